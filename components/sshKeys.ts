import * as pulumi from "@pulumi/pulumi";
import { KeyPair } from "@pulumi/aws/ec2/keyPair";
import { PrivateKey } from "@pulumi/tls/privateKey";
import { ageRecipientOf } from "../lib/age";

/** ED25519 for both: short keys, no parameter choices, supported by EC2 key pairs and OpenSSH. */
const KEY_ALGORITHM = "ED25519";

export interface SshKeysArgs {
    /** Hosts that each get their own SSH host key. */
    readonly hostNames: string[];
    /** Tags of the EC2 key pair. */
    readonly tags: pulumi.Input<Record<string, pulumi.Input<string>>>;
}

export interface HostKey {
    /** `ssh-ed25519 AAAA...`, the only host key a deploy trusts for this host. */
    readonly publicKey: pulumi.Output<string>;
    /** OpenSSH private key, a secret; reaches the host through user-data only. */
    readonly privateKey: pulumi.Output<string>;
    /**
     * `age1...`, the age recipient sops-nix decrypts for on the host with this key
     * (`sops.age.sshKeyPaths`), derived as ssh-to-age derives it (lib/age.ts). Public.
     */
    readonly ageRecipient: pulumi.Output<string>;
}

/** The admin key pair (EC2 installs it for root) and one pre-generated host key per host. */
export class SshKeys extends pulumi.ComponentResource {
    public readonly adminPublicKey: pulumi.Output<string>;
    public readonly adminPrivateKey: pulumi.Output<string>;
    public readonly keyPairName: pulumi.Output<string>;
    public readonly hostKeys: Readonly<Record<string, HostKey>>;

    constructor(name: string, args: SshKeysArgs, opts?: pulumi.ComponentResourceOptions) {
        super("nixos-ec2:index:SshKeys", name, args, opts);

        const admin = new PrivateKey(`${name}-admin`, { algorithm: KEY_ALGORITHM }, { parent: this });
        this.adminPublicKey = admin.publicKeyOpenssh.apply((k) => k.trim());
        // tls marks the private halves secret in real runs; wrapping also holds under the mock runtime.
        this.adminPrivateKey = pulumi.secret(admin.privateKeyOpenssh);

        const keyPair = new KeyPair(`${name}-admin`, { publicKey: this.adminPublicKey, tags: args.tags }, { parent: this });
        this.keyPairName = keyPair.keyName;

        const hostKeys: Record<string, HostKey> = {};
        for (const host of args.hostNames) {
            const key = new PrivateKey(`${name}-host-${host}`, { algorithm: KEY_ALGORITHM }, { parent: this });
            const privateKey = pulumi.secret(key.privateKeyOpenssh);
            const publicKey = key.publicKeyOpenssh.apply((k) => k.trim());
            hostKeys[host] = { publicKey, privateKey, ageRecipient: publicKey.apply(ageRecipientOf) };
        }
        this.hostKeys = hostKeys;

        this.registerOutputs({
            adminPublicKey: this.adminPublicKey,
            adminPrivateKey: this.adminPrivateKey,
            keyPairName: this.keyPairName,
        });
    }
}
