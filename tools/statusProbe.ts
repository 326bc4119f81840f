/**
 * What `npm run status` asks each host, and how: one SSH session per host, hardened as
 * deploy/nixos-deploy.sh's (no user config, the pinned host key only, the admin key only, no
 * agent), that runs one read-only shell snippet and reads its report. Nothing here writes on the
 * host; every file the snippet reads is one deploy/remote-switch.sh or NixOS itself writes.
 *
 * Loads nothing but Node's own modules, so that the status of a fleet costs a few SSH sessions
 * and not the Pulumi SDK.
 */
import { spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";

/** What the snippet prints first; a report without it (or without its end) is not one. */
export const REPORT_FORMAT = "nixos-ec2-status-1";

/**
 * The snippet, for the admin's login shell (POSIX sh; bash on NixOS). Paths are deploy/remote-switch.sh's,
 * overridable through the same variables for the tests. Files are read with the shell's own `read`
 * and symbolic links resolved with `cd -P`, so that a report costs few processes: find (every link
 * at once), df, systemctl and curl.
 *
 * - current, booted: /run/current-system (what runs) and /run/booted-system (what the running
 *   kernel booted; stage-2-init.sh links it), resolved.
 * - profile: what the next boot runs, and its generation (the profile link's target).
 * - kernel, initrd, kernel-modules of both: a live switch changes these only at the next boot, so a
 *   difference means a reboot is due (the check of nixos/modules/tasks/auto-upgrade.nix with allowReboot).
 * - the deploy's records: pending-rollback, pending-boot, last-rollback, deploys/<id>, and
 *   deploy.log, which links to the newest deploy's log (logs/<time>-<id>.log).
 * - nixos-version (top-level.nix writes it without a newline), uptime, boot ID, free disk where
 *   the deploy puts its upload, `systemctl is-system-running` (no --wait), the failed units when
 *   it is not running (with the certificates issued so far, so that an order that waits for DNS
 *   is told apart, as the deploy does), and the deploy's health check (5 s at most).
 */
export const REMOTE_SNIPPET = `d="\${NIXOS_EC2_STATE_DIR:-/var/lib/nixos-ec2}"
p="\${NIXOS_EC2_SYSTEM_PROFILE:-/nix/var/nix/profiles/system}"
r="\${NIXOS_EC2_RUN_DIR:-/run}"
u="\${NIXOS_EC2_HEALTH_URL:-http://127.0.0.1/healthz}"
b="\${NIXOS_EC2_BOOT_ID_FILE:-/proc/sys/kernel/random/boot_id}"
LC_ALL=C
export LC_ALL
v() { printf '%s=%s\\n' "$1" "$2"; }
f() { x=; if [ -r "$2" ]; then IFS= read -r x <"$2" || :; fi; v "$1" "$x"; }
l() { x=; if cd -P "$2" 2>/dev/null; then x=$PWD; fi; v "$1" "$x"; }
v format ${REPORT_FORMAT}
l current "$r/current-system"
l booted "$r/booted-system"
l profile "$p"
cd /
v profile-link "$p"
v log-link "$d/deploy.log"
f version "$r/current-system/nixos-version"
f uptime /proc/uptime
f boot-id "$b"
f pending-rollback "$d/pending-rollback"
f pending-boot "$d/pending-boot"
f last-rollback "$d/last-rollback"
for o in "$d"/deploys/*; do if [ -f "$o" ]; then f "outcome.\${o##*/}" "$o"; fi; done
find "$p" "$d/deploy.log" "$r/booted-system/" "$r/current-system/" -maxdepth 1 -type l -printf 'link=%p %l\\n' 2>/dev/null
s=/
if [ -d "$d" ]; then s=$d; fi
v df-path "$s"
v health-url "$u"
y=$(systemctl is-system-running 2>/dev/null)
v state "$y"
if [ "$y" != running ]; then
for c in "\${NIXOS_EC2_ACME_DIR:-/var/lib/acme}"/*/acme-success; do if [ -e "$c" ]; then c=\${c%/acme-success}; v "issued.\${c##*/}" 1; fi; done
fi
echo '--- df'
df -Pk "$s" 2>&1
if [ "$y" != running ]; then
echo '--- failed'
systemctl --failed --no-legend --plain --no-pager 2>&1
fi
echo '--- health'
curl -fsS --max-time 5 "$u" 2>&1
echo "--- health-exit $?"
echo '--- end'
`;

/** Where to reach a host and which host key to trust. */
export interface SshTarget {
    readonly user: string;
    readonly address: string;
    readonly port: number;
    /** `ssh-ed25519 AAAA...`: the only host key accepted. */
    readonly hostPublicKey: string;
}

/** What the host reported. */
export interface HostFacts {
    /** /run/current-system, resolved: the system that runs. */
    readonly currentSystem: string;
    /** /run/booted-system, resolved: the system the running kernel booted. */
    readonly bootedSystem: string;
    /** The system profile, resolved: what the next boot runs. */
    readonly profileSystem: string;
    readonly profileGeneration?: number;
    /** Of kernel, initrd and kernel-modules, those the booted and the current system differ in. */
    readonly bootChanges: string[];
    readonly nixosVersion: string;
    readonly uptimeSeconds?: number;
    readonly bootId: string;
    readonly diskFreeKiB?: number;
    /** The directory whose file system diskFreeKiB is of. */
    readonly diskPath: string;
    /** `systemctl is-system-running`: running, degraded, starting, ... */
    readonly systemState: string;
    /** Failed units, but for the orders of certificates never issued (pendingCertificates). */
    readonly failedUnits: string[];
    /**
     * Certificates whose order (acme-order-renew-<cert>.service) failed and that were never issued
     * (no acme-success): waiting for DNS, which the deploy counts as a success (deploy/remote-switch.sh
     * only_pending_certificates) and the host retries by itself.
     */
    readonly pendingCertificates: string[];
    readonly health: { readonly url: string; readonly ok: boolean; readonly detail: string };
    /** pending-rollback: a deploy that switched and is not confirmed yet. */
    readonly pendingRollback?: { readonly deploy: string; readonly generation: number };
    /** pending-boot: a deploy that waits for a reboot into its new system and its confirmation. */
    readonly pendingBoot?: { readonly deploy: string; readonly generation: number; readonly previousGeneration: number };
    /** The newest deploy's ID and its outcome line (`confirmed generation=N`, `rolled-back ...`). */
    readonly lastDeploy?: { readonly id: string; readonly outcome: string };
    /** last-rollback: when the latest rollback happened and why. */
    readonly lastRollback?: string;
}

export type UnreachableKind = "no-address" | "host-key" | "auth" | "refused" | "timeout" | "no-route" | "dns" | "closed" | "deadline" | "bad-answer" | "other";

export interface Unreachable {
    readonly kind: UnreachableKind;
    /** Why, for a person: what happened and where. */
    readonly message: string;
}

export type Probe = { readonly reachable: true; readonly facts: HostFacts } | { readonly reachable: false; readonly why: Unreachable };

/** `SHA256:...` of a public key, as ssh-keygen -l prints it. */
export function fingerprint(publicKey: string): string {
    const blob = publicKey.trim().split(/\s+/)[1] ?? "";
    return `SHA256:${createHash("sha256").update(Buffer.from(blob, "base64")).digest("base64").replace(/=+$/, "")}`;
}

const USER = /^[a-z_][a-z0-9_-]{0,31}$/;
// A leading "-" would make the address an ssh option.
const ADDRESS = /^[A-Za-z0-9_.:][A-Za-z0-9_.:-]*$/;

/**
 * The user, address and port of a host's `sshCommand` output (components/nixosHost.ts's
 * sshCommand), so that status connects where that command does; undefined if it is not one.
 */
export function parseSshCommand(command: string): { user: string; address: string; port: number } | undefined {
    const m = / ssh (?:-p (\d+) )?-i "\$key" .* ([^\s@]+)@([^\s@)]+)\)$/.exec(command);
    if (!m || !USER.test(m[2]) || !ADDRESS.test(m[3])) return undefined;
    const port = m[1] === undefined ? 22 : Number(m[1]);
    return port >= 1 && port <= 65535 ? { user: m[2], address: m[3], port } : undefined;
}

