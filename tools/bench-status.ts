/**
 * Wall time of `npm run status` (as `node` with the script's arguments) for a stack of 20 hosts
 * against the same for a stack of one, each host a loopback fake host (test/support/sshd.ts) in
 * sync, the stack's outputs from a stand-in `pulumi` (test/support/fakePulumi.ts). Both run in
 * every round, in an order that rotates; the ratio is the median of the per-round ratios. Target:
 * at most 1.5, since the hosts are checked at once.
 *
 * The fake hosts run on this machine: their sshd and the report's few processes share its cores
 * with the status command, which on a real fleet they would not. So each round also measures
 * two things beside it:
 * - bare sessions: `ssh <the status command's own options> <host> true` to the same 20 hosts at
 *   once, against the same to one, started by one bash (whose forks cost less than node's): what
 *   20 OpenSSH sessions cost here with nothing to report, a floor under any status command that
 *   uses them;
 * - CPU: what the status command and its ssh clients used (this process's reaped children) and
 *   what the fake hosts used for it (each fake sshd's reaped session children), from
 *   /proc/<pid>/stat, in means a round.
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
import { hostKeyAlias, kexOptions, sshArgs } from "./statusProbe";

export const FLEET_HOSTS = 20;

export interface StatusBench {
    rounds: number;
    hosts: number;
    oneMedianMs: number;
    fleetMedianMs: number;
    ratio: number;
    oneSamples: number[];
    fleetSamples: number[];
    /** The same hosts, bare `ssh ... true` sessions (see the top of this file). */
    bareOneMedianMs: number;
    bareFleetMedianMs: number;
    bareRatio: number;
    /** CPU time a status run used, mean over the rounds: here (the command and its ssh) and on the fake hosts. */
    cpu: { oneLocalMs: number; oneHostsMs: number; fleetLocalMs: number; fleetHostsMs: number };
}

/** Linux's /proc clock tick (USER_HZ), fixed at 100 for user space. */
const TICK_MS = 10;

/** CPU time of a process's reaped children (cutime + cstime), in ms; 0 once it is gone. */
function childrenCpuMs(pid: number | undefined): number {
    if (pid === undefined) return 0;
    try {
        // After "(comm) ": state is field 0, so cutime and cstime are 13 and 14.
        const fields = fs.readFileSync(`/proc/${pid}/stat`, "utf8").split(") ").pop()!.split(" ");
        return (Number(fields[13]) + Number(fields[14])) * TICK_MS;
    } catch {
        return 0;
    }
}

function shellQuote(word: string): string {
    return `'${word.replace(/'/g, "'\\''")}'`;
}

