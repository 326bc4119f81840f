/**
 * A stand-in `pulumi` for `npm run status`: a bash script on PATH that answers
 * `pulumi stack output --json --show-secrets -s STACK` as the CLI does
 * (pulumi/pulumi pkg/cmd/pulumi/stack/stack_output.go): every output of the stack as one JSON
 * document on stdout, secrets in plain text because of --show-secrets; a stack that does not exist
 * is `error: no stack named 'STACK' found` on stderr (RequireStack) and a failed exit. It records
 * every call, and refuses any other arguments (exit 9), so a test sees exactly what was asked.
 */
import { chmodSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import * as path from "node:path";
import { sshCommand } from "../../components/nixosHost";
import type { TestSshd } from "./sshd";

export interface FakePulumi {
    /** Put it first on PATH. */
    readonly binDir: string;
    /** Sets (or replaces) the outputs of a stack. */
    setOutputs(stack: string, outputs: Record<string, unknown>): void;
    /** The argument lists it was called with, one string each. */
    calls(): string[];
}

export function fakePulumi(dir: string): FakePulumi {
    const binDir = path.join(dir, "bin");
    const stacks = path.join(dir, "stacks");
    mkdirSync(binDir, { recursive: true });
    mkdirSync(stacks, { recursive: true, mode: 0o700 });
    const script = `#!/usr/bin/env bash
set -euo pipefail
printf '%s\\n' "$*" >>'${dir}/calls'
if [[ $# -ne 6 || $1 != stack || $2 != output || $3 != --json || $4 != --show-secrets || $5 != -s ]]; then
    echo "pulumi stand-in: unexpected arguments: $*" >&2
    exit 9
fi
file='${stacks}'/$6.json
if [[ ! -f $file ]]; then
    echo "error: no stack named '$6' found" >&2
    exit 255
fi
cat "$file"
`;
    writeFileSync(path.join(binDir, "pulumi"), script);
    chmodSync(path.join(binDir, "pulumi"), 0o755);
    return {
        binDir,
        setOutputs(stack, outputs) {
            writeFileSync(path.join(stacks, `${stack}.json`), `${JSON.stringify(outputs, null, 2)}\n`, { mode: 0o600 });
        },
        calls() {
            try {
                return readFileSync(path.join(dir, "calls"), "utf8").split("\n").filter((l) => l !== "");
            } catch {
                return [];
            }
        },
    };
}

/** What a deploy left in the outputs (the deploy script's result line), or the host's own state. */
export interface DeployedRecord {
    readonly systemPath: string;
    readonly generation: number;
    readonly rebooted?: boolean;
}

/**
 * A host's entry in the `hosts` output as index.ts exports it, pointing at a loopback fake host:
 * its sshCommand is the real one, with the fake host's port and user.
 */
export function hostOutput(stack: string, name: string, sshd: TestSshd, deployed: DeployedRecord, hostPublicKey = sshd.hostPublicKey): Record<string, unknown> {
    return {
        flakeAttr: name,
        instanceType: "t3.small",
        instanceId: `i-0${name.length}f00ba4`,
        publicIp: "127.0.0.1",
        publicDns: "localhost",
        url: "http://127.0.0.1/",
        sshCommand: sshCommand(stack, "127.0.0.1", hostPublicKey, sshd.port, sshd.user),
        hostPublicKey,
        systemPath: deployed.systemPath,
        generation: deployed.generation,
        rebooted: deployed.rebooted ?? false,
    };
}