/** A path as an ssh option value: quoted, `\\` and `"` escaped, `%` doubled (ssh_config(5) TOKENS). */
export function sshPath(p: string): string {
    return `"${p.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/%/g, "%%")}"`;
}

/** The files every session reads: the admin key and the known_hosts with one line per host alias. */
export interface SshFiles {
    readonly identity: string;
    readonly knownHosts: string;
}

/** The known_hosts alias of host `name`; one file pins every host's key under its own alias. */
export function hostKeyAlias(name: string): string {
    return `nixos-ec2-${name}`;
}

/** The options deploy/nixos-deploy.sh's set_ssh_options gives ssh, for one session that ends by itself. */
export function sshArgs(name: string, target: SshTarget, files: SshFiles, connectSeconds: number, extraOptions: readonly string[] = []): string[] {
    const options = [
        "BatchMode=yes",
        "IdentitiesOnly=yes",
        "IdentityAgent=none",
        `IdentityFile=${sshPath(files.identity)}`,
        "PreferredAuthentications=publickey",
        "StrictHostKeyChecking=yes",
        `UserKnownHostsFile=${sshPath(files.knownHosts)}`,
        "GlobalKnownHostsFile=/dev/null",
        `HostKeyAlias=${hostKeyAlias(name)}`,
        "HostKeyAlgorithms=ssh-ed25519",
        "CheckHostIP=no",
        "UpdateHostKeys=no",
        "ForwardAgent=no",
        "ClearAllForwardings=yes",
        "RequestTTY=no",
        "ControlMaster=no",
        "ControlPath=none",
        `ConnectTimeout=${connectSeconds}`,
        "ServerAliveInterval=5",
        "ServerAliveCountMax=2",
        "LogLevel=ERROR",
        ...extraOptions,
    ];
    return ["-F", "/dev/null", "-p", String(target.port), ...options.flatMap((o) => ["-o", o]), `${target.user}@${target.address}`, REMOTE_SNIPPET];
}

