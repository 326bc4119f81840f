/**
 * Reads a stack's configuration the way the Pulumi CLI would hand it to the program, without
 * the CLI: the project schema defaults of Pulumi.yaml, then Pulumi.<stack>.yaml, then overrides.
 * Used by the offline preview and the tests; `pulumi up` gets the same values from the CLI.
 */
import { existsSync, readdirSync, readFileSync } from "node:fs";
import * as path from "node:path";
import * as yaml from "js-yaml";
import { parseSettings, qualifyKey, Settings } from "./config";
import { SECRET_KEY_PREFIX } from "./hostSecrets";
import { readNetworkFile } from "./network";

export const PROJECT_DIR = path.join(__dirname, "..");

/** Full config keys (`nixos-ec2:hosts`, `aws:region`) to the strings a program receives. */
export type StackConfig = Record<string, string>;

/** The stack names that have a Pulumi.<stack>.yaml in the project. */
export function listStacks(dir: string = PROJECT_DIR): string[] {
    return readdirSync(dir)
        .map((f) => /^Pulumi\.(.+)\.yaml$/.exec(f)?.[1])
        .filter((s): s is string => s !== undefined)
        .sort();
}

/** Config values reach a program as strings; arrays and objects as JSON. */
function asConfigString(v: unknown): string {
    return typeof v === "string" ? v : JSON.stringify(v);
}

/** A project or stack file that is not valid YAML: the file and line, without a stack trace. */
export class StackFileError extends Error {
    constructor(message: string) {
        super(message);
        this.name = "StackFileError";
    }
}

function readYaml(file: string): unknown {
    try {
        return yaml.load(readFileSync(file, "utf8"), { filename: path.basename(file) });
    } catch (e) {
        if (!(e instanceof yaml.YAMLException)) throw e;
        const at = e.mark ? `:${e.mark.line + 1}:${e.mark.column + 1}` : "";
        throw new StackFileError(`${path.basename(file)}${at}: not valid YAML: ${e.reason}`);
    }
}

export class UnknownStackError extends Error {
    constructor(stack: string, known: string[]) {
        super(`unknown stack ${JSON.stringify(stack)}: there is no Pulumi.${stack}.yaml; the stacks are ${known.join(", ")}`);
        this.name = "UnknownStackError";
    }
}

/** A stack file's value set with `pulumi config set --secret`: `{secure: <ciphertext>}`. */
function isSecure(v: unknown): boolean {
    return v !== null && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length === 1 && typeof (v as { secure?: unknown }).secure === "string";
}

/** Whether a value holds a `secure:` leaf anywhere, as `pulumi config set --secret --path` leaves one. */
function holdsSecure(v: unknown): boolean {
    if (isSecure(v)) return true;
    if (v !== null && typeof v === "object") return Object.values(v).some(holdsSecure);
    return false;
}

/** What stands for a secret value offline: no passphrase or KMS key decrypts it here. */
export function offlineSecretPlaceholder(stack: string, key: string): string {
    return `(secret ${key} of Pulumi.${stack}.yaml, not decrypted offline)`;
}

/** A stack's configuration, and which of its keys hold secrets. */
export interface LoadedStack {
    readonly config: StackConfig;
    /** Keys the CLI would hand the program as secrets (PULUMI_CONFIG_SECRET_KEYS). */
    readonly secretKeys: string[];
}

/**
 * The configuration of `stack`. `overrides` are `key=value` pairs as `--config` takes them
 * (a bare key is in the project namespace); their values are taken as written. A value the stack
 * file holds as a secret cannot be decrypted here: it becomes a placeholder, marked secret as the
 * CLI marks it; so does an override of a `secret.<name>` key, which stands for
 * `pulumi config set --secret`.
 */
export function loadStack(stack: string, overrides: Record<string, string> = {}, dir: string = PROJECT_DIR): LoadedStack {
    const stackFile = path.join(dir, `Pulumi.${stack}.yaml`);
    if (!existsSync(stackFile)) throw new UnknownStackError(stack, listStacks(dir));

    const project = readYaml(path.join(dir, "Pulumi.yaml")) as {
        config?: Record<string, { default?: unknown } | unknown>;
    };
    const config: StackConfig = {};
    for (const [key, declaration] of Object.entries(project.config ?? {})) {
        if (declaration !== null && typeof declaration === "object" && "default" in declaration) {
            config[qualifyKey(key)] = asConfigString((declaration as { default: unknown }).default);
        }
    }
    const secretKeys = new Set<string>();
    const stackYaml = readYaml(stackFile) as { config?: Record<string, unknown> } | null;
    for (const [key, v] of Object.entries(stackYaml?.config ?? {})) {
        const full = qualifyKey(key);
        if (holdsSecure(v)) {
            config[full] = offlineSecretPlaceholder(stack, full);
            secretKeys.add(full);
        } else {
            config[full] = asConfigString(v);
            secretKeys.delete(full);
        }
    }
    for (const [key, v] of Object.entries(overrides)) {
        const full = qualifyKey(key);
        config[full] = v;
        if (full.startsWith(qualifyKey(SECRET_KEY_PREFIX))) secretKeys.add(full);
        else secretKeys.delete(full);
    }
    return { config, secretKeys: [...secretKeys].sort() };
}

/** The configuration of `stack` (see loadStack), without the list of secret keys. */
export function loadStackConfig(stack: string, overrides: Record<string, string> = {}, dir: string = PROJECT_DIR): StackConfig {
    return loadStack(stack, overrides, dir).config;
}

/** The validated settings of `stack`, as the program would see them (throws ConfigError or StackFileError). */
export function loadSettings(stack: string, overrides: Record<string, string> = {}, dir: string = PROJECT_DIR): Settings {
    const { config, secretKeys } = loadStack(stack, overrides, dir);
    return parseSettings(stack, config, readNetworkFile(path.join(dir, "nix", "network.json")), secretKeys);
}
