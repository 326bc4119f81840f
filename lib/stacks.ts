/**
 * Reads a stack's configuration the way the Pulumi CLI would hand it to the program, without
 * the CLI: the project schema defaults of Pulumi.yaml, then Pulumi.<stack>.yaml, then overrides.
 * Used by the offline preview and the tests; `pulumi up` gets the same values from the CLI.
 */
import { existsSync, readdirSync, readFileSync } from "node:fs";
import * as path from "node:path";
import * as yaml from "js-yaml";
import { parseSettings, qualifyKey, Settings } from "./config";
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

/**
 * The configuration of `stack`. `overrides` are `key=value` pairs as `--config` takes them
 * (a bare key is in the project namespace); their values are taken as written.
 */
export function loadStackConfig(stack: string, overrides: Record<string, string> = {}, dir: string = PROJECT_DIR): StackConfig {
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
    const stackYaml = readYaml(stackFile) as { config?: Record<string, unknown> } | null;
    for (const [key, v] of Object.entries(stackYaml?.config ?? {})) config[qualifyKey(key)] = asConfigString(v);
    for (const [key, v] of Object.entries(overrides)) config[qualifyKey(key)] = v;
    return config;
}

/** The validated settings of `stack`, as the program would see them (throws ConfigError or StackFileError). */
export function loadSettings(stack: string, overrides: Record<string, string> = {}, dir: string = PROJECT_DIR): Settings {
    const config = loadStackConfig(stack, overrides, dir);
    return parseSettings(stack, config, readNetworkFile(path.join(dir, "nix", "network.json")));
}
