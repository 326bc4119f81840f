/**
 * ED25519 keys in OpenSSH's formats: the `ssh-ed25519 AAAA...` public key line and the unencrypted
 * `openssh-key-v1` private key (OpenSSH PROTOCOL.key; `sshkey_private_to_blob2` in sshkey.c writes
 * it). tls.PrivateKey hands the program its keys in these formats. Only parsing and writing here;
 * the key arithmetic is Node's (OpenSSL).
 */
import { createPrivateKey, createPublicKey } from "node:crypto";

const KEY_TYPE = "ssh-ed25519";
const MAGIC = Buffer.from("openssh-key-v1\0", "latin1");
/** RFC 8410 PKCS#8 prefix of an Ed25519 private key (the 32-byte seed follows). */
const ED25519_PKCS8_PREFIX = Buffer.from("302e020100300506032b657004220420", "hex");

export interface Ed25519Key {
    /** The 32-byte private seed (RFC 8032). */
    readonly seed: Buffer;
    /** The 32-byte public key. */
    readonly publicKey: Buffer;
}

class Reader {
    private at = 0;
    constructor(private readonly buf: Buffer) {}
    uint32(): number {
        if (this.at + 4 > this.buf.length) throw new Error("OpenSSH key: truncated");
        const v = this.buf.readUInt32BE(this.at);
        this.at += 4;
        return v;
    }
    string(): Buffer {
        const n = this.uint32();
        if (this.at + n > this.buf.length) throw new Error("OpenSSH key: truncated");
        const v = this.buf.subarray(this.at, this.at + n);
        this.at += n;
        return v;
    }
}

function sshString(data: Buffer | string): Buffer {
    const body = typeof data === "string" ? Buffer.from(data, "utf8") : data;
    const length = Buffer.alloc(4);
    length.writeUInt32BE(body.length);
    return Buffer.concat([length, body]);
}

/** The wire form of an ED25519 public key: string "ssh-ed25519", string key. */
function publicBlob(publicKey: Buffer): Buffer {
    return Buffer.concat([sshString(KEY_TYPE), sshString(publicKey)]);
}

function publicKeyFromBlob(blob: Buffer): Buffer {
    const r = new Reader(blob);
    const type = r.string().toString("latin1");
    if (type !== KEY_TYPE) throw new Error(`OpenSSH key: ${JSON.stringify(type)} is not an ${KEY_TYPE} key`);
    const key = r.string();
    if (key.length !== 32) throw new Error(`OpenSSH key: an ${KEY_TYPE} key has 32 bytes, not ${key.length}`);
    return key;
}

/** The 32 bytes of an `ssh-ed25519 AAAA... [comment]` line. */
export function parseEd25519PublicKey(line: string): Buffer {
    const [type, blob] = line.trim().split(/\s+/);
    if (type !== KEY_TYPE || blob === undefined) throw new Error(`OpenSSH key: not an ${KEY_TYPE} public key line`);
    return publicKeyFromBlob(Buffer.from(blob, "base64"));
}

/** The Ed25519 public key of a 32-byte seed, computed by Node (OpenSSL). */
export function ed25519PublicKeyOfSeed(seed: Buffer): Buffer {
    if (seed.length !== 32) throw new Error("an Ed25519 seed has 32 bytes");
    const key = createPrivateKey({ key: Buffer.concat([ED25519_PKCS8_PREFIX, seed]), format: "der", type: "pkcs8" });
    return createPublicKey(key).export({ format: "der", type: "spki" }).subarray(-32);
}

/**
 * The seed and public key of an unencrypted OpenSSH ED25519 private key; throws (without quoting
 * the key) for any other kind, an encrypted key, or one whose halves do not match.
 */
export function parseEd25519PrivateKey(pem: string): Ed25519Key {
    const body = /-----BEGIN OPENSSH PRIVATE KEY-----([\s\S]*?)-----END OPENSSH PRIVATE KEY-----/.exec(pem)?.[1];
    if (body === undefined) throw new Error("OpenSSH key: not an OpenSSH private key");
    const blob = Buffer.from(body.replace(/\s+/g, ""), "base64");
    if (!blob.subarray(0, MAGIC.length).equals(MAGIC)) throw new Error("OpenSSH key: not in the openssh-key-v1 format");
    const r = new Reader(blob.subarray(MAGIC.length));
    const cipher = r.string().toString("latin1");
    const kdf = r.string().toString("latin1");
    r.string(); // kdf options
    if (cipher !== "none" || kdf !== "none") throw new Error("OpenSSH key: the key is encrypted with a passphrase");
    if (r.uint32() !== 1) throw new Error("OpenSSH key: expected exactly one key");
    const outerPublic = publicKeyFromBlob(r.string());
    const p = new Reader(r.string());
    if (p.uint32() !== p.uint32()) throw new Error("OpenSSH key: check values differ (a corrupt key)");
    if (p.string().toString("latin1") !== KEY_TYPE) throw new Error(`OpenSSH key: not an ${KEY_TYPE} key`);
    const publicKey = p.string();
    const secret = p.string();
    if (secret.length !== 64) throw new Error("OpenSSH key: an ED25519 private key has 64 bytes");
    const seed = Buffer.from(secret.subarray(0, 32));
    if (!publicKey.equals(outerPublic) || !publicKey.equals(secret.subarray(32)) || !ed25519PublicKeyOfSeed(seed).equals(publicKey)) {
        throw new Error("OpenSSH key: the private and public halves do not match");
    }
    return { seed, publicKey: Buffer.from(publicKey) };
}

/** `ssh-ed25519 AAAA...` of a 32-byte public key. */
export function formatEd25519PublicKey(publicKey: Buffer): string {
    return `${KEY_TYPE} ${publicBlob(publicKey).toString("base64")}`;
}

/**
 * An unencrypted OpenSSH private key for `seed`, laid out as `ssh-keygen` writes one (check values,
 * key, comment, then padding 1, 2, 3... to the cipher block size of 8), base64 in lines of 70.
 */
export function formatEd25519PrivateKey(seed: Buffer, check: number, comment = ""): string {
    const publicKey = ed25519PublicKeyOfSeed(seed);
    const checkBytes = Buffer.alloc(8);
    checkBytes.writeUInt32BE(check >>> 0, 0);
    checkBytes.writeUInt32BE(check >>> 0, 4);
    const section = Buffer.concat([checkBytes, sshString(KEY_TYPE), sshString(publicKey), sshString(Buffer.concat([seed, publicKey])), sshString(comment)]);
    const padding = Buffer.from(Array.from({ length: (8 - (section.length % 8)) % 8 }, (_, i) => i + 1));
    const blob = Buffer.concat([
        MAGIC,
        sshString("none"),
        sshString("none"),
        sshString(""),
        Buffer.from([0, 0, 0, 1]),
        sshString(publicBlob(publicKey)),
        sshString(Buffer.concat([section, padding])),
    ]);
    const lines = blob.toString("base64").match(/.{1,70}/g) ?? [];
    return `-----BEGIN OPENSSH PRIVATE KEY-----\n${lines.join("\n")}\n-----END OPENSSH PRIVATE KEY-----\n`;
}
