import * as pulumi from "@pulumi/pulumi";
import { parseSettings, Settings } from "./config";
import { readNetworkFile } from "./network";

/** The running stack's settings, from the config Pulumi hands the program (throws ConfigError). */
export function readSettings(): Settings {
    const settings = parseSettings(pulumi.getStack(), pulumi.runtime.allConfig(), readNetworkFile());
    for (const warning of settings.warnings) void pulumi.log.warn(warning);
    return settings;
}
