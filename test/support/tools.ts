import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import * as path from "node:path";

/**
 * Whether a system tool is on PATH. With CI=true a missing tool is a test failure (CI installs
 * every tool the suite needs); on a laptop the caller skips with a visible message instead.
 */
export function haveTool(tool: string): boolean {
    try {
        execFileSync("sh", ["-c", `command -v "$1"`, "sh", tool], { stdio: "ignore" });
        return true;
    } catch {
        if (process.env.CI === "true") {
            throw new Error(`${tool} is required with CI=true but is not installed (.ci/run installs it)`);
        }
        process.stderr.write(`SKIPPING tests that need ${tool}: it is not installed\n`);
        return false;
    }
}

/** `describe` when every tool is present, `describe.skip` (with a message) otherwise; throws on CI. */
export function describeWithTools(tools: string[]): jest.Describe {
    return tools.every(haveTool) ? describe : describe.skip;
}

const SBIN_DIRS = ["/usr/local/sbin", "/usr/sbin", "/sbin"];

/**
 * A tool's absolute path when it is on PATH or in an sbin directory, which a non-root user's
 * PATH often lacks (and a test cannot add to PATH: jest sandboxes process.env). The bare name
 * when it is nowhere, so that describeWithTools reports it missing.
 */
export function sbinTool(name: string): string {
    for (const dir of (process.env.PATH ?? "").split(":").concat(SBIN_DIRS)) {
        const candidate = path.join(dir, name);
        if (dir !== "" && existsSync(candidate)) return path.resolve(candidate);
    }
    return name;
}
