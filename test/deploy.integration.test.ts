/**
 * deploy/nixos-deploy.sh against a real OpenSSH server on 127.0.0.1 that plays the NixOS host
 * (test/support/sshd.ts): stand-ins for nixos-rebuild, nix-env, systemd-run, systemctl and curl
 * record their calls, and the system profile is a real symlink chain.
 */
import { execFileSync, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { DeployRun, deployEnv, freePort, runDeploy, sshdCommand, startSshd, SshdOptions, TestSshd } from "./support/sshd";
import { describeWithTools } from "./support/tools";

const REPO = path.resolve(__dirname, "..");
const TAIL_HEADER = /---- last 40 lines of \S+ on \S+ ----/;

/** Every script the project ships or runs on the fake host. */
function shellScripts(): string[] {
    const dirs = ["deploy", "test/fixtures/host-bin", "test/fixtures/fake-system"];
    return dirs.flatMap((dir) =>
        fs
            .readdirSync(path.join(REPO, dir))
            .map((name) => path.join(REPO, dir, name))
            .filter((file) => fs.statSync(file).isFile() && fs.readFileSync(file, "utf8").startsWith("#!/usr/bin/env bash")),
    );
}

describeWithTools(["shellcheck"])("deploy scripts", () => {
    test("shellcheck passes on every script under deploy/ and the host stand-ins", () => {
        const scripts = shellScripts();
        expect(scripts.map((file) => path.relative(REPO, file))).toEqual(
            expect.arrayContaining([
                "deploy/nixos-deploy.sh",
                "deploy/remote-switch.sh",
                "test/fixtures/host-bin/nixos-rebuild",
                "test/fixtures/host-bin/nix-env",
                "test/fixtures/host-bin/systemd-run",
                "test/fixtures/host-bin/systemctl",
                "test/fixtures/host-bin/curl",
                "test/fixtures/fake-system/switch-to-configuration",
            ]),
        );
        const result = spawnSync("shellcheck", ["--severity=style", ...scripts], { encoding: "utf8" });
        expect(result.stdout + result.stderr).toBe("");
        expect(result.status).toBe(0);
    });

    test("the deploy scripts are executable and strict", () => {
        for (const script of ["deploy/nixos-deploy.sh", "deploy/remote-switch.sh"]) {
            const file = path.join(REPO, script);
            expect(fs.statSync(file).mode & 0o111).not.toBe(0);
            const text = fs.readFileSync(file, "utf8");
            expect(text).toMatch(/^#!\/usr\/bin\/env bash\n/);
            expect(text).toContain("\nset -euo pipefail\n");
            expect(text).not.toMatch(/set -[a-z]*x/);
        }
    });
});

describeWithTools([sshdCommand(), "ssh", "ssh-keygen", "tar", "flock", "setsid", "timeout", "sha256sum"])(
    "deploy/nixos-deploy.sh against a loopback sshd",
    () => {
        const hosts: TestSshd[] = [];

        async function host(options: SshdOptions = {}): Promise<TestSshd> {
            const sshd = await startSshd(options);
            hosts.push(sshd);
            return sshd;
        }

        afterEach(async () => {
            for (const sshd of hosts.splice(0)) {
                // A deploy killed on purpose leaves its ControlMaster behind (ControlPersist).
                for (const work of fs.existsSync(sshd.localTmp) ? fs.readdirSync(sshd.localTmp) : []) {
                    const socket = path.join(sshd.localTmp, work, "cm");
                    if (fs.existsSync(socket)) {
                        spawnSync("ssh", ["-o", `ControlPath=${socket}`, "-O", "exit", "x"], { stdio: "ignore" });
                    }
                }
                await sshd.stop();
            }
        });

        function stdoutLines(run: DeployRun): string[] {
            return run.stdout.split("\n").filter((line) => line !== "");
        }

        function deployId(run: DeployRun): string {
            const match = /\(deploy ([0-9a-f]{12})\)/.exec(run.stderr);
            if (!match) {
                throw new Error(`no deploy id in:\n${run.stderr}`);
            }
            return match[1];
        }

        function unitFile(sshd: TestSshd, run: DeployRun, suffix: string): string {
            return path.join(sshd.hostDir, "units", `nixos-ec2-rollback-${deployId(run)}.timer.${suffix}`);
        }

        /**
         * The base64 lines of the admin key that carry key material. The first line is left out:
         * it holds only the format header, the same in every unencrypted ED25519 key (the host's too).
         */
        function secretLines(sshd: TestSshd): string[] {
            const body = sshd.adminPrivateKey.split("\n").filter((line) => line !== "" && !line.startsWith("-----"));
            return body.slice(1).filter((line) => line.length >= 20);
        }

        function filesUnder(dir: string): string[] {
            return fs.readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
                const full = path.join(dir, entry.name);
                if (entry.isDirectory()) {
                    return filesUnder(full);
                }
                return entry.isFile() ? [full] : [];
            });
        }

        /** The key is in no output, no recorded call, no log or file of the host, and no temp file is left. */
        function expectNoSecretLeft(sshd: TestSshd, run: DeployRun): void {
            const texts: [string, string][] = [
                ["stdout", run.stdout],
                ["stderr", run.stderr],
                ...filesUnder(sshd.dir).map((file): [string, string] => [file, fs.readFileSync(file, "latin1")]),
            ];
            for (const line of secretLines(sshd)) {
                for (const [where, text] of texts) {
                    if (text.includes(line)) {
                        throw new Error(`a line of the private key appears in ${where}`);
                    }
                }
            }
            expect(fs.readdirSync(sshd.localTmp)).toEqual([]);
        }

        async function waitFor(what: string, condition: () => boolean, timeoutMs: number): Promise<void> {
            const started = Date.now();
            while (!condition()) {
                if (Date.now() - started > timeoutMs) {
                    throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
                }
                await new Promise((resolve) => setTimeout(resolve, 100));
            }
        }

        function callIndex(sshd: TestSshd, pattern: RegExp): number {
            return sshd.calls().findIndex((call) => pattern.test(call));
        }

        /** The failure output: the log tail from the host, then the error line of the deploy. */
        function expectRolledBackWithLogTail(sshd: TestSshd, run: DeployRun, logLine: string): void {
            expect(run.code).toBe(1);
            expect(run.stdout).toBe("");
            expect(sshd.generation()).toBe(1);
            expect(sshd.currentSystem()).toBe(sshd.systemPath());
            expect(sshd.systemPath()).toMatch(/-nixos-system-initial$/);
            const tail = run.stderr.search(TAIL_HEADER);
            expect(tail).toBeGreaterThan(-1);
            expect(run.stderr.indexOf(logLine, tail)).toBeGreaterThan(tail);
            expect(run.stderr).toMatch(/rolled back to generation 1/);
            expect(run.stderr).toMatch(/nixos-deploy: error: .*127\.0\.0\.1 port \d+/);
            expect(run.stderr).toMatch(/nixos-deploy: {3}next: /);
            expect(sshd.calls()).toContain(`nix-env -p ${sshd.profile} --switch-generation 1`);
            expect(fs.existsSync(unitFile(sshd, run, "stopped"))).toBe(true);
            expect(fs.existsSync(unitFile(sshd, run, "fired"))).toBe(false);
        }

        test("a deploy switches the host, copies the flake and prints the new system as its only stdout line", async () => {
            const sshd = await host();
            const run = await runDeploy(deployEnv(sshd));
            expect(run.stderr).toContain("confirmed");
            expect(run.code).toBe(0);

            const lines = stdoutLines(run);
            expect(lines).toHaveLength(1);
            expect(JSON.parse(lines[0])).toEqual({ systemPath: sshd.systemPath(), generation: 2 });
            expect(sshd.systemPath()).toMatch(new RegExp(`^${sshd.hostDir}/store/[0-9a-f]{32}-nixos-system-web$`));
            expect(sshd.currentSystem()).toBe(sshd.systemPath());

            const copied = path.join(sshd.stateDir, "flake");
            expect(fs.readFileSync(path.join(copied, "flake.nix"), "utf8")).toBe(
                fs.readFileSync(path.join(sshd.flakeDir, "flake.nix"), "utf8"),
            );
            expect(fs.readFileSync(path.join(copied, "modules", "web.nix"), "utf8")).toBe("{ ... }: { }\n");
            for (const dropping of ["result", "result-1", "flake.nix~", ".DS_Store", "modules/.#web.nix", "modules/.web.nix.swp"]) {
                expect(fs.existsSync(path.join(copied, dropping))).toBe(false);
            }
            expect(fs.readFileSync(path.join(sshd.stateDir, "bin", "remote-switch.sh"), "utf8")).toBe(
                fs.readFileSync(path.join(REPO, "deploy", "remote-switch.sh"), "utf8"),
            );
            expect(fs.readdirSync(sshd.stateDir).filter((name) => name.startsWith("upload."))).toEqual([]);

            const id = deployId(run);
            const order = [
                new RegExp(`^nixos-rebuild build --flake path:${sshd.stateDir}/flake#web$`),
                new RegExp(`^systemd-run --unit=nixos-ec2-rollback-${id} .*--on-active=5s .* rollback ${id}$`),
                new RegExp(`^nix-env -p ${sshd.profile} --set ${sshd.systemPath()}$`),
                /^switch-to-configuration\[[0-9a-f]{32}-nixos-system-web\] switch$/,
                new RegExp(`^systemctl stop nixos-ec2-rollback-${id}\\.timer$`),
                /^systemctl is-system-running --wait$/,
                /^curl -fsS --max-time 10 http:\/\/127\.0\.0\.1\/healthz$/,
            ].map((pattern) => callIndex(sshd, pattern));
            expect(order.every((index) => index >= 0)).toBe(true);
            expect([...order].sort((a, b) => a - b)).toEqual(order);

            expect(fs.existsSync(unitFile(sshd, run, "stopped"))).toBe(true);
            expect(fs.existsSync(unitFile(sshd, run, "fired"))).toBe(false);
            expect(fs.readFileSync(path.join(sshd.stateDir, "deploys", id), "utf8")).toBe("confirmed generation=2\n");
            expect(sshd.acceptedLogins()).toBe(2);
            expect(run.stderr).toMatch(/connecting to 127\.0\.0\.1 port \d+/);
            expect(run.stderr).toContain("confirming over a new SSH connection");
            expectNoSecretLeft(sshd, run);
        });

        test("a deploy opens exactly two SSH connections: one multiplexed for copy and switch, one to confirm", async () => {
            const sshd = await host();
            const run = await runDeploy(deployEnv(sshd));
            expect(run.code).toBe(0);
            expect(sshd.acceptedLogins()).toBe(2);
            const ports = [...sshd.sshdLog().matchAll(/Accepted publickey for \S+ from 127\.0\.0\.1 port (\d+)/g)].map(
                (match) => match[1],
            );
            expect(new Set(ports).size).toBe(2);
        });

        test("an SSH server that comes up late is waited for, with progress", async () => {
            const sshd = await host({ startAfterMs: 2500 });
            const run = await runDeploy(deployEnv(sshd, { NIXOS_EC2_CONNECT_TIMEOUT_SECONDS: "20" }));
            expect(run.code).toBe(0);
            expect(run.elapsedMs).toBeGreaterThanOrEqual(2500);
            expect(run.stderr).toMatch(/waiting for SSH on 127\.0\.0\.1 port \d+ \(attempt 1, \d+s left\): .*Connection refused/);
            expect(JSON.parse(stdoutLines(run)[0]).generation).toBe(2);
            expect(sshd.acceptedLogins()).toBe(2);
            expectNoSecretLeft(sshd, run);
        });

        test("an SSH server that never comes up fails within the deadline, naming the host, the last error and what to check", async () => {
            const sshd = await host();
            const closedPort = await freePort();
            const run = await runDeploy(
                deployEnv(sshd, { NIXOS_EC2_PORT: String(closedPort), NIXOS_EC2_CONNECT_TIMEOUT_SECONDS: "3" }),
            );
            expect(run.code).toBe(1);
            expect(run.elapsedMs).toBeGreaterThanOrEqual(2000);
            expect(run.elapsedMs).toBeLessThan(7000);
            expect(run.stdout).toBe("");
            expect(run.stderr).toContain(`no SSH connection to 127.0.0.1 port ${closedPort} within 3s`);
            expect(run.stderr).toMatch(/last SSH error: .*Connection refused/);
            expect(run.stderr).toMatch(/security group allows TCP \d+/);
            expect(run.stderr).toContain("CIDR");
            expect(sshd.calls()).toEqual([]);
            expectNoSecretLeft(sshd, run);
        });

        test("a host key other than the pinned one fails at once and says so", async () => {
            const sshd = await host();
            const otherKey = path.join(sshd.dir, "other_host_key");
            execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", otherKey]);
            const pinned = fs.readFileSync(`${otherKey}.pub`, "utf8").trim();
            const run = await runDeploy(
                deployEnv(sshd, { NIXOS_EC2_HOST_PUBLIC_KEY: pinned, NIXOS_EC2_CONNECT_TIMEOUT_SECONDS: "30" }),
            );
            expect(run.code).toBe(1);
            expect(run.elapsedMs).toBeLessThan(5000);
            expect(run.stdout).toBe("");
            expect(run.stderr).toMatch(/the SSH host key of 127\.0\.0\.1 port \d+ did not match the pinned key/);
            expect(run.stderr).toContain("possible interception");
            expect(run.stderr).toContain("Not retrying");
            expect(run.stderr).not.toContain("waiting for SSH");
            expect(sshd.acceptedLogins()).toBe(0);
            expect(sshd.calls()).toEqual([]);
            expectNoSecretLeft(sshd, run);
        });

        test("a key the host refuses fails at once instead of being retried", async () => {
            const sshd = await host();
            const otherKey = path.join(sshd.dir, "other_admin_key");
            execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", otherKey]);
            const privateKey = fs.readFileSync(otherKey, "utf8");
            fs.rmSync(otherKey);
            const run = await runDeploy(
                deployEnv(sshd, { NIXOS_EC2_SSH_PRIVATE_KEY: privateKey, NIXOS_EC2_CONNECT_TIMEOUT_SECONDS: "30" }),
            );
            expect(run.code).toBe(1);
            expect(run.elapsedMs).toBeLessThan(5000);
            expect(run.stderr).toMatch(/127\.0\.0\.1 port \d+ refused the SSH key for user '\S+': .*Permission denied/);
            expect(run.stderr).not.toContain("waiting for SSH");
            expect(sshd.calls()).toEqual([]);
            expect(fs.readdirSync(sshd.localTmp)).toEqual([]);
        });

        test("a switch that fails (exit 1) rolls back to the recorded generation and fails with the log tail", async () => {
            const sshd = await host();
            sshd.setBehaviour({ switchExit: 1 });
            const run = await runDeploy(deployEnv(sshd));
            expectRolledBackWithLogTail(sshd, run, "error: fake activation script failed");
            expect(run.stderr).toContain("activation failed (exit status 1)");
            expect(run.stderr).toMatch(/switching 127\.0\.0\.1 port \d+ to #web failed and the host rolled back to generation 1/);
            expectNoSecretLeft(sshd, run);
        });

        test("a switch with failed units (exit 4) rolls back and fails unless allowFailedUnits is set", async () => {
            const sshd = await host();
            sshd.setBehaviour({ switchExit: 4 });
            const run = await runDeploy(deployEnv(sshd));
            expectRolledBackWithLogTail(sshd, run, "warning: the following units failed: fake-broken.service");
            expect(run.stderr).toContain("some units failed to start (switch-to-configuration exited 4; allowFailedUnits is false)");
        });

        test("a switch with failed units (exit 4) is kept when allowFailedUnits is true", async () => {
            const sshd = await host();
            sshd.setBehaviour({ switchExit: 4 });
            const run = await runDeploy(deployEnv(sshd, { NIXOS_EC2_ALLOW_FAILED_UNITS: "true" }));
            expect(run.code).toBe(0);
            expect(run.stderr).toContain("keeping the new system because allowFailedUnits is true");
            expect(JSON.parse(stdoutLines(run)[0])).toEqual({ systemPath: sshd.systemPath(), generation: 2 });
            expect(sshd.systemPath()).toMatch(/-nixos-system-web$/);
            expect(sshd.calls().some((call) => call.includes("--switch-generation"))).toBe(false);
        });

        test("a failing build changes nothing on the host and fails with the log tail", async () => {
            const sshd = await host();
            sshd.setBehaviour({ buildExit: 1 });
            const run = await runDeploy(deployEnv(sshd));
            expect(run.code).toBe(1);
            expect(run.stdout).toBe("");
            const tail = run.stderr.search(TAIL_HEADER);
            expect(tail).toBeGreaterThan(-1);
            expect(run.stderr.indexOf("fake build failure", tail)).toBeGreaterThan(tail);
            expect(run.stderr).toMatch(/building #web on 127\.0\.0\.1 port \d+ failed; the host was not changed/);
            expect(sshd.generation()).toBe(1);
            expect(sshd.calls().filter((call) => /^(nix-env|switch-to-configuration)/.test(call))).toEqual([]);
            expect(sshd.calls().some((call) => call.includes("--on-active"))).toBe(false);
        });

        test("a switch that locks the admin out of new connections is rolled back by the host; the deploy fails and says so", async () => {
            const sshd = await host();
            sshd.setBehaviour({ breakSsh: true });
            const run = await runDeploy(deployEnv(sshd, { NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: "3" }));
            expect(run.code).toBe(1);
            expect(run.stdout).toBe("");
            expect(run.stderr).toMatch(/could not open a new SSH connection to 127\.0\.0\.1 port \d+ after the switch .*Permission denied/);
            expect(run.stderr).toContain("the host rolls itself back to generation 1 within 3s");
            expect(sshd.acceptedLogins()).toBe(1);
            // The deploy did not roll back; the timer on the host does.
            expect(sshd.generation()).toBe(2);
            expect(fs.readFileSync(path.join(sshd.hostDir, "authorized_keys"), "utf8").trim()).toBe("");

            await waitFor("the host to roll back", () => sshd.generation() === 1, 8000);
            await waitFor("the rollback to finish", () => {
                const outcome = path.join(sshd.stateDir, "deploys", deployId(run));
                return fs.existsSync(outcome) && fs.readFileSync(outcome, "utf8").startsWith("rolled-back");
            }, 5000);
            expect(fs.existsSync(unitFile(sshd, run, "fired"))).toBe(true);
            expect(sshd.currentSystem()).toMatch(/-nixos-system-initial$/);
            expect(fs.readFileSync(path.join(sshd.hostDir, "authorized_keys"), "utf8")).toBe(
                fs.readFileSync(path.join(sshd.hostDir, "admin.pub"), "utf8"),
            );
            expect(fs.readFileSync(path.join(sshd.stateDir, "deploy.log"), "utf8")).toContain(
                "was not confirmed within the rollback timeout",
            );
            expectNoSecretLeft(sshd, run);

            // The admin is let in again: the next deploy works.
            sshd.setBehaviour({});
            const again = await runDeploy(deployEnv(sshd));
            expect(again.code).toBe(0);
        });

        test("a failing health check rolls back and fails", async () => {
            const sshd = await host({ healthUrl: "http://127.0.0.1:8080/healthz" });
            sshd.setBehaviour({ health: "503" });
            const run = await runDeploy(deployEnv(sshd));
            expectRolledBackWithLogTail(sshd, run, "health check http://127.0.0.1:8080/healthz failed");
            expect(run.stderr).toContain("The requested URL returned error: 503");
            expect(run.stderr).toMatch(/failed its checks after the switch and was rolled back to generation 1/);
            const healthCalls = sshd.calls().filter((call) => call.startsWith("curl "));
            expect(healthCalls).toHaveLength(5);
            expect(healthCalls.every((call) => call.endsWith(" http://127.0.0.1:8080/healthz"))).toBe(true);
        });

        test("a health check that answers something other than ok rolls back", async () => {
            const sshd = await host();
            sshd.setBehaviour({ health: "starting" });
            const run = await runDeploy(deployEnv(sshd));
            expectRolledBackWithLogTail(sshd, run, "health check http://127.0.0.1/healthz failed after 5 attempts: starting");
        });

        test("a degraded system after the switch rolls back unless allowFailedUnits is set", async () => {
            const sshd = await host();
            sshd.setBehaviour({ systemState: "degraded" });
            const run = await runDeploy(deployEnv(sshd));
            expectRolledBackWithLogTail(sshd, run, "fake-broken.service loaded failed failed");
            expect(run.stderr).toContain("the system is degraded");

            const allowed = await runDeploy(deployEnv(sshd, { NIXOS_EC2_ALLOW_FAILED_UNITS: "true" }));
            expect(allowed.code).toBe(0);
            expect(allowed.stderr).toContain("accepted because allowFailedUnits is true");
            expect(sshd.systemPath()).toMatch(/-nixos-system-web$/);
        });

        test("a system that does not settle in time rolls back", async () => {
            const sshd = await host();
            sshd.setBehaviour({ settleDelaySeconds: 5 });
            const run = await runDeploy(deployEnv(sshd, { NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: "2" }));
            expectRolledBackWithLogTail(sshd, run, "the system did not settle within 2s");
        });

        test("an earlier deploy that was never confirmed is rolled back before the next one; an unchanged flake keeps its generation", async () => {
            const sshd = await host();
            const first = await runDeploy(deployEnv(sshd));
            expect(first.code).toBe(0);
            expect(sshd.generation()).toBe(2);
            // As if a deploy had switched to generation 2 and then lost its confirm connection.
            fs.writeFileSync(path.join(sshd.stateDir, "pending-rollback"), "0123456789ab 1\n");
            const callsBefore = sshd.calls().length;

            const second = await runDeploy(deployEnv(sshd));
            expect(second.code).toBe(0);
            expect(second.stderr).toContain("deploy 0123456789ab was never confirmed; rolling it back");
            const calls = sshd.calls().slice(callsBefore);
            const rollback = calls.indexOf(`nix-env -p ${sshd.profile} --switch-generation 1`);
            const build = calls.findIndex((call) => call.startsWith("nixos-rebuild build"));
            expect(rollback).toBeGreaterThan(-1);
            expect(build).toBeGreaterThan(rollback);
            // Same flake, same system: Nix makes no new generation.
            expect(JSON.parse(stdoutLines(second)[0])).toEqual({ systemPath: sshd.systemPath(), generation: 2 });
            expect(fs.readFileSync(path.join(sshd.stateDir, "deploys", "0123456789ab"), "utf8")).toMatch(
                /^rolled-back generation=1 reason=superseded by deploy/,
            );
        });

        /** The ControlMaster of a running deploy (its socket lives in the deploy's temp dir). */
        function controlMasterPid(sshd: TestSshd): number | undefined {
            for (const work of fs.readdirSync(sshd.localTmp)) {
                const socket = path.join(sshd.localTmp, work, "cm");
                const check = spawnSync("ssh", ["-o", `ControlPath=${socket}`, "-O", "check", "x"], { encoding: "utf8" });
                const match = /pid=(\d+)/.exec(check.stderr);
                if (match) {
                    return Number(match[1]);
                }
            }
            return undefined;
        }

        test("a dropped SSH connection does not stop the switch, and the unconfirmed host rolls itself back", async () => {
            const sshd = await host();
            sshd.setBehaviour({ buildDelaySeconds: 1.5 });
            let callsAtDrop: string[] = [];
            // The mux client hands its stdio to the master, so only killing the master drops the
            // TCP connection (and with it the session on the host).
            const run = await runDeploy(deployEnv(sshd, { NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: "3" }), {
                killWhen: (stderr) => {
                    if (!stderr.includes("building the system configuration")) {
                        return false;
                    }
                    const master = controlMasterPid(sshd);
                    if (master === undefined) {
                        throw new Error("no ControlMaster found for the running deploy");
                    }
                    callsAtDrop = sshd.calls();
                    process.kill(master, "SIGKILL");
                    return true;
                },
            });
            expect(run.signal).toBe("SIGKILL");
            expect(run.elapsedMs).toBeLessThan(1500);
            expect(callsAtDrop.some((call) => call.startsWith("nixos-rebuild build"))).toBe(true);
            expect(callsAtDrop.some((call) => call.startsWith("switch-to-configuration"))).toBe(false);

            await waitFor(
                "the switch to finish on the host",
                () => callIndex(sshd, /^switch-to-configuration\[[0-9a-f]{32}-nixos-system-web\] switch$/) >= 0,
                8000,
            );
            await waitFor("the host to roll back", () => sshd.generation() === 1 && callIndex(sshd, /--switch-generation 1$/) >= 0, 8000);
            const log = fs.readFileSync(path.join(sshd.stateDir, "deploy.log"), "utf8");
            expect(log).toContain("switched to generation 2");
            expect(log).toContain("was not confirmed within the rollback timeout");
            expect(sshd.currentSystem()).toMatch(/-nixos-system-initial$/);
        });

        test("an interrupted deploy (SIGTERM) removes its key at once, and the unconfirmed host rolls itself back", async () => {
            const sshd = await host();
            sshd.setBehaviour({ buildDelaySeconds: 2 });
            let signalledAt = 0;
            const run = await runDeploy(deployEnv(sshd, { NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: "3" }), {
                signalWhen: (stderr) => {
                    if (!stderr.includes("building the system configuration")) {
                        return undefined;
                    }
                    signalledAt = Date.now();
                    return "SIGTERM";
                },
            });
            expect(run.code).toBe(143);
            // Not held up by the 2 s build running on the host.
            expect(Date.now() - signalledAt).toBeLessThan(1500);
            expect(run.stdout).toBe("");
            expect(fs.readdirSync(sshd.localTmp)).toEqual([]);

            await waitFor("the host to roll back", () => callIndex(sshd, /--switch-generation 1$/) >= 0 && sshd.generation() === 1, 10000);
            expect(callIndex(sshd, /^switch-to-configuration\[[0-9a-f]{32}-nixos-system-web\] switch$/)).toBeGreaterThan(-1);
            expectNoSecretLeft(sshd, run);
        });

        test("the private key never reaches argv or the environment of any process the deploy starts", async () => {
            const sshd = await host();
            const spy = path.join(sshd.dir, "spy");
            const record = path.join(sshd.dir, "spy.log");
            fs.mkdirSync(spy);
            // Each wrapper records its argv and environment, and for ssh the mode of the key file.
            const keyMode = 'for a in "$@"; do case $a in IdentityFile=*) echo "key mode: $(stat -c %a "${a#IdentityFile=}")";; esac; done';
            for (const tool of ["ssh", "tar", "mktemp", "cp", "mkdir", "rm", "sleep"]) {
                const real = execFileSync("sh", ["-c", `command -v ${tool}`], { encoding: "utf8" }).trim();
                fs.writeFileSync(
                    path.join(spy, tool),
                    `#!/bin/sh\n{ echo "argv: $0 $*"; env; ${tool === "ssh" ? keyMode : ":"}; } >>'${record}'\nexec '${real}' "$@"\n`,
                    { mode: 0o755 },
                );
            }
            const env = deployEnv(sshd, { PATH: `${spy}:${process.env.PATH}` });
            const run = await runDeploy(env);
            expect(run.code).toBe(0);
            const recorded = fs.readFileSync(record, "utf8");
            // Booleans only: a failing toContain would print the recorded environment.
            expect(recorded.includes("argv: ")).toBe(true);
            expect(recorded.includes("NIXOS_EC2_HOST=")).toBe(true);
            expect(recorded.includes("NIXOS_EC2_SSH_PRIVATE_KEY")).toBe(false);
            expect(recorded.includes("PRIVATE KEY-----")).toBe(false);
            const modes = [...recorded.matchAll(/^key mode: (\d+)$/gm)].map((match) => match[1]);
            expect(modes.length).toBeGreaterThanOrEqual(2);
            expect(new Set(modes)).toEqual(new Set(["600"]));
            for (const line of secretLines(sshd)) {
                expect(recorded.includes(line)).toBe(false);
            }
            fs.rmSync(record);
            expectNoSecretLeft(sshd, run);
        });

        test("invalid inputs are rejected before any connection, each with the variable to fix", async () => {
            const sshd = await host();
            const run = await runDeploy(
                deployEnv(sshd, {
                    NIXOS_EC2_PORT: "70000",
                    NIXOS_EC2_SSH_PRIVATE_KEY: "",
                    NIXOS_EC2_HOST_PUBLIC_KEY: "ssh-rsa AAAAB3NzaC1yc2E",
                    NIXOS_EC2_FLAKE_ATTR: "web;reboot",
                    NIXOS_EC2_ALLOW_FAILED_UNITS: "yes",
                    NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: "0",
                }),
            );
            expect(run.code).toBe(2);
            for (const variable of [
                "NIXOS_EC2_PORT",
                "NIXOS_EC2_SSH_PRIVATE_KEY",
                "NIXOS_EC2_HOST_PUBLIC_KEY",
                "NIXOS_EC2_FLAKE_ATTR",
                "NIXOS_EC2_ALLOW_FAILED_UNITS",
                "NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS",
            ]) {
                expect(run.stderr).toContain(variable);
            }
            expect(run.stderr).not.toMatch(/NIXOS_EC2_HOST must|NIXOS_EC2_FLAKE_DIR must|NIXOS_EC2_CONNECT_TIMEOUT_SECONDS/);
            expect(sshd.sshdLog()).not.toContain("Connection from");
            expect(fs.readdirSync(sshd.localTmp)).toEqual([]);
        });
    },
);
