/**
 * `npm run status -- STACK [--json] [--timeout SECONDS]`: does every host of the stack still run
 * what Pulumi deployed, and is it healthy? `pulumi refresh` cannot tell: the deploy is a
 * local.Command, which has no read.
 *
 * Reads the stack's outputs through the Pulumi CLI, checks every host at once over one SSH session
 * each (tools/statusProbe.ts), each within its own deadline, and prints one verdict per host
 * (tools/statusVerdict.ts) as a table or as JSON (tools/statusReport.ts). The admin key exists
 * only in a 0600 file in a private temporary directory, removed on every exit this process sees.
 *
 * Exit status: 0 every host in sync and healthy; 1 some host is not (drifted, rolled back,
 * unhealthy, needs a reboot, a deploy in progress); 2 some host unreachable; 3 the command could
 * not run (bad arguments, no Pulumi CLI, no such stack, no outputs), with what to do.
 */
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { setMaxListeners } from "node:events";
import { hostKeyAlias, kexOptions, parseSshCommand, probeHost, Probe, SshFiles, SshTarget } from "./statusProbe";
import { HostStatus, renderJson, renderText, StatusReport, useColour } from "./statusReport";
import { exitStatusOf, nextSteps, verdictOf } from "./statusVerdict";

/** lib/config.ts PROJECT, written here so that status does not load the config schema; a test keeps them equal. */
const PROJECT = "nixos-ec2";
const DEFAULT_DEADLINE_SECONDS = 20;
const MAX_DEADLINE_SECONDS = 3600;
/** `pulumi stack output` decrypts the stack's secrets (a KMS call); more than this is a hang. */
const CLI_DEADLINE_SECONDS = 120;
const ED25519_PUBLIC_KEY = /^ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI[A-Za-z0-9+/]{43}( .*)?$/;

const USAGE = `usage: npm run status -- STACK [--json] [--timeout SECONDS]
  STACK              the stack whose hosts to check (its outputs, read with pulumi stack output)
  --json             print one JSON document instead of the table
  --timeout SECONDS  how long each host may take, connection included (default ${DEFAULT_DEADLINE_SECONDS})
exit status: 0 all in sync, 1 some host not in sync or unhealthy, 2 some host unreachable, 3 cannot run
`;

/** The command could not run; the message says what to do. Exit status 3. */
export class CannotRun extends Error {}

export interface Options {
    readonly stack: string;
    readonly json: boolean;
    readonly deadlineSeconds: number;
}

export function parseArgs(argv: readonly string[]): Options | "help" {
    let stack: string | undefined;
    let json = false;
    let deadlineSeconds = DEFAULT_DEADLINE_SECONDS;
    for (let i = 0; i < argv.length; i++) {
        const [flag, inline] = argv[i].split(/=(.*)/s, 2);
        if (flag === "--json") json = true;
        else if (flag === "-h" || flag === "--help") return "help";
        else if (flag === "--timeout") {
            const text = inline ?? argv[++i];
            const n = Number(text);
            if (!Number.isFinite(n) || n <= 0 || n > MAX_DEADLINE_SECONDS) throw new CannotRun(`--timeout needs a number of seconds above 0 and at most ${MAX_DEADLINE_SECONDS}, not ${JSON.stringify(text)}\n\n${USAGE}`);
            deadlineSeconds = n;
        } else if (argv[i].startsWith("-")) throw new CannotRun(`unknown option ${JSON.stringify(argv[i])}\n\n${USAGE}`);
        else if (stack !== undefined) throw new CannotRun(`one stack at a time, not ${JSON.stringify(stack)} and ${JSON.stringify(argv[i])}\n\n${USAGE}`);
        else stack = argv[i];
    }
    if (stack === undefined) throw new CannotRun(`name the stack to check, e.g. npm run status -- staging\n\n${USAGE}`);
    // Pulumi's stack names (with an optional org/project/ prefix); anything else would only confuse the CLI.
    if (!/^[A-Za-z0-9_.-]+(\/[A-Za-z0-9_.-]+){0,2}$/.test(stack)) throw new CannotRun(`${JSON.stringify(stack)} is not a stack name\n\n${USAGE}`);
    return { stack, json, deadlineSeconds };
}

