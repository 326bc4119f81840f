/**
 * `npm run bench -- [--runs N] [--fleet-runs N] [--rss-runs N] [--deploy-runs N] [--json]`
 *
 * Medians over repeated whole-process runs (`node` started afresh each time, as a person runs
 * the preview), each measured against a baseline run in the same rounds, so that a ratio means
 * the same on a busy machine as on an idle one. In every round the subject and its baseline run
 * back to back, in an order that rotates from round to round, and a ratio is the median of the
 * per-round ratios. One unmeasured run of everything warms the caches first.
 *
 * - preview: `npm run preview -- staging` against the floor, a node process that loads exactly
 *   the Pulumi SDK files the preview loaded (recorded from a preview run by tools/benchProbe.js)
 *   and exits. Target: at most 1.3.
 * - fleet: the same preview with 1, 10 and 50 hosts (`--config hosts=...`). Targets: 50 hosts at
 *   most 2x one host; and linear growth: the time a host adds from 10 to 50 hosts, (t50-t10)/40,
 *   is at most 1.5x the time a host adds from 1 to 10, (t10-t1)/9 (1.0 is exactly linear; a cost
 *   that grows with the square of the hosts gives about 5.5).
 * - memory: peak RSS of the 50-host preview (process.resourceUsage().maxRSS, via the probe).
 * - deploy: tools/bench-deploy.ts's script-to-floor ratio, when that file and sshd are present.
 * - status: tools/bench-status.ts, `npm run status` of 20 loopback hosts against one host, in the
 *   same rounds. Target: at most 1.5. Beside it, not judged: bare `ssh ... true` sessions to the
 *   same hosts (20 against 1), and the CPU a status run used here and on the fake hosts.
 */
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { PROJECT_DIR } from "../lib/stacks";
import { previewNodeArgs } from "./previewCommand";

const TARGETS = { previewRatio: 1.3, fleetRatio: 2, perHostGrowth: 1.5, deployRatio: 1.5, statusRatio: 1.5 };
const FLEET_SIZES = [1, 10, 50] as const;
const PROBE = path.join(PROJECT_DIR, "tools", "benchProbe.js");
const FLOOR = path.join(PROJECT_DIR, "tools", "benchFloor.js");
const DEPLOY_BENCH = path.join(PROJECT_DIR, "tools", "bench-deploy.ts");
const STATUS_BENCH = path.join(PROJECT_DIR, "tools", "bench-status.ts");

const USAGE = `usage: npm run bench -- [--runs N] [--fleet-runs N] [--rss-runs N] [--deploy-runs N] [--status-runs N] [--json]
  --runs N         rounds of the preview-vs-floor comparison (default 10)
  --fleet-runs N   rounds of the 1/10/50-host comparison (default 5)
  --rss-runs N     runs of the 50-host preview for peak memory (default 3)
  --deploy-runs N  runs handed to tools/bench-deploy.ts (default 10)
  --status-runs N  rounds of the 20-host-vs-1 status comparison (default 10)
  --json           print the results as one JSON document
`;

interface Options {
    runs: number;
    fleetRuns: number;
    rssRuns: number;
    deployRuns: number;
    statusRuns: number;
    json: boolean;
}

function parseArgs(argv: readonly string[]): Options {
    const options: Options = { runs: 10, fleetRuns: 5, rssRuns: 3, deployRuns: 10, statusRuns: 10, json: false };
    const counts: Record<string, keyof Omit<Options, "json">> = {
        "--runs": "runs",
        "--fleet-runs": "fleetRuns",
        "--rss-runs": "rssRuns",
        "--deploy-runs": "deployRuns",
        "--status-runs": "statusRuns",
    };
    for (let i = 0; i < argv.length; i++) {
        const [flag, inline] = argv[i].split(/=(.*)/s, 2);
        if (flag === "--json") options.json = true;
        else if (flag === "-h" || flag === "--help") {
            process.stdout.write(USAGE);
            process.exit(0);
        } else if (flag in counts) {
            const text = inline ?? argv[++i];
            const n = Number(text);
            if (!Number.isInteger(n) || n < 1) usage(`${flag} needs a whole number of at least 1, not ${JSON.stringify(text)}`);
            options[counts[flag]] = n;
        } else usage(`unknown argument ${JSON.stringify(argv[i])}`);
    }
    return options;
}

function usage(message: string): never {
    process.stderr.write(`bench: ${message}\n\n${USAGE}`);
    process.exit(2);
}

