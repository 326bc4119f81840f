/**
 * Host secrets in the stack's configuration: `nixos-ec2:hostSecrets` says which hosts get which
 * secret, and each secret's value is its own Pulumi secret, `nixos-ec2:secret.<name>`, set with
 * `pulumi config set --secret`. One key per secret, not one object holding them all: the program
 * then sees for each value whether it was set as a secret (Pulumi marks secrecy per key; an object
 * with one `secure:` leaf is secret as a whole), so a value left in plain text in a stack file is
 * refused by name; and each secret is set, rotated and removed on its own (`pulumi config rm`).
 *
 * The rules here never quote a secret's value, only its key and, for a size, its length.
 */
import { z } from "zod";
import { Bad, cut, show } from "./configSchema";

/**
 * A secret's name: its file in /var/lib/nixos-ec2/secrets, its systemd credential ID and a Nix
 * attribute name that needs no quoting. deploy/nixos-deploy.sh and deploy/remote-switch.sh hold
 * the same pattern; a test keeps the three equal.
 */
export const SECRET_NAME_PATTERN = "^[A-Za-z][A-Za-z0-9_-]{0,62}$";
const SECRET_NAME = new RegExp(SECRET_NAME_PATTERN);

/** `nixos-ec2:secret.<name>` holds the value of the secret <name>. */
export const SECRET_KEY_PREFIX = "secret.";

/**
 * A host's secrets reach its deploy base64-encoded in one environment variable, and Linux caps one
 * environment string at 128 KiB (MAX_ARG_STRLEN, include/uapi/linux/binfmts.h); base64 adds a third.
 */
export const MAX_SECRET_BYTES_PER_HOST = 64 * 1024;

/** "all" (every host of the stack) or a list of its hosts. */
const ALL_HOSTS = "all";

export const SECRET_NAMES_ALLOWED = `names matching ${SECRET_NAME_PATTERN} (letters, digits, _ and -)`;

/** The rules of `hostSecrets`' value on its own (lib/config.ts declares the key). */
export function hostSecretsSchema(bad: Bad) {
    return z.record(z.string().regex(SECRET_NAME), z.union([z.literal(ALL_HOSTS), z.array(z.string()).min(1, bad("is an empty list, which names no host"))], bad(`is neither "${ALL_HOSTS}" nor a list of host names`)), {
        error: (issue) => (issue.code === "invalid_key" ? `secret name ${show(issue.input)} is not allowed; allowed: ${SECRET_NAMES_ALLOWED}` : bad("is not an object").error),
    });
}

export type HostSecretsValue = z.output<ReturnType<typeof hostSecretsSchema>>;

/** One secret: its name, the key of its value, and the hosts that get it. */
export interface SecretSettings {
    readonly name: string;
    /** `nixos-ec2:secret.<name>`. */
    readonly configKey: string;
    /** Host names, in the stack's order. */
    readonly hosts: string[];
}

/** The secrets, sorted by name, each with the hosts it goes to. */
export function secretsOf(project: string, hostSecrets: HostSecretsValue, hostNames: readonly string[]): SecretSettings[] {
    return Object.keys(hostSecrets)
        .sort()
        .map((name) => {
            const to = hostSecrets[name];
            return { name, configKey: `${project}:${SECRET_KEY_PREFIX}${name}`, hosts: to === ALL_HOSTS ? [...hostNames] : hostNames.filter((h) => to.includes(h)) };
        });
}

export interface SecretRuleInput {
    readonly project: string;
    readonly stack: string;
    readonly hostSecrets: HostSecretsValue;
    readonly hostNames: readonly string[];
    /** The config the program gets, full keys to strings. */
    readonly config: Readonly<Record<string, string>>;
    /** Keys of `config` that Pulumi holds as secrets. */
    readonly secretKeys: readonly string[];
}

/** Every problem of the secrets' configuration: hosts, values set or missing, plain text, sizes. */
export function secretProblems(input: SecretRuleInput): string[] {
    const { project, stack, hostSecrets, hostNames, config, secretKeys } = input;
    const key = (k: string) => `${project}:${k}`;
    const problems: string[] = [];
    const setValues = Object.keys(config).filter((k) => k.startsWith(key(SECRET_KEY_PREFIX)) && config[k] !== "");

    for (const [name, to] of Object.entries(hostSecrets)) {
        if (to !== ALL_HOSTS) {
            to.forEach((host, i) => {
                if (!hostNames.includes(host)) {
                    problems.push(
                        `${key("hostSecrets")}.${name}[${i}]: ${show(host)} is not a host of stack "${stack}"; allowed: "${ALL_HOSTS}" or hosts of the stack (${hostNames.join(", ")})`,
                    );
                } else if (to.indexOf(host) !== i) {
                    problems.push(`${key("hostSecrets")}.${name}[${i}]: lists ${show(host)} a second time; allowed: each host once`);
                }
            });
        }
        const valueKey = key(`${SECRET_KEY_PREFIX}${name}`);
        if (!setValues.includes(valueKey)) {
            problems.push(
                `${key("hostSecrets")}.${name}: names the secret ${name}, but ${valueKey} is not set; set it with ` +
                    `\`pulumi config set --secret ${valueKey}\` (the value on standard input or at the prompt), or remove ${name} from ${key("hostSecrets")}`,
            );
        }
    }

    for (const valueKey of setValues) {
        const name = valueKey.slice(key(SECRET_KEY_PREFIX).length);
        if (!SECRET_NAME.test(name)) {
            problems.push(`${cut(valueKey, 100)}: ${show(name)} is not a secret name; allowed: ${SECRET_NAMES_ALLOWED}`);
            continue;
        }
        // Own keys only: "constructor" and friends are in every object's prototype.
        if (!Object.hasOwn(hostSecrets, name)) {
            problems.push(
                `${valueKey}: is set, but ${key("hostSecrets")} names no secret ${name}, so no host would get it; ` +
                    `add "${name}": "${ALL_HOSTS}" (or a list of hosts) to ${key("hostSecrets")}, or remove it with \`pulumi config rm ${valueKey}\``,
            );
        }
        if (!secretKeys.includes(valueKey)) {
            problems.push(
                `${valueKey}: is set in plain text (without --secret), so Pulumi.${stack}.yaml holds its value unencrypted; ` +
                    `set it again with \`pulumi config set --secret ${valueKey}\`, and change the secret itself if that file was ever committed`,
            );
        }
    }
    if (key("secret") in config) {
        problems.push(`${key("secret")}: is an object (set with --path?); allowed: each secret as its own key, ${key(`${SECRET_KEY_PREFIX}<name>`)}, set without --path`);
    }

    for (const host of hostNames) {
        const bytes = secretsOf(project, hostSecrets, hostNames)
            .filter((s) => s.hosts.includes(host))
            .reduce((sum, s) => sum + Buffer.byteLength(config[s.configKey] ?? "", "utf8"), 0);
        if (bytes > MAX_SECRET_BYTES_PER_HOST) {
            problems.push(
                `${key("hostSecrets")}: the secrets of host ${host} take ${Math.ceil(bytes / 1024)} KiB; allowed: at most ${MAX_SECRET_BYTES_PER_HOST / 1024} KiB a host ` +
                    `(they reach its deploy in one environment variable); keep large files in the flake with sops-nix instead`,
            );
        }
    }
    return problems;
}
