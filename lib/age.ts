/**
 * A host's age keys, derived from its SSH ED25519 host key as ssh-to-age derives them
 * (Mic92/ssh-to-age convert.go), which is what sops-nix does on the host with
 * `sops.age.sshKeyPaths`:
 *
 *   - the recipient (`age1...`) is the Montgomery form of the Ed25519 public point
 *     (ed25519PublicKeyToCurve25519, filippo.io/edwards25519 BytesMontgomery), here by
 *     @noble/curves' edwardsToMontgomeryPub, from the public key alone;
 *   - the identity (`AGE-SECRET-KEY-1...`) is sha512(seed)[:32], the scalar Ed25519 itself derives
 *     from the seed (RFC 8032), unclamped, as ed25519PrivateKeyToCurve25519 writes it (age clamps
 *     it when it uses it); the hash is Node's.
 *
 * No curve arithmetic is written here. test/age.test.ts checks both against ssh-to-age's own test
 * key and its README, and with Debian's age: encrypt to the recipient, decrypt with the identity.
 */
import { createHash } from "node:crypto";
import { edwardsToMontgomeryPub } from "@noble/curves/ed25519";
import { bech32Decode, bech32Encode } from "./bech32";
import { parseEd25519PrivateKey, parseEd25519PublicKey } from "./opensshKey";

const RECIPIENT_PREFIX = "age";
const IDENTITY_PREFIX = "AGE-SECRET-KEY-";

function x25519Scalar(opensshPrivateKey: string): Buffer {
    const { seed } = parseEd25519PrivateKey(opensshPrivateKey);
    return createHash("sha512").update(seed).digest().subarray(0, 32);
}

/** `age1...` of an X25519 public key. */
export function formatAgeRecipient(publicKey: Buffer): string {
    return bech32Encode(RECIPIENT_PREFIX, publicKey);
}

/** The age recipient of an SSH ED25519 public key, `ssh-ed25519 AAAA...` (what `ssh-to-age` prints). */
export function ageRecipientOf(opensshPublicKey: string): string {
    return formatAgeRecipient(Buffer.from(edwardsToMontgomeryPub(parseEd25519PublicKey(opensshPublicKey))));
}

/** The age identity of an SSH ED25519 private key (what `ssh-to-age -private-key` prints). A secret. */
export function ageIdentityOf(opensshPrivateKey: string): string {
    return bech32Encode(IDENTITY_PREFIX, x25519Scalar(opensshPrivateKey));
}

/** Whether `text` is an age X25519 recipient: `age1` and 32 bytes in Bech32. */
export function isAgeRecipient(text: string): boolean {
    try {
        const { hrp, data } = bech32Decode(text);
        return hrp === RECIPIENT_PREFIX && data.length === 32 && text === text.toLowerCase();
    } catch {
        return false;
    }
}