function lastLine(text: string): string {
    return (
        text
            .split("\n")
            .map((l) => l.trim())
            .filter((l) => l !== "")
            .pop() ?? ""
    );
}

/** Why ssh gave up, from its stderr (the same cases as deploy/nixos-deploy.sh's classify_ssh_error). */
export function classifySshError(stderr: string, target: SshTarget): Unreachable {
    const where = `${target.address} port ${target.port}`;
    if (/REMOTE HOST IDENTIFICATION HAS CHANGED|Host key verification failed|host key mismatch|no matching host key type/.test(stderr)) {
        const presented = /SHA256:[A-Za-z0-9+/=]+/.exec(stderr)?.[0];
        return {
            kind: "host-key",
            message:
                `the host key of ${where} does not match the one the stack pins (${fingerprint(target.hostPublicKey)}); it presented ` +
                `${presented ?? "another key"}: a possible interception, or a host replaced outside Pulumi`,
        };
    }
    const last = lastLine(stderr).slice(0, 300);
    const cases: Array<[RegExp, UnreachableKind, string]> = [
        [/Permission denied|Too many authentication failures|Load key/, "auth", `${where} refused the admin key for user ${target.user}`],
        [/Connection refused/, "refused", `${where} refused the connection (sshd not running, or the instance not up)`],
        [/timed out/, "timeout", `the connection to ${where} timed out`],
        [/No route to host|Network is unreachable/, "no-route", `no route to ${where}`],
        [/Could not resolve hostname/, "dns", `cannot resolve ${target.address}`],
        [/Connection closed|Connection reset|kex_exchange_identification|Broken pipe/, "closed", `${where} closed the connection`],
    ];
    for (const [pattern, kind, message] of cases) if (pattern.test(stderr)) return { kind, message: `${message}: ${last}` };
    return { kind: "other", message: `ssh to ${where} failed: ${last || "ssh exited without a message"}` };
}

function numberOr(text: string | undefined): number | undefined {
    if (text === undefined || !/^[0-9]+(\.[0-9]+)?$/.test(text)) return undefined;
    return Number(text);
}

/**
 * The host's report, read; a string when it is not a whole report. Value lines (`key=value`) and
 * links (`link=<path> <target>`) come first, then blocks of command output, each opened by a line
 * `--- <name>[ <value>]`, the last one `--- end`.
 */
