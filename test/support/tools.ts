import { execFileSync } from "node:child_process";

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
