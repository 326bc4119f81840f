import { OfflineRun, RecordedResource, runOffline } from "../../lib/offline";
import { loadStack, StackConfig } from "../../lib/stacks";

/**
 * Runs index.ts under the mock runtime with a real stack's configuration plus overrides
 * (bare keys are in the project namespace; `secret.<name>` values are secrets, as the preview
 * takes them), in a fresh module registry so runs do not mix.
 */
export async function runProgram(stack: string, overrides: Record<string, string> = {}): Promise<OfflineRun> {
    const { config, secretKeys } = loadStack(stack, overrides);
    return runConfig(stack, config, secretKeys);
}

/** Runs index.ts with exactly this configuration; `secretKeys` are the keys Pulumi holds as secrets. */
export async function runConfig(stack: string, config: StackConfig, secretKeys: readonly string[] = []): Promise<OfflineRun> {
    let run: OfflineRun | undefined;
    let failure: unknown;
    await jest.isolateModulesAsync(async () => {
        try {
            // Warnings are in run.warnings for the tests to check, not printed.
            run = await runOffline({ stack, config, secretKeys, onWarning: () => undefined });
        } catch (e) {
            failure = e;
        }
    });
    if (failure !== undefined) throw failure;
    return run as OfflineRun;
}

/** The one resource of `type` named `name`; fails the test when there is not exactly one. */
export function resource(run: OfflineRun, type: string, name: string): RecordedResource {
    const found = run.resources.filter((r) => r.type === type && r.name === name);
    if (found.length !== 1) {
        throw new Error(`expected one ${type} named ${name}, found ${found.length}; resources: ${run.resources.map((r) => r.name).join(", ")}`);
    }
    return found[0];
}

/** The resources whose parent is the component of `type` named `name`. */
export function childrenOf(run: OfflineRun, type: string, name: string): RecordedResource[] {
    const parent = resource(run, type, name);
    return run.resources.filter((r) => r.parent === parent.urn);
}