export function parseReport(stdout: string): HostFacts | string {
    const lines = stdout.split("\n");
    if (lines[0] !== `format=${REPORT_FORMAT}`) return `the host answered with something other than a status report: ${JSON.stringify(lines[0].slice(0, 120))}`;
    if (!lines.includes("--- end")) return "the host's report ended early";
    const values = new Map<string, string>();
    const blocks = new Map<string, { value: string; lines: string[] }>();
    const links: Array<[string, string]> = [];
    let block: string[] | undefined;
    for (const line of lines.slice(1)) {
        const header = /^--- (\S+) ?(.*)$/.exec(line);
        if (header) {
            block = [];
            blocks.set(header[1], { value: header[2], lines: block });
        } else if (block !== undefined) {
            block.push(line);
        } else if (line.startsWith("link=")) {
            const [at, ...target] = line.slice("link=".length).split(" ");
            links.push([at, target.join(" ")]);
        } else {
            const kv = /^([a-z][a-z0-9.-]*)=(.*)$/.exec(line);
            if (kv) values.set(kv[1], kv[2]);
        }
    }
    const get = (k: string) => values.get(k) ?? "";
    const output = (name: string) => (blocks.get(name)?.lines ?? []).filter((l) => l.trim() !== "");
    const linkOf = (at: string) => links.find(([p]) => p === at)?.[1];
    const bootLink = (system: "booted" | "current", name: string) => links.find(([p]) => new RegExp(`/${system}-system/+${name}$`).test(p))?.[1] ?? "";

    const generation = /-(\d+)-link$/.exec(linkOf(get("profile-link")) ?? "")?.[1];
    const lastId = /-([0-9a-f]+)\.log$/.exec(linkOf(get("log-link")) ?? "")?.[1];
    const [pendingId, pendingGeneration] = get("pending-rollback").split(/\s+/);
    const pb = get("pending-boot").split(/\s+/);
    const df = output("df");
    const free = df.length >= 2 ? numberOr(df[df.length - 1].trim().split(/\s+/)[3]) : undefined;
    const healthBody = output("health").join("\n").trim();
    const healthExit = blocks.get("health-exit")?.value ?? "";
    const healthOk = healthExit === "0" && healthBody.replace(/\s+/g, "") === "ok";
    const uptime = numberOr(get("uptime").split(/\s+/)[0]);
    const failed = output("failed")
        .map((l) => l.trim().split(/\s+/)[0])
        .filter((u) => /^[\w@:.\\-]+\.[a-z]+$/.test(u));
    const pendingCertificateOf = (unit: string): string | undefined => {
        const cert = /^acme-order-renew-(.+)\.service$/.exec(unit)?.[1];
        return cert !== undefined && !values.has(`issued.${cert}`) ? cert : undefined;
    };
    return {
        currentSystem: get("current"),
        bootedSystem: get("booted"),
        profileSystem: get("profile"),
        profileGeneration: generation === undefined ? undefined : Number(generation),
        bootChanges: ["kernel", "initrd", "kernel-modules"].filter((n) => bootLink("booted", n) !== bootLink("current", n)),
        nixosVersion: get("version").trim(),
        uptimeSeconds: uptime === undefined ? undefined : Math.floor(uptime),
        bootId: get("boot-id"),
        diskFreeKiB: free,
        diskPath: get("df-path"),
        systemState: get("state"),
        failedUnits: failed.filter((u) => pendingCertificateOf(u) === undefined),
        pendingCertificates: failed.map(pendingCertificateOf).filter((c): c is string => c !== undefined),
        health: {
            url: get("health-url"),
            ok: healthOk,
            detail: healthOk
                ? "ok"
                : healthExit === "0"
                  ? `answered ${JSON.stringify(healthBody.slice(0, 80))}, not ok`
                  : lastLine(healthBody).slice(0, 200) || `curl exited ${healthExit || "without a status"}`,
        },
        pendingRollback: pendingId ? { deploy: pendingId, generation: Number(pendingGeneration) } : undefined,
        pendingBoot: pb[0] ? { deploy: pb[0], previousGeneration: Number(pb[1]), generation: Number(pb[2]) } : undefined,
        lastDeploy: lastId === undefined ? undefined : { id: lastId, outcome: get(`outcome.${lastId}`) },
        lastRollback: get("last-rollback") || undefined,
    };
}

