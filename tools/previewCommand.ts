/**
 * The node arguments of `npm run preview`, read from package.json, so that the tests and the
 * benchmark run exactly what a person runs (without npm's own start-up and banner).
 */
import { readFileSync } from "node:fs";
import * as path from "node:path";
import { PROJECT_DIR } from "../lib/stacks";

/** `["--require", "./tools/registerTs.js", "tools/preview.ts"]`, to run with `node` in PROJECT_DIR. */
export function previewNodeArgs(): string[] {
    const pkg = JSON.parse(readFileSync(path.join(PROJECT_DIR, "package.json"), "utf8")) as { scripts?: Record<string, string> };
    const script = pkg.scripts?.preview ?? "";
    const [command, ...args] = script.trim().split(/\s+/);
    if (command !== "node" || args.length === 0 || args.some((a) => /["'$`\\|&;<>]/.test(a))) {
        throw new Error(`package.json scripts.preview must be a plain "node ..." command; it is ${JSON.stringify(script)}`);
    }
    return args;
}
