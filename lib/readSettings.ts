import * as pulumi from "@pulumi/pulumi";
import { parseSettings, PROJECT, Settings } from "./config";
import { SECRET_KEY_PREFIX } from "./hostSecrets";
import { readNetworkFile } from "./network";

/**
 * Whether Pulumi holds a config key as a secret. The CLI hands the program the list in
 * PULUMI_CONFIG_SECRET_KEYS, and the SDK reads it in `isConfigSecret` (sdk/nodejs/runtime/config.ts),
 * which it exports without declaring (@internal); the mock runtime's setAllConfig fills the same list.
 */
function isConfigSecret(key: string): boolean {
    const read = (pulumi.runtime as unknown as { isConfigSecret?: (k: string) => boolean }).isConfigSecret;
    if (typeof read !== "function") throw new Error("@pulumi/pulumi no longer exports runtime.isConfigSecret, which tells a secret config value from a plain one");
    return read(key);
}

/** The running stack's settings, from the config Pulumi hands the program (throws ConfigError). */
export function readSettings(): Settings {
    const config = pulumi.runtime.allConfig();
    const secretKeys = Object.keys(config).filter(isConfigSecret);
    const settings = parseSettings(pulumi.getStack(), config, readNetworkFile(), secretKeys);
    for (const warning of settings.warnings) void pulumi.log.warn(warning);
    return settings;
}

/** Each host secret's value, by name: the Pulumi secret `nixos-ec2:secret.<name>`. */
export function readSecretValues(settings: Settings): Record<string, pulumi.Output<string>> {
    const config = new pulumi.Config(PROJECT);
    return Object.fromEntries(settings.secrets.map((s) => [s.name, config.requireSecret(`${SECRET_KEY_PREFIX}${s.name}`)]));
}
