/**
 * lib/age.ts, lib/bech32.ts and lib/opensshKey.ts: a host's age recipient and identity from its SSH
 * ED25519 key, as ssh-to-age derives them. Checked against ssh-to-age's own published test key and
 * outputs, its Bech32 test vectors, OpenSSH's ssh-keygen, and Debian's age, which encrypts to the
 * derived recipient and decrypts with the derived identity.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import * as path from "node:path";
import { ageIdentityOf, ageRecipientOf, isAgeRecipient } from "../lib/age";
import { bech32Decode, bech32Encode } from "../lib/bech32";
import { fakeKeyPair } from "../lib/offline";
import { formatEd25519PublicKey, parseEd25519PrivateKey, parseEd25519PublicKey } from "../lib/opensshKey";
import { tempDir } from "./support/tempDir";
import { describeWithTools } from "./support/tools";

const SSH_TO_AGE = path.join(__dirname, "fixtures", "ssh-to-age");
/** What ssh-to-age's README shows for its test key (test/fixtures/ssh-to-age/README.md). */
const SSH_TO_AGE_IDENTITY = "AGE-SECRET-KEY-1K3VN4N03PTHJWSJSCCMQCN33RY5FSKQPJ4KRRTG3JMQUYE0TUSEQEDH6V8";
const SSH_TO_AGE_RECIPIENT = "age17044m9wgakla6pzftf4srtl3h5mcsr85jysgt5fg23zpnta8sfdqhzn452";

/** Mic92/ssh-to-age bech32/bech32_test.go (BIP 173's vectors among them). */
const VALID = [
    "A12UEL5L",
    "a12uel5l",
    "an83characterlonghumanreadablepartthatcontainsthenumber1andtheexcludedcharactersbio1tt5tgs",
    "abcdef1qpzry9x8gf2tvdw0s3jn54khce6mua7lmqqqxw",
    "11qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqc8247j",
    "split1checkupstagehandshakeupstreamerranterredcaperred2y9e3w",
];
const INVALID = [
    "split1checkupstagehandshakeupstreamerranterredcaperred2y9e2w",
    "s lit1checkupstagehandshakeupstreamerranterredcaperredp8hs2p",
    "split1cheo2y9e2w",
    "split1a2y9w",
    "1checkupstagehandshakeupstreamerranterredcaperred2y9e3w",
    `spl${String.fromCharCode(127)}t1checkupstagehandshakeupstreamerranterredcaperred2y9e3w`,
    "11qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqsqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqc8247j",
    "an84characterslonghumanreadablepartthatcontainsthenumber1andtheexcludedcharactersbio1569pvx",
    "pzry9x0s0muk",
    "1pzry9x0s0muk",
    "x1b4n0q5v",
    "li1dgmt3",
    "de1lg7wt\xff",
    "A1G7SGD8",
    "10a06t8",
    "1qzzfhee",
];

describe("bech32 (ssh-to-age's test vectors)", () => {
    it.each(VALID)("decodes %s and encodes it back; a flipped character is caught", (text) => {
        const { hrp, data } = bech32Decode(text);
        const upper = text === text.toUpperCase();
        expect(bech32Encode(upper ? hrp.toUpperCase() : hrp, data)).toBe(text);
        const at = text.lastIndexOf("1");
        const flipped = text.slice(0, at + 1) + String.fromCharCode(text.charCodeAt(at + 1) ^ 1) + text.slice(at + 2);
        expect(() => bech32Decode(flipped)).toThrow();
    });

    it.each(INVALID.map((t) => [JSON.stringify(t), t]))("refuses %s", (_shown, text) => {
        expect(() => bech32Decode(text)).toThrow(/bech32/);
    });
});

