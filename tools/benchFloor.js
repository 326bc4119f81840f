"use strict";
/**
 * The benchmark's floor: `node tools/benchFloor.js PROBE.json` loads exactly the SDK files that a
 * preview loaded (the `sdkModules` that tools/benchProbe.js recorded from it) and exits. A Pulumi
 * TypeScript program cannot start faster than this; the benchmark reports the preview as a ratio
 * to it. Plain JavaScript, without the TS loader: the loader is part of what is measured.
 */
const fs = require("node:fs");

const { sdkModules } = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
if (!Array.isArray(sdkModules) || sdkModules.length === 0) {
    process.stderr.write(`benchFloor: ${process.argv[2]} lists no SDK modules\n`);
    process.exit(2);
}
for (const file of sdkModules) require(file);
