"use strict";
/**
 * Preloaded (`node --require ./tools/benchProbe.js ...`) into a process the benchmark measures.
 * When NIXOS_EC2_PROBE names a file, it writes there, as the process exits:
 *   { "maxRssKiB": peak resident memory, "sdkModules": files loaded from node_modules/@pulumi }
 * The first is the peak RSS the benchmark reports (no GNU time needed); the second is what the
 * floor process loads, so that the floor is always exactly the SDK the program really loads.
 * Without NIXOS_EC2_PROBE it does nothing. Plain JavaScript: it must not need the TS loader.
 */
const fs = require("node:fs");
const path = require("node:path");

const out = process.env.NIXOS_EC2_PROBE;
if (out) {
    const sdkDir = `${path.sep}node_modules${path.sep}@pulumi${path.sep}`;
    process.on("exit", () => {
        const sdkModules = Object.keys(require.cache)
            .filter((file) => file.includes(sdkDir))
            .sort();
        fs.writeFileSync(out, JSON.stringify({ maxRssKiB: process.resourceUsage().maxRSS, sdkModules }));
    });
}