/** A bash script that starts every ssh at once and fails unless each one succeeded. */
function bareSessionsScript(sessions: readonly string[][]): string {
    return [
        "set -u",
        "pids=()",
        ...sessions.map((args) => `ssh ${args.map(shellQuote).join(" ")} </dev/null >/dev/null & pids+=("$!")`),
        "rc=0",
        'for pid in "${pids[@]}"; do wait "$pid" || rc=1; done',
        'exit "$rc"',
        "",
    ].join("\n");
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

        // The bare sessions log in as the status command does: the same options, key and pins.
        const files = { identity: path.join(work, "id"), knownHosts: path.join(work, "known_hosts") };
        fs.writeFileSync(files.identity, admin.privateKey, { mode: 0o600 });
        fs.writeFileSync(files.knownHosts, hosts.map((h, i) => `${hostKeyAlias(`bare-${i}`)} ${h.hostPublicKey}\n`).join(""), { mode: 0o600 });
        const kex = kexOptions(env);
        const sessions = hosts.map((h, i) => [...sshArgs(`bare-${i}`, { user: h.user, address: "127.0.0.1", port: h.port, hostPublicKey: h.hostPublicKey }, files, 10, kex).slice(0, -1), "true"]);
        const scripts = { one: path.join(work, "bare-one.sh"), fleet: path.join(work, "bare-fleet.sh") };
        fs.writeFileSync(scripts.one, bareSessionsScript(sessions.slice(0, 1)));
        fs.writeFileSync(scripts.fleet, bareSessionsScript(sessions));

        const hostsCpuMs = () => hosts.reduce((sum, h) => sum + childrenCpuMs(h.serverPid()), 0);
        const cpu = { oneLocalMs: 0, oneHostsMs: 0, fleetLocalMs: 0, fleetHostsMs: 0 };
        const timed = (what: string, command: string, args: string[], account?: "one" | "fleet"): number => {
            const localBefore = childrenCpuMs(process.pid);
            const hostsBefore = hostsCpuMs();
            const started = process.hrtime.bigint();
            const r = spawnSync(command, args, { cwd: PROJECT_DIR, env, encoding: "utf8" });
            const ms = Number(process.hrtime.bigint() - started) / 1e6;
            if (r.status !== 0) throw new Error(`${what} exited ${r.status ?? r.signal} (every host should be in sync):\n${r.stderr}${r.stdout.slice(0, 2000)}`);
            if (account !== undefined) {
                cpu[`${account}LocalMs`] += childrenCpuMs(process.pid) - localBefore;
                cpu[`${account}HostsMs`] += hostsCpuMs() - hostsBefore;
            }
            return ms;
        };
        const status = (stack: "one" | "fleet", account = true) =>
            timed(`status ${stack}`, process.execPath, ["--require", "./tools/registerTs.js", "tools/status.ts", stack, "--json"], account ? stack : undefined);
        const bare = (which: "one" | "fleet") => timed(`bare sessions (${which})`, "bash", [scripts[which]]);
        status("one", false);
        status("fleet", false);
        bare("one");
        bare("fleet");
        const one: number[] = [];
        const fleet: number[] = [];
        const bareOne: number[] = [];
        const bareFleet: number[] = [];
        for (let round = 0; round < rounds; round++) {
            if (round % 2 === 0) {
                one.push(status("one"));
                fleet.push(status("fleet"));
                bareOne.push(bare("one"));
                bareFleet.push(bare("fleet"));
            } else {
                bareFleet.push(bare("fleet"));
                bareOne.push(bare("one"));
                fleet.push(status("fleet"));
                one.push(status("one"));
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
            bareOneMedianMs: median(bareOne),
            bareFleetMedianMs: median(bareFleet),
            bareRatio: median(bareFleet.map((f, i) => f / bareOne[i])),
            cpu: {
                oneLocalMs: cpu.oneLocalMs / rounds,
                oneHostsMs: cpu.oneHostsMs / rounds,
                fleetLocalMs: cpu.fleetLocalMs / rounds,
                fleetHostsMs: cpu.fleetHostsMs / rounds,
            },
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
                [
                    `status: ${r.hosts} hosts ${r.fleetMedianMs.toFixed(0)} ms median, 1 host ${r.oneMedianMs.toFixed(0)} ms median, ` +
                        `ratio ${r.ratio.toFixed(2)} (target <= 1.5, ${rounds} rounds)`,
                    `bare ssh sessions: ${r.hosts} hosts ${r.bareFleetMedianMs.toFixed(0)} ms median, 1 host ${r.bareOneMedianMs.toFixed(0)} ms median, ratio ${r.bareRatio.toFixed(2)}`,
                    `CPU a status run, 1 host: ${r.cpu.oneLocalMs.toFixed(0)} ms here, ${r.cpu.oneHostsMs.toFixed(0)} ms on the fake host; ` +
                        `${r.hosts} hosts: ${r.cpu.fleetLocalMs.toFixed(0)} ms here, ${r.cpu.fleetHostsMs.toFixed(0)} ms on the fake hosts`,
                ].join("\n"),
            ),
        (error: unknown) => {
            console.error(error instanceof Error ? error.message : error);
            process.exitCode = 1;
        },
    );
}