/** The URN of a host's deploy Command (components/nixosDeployment.ts names it `<host>-switch`). */
export function deployUrn(stack: string, host: string): string {
    const name = stack.split("/").pop() ?? stack;
    return `urn:pulumi:${name}::${PROJECT}::${PROJECT}:index:NixosDeployment$command:local:Command::${host}-switch`;
}

function cliProblem(stack: string, stderr: string): string {
    const said = stderr.trim().split("\n").slice(-3).join("\n").slice(0, 600);
    const hint = /no stack named/i.test(stderr)
        ? `the backend you are logged in to has no stack ${stack}: check the name (pulumi stack ls) and the backend (pulumi whoami -v, pulumi login <url>)`
        : /PASSPHRASE/.test(stderr)
          ? "the stack's secrets need its passphrase: set PULUMI_CONFIG_PASSPHRASE or PULUMI_CONFIG_PASSPHRASE_FILE"
          : /login|ACCESS_TOKEN|credentials/i.test(stderr)
            ? "log in to the stack's backend first (pulumi login), with AWS credentials for its bucket and KMS key"
            : "run the same command by hand to see what it needs";
    return `pulumi stack output -s ${stack} failed:\n${said}\n${hint}`;
}

/** `pulumi stack output --json --show-secrets -s STACK`, parsed. Its text is never printed: it holds the admin key. */
export function readStackOutputs(stack: string, env: NodeJS.ProcessEnv): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => {
        const args = ["stack", "output", "--json", "--show-secrets", "-s", stack];
        // No prompt can come (stdin is not a terminal), and no update check delays the answer.
        const child = spawn("pulumi", args, { stdio: ["ignore", "pipe", "pipe"], env: { ...env, PULUMI_SKIP_UPDATE_CHECK: "true" } });
        const out: Buffer[] = [];
        let err = "";
        let timedOut = false;
        const timer = setTimeout(() => {
            timedOut = true;
            child.kill("SIGKILL");
        }, CLI_DEADLINE_SECONDS * 1000);
        child.stdout.on("data", (chunk: Buffer) => out.push(chunk));
        child.stderr.on("data", (chunk: Buffer) => (err += chunk.toString()));
        child.once("error", (error: NodeJS.ErrnoException) => {
            clearTimeout(timer);
            reject(
                new CannotRun(
                    error.code === "ENOENT"
                        ? "the Pulumi CLI (pulumi) is not on PATH: install it (https://www.pulumi.com/docs/install/) and log in to the stack's backend (pulumi login)"
                        : `could not run the Pulumi CLI: ${error.message}`,
                ),
            );
        });
        child.once("close", (code) => {
            clearTimeout(timer);
            if (timedOut) return reject(new CannotRun(`pulumi stack output -s ${stack} did not answer within ${CLI_DEADLINE_SECONDS} s; run it by hand to see what it waits for`));
            if (code !== 0) return reject(new CannotRun(cliProblem(stack, err)));
            let parsed: unknown;
            try {
                parsed = JSON.parse(Buffer.concat(out).toString("utf8"));
            } catch {
                return reject(new CannotRun(`pulumi stack output -s ${stack} --json printed something that is not JSON; is the CLI older than 3.0?`));
            }
            if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) return reject(new CannotRun(`pulumi stack output -s ${stack} --json printed no object of outputs`));
            resolve(parsed as Record<string, unknown>);
        });
    });
}

/** One host of the outputs: where to reach it, or why it cannot be; what was deployed. */
export interface HostEntry {
    readonly name: string;
    readonly flakeAttr: string;
    readonly target?: SshTarget;
    readonly problem?: string;
    readonly systemPath?: string;
    readonly generation?: number;
}