export function median(values: readonly number[]): number {
    const sorted = [...values].sort((a, b) => a - b);
    const middle = Math.floor(sorted.length / 2);
    return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

/** One whole `node` process; its wall time in ms. A run that fails stops the benchmark. */
function timeNode(args: readonly string[], env: NodeJS.ProcessEnv = process.env): number {
    const started = process.hrtime.bigint();
    const result = spawnSync(process.execPath, args, { cwd: PROJECT_DIR, env, stdio: ["ignore", "ignore", "pipe"], maxBuffer: 64 << 20 });
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    if (result.status !== 0) {
        throw new Error(`node ${args.join(" ").slice(0, 200)} exited with ${result.status ?? result.signal}:\n${result.stderr.toString()}`);
    }
    return ms;
}

interface Probe {
    maxRssKiB: number;
    sdkModules: string[];
}

/** Run once with tools/benchProbe.js preloaded; what it recorded. */
function probe(args: readonly string[], file: string): Probe {
    timeNode(["--require", PROBE, ...args], { ...process.env, NIXOS_EC2_PROBE: file });
    return JSON.parse(readFileSync(file, "utf8")) as Probe;
}

function fleetConfig(hosts: number): string {
    const names = Array.from({ length: hosts }, (_, i) => `host-${String(i + 1).padStart(2, "0")}`);
    return `hosts=${JSON.stringify(Object.fromEntries(names.map((n) => [n, {}])))}`;
}

/**
 * `rounds` rounds of every subject once, the order rotating each round; the samples by subject.
 * Returns per-subject samples in subject order (round i of each subject ran in the same round).
 */
function interleave(subjects: ReadonlyArray<readonly string[]>, rounds: number): number[][] {
    const samples = subjects.map(() => [] as number[]);
    for (let round = 0; round < rounds; round++) {
        for (let k = 0; k < subjects.length; k++) {
            const i = (round + k) % subjects.length;
            samples[i].push(timeNode(subjects[i]));
        }
    }
    return samples;
}

/** Median of the per-round ratios subject/baseline. */
function pairedRatio(subject: readonly number[], baseline: readonly number[]): number {
    return median(subject.map((s, i) => s / baseline[i]));
}

interface Verdict {
    value: number;
    target: number;
    pass: boolean;
}

function verdict(value: number, target: number): Verdict {
    return { value, target, pass: value <= target };
}

type DeployResult =
    | { available: true; runs: number; scriptMedianMs: number; floorMedianMs: number; ratio: Verdict }
    | { available: false; reason: string };

function haveSshd(): boolean {
    const dirs = [...(process.env.PATH ?? "").split(":"), "/usr/local/sbin", "/usr/sbin", "/sbin"];
    return dirs.some((dir) => dir !== "" && existsSync(path.join(dir, "sshd")));
}

async function benchDeployIfPresent(runs: number): Promise<DeployResult> {
    if (!existsSync(DEPLOY_BENCH)) return { available: false, reason: "tools/bench-deploy.ts does not exist yet" };
    if (!haveSshd()) return { available: false, reason: "sshd is not installed (Debian: openssh-server)" };
    type BenchDeploy = (runs?: number) => Promise<{ scriptMedianMs: number; floorMedianMs: number; ratio: number }>;
    try {
        // Loaded by path: the file belongs to the deploy work and may not exist in every checkout.
        // eslint-disable-next-line @typescript-eslint/no-require-imports
        const { benchDeploy } = require(DEPLOY_BENCH) as { benchDeploy?: BenchDeploy };
        if (typeof benchDeploy !== "function") return { available: false, reason: "tools/bench-deploy.ts exports no benchDeploy function" };
        const r = await benchDeploy(runs);
        return { available: true, runs, scriptMedianMs: r.scriptMedianMs, floorMedianMs: r.floorMedianMs, ratio: verdict(r.ratio, TARGETS.deployRatio) };
    } catch (e) {
        return { available: false, reason: `tools/bench-deploy.ts failed: ${(e instanceof Error ? e.message : String(e)).split("\n")[0]}` };
    }
}

type StatusResult =
    | ({ available: true; ratio: Verdict } & Omit<import("./bench-status").StatusBench, "ratio">)
    | { available: false; reason: string };

async function benchStatusIfPossible(rounds: number): Promise<StatusResult> {
    if (!haveSshd()) return { available: false, reason: "sshd is not installed (Debian: openssh-server)" };
    try {
        // eslint-disable-next-line @typescript-eslint/no-require-imports
        const { benchStatus } = require(STATUS_BENCH) as typeof import("./bench-status");
        const r = await benchStatus(rounds);
        return { available: true, ...r, ratio: verdict(r.ratio, TARGETS.statusRatio) };
    } catch (e) {
        return { available: false, reason: `tools/bench-status.ts failed: ${(e instanceof Error ? e.message : String(e)).split("\n")[0]}` };
    }
}

export interface BenchResult {
    machine: { cores: number; cpu: string; node: string; platform: string; memoryGiB: number; loadAverage1m: number };
    command: string;
    preview: { runs: number; floorMs: number; previewMs: number; sdkModules: number; ratio: Verdict; floorSamples: number[]; previewSamples: number[] };
    fleet: {
        runs: number;
        hosts: number[];
        ms: number[];
        samples: number[][];
        ratio50to1: Verdict;
        perHostMs: { from1to10: number; from10to50: number };
        growth: Verdict;
    };
    memory: { runs: number; maxRssMiB50Hosts: number; maxRssMiBFloor: number };
    deploy: DeployResult;
    status: StatusResult;
}

async function bench(options: Options): Promise<BenchResult> {
    const preview = previewNodeArgs();
    const tmp = mkdtempSync(path.join(os.tmpdir(), "nixos-ec2-bench-"));
    try {
        const log = (line: string) => {
            if (!options.json) process.stderr.write(`bench: ${line}\n`);
        };
        const machine = {
            cores: os.cpus().length,
            cpu: os.cpus()[0]?.model.trim() ?? "unknown",
            node: process.version,
            platform: `${process.platform} ${process.arch}`,
            memoryGiB: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
            loadAverage1m: Math.round(os.loadavg()[0] * 100) / 100,
        };

        log("recording the SDK files a preview loads (and warming the transpile cache)");
        const probeFile = path.join(tmp, "probe.json");
        const { sdkModules } = probe([...preview, "staging"], probeFile);
        const floor = [FLOOR, probeFile];

        const fleet = FLEET_SIZES.map((n) => [...preview, "staging", "--config", fleetConfig(n)]);
        log("warming up");
        for (const args of [floor, [...preview, "staging"], ...fleet]) timeNode(args);

        log(`preview vs floor, ${options.runs} rounds`);
        const [floorSamples, previewSamples] = interleave([floor, [...preview, "staging"]], options.runs);

        log(`fleet of 1, 10, 50 hosts, ${options.fleetRuns} rounds`);
        const fleetSamples = interleave(fleet, options.fleetRuns);
        const ms = fleetSamples.map(median);
        const perHostMs = { from1to10: (ms[1] - ms[0]) / 9, from10to50: (ms[2] - ms[1]) / 40 };

        log(`peak memory, ${options.rssRuns} runs`);
        const rss50: number[] = [];
        const rssFloor: number[] = [];
        for (let i = 0; i < options.rssRuns; i++) {
            rss50.push(probe(fleet[2], path.join(tmp, `rss-${i}.json`)).maxRssKiB);
            rssFloor.push(probe(floor, path.join(tmp, `rss-floor-${i}.json`)).maxRssKiB);
        }

        log("deploy script (tools/bench-deploy.ts)");
        const deploy = await benchDeployIfPresent(options.deployRuns);

        log(`status of 20 hosts vs 1, ${options.statusRuns} rounds (tools/bench-status.ts)`);
        const status = await benchStatusIfPossible(options.statusRuns);

        return {
            machine,
            command: `npm run bench${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(" ")}` : ""}`,
            preview: {
                runs: options.runs,
                floorMs: median(floorSamples),
                previewMs: median(previewSamples),
                sdkModules: sdkModules.length,
                ratio: verdict(pairedRatio(previewSamples, floorSamples), TARGETS.previewRatio),
                floorSamples,
                previewSamples,
            },
            fleet: {
                runs: options.fleetRuns,
                hosts: [...FLEET_SIZES],
                ms,
                samples: fleetSamples,
                ratio50to1: verdict(pairedRatio(fleetSamples[2], fleetSamples[0]), TARGETS.fleetRatio),
                perHostMs,
                growth: verdict(perHostMs.from10to50 / perHostMs.from1to10, TARGETS.perHostGrowth),
            },
            memory: { runs: options.rssRuns, maxRssMiB50Hosts: median(rss50) / 1024, maxRssMiBFloor: median(rssFloor) / 1024 },
            deploy,
            status,
        };
    } finally {
        rmSync(tmp, { recursive: true, force: true });
    }
}

function renderTable(r: BenchResult): string {
    const ms = (v: number) => `${v.toFixed(0)} ms`;
    const result = (v: Verdict) => (v.pass ? "PASS" : "OVER");
    const rows: string[][] = [
        ["measurement", "median", "baseline", "ratio", "target", "result"],
        ["preview staging, wall time", ms(r.preview.previewMs), `floor ${ms(r.preview.floorMs)}`, r.preview.ratio.value.toFixed(2), `<= ${r.preview.ratio.target}`, result(r.preview.ratio)],
        ...r.fleet.hosts.map((n, i) => [`preview, ${n} host${n === 1 ? "" : "s"}`, ms(r.fleet.ms[i]), "", "", "", ""]),
        ["50 hosts vs 1 host", ms(r.fleet.ms[2]), `1 host ${ms(r.fleet.ms[0])}`, r.fleet.ratio50to1.value.toFixed(2), `<= ${r.fleet.ratio50to1.target}`, result(r.fleet.ratio50to1)],
        [
            "per host, 10->50 vs 1->10",
            `${r.fleet.perHostMs.from10to50.toFixed(1)} ms`,
            `${r.fleet.perHostMs.from1to10.toFixed(1)} ms`,
            r.fleet.growth.value.toFixed(2),
            `<= ${r.fleet.growth.target}`,
            r.fleet.growth.pass ? "PASS (linear)" : "OVER (worse than linear)",
        ],
        ["peak RSS, 50-host preview", `${r.memory.maxRssMiB50Hosts.toFixed(0)} MiB`, `floor ${r.memory.maxRssMiBFloor.toFixed(0)} MiB`, "", "", ""],
        r.deploy.available
            ? ["deploy script", ms(r.deploy.scriptMedianMs), `2 x ssh ${ms(r.deploy.floorMedianMs)}`, r.deploy.ratio.value.toFixed(2), `< ${r.deploy.ratio.target}`, result(r.deploy.ratio)]
            : ["deploy script", "not available", "", "", "", r.deploy.reason],
        r.status.available
            ? [`status, ${r.status.hosts} hosts vs 1`, ms(r.status.fleetMedianMs), `1 host ${ms(r.status.oneMedianMs)}`, r.status.ratio.value.toFixed(2), `<= ${r.status.ratio.target}`, result(r.status.ratio)]
            : ["status, 20 hosts vs 1", "not available", "", "", "", r.status.reason],
        ...(r.status.available
            ? [
                  [`bare ssh sessions, ${r.status.hosts} vs 1`, ms(r.status.bareFleetMedianMs), `1 host ${ms(r.status.bareOneMedianMs)}`, r.status.bareRatio.toFixed(2), "", "floor under the status ratio"],
                  [`status CPU, ${r.status.hosts} hosts`, `${ms(r.status.cpu.fleetLocalMs)} here`, `${ms(r.status.cpu.fleetHostsMs)} on hosts`, "", "", "means a run"],
                  ["status CPU, 1 host", `${ms(r.status.cpu.oneLocalMs)} here`, `${ms(r.status.cpu.oneHostsMs)} on host`, "", "", ""],
              ]
            : []),
    ];
    const widths = rows[0].map((_, c) => Math.max(...rows.map((row) => (c === 5 ? 0 : row[c].length))));
    const line = (row: string[]) => row.map((cell, c) => (c === 5 ? cell : cell.padEnd(widths[c]))).join("  ").trimEnd();
    const m = r.machine;
    return [
        `Machine: ${m.cores} cores (${m.cpu}), ${m.memoryGiB} GiB, Node ${m.node}, ${m.platform}; load average ${m.loadAverage1m} at start`,
        `Command: ${r.command}`,
        `Medians of ${r.preview.runs} rounds (preview), ${r.fleet.runs} (fleet), ${r.memory.runs} (memory), ${r.status.available ? r.status.rounds : 0} (status); ratios are medians of per-round ratios.`,
        `Floor: node loading the ${r.preview.sdkModules} Pulumi SDK files the preview loads, and nothing else.`,
        "",
        line(rows[0]),
        line(rows[0].map((h, c) => "-".repeat(c === 5 ? h.length : widths[c]))),
        ...rows.slice(1).map(line),
        "",
    ].join("\n");
}

if (require.main === module) {
    const options = parseArgs(process.argv.slice(2));
    bench(options).then(
        (r) => process.stdout.write(options.json ? `${JSON.stringify(r, null, 2)}\n` : renderTable(r)),
        (e: unknown) => {
            process.stderr.write(`bench: ${e instanceof Error ? e.message : String(e)}\n`);
            process.exitCode = 1;
        },
    );
}
