/**
 * A host's age keys, derived from its SSH ED25519 host key as ssh-to-age derives them
 * (Mic92/ssh-to-age convert.go), which is what sops-nix does on the host with
 * `sops.age.sshKeyPaths`:
 *
 *   - the identity (`AGE-SECRET-KEY-1...`) is the X25519 scalar sha512(seed)[:32], the scalar
 *     Ed25519 itself derives from the seed (RFC 8032), in Bech32 (ed25519PrivateKeyToCurve25519);
 *   - the recipient (`age1...`) is the Montgomery form of the Ed25519 public point
 *     (ed25519PublicKeyToCurve25519, filippo.io/edwards25519 BytesMontgomery). The same point is
 *     X25519(scalar, 9), so it is computed here from the scalar with Node's X25519 (OpenSSL): the
 *     program has each host's private key, which it generated, and Node has no Edwards-to-Montgomery
 *     map. Both clamp the scalar the same way. test/age.test.ts checks the result against the
 *     recipient ssh-to-age computes from the public key of its own test key.
 *
 * No curve arithmetic is written here; the key's two halves are checked to match (Node's Ed25519).
 */
import { createHash, createPrivateKey, createPublicKey } from "node:crypto";
import { bech32Decode, bech32Encode } from "./bech32";
import { parseEd25519PrivateKey } from "./opensshKey";

/** RFC 8410 PKCS#8 prefix of an X25519 private key (the 32-byte scalar follows). */
const X25519_PKCS8_PREFIX = Buffer.from("302e020100300506032b656e04220420", "hex");
const RECIPIENT_PREFIX = "age";
const IDENTITY_PREFIX = "AGE-SECRET-KEY-";

function x25519Scalar(opensshPrivateKey: string): Buffer {
    const { seed } = parseEd25519PrivateKey(opensshPrivateKey);
    return createHash("sha512").update(seed).digest().subarray(0, 32);
}

/** The X25519 public key of a scalar, by Node (OpenSSL). */
export function x25519PublicKeyOf(scalar: Buffer): Buffer {
    const key = createPrivateKey({ key: Buffer.concat([X25519_PKCS8_PREFIX, scalar]), format: "der", type: "pkcs8" });
    return createPublicKey(key).export({ format: "der", type: "spki" }).subarray(-32);
}

/** `age1...` of an X25519 public key. */
export function formatAgeRecipient(publicKey: Buffer): string {
    return bech32Encode(RECIPIENT_PREFIX, publicKey);
}

/** The age recipient of an SSH ED25519 private key (what `ssh-to-age` prints for its public key). */
export function ageRecipientOf(opensshPrivateKey: string): string {
    return formatAgeRecipient(x25519PublicKeyOf(x25519Scalar(opensshPrivateKey)));
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