export function hostsOf(stack: string, outputs: Record<string, unknown>): { hosts: HostEntry[]; adminKey: string } {
    const hosts = outputs.hosts;
    const adminKey = outputs.adminPrivateKey;
    if (hosts === undefined || adminKey === undefined) {
        throw new CannotRun(`stack ${stack} has no ${hosts === undefined ? "hosts" : "adminPrivateKey"} output: it was never deployed with this program; run pulumi up -s ${stack} first`);
    }
    if (hosts === null || typeof hosts !== "object" || Array.isArray(hosts)) throw new CannotRun(`stack ${stack}'s hosts output is not an object of hosts; is this stack of another program?`);
    if (typeof adminKey !== "string" || !adminKey.includes("PRIVATE KEY-----")) {
        throw new CannotRun(`stack ${stack}'s adminPrivateKey output is not a private key (its value is not shown); the CLI must be asked with --show-secrets`);
    }
    const entries = Object.entries(hosts as Record<string, unknown>)
        .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
        .map(([name, value]): HostEntry => {
            const h = (value ?? {}) as Record<string, unknown>;
            const flakeAttr = typeof h.flakeAttr === "string" ? h.flakeAttr : name;
            const systemPath = typeof h.systemPath === "string" && h.systemPath.startsWith("/") ? h.systemPath : undefined;
            const generation = typeof h.generation === "number" && Number.isInteger(h.generation) ? h.generation : undefined;
            const ssh = typeof h.sshCommand === "string" ? parseSshCommand(h.sshCommand) : undefined;
            const key = typeof h.hostPublicKey === "string" ? h.hostPublicKey.trim() : "";
            const base = { name, flakeAttr, systemPath, generation };
            if (!/^[a-z][a-z0-9-]{0,30}$/.test(name)) return { ...base, problem: `${JSON.stringify(name.slice(0, 40))} is not a host name of this program` };
            if (!ED25519_PUBLIC_KEY.test(key)) return { ...base, problem: "the stack's outputs hold no ED25519 host key for it, so no connection could be trusted" };
            if (ssh === undefined) return { ...base, problem: "the stack's outputs hold no sshCommand with its address" };
            return { ...base, target: { ...ssh, hostPublicKey: key } };
        });
    return { hosts: entries, adminKey };
}

/**
 * A private directory with the admin key (0600) and the pinned host keys, and its removal. ssh
 * expands `${VAR}` in file paths with no escape for it, so such a TMPDIR is not used.
 */
function makeKeyDir(hosts: readonly HostEntry[], adminKey: string): { dir: string; files: SshFiles } {
    const base = os.tmpdir().includes("${") ? "/tmp" : os.tmpdir();
    const dir = fs.mkdtempSync(path.join(base, "nixos-ec2-status-"));
    const files = { identity: path.join(dir, "id"), knownHosts: path.join(dir, "known_hosts") };
    try {
        fs.chmodSync(dir, 0o700);
        fs.writeFileSync(files.identity, adminKey.endsWith("\n") ? adminKey : `${adminKey}\n`, { mode: 0o600, flag: "wx" });
        const pins = hosts.flatMap((h) => (h.target ? [`${hostKeyAlias(h.name)} ${h.target.hostPublicKey.split(/\s+/).slice(0, 2).join(" ")}`] : []));
        fs.writeFileSync(files.knownHosts, `${pins.join("\n")}\n`, { mode: 0o600, flag: "wx" });
    } catch (e) {
        // A full or failing disk must not leave the key written so far behind.
        fs.rmSync(dir, { recursive: true, force: true });
        throw new CannotRun(`could not write the key files into ${base}: ${(e as Error).message}; set TMPDIR to a writable directory with space`);
    }
    return { dir, files };
}

/** What ssh gets: enough to run, and not the caller's agent. */
function sshEnvironment(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
    const keep = ["PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TMPDIR"];
    return Object.fromEntries(keep.filter((k) => env[k] !== undefined).map((k) => [k, env[k]]));
}

export interface Io {
    readonly stdout: NodeJS.WritableStream & { isTTY?: boolean };
    readonly stderr: NodeJS.WritableStream;
    readonly env: NodeJS.ProcessEnv;
}

