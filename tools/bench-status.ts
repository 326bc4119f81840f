/**
 * Wall time of `npm run status` (as `node` with the script's arguments) for a stack of 20 hosts
 * against the same for a stack of one, each host a loopback fake host (test/support/sshd.ts) in
 * sync, the stack's outputs from a stand-in `pulumi` (test/support/fakePulumi.ts). Both run in
 * every round, in an order that rotates; the ratio is the median of the per-round ratios. Target:
 * at most 1.5, since the hosts are checked at once.
 *
 * The fake hosts run on this machine: their sshd and the report's few processes share its cores
 * with the status command, which on a real fleet they would not.
 *
 *   node --require ./tools/registerTs.js tools/bench-status.ts [rounds]
 */
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { PROJECT_DIR } from "../lib/stacks";
import { fakePulumi, hostOutput } from "../test/support/fakePulumi";
import { adminKeyPair, startSshd, TestSshd } from "../test/support/sshd";

export const FLEET_HOSTS = 20;

export interface StatusBench {
    rounds: number;
    hosts: number;
    oneMedianMs: number;
    fleetMedianMs: number;
    ratio: number;
    oneSamples: number[];
    fleetSamples: number[];
}

function median(values: readonly number[]): number {
    const sorted = [...values].sort((a, b) => a - b);
    const middle = Math.floor(sorted.length / 2);
    return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

export async function benchStatus(rounds = 10): Promise<StatusBench> {
    const work = fs.mkdtempSync(path.join(os.tmpdir(), "nixos-ec2-bench-status-"));
    const admin = adminKeyPair();
    const hosts: TestSshd[] = [];
    try {
        hosts.push(...(await Promise.all(Array.from({ length: FLEET_HOSTS }, () => startSshd({ adminKey: admin })))));
        const pulumi = fakePulumi(path.join(work, "pulumi"));
        const outputsOf = (members: TestSshd[]) => ({
            adminPrivateKey: admin.privateKey,
            hosts: Object.fromEntries(
                members.map((h, i) => {
                    const name = `host-${String(i + 1).padStart(2, "0")}`;
                    return [name, hostOutput("bench", name, h, { systemPath: h.systemPath(), generation: h.generation() })];
                }),
            ),
        });
        pulumi.setOutputs("one", outputsOf(hosts.slice(0, 1)));
        pulumi.setOutputs("fleet", outputsOf(hosts));
        const tmp = path.join(work, "tmp");
        fs.mkdirSync(tmp);
        const env = { PATH: `${pulumi.binDir}:${process.env.PATH}`, HOME: process.env.HOME ?? os.homedir(), TMPDIR: tmp };
        const time = (stack: string): number => {
            const started = process.hrtime.bigint();
            const r = spawnSync(process.execPath, ["--require", "./tools/registerTs.js", "tools/status.ts", stack, "--json"], { cwd: PROJECT_DIR, env, encoding: "utf8" });
            const ms = Number(process.hrtime.bigint() - started) / 1e6;
            if (r.status !== 0) throw new Error(`status ${stack} exited ${r.status ?? r.signal} (every host should be in sync):\n${r.stderr}${r.stdout.slice(0, 2000)}`);
            return ms;
        };
        time("one");
        time("fleet");
        const one: number[] = [];
        const fleet: number[] = [];
        for (let round = 0; round < rounds; round++) {
            if (round % 2 === 0) {
                one.push(time("one"));
                fleet.push(time("fleet"));
            } else {
                fleet.push(time("fleet"));
                one.push(time("one"));
            }
        }
        return {
            rounds,
            hosts: FLEET_HOSTS,
            oneMedianMs: median(one),
            fleetMedianMs: median(fleet),
            ratio: median(fleet.map((f, i) => f / one[i])),
            oneSamples: one,
            fleetSamples: fleet,
        };
    } finally {
        await Promise.all(hosts.map((h) => h.stop()));
        fs.rmSync(work, { recursive: true, force: true });
    }
}

if (require.main === module) {
    const rounds = Number(process.argv[2] ?? "10");
    benchStatus(rounds).then(
        (r) =>
            console.log(
                `status: ${r.hosts} hosts ${r.fleetMedianMs.toFixed(0)} ms median, 1 host ${r.oneMedianMs.toFixed(0)} ms median, ` +
                    `ratio ${r.ratio.toFixed(2)} (target <= 1.5, ${rounds} rounds)`,
            ),
        (error: unknown) => {
            console.error(error instanceof Error ? error.message : error);
            process.exitCode = 1;
        },
    );
}
