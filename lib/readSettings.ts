import * as pulumi from "@pulumi/pulumi";
import { parseSettings, PROJECT, Settings } from "./config";
import { readNetworkFile } from "./network";

/** The running stack's settings, from the config Pulumi hands the program (throws ConfigError). */
export function readSettings(): Settings {
    const all = pulumi.runtime.allConfig();
    const raw: Record<string, string> = {};
    for (const [key, value] of Object.entries(all)) {
        if (key.startsWith(`${PROJECT}:`)) raw[key.slice(PROJECT.length + 1)] = value;
    }
    return parseSettings(pulumi.getStack(), raw, all["aws:region"], readNetworkFile());
}