/** Runs the whole command; resolves with the exit status. */
export async function status(argv: readonly string[], io: Io): Promise<number> {
    let options: Options | "help";
    try {
        options = parseArgs(argv);
    } catch (e) {
        io.stderr.write(`status: ${(e as Error).message}`.replace(/\n*$/, "\n"));
        return 3;
    }
    if (options === "help") {
        io.stdout.write(USAGE);
        return 0;
    }
    const { stack, deadlineSeconds } = options;
    let entries: HostEntry[];
    let adminKey: string;
    try {
        ({ hosts: entries, adminKey } = hostsOf(stack, await readStackOutputs(stack, io.env)));
    } catch (e) {
        if (!(e instanceof CannotRun)) throw e;
        io.stderr.write(`status: ${e.message}\n`);
        return 3;
    }
    if (entries.length === 0) {
        io.stderr.write(`status: stack ${stack} has no hosts in its outputs; run pulumi up -s ${stack}\n`);
        return 3;
    }

    const checkedAt = new Date().toISOString();
    let keyDir: { dir: string; files: SshFiles };
    try {
        keyDir = makeKeyDir(entries, adminKey);
    } catch (e) {
        if (!(e instanceof CannotRun)) throw e;
        io.stderr.write(`status: ${e.message}\n`);
        return 3;
    } finally {
        adminKey = "";
    }
    const { dir, files } = keyDir;
    const abort = new AbortController();
    // Every host's ssh listens on it.
    setMaxListeners(entries.length + 10, abort.signal);
    const removeKeys = () => fs.rmSync(dir, { recursive: true, force: true });
    const onSignal = (signal: NodeJS.Signals) => {
        abort.abort();
        removeKeys();
        process.exit(128 + (os.constants.signals[signal] ?? 1));
    };
    // Ctrl-C, Ctrl-\, kill, a closed terminal: each would end the process and leave the key behind.
    const signals: NodeJS.Signals[] = ["SIGINT", "SIGQUIT", "SIGTERM", "SIGHUP"];
    process.once("exit", removeKeys);
    for (const s of signals) process.once(s, onSignal);
    let probes: Probe[];
    try {
        const env = sshEnvironment(io.env);
        const extraOptions = kexOptions(env);
        probes = await Promise.all(
            entries.map(
                (h): Promise<Probe> =>
                    h.target
                        ? probeHost(h.name, h.target, files, { deadlineSeconds, env, extraOptions, signal: abort.signal })
                        : Promise.resolve({ reachable: false, why: { kind: "no-address", message: h.problem ?? "no address" } }),
            ),
        );
    } finally {
        removeKeys();
        process.removeListener("exit", removeKeys);
        for (const s of signals) process.removeListener(s, onSignal);
    }

    const hosts = entries.map((h, i): HostStatus => {
        const probe = probes[i];
        const deployed = { systemPath: h.systemPath, generation: h.generation };
        const verdict = verdictOf(deployed, probe);
        const urn = deployUrn(stack, h.name);
        return {
            name: h.name,
            flakeAttr: h.flakeAttr,
            ssh: h.target ? { user: h.target.user, address: h.target.address, port: h.target.port } : undefined,
            deployed,
            probe,
            verdict,
            deployUrn: urn,
            next: nextSteps(verdict, probe, { stack, host: h.name, deployUrn: urn }),
        };
    });
    const report: StatusReport = { stack, checkedAt, deadlineSeconds, exitStatus: exitStatusOf(hosts.map((h) => h.verdict.kind)), hosts };
    io.stdout.write(options.json ? renderJson(report) : renderText(report, useColour(Boolean(io.stdout.isTTY), io.env)));
    return report.exitStatus;
}

if (require.main === module) {
    status(process.argv.slice(2), { stdout: process.stdout, stderr: process.stderr, env: process.env }).then(
        (code) => {
            process.exitCode = code;
        },
        (e: unknown) => {
            process.stderr.write(`status: ${e instanceof Error ? e.message : String(e)}\n`);
            process.exitCode = 3;
        },
    );
}