/**
 * The key exchange, in order of preference: the post-quantum ML-KEM hybrid where this ssh has it
 * (OpenSSH 9.9 and newer; cheap), else X25519, ahead of sntrup761x25519, OpenSSH 9.0-9.8's
 * default, whose key generation costs about 60 ms of CPU here per connection: with 20 hosts,
 * more than a second, for sessions that carry nothing secret (a report of store paths, units and
 * the deploy's records). The deploy, one connection per host, keeps OpenSSH's default.
 */
const KEX_PREFERENCE = ["mlkem768x25519-sha256", "curve25519-sha256", "curve25519-sha256@libssh.org"];

/** `-o KexAlgorithms=...` for this machine's ssh (from `ssh -Q kex`); none if it knows none of them. */
export function kexOptions(env: NodeJS.ProcessEnv): string[] {
    const r = spawnSync("ssh", ["-Q", "kex"], { encoding: "utf8", env, timeout: 10_000 });
    const known = new Set((r.stdout ?? "").split("\n").map((l) => l.trim()));
    const preferred = KEX_PREFERENCE.filter((k) => known.has(k));
    return preferred.length > 0 ? [`KexAlgorithms=${preferred.join(",")}`] : [];
}

/** The most a report may be; a host that sends more is not answering the snippet. */
const MAX_REPORT_BYTES = 256 * 1024;

export interface ProbeOptions {
    /** The whole session's deadline, connection included. */
    readonly deadlineSeconds: number;
    /** More `-o` options (the key exchange). */
    readonly extraOptions?: readonly string[];
    readonly env: NodeJS.ProcessEnv;
    /** Aborted when the status command is interrupted: ssh is killed at once. */
    readonly signal?: AbortSignal;
}

/**
 * One SSH session to one host: resolves with what it reported or why it could not. Never rejects,
 * and never takes longer than the deadline: ssh is killed then.
 */
export function probeHost(name: string, target: SshTarget, files: SshFiles, options: ProbeOptions): Promise<Probe> {
    const connectSeconds = Math.max(1, Math.min(10, Math.ceil(options.deadlineSeconds)));
    return new Promise((resolve) => {
        let stdout = "";
        let stderr = "";
        let ended: Unreachable | undefined;
        const child = spawn("ssh", sshArgs(name, target, files, connectSeconds, options.extraOptions), {
            stdio: ["ignore", "pipe", "pipe"],
            env: options.env,
            signal: options.signal,
            killSignal: "SIGKILL",
        });
        const stop = (why: Unreachable) => {
            ended ??= why;
            child.kill("SIGKILL");
        };
        const timer = setTimeout(
            () => stop({ kind: "deadline", message: `no complete answer from ${target.address} port ${target.port} within ${options.deadlineSeconds} s (the status deadline, --timeout)` }),
            options.deadlineSeconds * 1000,
        );
        child.stdout.setEncoding("utf8");
        child.stderr.setEncoding("utf8");
        child.stdout.on("data", (chunk: string) => {
            stdout += chunk;
            if (stdout.length > MAX_REPORT_BYTES) stop({ kind: "bad-answer", message: `the host sent more than ${MAX_REPORT_BYTES} bytes instead of a status report` });
        });
        child.stderr.on("data", (chunk: string) => {
            if (stderr.length < MAX_REPORT_BYTES) stderr += chunk;
        });
        child.once("error", (error) => stop({ kind: "other", message: `could not run ssh: ${error.message}` }));
        child.once("close", (code) => {
            clearTimeout(timer);
            if (ended !== undefined) return resolve({ reachable: false, why: ended });
            if (code === 255) return resolve({ reachable: false, why: classifySshError(stderr, target) });
            const facts = parseReport(stdout);
            if (typeof facts === "string") return resolve({ reachable: false, why: { kind: "bad-answer", message: `${facts} (ssh exited ${code})` } });
            resolve({ reachable: true, facts });
        });
    });
}
