/**
 * `npm run status`, run as a person runs it (a child `node` with package.json's script), against
 * loopback fake hosts (test/support/sshd.ts) put in every state by real deploys and by hand, with
 * a stand-in `pulumi` on PATH answering `pulumi stack output` (test/support/fakePulumi.ts).
 */
import { spawn, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import * as path from "node:path";
import { PROJECT_DIR } from "../lib/stacks";
import { REMOTE_SNIPPET } from "../tools/statusProbe";
import { DEPLOY_TOOLS, secretLines, waitFor } from "./support/deployTest";
import { fakePulumi, FakePulumi, hostOutput } from "./support/fakePulumi";
import { AdminKey, adminKeyPair, deployEnv, freePort, runDeploy, startSshd, TestSshd } from "./support/sshd";
import { tempDir } from "./support/tempDir";
import { describeWithTools } from "./support/tools";

const STATUS = ["--require", path.join(PROJECT_DIR, "tools", "registerTs.js"), path.join(PROJECT_DIR, "tools", "status.ts")];
const OTHER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGT132e+qnONjsm9xQQfd9oWrGJWQbfv8EoOwnp7SCGC";

interface Run {
    status: number | null;
    signal: NodeJS.Signals | null;
    stdout: string;
    stderr: string;
    elapsedMs: number;
}

interface HostJson {
    verdict: string;
    kind: string;
    why: string[];
    reachable: boolean;
    unreachable: { kind: string; message: string } | null;
    deployed: { systemPath: string | null; generation: number | null };
    host: Record<string, unknown> | null;
    deployUrn: string;
    next: string[];
}

describeWithTools([...DEPLOY_TOOLS, "bash", "find", "df", "script", "shellcheck"])("npm run status", () => {
    const hosts: Record<string, TestSshd> = {};
    let admin: AdminKey;
    let work: string;
    let tmp: string;
    let pulumi: FakePulumi;
    let stall: net.Server;
    let stallPort: number;
    /** Connections the stalled server accepted: a status run that reached it has its handlers set. */
    let stallConnections = 0;
    const outputs: Record<string, Record<string, unknown>> = {};

    /** Runs the status command; TMPDIR is a directory of the test's own, to see what it leaves. */
    function status(args: string[], env: Record<string, string> = {}, onSpawn?: (pid: number) => void): Promise<Run> {
        const started = Date.now();
        const child = spawn(process.execPath, [...STATUS, ...args], {
            cwd: PROJECT_DIR,
            env: { PATH: `${pulumi.binDir}:${process.env.PATH}`, HOME: process.env.HOME ?? "", TMPDIR: tmp, ...env },
            stdio: ["ignore", "pipe", "pipe"],
        });
        if (child.pid !== undefined) onSpawn?.(child.pid);
        let stdout = "";
        let stderr = "";
        child.stdout.on("data", (c: Buffer) => (stdout += c.toString()));
        child.stderr.on("data", (c: Buffer) => (stderr += c.toString()));
        return new Promise((resolve) => child.once("close", (code, signal) => resolve({ status: code, signal, stdout, stderr, elapsedMs: Date.now() - started })));
    }

    function json(run: Run): { stack: string; exitStatus: number; summary: Record<string, number>; hosts: Record<string, HostJson> } {
        return JSON.parse(run.stdout);
    }

    /** A command an admin runs on the host by hand, over SSH with the admin key. */
    function byHand(sshd: TestSshd, command: string): void {
        const dir = tempDir("by-hand-");
        fs.writeFileSync(path.join(dir, "id"), admin.privateKey, { mode: 0o600 });
        fs.writeFileSync(path.join(dir, "known_hosts"), `h ${sshd.hostPublicKey}\n`);
        const r = spawnSync(
            "ssh",
            ["-F", "/dev/null", "-p", String(sshd.port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", `IdentityFile=${dir}/id`]
                .concat(["-o", `UserKnownHostsFile=${dir}/known_hosts`, "-o", "HostKeyAlias=h", "-o", "StrictHostKeyChecking=yes", `${sshd.user}@127.0.0.1`, command]),
            { encoding: "utf8" },
        );
        fs.rmSync(dir, { recursive: true, force: true });
        if (r.status !== 0) throw new Error(`by hand on the host failed: ${r.stderr}`);
    }

    async function deploy(sshd: TestSshd, env: Record<string, string> = {}): Promise<{ systemPath: string; generation: number; rebooted: boolean }> {
        const run = await runDeploy(deployEnv(sshd, { NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: "30", ...env }));
        if (run.code !== 0) throw new Error(`deploy failed:\n${run.stderr}`);
        return JSON.parse(run.stdout.trim().split("\n").pop() ?? "");
    }

    function setStack(stack: string, names: string[], overrides: Record<string, Record<string, unknown>> = {}): void {
        pulumi.setOutputs(stack, {
            adminPrivateKey: admin.privateKey,
            adminPublicKey: admin.publicKey.trim(),
            backendUrl: "s3://nixos-ec2-state-test?region=eu-central-1",
            hosts: Object.fromEntries(names.map((n) => [n, { ...outputs[n], ...overrides[n] }])),
        });
    }

    beforeAll(async () => {
        work = tempDir("status-");
        tmp = path.join(work, "tmp");
        fs.mkdirSync(tmp);
        pulumi = fakePulumi(path.join(work, "pulumi"));
        admin = adminKeyPair();
        const names = ["in-sync", "by-hand", "rolled-back", "reboot-due", "failed-unit", "wrong-key"];
        await Promise.all(names.map(async (n) => (hosts[n] = await startSshd({ adminKey: admin }))));

        // A server that accepts connections and never says a word.
        stall = net.createServer(() => {
            stallConnections += 1;
        });
        await new Promise<void>((resolve) => stall.listen(0, "127.0.0.1", resolve));
        stallPort = (stall.address() as net.AddressInfo).port;

        const deployed = async (n: string, env: Record<string, string> = {}) => (outputs[n] = hostOutput("prod", n, hosts[n], await deploy(hosts[n], env)));
        await Promise.all([
            deployed("in-sync"),
            // The stack pins another key than the one the host presents.
            deploy(hosts["wrong-key"]).then((result) => (outputs["wrong-key"] = hostOutput("prod", "wrong-key", hosts["wrong-key"], result, OTHER_KEY))),
            deployed("by-hand").then(() => byHand(hosts["by-hand"], 'nix-env -p "$NIXOS_EC2_SYSTEM_PROFILE" --switch-generation 1 && "$NIXOS_EC2_SYSTEM_PROFILE/bin/switch-to-configuration" switch')),
            deployed("rolled-back").then(async () => {
                hosts["rolled-back"].setBehaviour({ health: "503" });
                const failed = await runDeploy(deployEnv(hosts["rolled-back"]));
                if (failed.code === 0) throw new Error("the failing deploy succeeded");
            }),
            (async () => {
                hosts["reboot-due"].setBehaviour({ kernel: "6.13.2" });
                await deployed("reboot-due");
            })(),
            (async () => {
                hosts["failed-unit"].setBehaviour({ systemState: "degraded" });
                await deployed("failed-unit", { NIXOS_EC2_ALLOW_FAILED_UNITS: "true" });
            })(),
        ]);
        const deadPort = await freePort();
        outputs.unreachable = { ...outputs["in-sync"], sshCommand: String(outputs["in-sync"].sshCommand).replace(`-p ${hosts["in-sync"].port} `, `-p ${deadPort} `) };
        outputs.stalled = { ...outputs["in-sync"], sshCommand: String(outputs["in-sync"].sshCommand).replace(`-p ${hosts["in-sync"].port} `, `-p ${stallPort} `) };
        setStack("prod", [...names, "unreachable"]);
        setStack("good", ["in-sync"]);
        setStack("drift", ["in-sync", "by-hand"]);
        setStack("slow", ["in-sync", "stalled"]);
        // More hosts than Node lets listen on one signal by default, every one refused at once.
        for (let i = 1; i <= 12; i++) outputs[`dead-${i}`] = outputs.unreachable;
        setStack("many", Array.from({ length: 12 }, (_, i) => `dead-${i + 1}`));
        pulumi.setOutputs("empty", {});
    }, 60_000);

    afterAll(async () => {
        stall?.close();
        await Promise.all(Object.values(hosts).map((h) => h.stop()));
    });

    afterEach(() => {
        // No key file (nor anything else) is left, whatever the run did.
        expect(fs.readdirSync(tmp)).toEqual([]);
    });

    function expectNoSecret(run: Run): void {
        for (const text of [run.stdout, run.stderr]) {
            expect(text).not.toContain("PRIVATE KEY");
            for (const line of secretLines({ adminPrivateKey: admin.privateKey } as TestSshd)) expect(text).not.toContain(line);
        }
    }

    describe("a fleet in every state, as JSON", () => {
        let run: Run;
        let report: ReturnType<typeof json>;
        const logins: Record<string, number> = {};
        const stateFiles: Record<string, string> = {};
        const calls: Record<string, number> = {};
        beforeAll(async () => {
            for (const [n, h] of Object.entries(hosts)) {
                logins[n] = h.acceptedLogins();
                stateFiles[n] = snapshot(h.stateDir);
                calls[n] = h.calls().length;
            }
            run = await status(["prod", "--json"]);
            report = json(run);
        });

        it("gives each host its verdict, and exit status 2 as one is unreachable", () => {
            const verdicts = Object.fromEntries(Object.entries(report.hosts).map(([n, h]) => [n, h.verdict]));
            expect(verdicts).toEqual({
                "by-hand": "drifted: switched outside Pulumi",
                "failed-unit": "unhealthy: unit fake-broken.service failed",
                "in-sync": "in sync",
                "reboot-due": "needs reboot",
                "rolled-back": expect.stringMatching(/^rolled back: health check http:\/\/127\.0\.0\.1\/healthz failed after 5 attempts: curl: \(22\) .*503/),
                unreachable: "unreachable",
                "wrong-key": "unreachable",
            });
            expect([run.status, report.exitStatus, run.stderr]).toEqual([2, 2, ""]);
            expect(report.summary).toEqual({ hosts: 7, "in-sync": 1, "rolled-back": 1, drifted: 1, unhealthy: 1, "needs-reboot": 1, unreachable: 2 });
        });

        it("says why a host is unreachable: a refused connection, a host key that is not the pinned one", () => {
            expect(report.hosts.unreachable.unreachable).toEqual({ kind: "refused", message: expect.stringMatching(/^127\.0\.0\.1 port \d+ refused the connection/) });
            expect(report.hosts["wrong-key"].unreachable).toEqual({
                kind: "host-key",
                message: expect.stringMatching(/does not match the one the stack pins \(SHA256:[^)]+\); it presented SHA256:\S+: a possible interception/),
            });
            const sshKeygen = (key: string) => /SHA256:\S+/.exec(spawnSync("ssh-keygen", ["-l", "-f", "-"], { input: key, encoding: "utf8" }).stdout)?.[0];
            expect(report.hosts["wrong-key"].unreachable?.message).toContain(`pins (${sshKeygen(OTHER_KEY)}); it presented ${sshKeygen(hosts["wrong-key"].hostPublicKey)}:`);
            expect(report.hosts["wrong-key"].next.join(" ")).toMatch(/do not work around it/);
            expect(report.hosts["wrong-key"].host).toBeNull();
        });

        it("reports what was deployed against what runs, boots and is in the profile", () => {
            const drifted = report.hosts["by-hand"];
            expect(drifted.deployed).toEqual({ systemPath: outputs["by-hand"].systemPath, generation: 2 });
            expect(drifted.host).toMatchObject({ profileGeneration: 1, currentSystem: hosts["by-hand"].currentSystem(), bootedSystem: hosts["by-hand"].bootedSystem() });
            expect(drifted.deployed.systemPath).not.toBe(drifted.host?.currentSystem);
            const synced = report.hosts["in-sync"];
            expect(synced.host).toMatchObject({ currentSystem: synced.deployed.systemPath, profileSystem: synced.deployed.systemPath, profileGeneration: 2, bootChanges: [] });
            expect(report.hosts["reboot-due"].host).toMatchObject({ bootChanges: ["kernel", "initrd", "kernel-modules"] });
        });

        it("tells how to re-deploy a drifted host: pulumi up --replace of its deploy Command", () => {
            const urn = "urn:pulumi:prod::nixos-ec2::nixos-ec2:index:NixosDeployment$command:local:Command::by-hand-switch";
            expect(report.hosts["by-hand"].deployUrn).toBe(urn);
            expect(report.hosts["by-hand"].next).toContain(`pulumi up -s prod --replace '${urn}'`);
        });

        it("has the JSON shape the README shows, with the host's records", () => {
            expect(Object.keys(report)).toEqual(["stack", "checkedAt", "deadlineSeconds", "exitStatus", "summary", "hosts"]);
            expect(Object.keys(report.hosts)).toEqual(["by-hand", "failed-unit", "in-sync", "reboot-due", "rolled-back", "unreachable", "wrong-key"]);
            const h = report.hosts["rolled-back"];
            expect(Object.keys(h)).toEqual(["verdict", "kind", "why", "reachable", "unreachable", "flakeAttr", "ssh", "deployed", "host", "deployUrn", "next"]);
            expect(h.host).toMatchObject({
                nixosVersion: "26.05.20261201.0000000 (Fake)",
                uptimeSeconds: expect.any(Number),
                diskFreeKiB: expect.any(Number),
                systemState: "running",
                failedUnits: [],
                health: { url: "http://127.0.0.1/healthz", ok: true, detail: "ok" },
                lastDeploy: { id: expect.stringMatching(/^[0-9a-f]{12}$/), outcome: expect.stringMatching(/^rolled-back generation=2 reason=health check/) },
                lastRollback: expect.stringMatching(/rolled back to generation 2: health check/),
            });
            expect(h.host).not.toHaveProperty("pendingRollback");
            expect(report.hosts["in-sync"].host).toMatchObject({ lastDeploy: { outcome: "confirmed generation=2" } });
            expect(report.hosts["failed-unit"].host).toMatchObject({ systemState: "degraded", failedUnits: ["fake-broken.service"] });
        });

        it("logs in once per reachable host, and changes nothing there", () => {
            for (const [n, h] of Object.entries(hosts)) {
                expect([n, h.acceptedLogins() - logins[n]]).toEqual([n, n === "wrong-key" ? 0 : 1]);
                expect(snapshot(h.stateDir)).toBe(stateFiles[n]);
                const asked = h.calls().slice(calls[n]);
                expect(asked.filter((c) => !/^(systemctl is-system-running|systemctl --failed --no-legend --plain --no-pager|df -Pk \S+|curl -fsS --max-time 5 \S+)$/.test(c))).toEqual([]);
            }
        });

        it("asks the CLI for the stack's outputs exactly so, and prints no secret", () => {
            expect(pulumi.calls()).toContain("stack output --json --show-secrets -s prod");
            expectNoSecret(run);
        });
    });

    describe("the table", () => {
        it("fits 80 columns but for the commands to copy, and has no colour when not on a terminal", async () => {
            const run = await status(["prod"]);
            expect(run.status).toBe(2);
            expect(run.stdout).not.toContain("\u001b[");
            const long = run.stdout.split("\n").filter((l) => l.length > 80);
            expect(long.every((l) => /^ {4}pulumi up -s prod --replace 'urn:/.test(l))).toBe(true);
            expect(run.stdout).toMatch(/^HOST +VERDICT +GEN +NIXOS +UP +FREE +LAST DEPLOY$/m);
            expect(run.stdout).toMatch(/^in-sync +in sync +2 +26\.05 +\S+( \S+)? +\S+ +confirmed$/m);
            expect(run.stdout).toMatch(/^by-hand +drifted +2→1 /m);
            expect(run.stdout).toMatch(/^rolled-back: rolled back: health check/m);
            expect(run.stdout).toMatch(/^wrong-key: unreachable\n {2}- the host key of 127\.0\.0\.1 port \d+ does not match[^\n]*\n {4}\S/m);
            expect(run.stdout).toMatch(/\n1 in sync, 1 rolled back, 1 drifted, 1 unhealthy, 1 needs reboot, 2 unreachable;\s+exit status 2\.\n$/);
            expectNoSecret(run);
        });

        it("is coloured on a terminal, unless NO_COLOR is set", () => {
            const onTerminal = (env: string) =>
                spawnSync("script", ["-qec", `env ${env} ${[process.execPath, ...STATUS, "good"].map((a) => `'${a}'`).join(" ")}`, "/dev/null"], {
                    cwd: PROJECT_DIR,
                    env: { PATH: `${pulumi.binDir}:${process.env.PATH}`, HOME: process.env.HOME ?? "", TMPDIR: tmp, TERM: "xterm" },
                    encoding: "utf8",
                    timeout: 30_000,
                }).stdout;
            expect(onTerminal("TERM=xterm")).toMatch(/\u001b\[32min sync/);
            const plain = onTerminal("NO_COLOR=1");
            expect(plain).toMatch(/in sync/);
            expect(plain).not.toContain("\u001b[");
        });
    });

    describe("the exit status", () => {
        it("is 0 when every host is in sync and healthy", async () => {
            const run = await status(["good"]);
            expect([run.status, run.stderr]).toEqual([0, ""]);
            expect(run.stdout).toMatch(/1 in sync; exit status 0\.\n$/);
        });

        it("is 0 with a TMPDIR that holds a space and a %, which ssh would split or expand", async () => {
            const odd = path.join(tmp, "a b%h");
            fs.mkdirSync(odd);
            const run = await status(["good"], { TMPDIR: odd });
            expect([run.status, run.stderr, fs.readdirSync(odd)]).toEqual([0, "", []]);
            fs.rmdirSync(odd);
        });

        it("is 1 when a host drifted and none is unreachable", async () => {
            const run = await status(["drift", "--json"]);
            expect([run.status, json(run).hosts["by-hand"].kind]).toEqual([1, "drifted"]);
        });

        it("is 3, saying what to do, for a stack the backend does not have", async () => {
            const run = await status(["nosuch"]);
            expect(run.status).toBe(3);
            expect(run.stdout).toBe("");
            expect(run.stderr).toMatch(/^status: pulumi stack output -s nosuch failed:\nerror: no stack named 'nosuch' found\nthe backend you are logged in to has no stack nosuch: check the name/);
        });

        it("is 3 for a stack that was never deployed", async () => {
            const run = await status(["empty"]);
            expect([run.status, run.stderr]).toEqual([3, "status: stack empty has no hosts output: it was never deployed with this program; run pulumi up -s empty first\n"]);
        });

        it("is 3 without the Pulumi CLI on PATH, saying how to get it", async () => {
            const run = await status(["prod"], { PATH: path.dirname(process.execPath) });
            expect(run.status).toBe(3);
            expect(run.stderr).toMatch(/the Pulumi CLI \(pulumi\) is not on PATH: install it/);
        });

        it("is 3 for bad arguments, with the usage", async () => {
            for (const args of [[], ["prod", "--timeout", "0"], ["prod", "--colour"], ["prod", "staging"]]) {
                const run = await status(args);
                expect([args, run.status]).toEqual([args, 3]);
                expect(run.stderr).toMatch(/usage: npm run status -- STACK/);
            }
        });
    });

    it("runs a snippet on the hosts that is POSIX sh, as shellcheck reads it", () => {
        const r = spawnSync("shellcheck", ["-s", "sh", "-"], { input: REMOTE_SNIPPET, encoding: "utf8" });
        expect([r.status, r.stdout]).toEqual([0, ""]);
    });

    it("checks a dozen hosts at once and says nothing on stderr", async () => {
        const run = await status(["many", "--json"]);
        expect([run.status, run.stderr]).toEqual([2, ""]);
        expect(Object.values(json(run).hosts).map((h) => h.unreachable?.kind)).toEqual(Array(12).fill("refused"));
    });

    describe("the deadline", () => {
        it("gives up on a host that never answers after --timeout, and reports the others", async () => {
            const run = await status(["slow", "--json", "--timeout", "2"]);
            const report = json(run);
            expect(run.status).toBe(2);
            expect(report.hosts["in-sync"].verdict).toBe("in sync");
            expect(report.hosts.stalled.unreachable).toEqual({ kind: "deadline", message: expect.stringMatching(/no complete answer from 127\.0\.0\.1 port \d+ within 2 s/) });
            expect(run.elapsedMs).toBeGreaterThanOrEqual(2000);
            expect(run.elapsedMs).toBeLessThan(8000);
        });

        it.each([
            ["SIGTERM", 143],
            ["SIGINT", 130],
            ["SIGHUP", 129],
            ["SIGQUIT", 131],
        ] as Array<[NodeJS.Signals, number]>)("leaves no key file when it is stopped by %s while it waits", async (signal, exitStatus) => {
            let pid = 0;
            const before = stallConnections;
            const running = status(["slow", "--timeout", "30"], {}, (p) => (pid = p));
            await waitFor("the key directory", () => fs.readdirSync(tmp).length === 1, 15_000);
            // Its ssh reached the stalled host: the probes run, after the signal handlers were set.
            await waitFor("the probe of the stalled host", () => stallConnections > before, 15_000);
            process.kill(pid, signal);
            const run = await running;
            expect([run.status, run.stdout]).toEqual([exitStatus, ""]);
            expect(run.elapsedMs).toBeLessThan(10_000);
        });
    });
});

/** Every file under `dir` with its content, as one string to compare. */
function snapshot(dir: string): string {
    const walk = (d: string): string[] =>
        fs.readdirSync(d, { withFileTypes: true }).flatMap((e) => {
            const p = path.join(d, e.name);
            if (e.isSymbolicLink()) return [`${p} -> ${fs.readlinkSync(p)}`];
            if (e.isDirectory()) return walk(p);
            return [`${p}: ${fs.readFileSync(p, "utf8")}`];
        });
    return walk(dir).sort().join("\n");
}
