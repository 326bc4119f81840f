/**
 * deploy/nixos-deploy.sh against a fake host (test/support/sshd.ts) when the new system fails:
 * rollbacks by the deploy, by the host's timer, and after a dropped or interrupted deploy.
 * A file of its own, so that jest runs it beside the other deploy tests.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { DEPLOY_TOOLS, callIndex, controlMasterPid, deployId, expectNoSecretLeft, expectRolledBackWithLogTail, stdoutLines, TAIL_HEADER, unitFile, useHosts, waitFor, waitForRollback } from "./support/deployTest";
import { deployEnv, runDeploy } from "./support/sshd";
import { describeWithTools } from "./support/tools";

describeWithTools(DEPLOY_TOOLS)(
    "deploy/nixos-deploy.sh against a loopback sshd: failures and rollbacks",
    () => {
        const host = useHosts();

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
            expect(JSON.parse(stdoutLines(run)[0])).toEqual({ systemPath: sshd.systemPath(), generation: 2, rebooted: false });
            expect(sshd.systemPath()).toMatch(/-nixos-system-web$/);
            expect(sshd.calls().some((call) => call.includes("--switch-generation"))).toBe(false);
        });

        // nix/modules/web.nix with a domain whose DNS does not point at the host yet: the ACME
        // module's order unit fails (exit 10) and the system is degraded until it succeeds.
        const ORDER = "acme-order-renew-todo.example.org.service";
        const NXDOMAIN = "[todo.example.org] acme: error: 400 :: urn:ietf:params:acme:error:dns :: DNS problem: NXDOMAIN looking up A for todo.example.org";
        const pendingOrder = { unit: ORDER, status: 10, log: NXDOMAIN };

        test("a certificate that waits for DNS does not fail the deploy, and the output says which one and why", async () => {
            const sshd = await host();
            sshd.setBehaviour({ switchExit: 4, systemState: "degraded", failedUnits: [pendingOrder] });
            const run = await runDeploy(deployEnv(sshd));
            expect(run.code).toBe(0);
            expect(JSON.parse(stdoutLines(run)[0])).toEqual({ systemPath: sshd.systemPath(), generation: 2, rebooted: false });
            expect(run.stderr).toContain(`] certificate for todo.example.org not issued yet: ${NXDOMAIN}\n`);
            expect(run.stderr).toContain(
                "] certificate for todo.example.org pending: HTTP keeps serving; nixos-ec2-acme-retry.timer orders it again (every 15 min at first, less often later)\n",
            );
            expect(run.stderr).toContain("the only units that failed are orders of certificates not issued yet; keeping the new system");
            expect(run.stderr).toContain("systemd reports the system as degraded only by the pending certificate(s) above");
            expect(sshd.calls().some((call) => call.includes("--switch-generation"))).toBe(false);
        });

        test("a pending certificate found only when the system settles does not fail the deploy either", async () => {
            const sshd = await host();
            sshd.setBehaviour({ systemState: "degraded", failedUnits: [pendingOrder] });
            const run = await runDeploy(deployEnv(sshd));
            expect(run.code).toBe(0);
            expect(run.stderr).toContain("certificate for todo.example.org pending");
            expect(sshd.generation()).toBe(2);
        });

        test("another failed unit beside a pending certificate still rolls back", async () => {
            const sshd = await host();
            sshd.setBehaviour({ switchExit: 4, systemState: "degraded", failedUnits: [pendingOrder, { unit: "postgresql.service", status: 1, log: "FATAL: could not start" }] });
            const run = await runDeploy(deployEnv(sshd));
            expectRolledBackWithLogTail(sshd, run, `warning: the following units failed: ${ORDER}, postgresql.service`);
            expect(run.stderr).not.toContain("certificate for todo.example.org pending");
            expect(run.stderr).not.toContain("not issued yet");
        });

        test("an order that failed with another exit status than 10 is a failure, not a pending certificate", async () => {
            const sshd = await host();
            sshd.setBehaviour({ switchExit: 4, systemState: "degraded", failedUnits: [{ ...pendingOrder, status: 1 }] });
            const run = await runDeploy(deployEnv(sshd));
            expectRolledBackWithLogTail(sshd, run, `warning: the following units failed: ${ORDER}`);
            expect(run.stderr).not.toContain("not issued yet");
        });

        test("a failed renewal of a certificate that was issued is a failure, not a pending certificate", async () => {
            const sshd = await host();
            fs.mkdirSync(path.join(sshd.hostDir, "acme", "todo.example.org"), { recursive: true });
            fs.writeFileSync(path.join(sshd.hostDir, "acme", "todo.example.org", "acme-success"), "");
            sshd.setBehaviour({ switchExit: 4, systemState: "degraded", failedUnits: [pendingOrder] });
            const run = await runDeploy(deployEnv(sshd));
            expectRolledBackWithLogTail(sshd, run, `warning: the following units failed: ${ORDER}`);
            expect(run.stderr).not.toContain("not issued yet");
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
            expect(JSON.parse(stdoutLines(second)[0])).toEqual({ systemPath: sshd.systemPath(), generation: 2, rebooted: false });
            expect(fs.readFileSync(path.join(sshd.stateDir, "deploys", "0123456789ab"), "utf8")).toMatch(
                /^rolled-back generation=1 reason=superseded by deploy/,
            );
        });

        /** The ControlMaster of a running deploy (its socket lives in the deploy's temp dir). */
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
            // The rollback's last log line comes after the old system is active again: wait for it,
            // not for the profile, which the rollback moves before it activates.
            const deployLog = () => fs.readFileSync(path.join(sshd.stateDir, "deploy.log"), "utf8");
            await waitForRollback(sshd, 8000);
            expect(sshd.generation()).toBe(1);
            expect(callIndex(sshd, /--switch-generation 1$/)).toBeGreaterThanOrEqual(0);
            const log = deployLog();
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

            await waitForRollback(sshd, 10000);
            expect(sshd.generation()).toBe(1);
            expect(callIndex(sshd, /^switch-to-configuration\[[0-9a-f]{32}-nixos-system-web\] switch$/)).toBeGreaterThan(-1);
            expectNoSecretLeft(sshd, run);
        });
    },
);
