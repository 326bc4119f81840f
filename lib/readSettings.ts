import * as pulumi from "@pulumi/pulumi";
import { parseSettings, projectKeys, Settings } from "./config";
import { readNetworkFile } from "./network";

/** The running stack's settings, from the config Pulumi hands the program (throws ConfigError). */
export function readSettings(): Settings {
    const all = pulumi.runtime.allConfig();
    return parseSettings(pulumi.getStack(), projectKeys(all), all["aws:region"], readNetworkFile());
}
