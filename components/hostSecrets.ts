import { createHmac } from "node:crypto";
import * as pulumi from "@pulumi/pulumi";
import { RandomBytes } from "@pulumi/random/randomBytes";

/**
 * The key of the deploy triggers' HMAC, as long as SHA-256's output. A plain hash of a secret would
 * let anyone who reads the state or a preview test guesses against it (a short password falls to a
 * dictionary); an HMAC under a random key the stack keeps secret tells nothing without that key.
 */
const TRIGGER_KEY_BYTES = 32;

export interface HostSecretsArgs {
    /** The hosts that get each secret, by secret name. */
    readonly recipients: Readonly<Record<string, readonly string[]>>;
    /** Each secret's value (a Pulumi secret), by secret name. */
    readonly values: Readonly<Record<string, pulumi.Input<string>>>;
}

/** What one host's deploy needs of the secrets. */
export interface HostSecretBundle {
    /** The names of the host's secrets, sorted. */
    readonly names: string[];
    /** NIXOS_EC2_SECRETS for deploy/nixos-deploy.sh: a line `<name> <value in base64>` per secret (secret). */
    readonly payload: pulumi.Output<string>;
    /** HMAC-SHA256 of the payload under the stack's trigger key: changes with any of the host's secrets (secret). */
    readonly trigger: pulumi.Output<string>;
}

/** The payload of secrets `values` (name to value), sorted by name; base64 keeps any byte on one line. */
export function encodeSecrets(values: Readonly<Record<string, string>>): string {
    return Object.keys(values)
        .sort()
        .map((name) => `${name} ${Buffer.from(values[name], "utf8").toString("base64")}`)
        .join("\n");
}

/** The trigger of a payload: HMAC-SHA256 under `keyHex`, in hex. */
export function secretsTrigger(keyHex: string, payload: string): string {
    return createHmac("sha256", Buffer.from(keyHex, "hex")).update(payload, "utf8").digest("hex");
}

/**
 * The host secrets of the stack, arranged per host: what each deploy hands over, and a trigger that
 * re-deploys exactly the hosts whose secrets changed. Created only when the stack has secrets.
 */
export class HostSecrets extends pulumi.ComponentResource {
    /** By host name, for the hosts that get at least one secret. */
    public readonly hosts: Readonly<Record<string, HostSecretBundle>>;

    constructor(name: string, args: HostSecretsArgs, opts?: pulumi.ComponentResourceOptions) {
        super("nixos-ec2:index:HostSecrets", name, args, opts);

        // The provider marks hex secret in real runs; wrapping also holds under the mock runtime.
        const key = pulumi.secret(new RandomBytes(`${name}-trigger-key`, { length: TRIGGER_KEY_BYTES }, { parent: this }).hex);

        const hostNames = [...new Set(Object.values(args.recipients).flat())].sort();
        const hosts: Record<string, HostSecretBundle> = {};
        for (const host of hostNames) {
            const names = Object.keys(args.recipients)
                .filter((secret) => args.recipients[secret].includes(host))
                .sort();
            const values = pulumi.all(Object.fromEntries(names.map((secret) => [secret, args.values[secret]])));
            const payload = pulumi.secret(values.apply((v) => encodeSecrets(v as Record<string, string>)));
            hosts[host] = { names, payload, trigger: pulumi.secret(pulumi.all([key, payload]).apply(([k, p]) => secretsTrigger(k, p))) };
        }
        this.hosts = hosts;

        this.registerOutputs({ recipients: args.recipients });
    }
}
