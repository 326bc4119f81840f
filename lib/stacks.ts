/**
 * Reads a stack's configuration the way the Pulumi CLI would hand it to the program, without
 * the CLI: the project schema defaults of Pulumi.yaml, then Pulumi.<stack>.yaml, then overrides.
 * Used by the offline preview and the tests; `pulumi up` gets the same values from the CLI.
 */
import { existsSync, readdirSync, readFileSync } from "node:fs";
import * as path from "node:path";
import * as yaml from "js-yaml";
import { parseSettings, projectKeys, qualifyKey, Settings } from "./config";
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

    const project = yaml.load(readFileSync(path.join(dir, "Pulumi.yaml"), "utf8")) as {
        config?: Record<string, { default?: unknown } | unknown>;
    };
    const config: StackConfig = {};
    for (const [key, declaration] of Object.entries(project.config ?? {})) {
        if (declaration !== null && typeof declaration === "object" && "default" in declaration) {
            config[qualifyKey(key)] = asConfigString((declaration as { default: unknown }).default);
        }
    }
    const stackYaml = yaml.load(readFileSync(stackFile, "utf8")) as { config?: Record<string, unknown> } | null;
    for (const [key, v] of Object.entries(stackYaml?.config ?? {})) config[qualifyKey(key)] = asConfigString(v);
    for (const [key, v] of Object.entries(overrides)) config[qualifyKey(key)] = v;
    return config;
}

/** The validated settings of `stack`, as the program would see them (throws ConfigError). */
export function loadSettings(stack: string, overrides: Record<string, string> = {}, dir: string = PROJECT_DIR): Settings {
    const config = loadStackConfig(stack, overrides, dir);
    return parseSettings(stack, projectKeys(config), config["aws:region"], readNetworkFile(path.join(dir, "nix", "network.json")));
}