describe("the age keys of an SSH ED25519 key", () => {
    const privateKey = readFileSync(path.join(SSH_TO_AGE, "id_ed25519"), "utf8");
    const publicKey = readFileSync(path.join(SSH_TO_AGE, "id_ed25519.pub"), "utf8");

    it("are what ssh-to-age's README shows for its test key: the identity and the recipient", () => {
        expect(ageIdentityOf(privateKey)).toBe(SSH_TO_AGE_IDENTITY);
        // From the public key alone, as `ssh-keyscan <host> | ssh-to-age` does.
        expect(ageRecipientOf(publicKey)).toBe(SSH_TO_AGE_RECIPIENT);
        expect(isAgeRecipient(SSH_TO_AGE_RECIPIENT)).toBe(true);
    });

    it("come from the key whose public half the .pub file holds", () => {
        const { publicKey: half } = parseEd25519PrivateKey(privateKey);
        expect(half.equals(parseEd25519PublicKey(publicKey))).toBe(true);
        expect(formatEd25519PublicKey(half)).toBe(publicKey.split(" ").slice(0, 2).join(" "));
    });

    it("refuse other keys, encrypted keys and mismatched halves, without quoting the key", () => {
        expect(() => ageIdentityOf("not a key")).toThrow("not an OpenSSH private key");
        expect(() => ageRecipientOf("not a key")).toThrow("not an ssh-ed25519 public key line");
        expect(() => ageRecipientOf("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ")).toThrow("not an ssh-ed25519 public key line");
        const tampered = privateKey.replace(/^(b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\nQyNTUxOQAAACDh)./m, "$1A");
        expect(tampered).not.toBe(privateKey);
        expect(() => ageIdentityOf(tampered)).toThrow(/OpenSSH key/);
        for (const text of ["not a key", tampered]) {
            try {
                ageIdentityOf(text);
            } catch (e) {
                expect(String(e)).not.toContain("b3BlbnNz");
            }
        }
    });

    it("tells an age recipient from other text", () => {
        expect(isAgeRecipient(SSH_TO_AGE_RECIPIENT.toUpperCase())).toBe(false);
        expect(isAgeRecipient(SSH_TO_AGE_RECIPIENT.slice(0, -1) + "q")).toBe(false);
        expect(isAgeRecipient(SSH_TO_AGE_IDENTITY)).toBe(false);
        expect(isAgeRecipient("ssh-ed25519 AAAA")).toBe(false);
    });
});

describeWithTools(["ssh-keygen"])("OpenSSH's formats (ssh-keygen)", () => {
    it("reads a key ssh-keygen made, and writes keys ssh-keygen reads (the offline stand-ins)", () => {
        const dir = tempDir("openssh-key-");
        const file = path.join(dir, "key");
        execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", file]);
        const parsed = parseEd25519PrivateKey(readFileSync(file, "utf8"));
        expect(formatEd25519PublicKey(parsed.publicKey)).toBe(readFileSync(`${file}.pub`, "utf8").split(" ").slice(0, 2).join(" "));

        const fake = fakeKeyPair("ssh-host-web");
        writeFileSync(file, fake.privateKey, { mode: 0o600 });
        expect(execFileSync("ssh-keygen", ["-y", "-f", file], { encoding: "utf8" }).trim()).toBe(fake.publicKey.trim());
    });

    it("refuses a key encrypted with a passphrase", () => {
        const dir = tempDir("openssh-key-");
        const file = path.join(dir, "key");
        execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "a passphrase", "-f", file]);
        expect(() => ageIdentityOf(readFileSync(file, "utf8"))).toThrow("encrypted with a passphrase");
    });
});

describeWithTools(["ssh-keygen", "age", "age-keygen"])("the derived keys with Debian's age", () => {
    it("age encrypts to the recipient of a fresh host key, and decrypts with the identity of the same key", () => {
        const dir = tempDir("age-");
        const file = path.join(dir, "ssh_host_ed25519_key");
        execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", file]);
        const sshKey = readFileSync(file, "utf8");
        const recipient = ageRecipientOf(readFileSync(`${file}.pub`, "utf8"));
        const identityFile = path.join(dir, "identity");
        writeFileSync(identityFile, `${ageIdentityOf(sshKey)}\n`, { mode: 0o600 });

        // age-keygen -y prints the recipient of an identity: the same as derived from the SSH key.
        expect(execFileSync("age-keygen", ["-y", identityFile], { encoding: "utf8" }).trim()).toBe(recipient);

        const plaintext = "a secret for sops-nix\n";
        const encrypted = execFileSync("age", ["--encrypt", "--armor", "--recipient", recipient], { input: plaintext });
        expect(encrypted.toString()).toMatch(/^-----BEGIN AGE ENCRYPTED FILE-----/);
        expect(encrypted.toString()).not.toContain(plaintext.trim());
        expect(execFileSync("age", ["--decrypt", "--identity", identityFile], { input: encrypted, encoding: "utf8" })).toBe(plaintext);

        // Another host's identity cannot.
        const other = path.join(dir, "other_key");
        execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", other]);
        const otherIdentity = path.join(dir, "other_identity");
        writeFileSync(otherIdentity, `${ageIdentityOf(readFileSync(other, "utf8"))}\n`, { mode: 0o600 });
        const refused = spawnSync("age", ["--decrypt", "--identity", otherIdentity], { input: encrypted, encoding: "utf8" });
        expect(refused.status).not.toBe(0);
        expect(refused.stderr).toMatch(/no identity matched/);
    });

    it("age accepts ssh-to-age's own recipient and identity of its test key as a pair", () => {
        const dir = tempDir("age-");
        const identityFile = path.join(dir, "identity");
        writeFileSync(identityFile, `${SSH_TO_AGE_IDENTITY}\n`, { mode: 0o600 });
        expect(execFileSync("age-keygen", ["-y", identityFile], { encoding: "utf8" }).trim()).toBe(SSH_TO_AGE_RECIPIENT);
    });
});
