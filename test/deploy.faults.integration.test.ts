/**
 * deploy/nixos-deploy.sh against a fake host (test/support/sshd.ts) under faults found by trying
 * it as an adversary would: each test shows the fault, and that the deploy now handles it.
 */
import * as fs from "node:fs";
import * as net from "node:net";
import * as path from "node:path";
import { spawnSync } from "node:child_process";
import { DEPLOY_TOOLS, callIndex, expectNoSecretLeft, stdoutLines, useHosts, waitFor, waitForRollback } from "./support/deployTest";
import { deployEnv, runDeploy, TestSshd } from "./support/sshd";
import { describeWithTools } from "./support/tools";

describeWithTools(DEPLOY_TOOLS)(
    "deploy/nixos-deploy.sh under faults",
    () => {
        const host = useHosts();

        /**
         * A TCP server on loopback that sends an SSH banner and then nothing, as a host whose sshd
         * hangs in key exchange does; after `stalls` connections it passes the rest to `to`.
         */
        async function stallingServer(stalls: number, to: number): Promise<{ port: number; connections: () => number; close: () => Promise<void> }> {
            let connections = 0;
            const sockets = new Set<net.Socket>();
            const server = net.createServer((socket) => {
                sockets.add(socket);
                socket.on("close", () => sockets.delete(socket));
                socket.on("error", () => undefined);
                connections += 1;
                if (connections <= stalls) {
                    socket.write("SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n");
                    return;
                }
                const upstream = net.connect(to, "127.0.0.1");
                upstream.on("error", () => socket.destroy());
                sockets.add(upstream);
                socket.pipe(upstream).pipe(socket);
            });
            await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
            const port = (server.address() as net.AddressInfo).port;
            const close = () =>
                new Promise<void>((resolve) => {
                    for (const s of sockets) s.destroy();
                    server.close(() => resolve());
                });
            return { port, connections: () => connections, close };
        }

        test("a server that stalls after its banner is given up on within the deadline, and said to be stalling", async () => {
            const sshd = await host();
            const stall = await stallingServer(Infinity, sshd.port);
            try {
                const run = await runDeploy(
                    deployEnv(sshd, { NIXOS_EC2_PORT: String(stall.port), NIXOS_EC2_CONNECT_TIMEOUT_SECONDS: "5", NIXOS_EC2_SSH_ATTEMPT_SECONDS: "2" }),
                );
                expect(run.code).toBe(1);
                expect(run.elapsedMs).toBeLessThan(8000);
                expect(stall.connections()).toBeGreaterThanOrEqual(2);
                expect(run.stderr).toMatch(/error: no SSH connection to 127\.0\.0\.1 port \d+ within 5s \(deployConnectTimeoutSeconds\), \d+ attempt\(s\); last SSH error: the SSH handshake did not finish within \d+s \(the server accepted the connection and then stalled\)/);
                expect(run.stderr).not.toContain("exited without a message");
                expect(fs.readdirSync(sshd.localTmp)).toEqual([]);
            } finally {
                await stall.close();
            }
        });

        test("a stall is retried: the deploy goes through once the server answers", async () => {
            const sshd = await host();
            const stall = await stallingServer(1, sshd.port);
            try {
                const run = await runDeploy(deployEnv(sshd, { NIXOS_EC2_PORT: String(stall.port), NIXOS_EC2_SSH_ATTEMPT_SECONDS: "2" }));
                expect(run.stderr).toMatch(/waiting for SSH on .*: the SSH handshake did not finish within 2s/);
                expect(run.code).toBe(0);
                expect(run.stderr).toMatch(/connected to 127\.0\.0\.1 port \d+ after 2 attempt\(s\)/);
                expect(sshd.generation()).toBe(2);
            } finally {
                await stall.close();
            }
        });

        test("a deploy killed with its process group releases its output at once, though the switch goes on on the host", async () => {
            const sshd = await host();
            sshd.setBehaviour({ buildDelaySeconds: 3 });
            let killedAt = 0;
            const run = await runDeploy(deployEnv(sshd), {
                killWhen: (stderr) => {
                    if (!stderr.includes("building the system configuration")) return false;
                    killedAt = Date.now();
                    return true;
                },
            });
            // runDeploy resolves when every holder of the script's stdout and stderr has let go,
            // as Pulumi's command provider waits for them.
            expect(run.signal).toBe("SIGKILL");
            expect(Date.now() - killedAt).toBeLessThan(1000);
            await waitForRollback(sshd, 15000);
        });

        test("a build that hangs is stopped at buildTimeoutSeconds, with progress meanwhile; the host is unchanged", async () => {
            const sshd = await host({ progressSeconds: 1 });
            sshd.setBehaviour({ buildDelaySeconds: 60 });
            const run = await runDeploy(deployEnv(sshd, { NIXOS_EC2_BUILD_TIMEOUT_SECONDS: "3" }));
            expect(run.code).toBe(1);
            expect(run.elapsedMs).toBeLessThan(10000);
            expect(run.stderr).toMatch(/still building after 1s \(deadline 3s\)/);
            expect(run.stderr).toMatch(/error: building #web on 127\.0\.0\.1 port \d+ did not finish within 3s \(buildTimeoutSeconds\) and was stopped; the host was not changed/);
            expect(run.stderr).toMatch(/next: raise buildTimeoutSeconds if this build is simply long/);
            expect(callIndex(sshd, /^nix-env/)).toBe(-1);
            expect(sshd.generation()).toBe(1);
            expect(uploads(sshd)).toEqual([]);
        });

        test("an activation that hangs is stopped at activationTimeoutSeconds and the host rolls back", async () => {
            const sshd = await host({ progressSeconds: 1 });
            sshd.setBehaviour({ switchDelaySeconds: 60 });
            const run = await runDeploy(deployEnv(sshd, { NIXOS_EC2_ACTIVATION_TIMEOUT_SECONDS: "2", NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: "30" }));
            expect(run.code).toBe(1);
            expect(run.elapsedMs).toBeLessThan(10000);
            expect(run.stderr).toMatch(/still activating after 1s \(deadline 2s\)/);
            expect(run.stderr).toMatch(/error: activating #web on 127\.0\.0\.1 port \d+ did not finish within 2s \(activationTimeoutSeconds\); it was stopped and the host rolled back to generation 1/);
            expect(sshd.generation()).toBe(1);
            expect(sshd.currentSystem()).toMatch(/-nixos-system-initial$/);
        });

        test("a session whose host processes freeze is given up on at the deploy's own deadline, naming the phase", async () => {
            const sshd = await host();
            sshd.setBehaviour({ buildDelaySeconds: 2 });
            let frozen: number[] = [];
            const run = await runDeploy(
                deployEnv(sshd, {
                    NIXOS_EC2_BUILD_TIMEOUT_SECONDS: "3",
                    NIXOS_EC2_ACTIVATION_TIMEOUT_SECONDS: "2",
                    NIXOS_EC2_SESSION_SLACK_SECONDS: "2",
                }),
                {
                    // Stops every process of the switch unit (timeout included): the host can end nothing.
                    signalWhen: (stderr) => {
                        if (frozen.length > 0 || !stderr.includes("building the system configuration")) return undefined;
                        frozen = unitProcesses(sshd);
                        for (const pid of frozen) process.kill(pid, "SIGSTOP");
                        return undefined;
                    },
                },
            );
            for (const pid of frozen) {
                try {
                    process.kill(pid, "SIGCONT");
                } catch {
                    // Gone with the SSH session (the stand-in's `setsid --wait` waits in it).
                }
            }
            expect(frozen.length).toBeGreaterThan(0);
            expect(run.code).toBe(1);
            expect(run.elapsedMs).toBeLessThan(12000);
            expect(run.stderr).toMatch(/error: the copy and switch on 127\.0\.0\.1 port \d+ did not end within 7s \(buildTimeoutSeconds \+ activationTimeoutSeconds \+ 2s\), while building the new system/);
            expect(fs.readdirSync(sshd.localTmp)).toEqual([]);
            // Thawed, the host finishes its step; unconfirmed, it rolls itself back.
            await waitFor("the thawed host to end its switch unit", () => unitProcesses(sshd).length === 0, 20000);
        });

        test.each([
            ["succeeds", 0],
            ["fails", 1],
        ])("a build that prints 10,000 lines keeps under 16 KiB of output (what Pulumi stores in state) when it %s", async (_what, buildExit) => {
            const sshd = await host();
            sshd.setBehaviour({ buildOutputLines: 10000, buildExit });
            const run = await runDeploy(deployEnv(sshd));
            expect(run.code).toBe(buildExit === 0 ? 0 : 1);
            const stored = Buffer.byteLength(run.stdout) + Buffer.byteLength(run.stderr);
            expect(stored).toBeLessThanOrEqual(16 * 1024);
            // Live progress still shows: the phases, the first build lines, and what was left out.
            expect(run.stderr).toMatch(/\] building path:/);
            expect(run.stderr).toContain("fake build output line 1 of 10000");
            expect(run.stderr).toMatch(/nixos-deploy: \(\d+ lines of build output and 0 progress lines were left out here\)/);
            // The host keeps the whole log.
            const hostLog = fs.readFileSync(path.join(sshd.stateDir, "deploy.log"), "utf8");
            expect(hostLog).toContain("fake build output line 10000 of 10000");
            if (buildExit === 0) {
                expect(run.stderr).toContain("confirmed");
            } else {
                // The failure still ends with the log's tail and the error.
                expect(run.stderr).toMatch(/---- last 40 lines of \S+ on \S+ ----/);
                expect(run.stderr).toContain("fake build failure");
                expect(run.stderr).toMatch(/error: building #web on 127\.0\.0\.1 port \d+ failed/);
            }
        });

        test("a long wait for SSH says less and less: about 35 lines in two hours, whatever the errors", () => {
            // progress_due from the script itself, on bash's own clock (SECONDS can be set).
            const harness = [
                `source <(sed -n '/^progress_due() {/,/^}/p' "$1")`,
                "PROGRESS_EVERY_SECONDS=10 reports=0 last=-10",
                'for ((t = 0; t <= 7200; t++)); do SECONDS=$t; if progress_due "$reports" "$last" true; then reports=$((reports + 1)); last=$t; fi; done',
                'echo "$reports"',
            ].join("\n");
            const reports = Number(spawnSync("bash", ["-c", harness, "_", path.join(__dirname, "..", "deploy", "nixos-deploy.sh")], { encoding: "utf8" }).stdout.trim());
            expect(reports).toBeGreaterThanOrEqual(20);
            expect(reports).toBeLessThanOrEqual(40);
        });

        const uploads = (sshd: TestSshd) => fs.readdirSync(sshd.stateDir).filter((name) => name.startsWith("upload."));

        /** The processes of the fake host's switch unit (setsid'd by the systemd-run stand-in). */
        function unitProcesses(sshd: TestSshd): number[] {
            const out = spawnSync("pgrep", ["-f", `${sshd.stateDir}/bin/remote-switch.sh switch|nixos-rebuild build --flake path:${sshd.stateDir}|sleep`], { encoding: "utf8" });
            const mine = out.stdout.split("\n").filter(Boolean).map(Number);
            // Only those under this host's directories (the sleep of its build stand-in included).
            return mine.filter((pid) => {
                try {
                    const cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, "utf8");
                    const environ = fs.readFileSync(`/proc/${pid}/environ`, "utf8");
                    return cmdline.includes(sshd.stateDir) || environ.includes(sshd.stateDir);
                } catch {
                    return false;
                }
            });
        }

        /** What bash does for a command it cannot find (execute_cmd.c: "command not found", status 127). */
        function removeCommand(sshd: TestSshd, name: string): void {
            fs.writeFileSync(path.join(sshd.hostDir, "bin", name), `#!/usr/bin/env bash\necho "bash: line 1: ${name}: command not found" >&2\nexit 127\n`, { mode: 0o755 });
        }

        test.each([
            ["a space", "with space"],
            ["ssh's % tokens", "per%cent %h %d %%"],
            ["quotes and a backslash", `quo"te's back\\slash`],
            ["an environment variable in ssh's ${} syntax", "x${HOME}y"],
            ["multi-byte characters", "Ω".repeat(30)],
        ])("works with a TMPDIR that holds %s", async (_what, name) => {
            const sshd = await host();
            const tmp = path.join(sshd.localTmp, name);
            fs.mkdirSync(tmp);
            const run = await runDeploy(deployEnv(sshd, { TMPDIR: tmp }));
            expect(run.stderr).not.toMatch(/interception|error:/);
            expect(run.code).toBe(0);
            expect(JSON.parse(stdoutLines(run)[0])).toEqual({ systemPath: sshd.systemPath(), generation: 2, rebooted: false });
            expect(fs.readdirSync(tmp)).toEqual([]);
            fs.rmdirSync(tmp);
            expectNoSecretLeft(sshd, run);
        });

        test("works with a TMPDIR too long for an SSH control socket", async () => {
            const sshd = await host();
            const tmp = path.join(sshd.localTmp, "d".repeat(90));
            fs.mkdirSync(tmp);
            const run = await runDeploy(deployEnv(sshd, { TMPDIR: tmp }));
            expect(run.stderr).not.toMatch(/error:/);
            expect(run.code).toBe(0);
            expect(fs.readdirSync(tmp)).toEqual([]);
        });

        test("a disk too full for the upload fails at once, saying how much space there is, and changes nothing", async () => {
            const sshd = await host();
            sshd.setBehaviour({ diskFreeKib: 100 });
            const run = await runDeploy(deployEnv(sshd));
            expect(run.code).toBe(1);
            expect(run.stderr).toMatch(new RegExp(`not enough disk space for the upload: 100 KiB free in ${sshd.stateDir}, it needs \\d+ KiB`));
            expect(run.stderr).toMatch(/error: 127\.0\.0\.1 port \d+ has too little disk space for the upload .*nothing was copied or changed/);
            expect(run.stderr).toMatch(/next: free space on the host \('nix-collect-garbage -d'/);
            expect(uploads(sshd)).toEqual([]);
            expect(callIndex(sshd, /^tar /)).toBe(-1);
            expect(callIndex(sshd, /^nixos-rebuild/)).toBe(-1);
            expect(sshd.generation()).toBe(1);
            expectNoSecretLeft(sshd, run);
        });

        test("a failed upload removes its partial data from the host, says the host is unchanged, and the next deploy succeeds", async () => {
            const sshd = await host();
            sshd.setBehaviour({ uploadFails: true });
            const failed = await runDeploy(deployEnv(sshd));
            expect(failed.code).toBe(1);
            expect(failed.stderr).toContain("Cannot write: No space left on device");
            expect(failed.stderr).toMatch(/receiving the upload into \S+\/upload\.\d+\.\w+ failed \(tar exited 2\); removed it/);
            expect(failed.stderr).toMatch(/error: the upload to 127\.0\.0\.1 port \d+ failed while the host received it .*partial copy was removed and nothing was changed/);
            // No log was written on the host, so no hint points at one.
            expect(failed.stderr).not.toMatch(/logs\/|this deploy's log/);
            expect(uploads(sshd)).toEqual([]);
            expect(sshd.generation()).toBe(1);

            sshd.setBehaviour({});
            const again = await runDeploy(deployEnv(sshd));
            expect(again.code).toBe(0);
            expect(sshd.generation()).toBe(2);
            expect(uploads(sshd)).toEqual([]);
        });

        test("a build killed by the kernel (exit status 137, the OOM killer's SIGKILL) is reported as a failed build, not as a deadline", async () => {
            const sshd = await host();
            sshd.setBehaviour({ buildExit: 137 });
            const run = await runDeploy(deployEnv(sshd));
            expect(run.code).toBe(1);
            expect(run.stderr).toMatch(/error: building #web on 127\.0\.0\.1 port \d+ failed; the host was not changed/);
            expect(run.stderr).not.toContain("did not finish within");
        });

        test("a deploy first removes the uploads of earlier deploys that died, and keeps those still arriving", async () => {
            const sshd = await host();
            // Named after the PID of the shell that received them: one that no longer runs, one that does.
            const stale = path.join(sshd.stateDir, "upload.999999999.abcdef");
            const live = path.join(sshd.stateDir, `upload.${process.pid}.ghijkl`);
            for (const dir of [stale, live]) {
                fs.mkdirSync(path.join(dir, "new", "flake"), { recursive: true });
                fs.writeFileSync(path.join(dir, "new", "flake", "big"), "x".repeat(1024));
            }
            const run = await runDeploy(deployEnv(sshd));
            expect(run.code).toBe(0);
            expect(uploads(sshd)).toEqual([path.basename(live)]);
        });

        test("a command missing on the host (exit status 127) is named as such, with what the host needs", async () => {
            const sshd = await host();
            removeCommand(sshd, "systemd-run");
            const run = await runDeploy(deployEnv(sshd));
            expect(run.code).toBe(1);
            expect(run.stderr).toContain("systemd-run: command not found");
            expect(run.stderr).toMatch(/error: a command the deploy needs is missing on 127\.0\.0\.1 port \d+ \(exit status 127, 'command not found'/);
            expect(run.stderr).toMatch(/next: the host side needs bash, tar, df, mktemp, flock, systemd-run/);
            expect(sshd.generation()).toBe(1);
        });

        test("the loser of two concurrent deploys is told that another deploy superseded it, not to raise a timeout", async () => {
            const sshd = await host();
            sshd.setBehaviour({ buildDelaySeconds: 1 });
            // The second starts once the first builds, and waits for the host's lock.
            let building: () => void = () => undefined;
            const firstBuilds = new Promise<void>((resolve) => (building = resolve));
            const first = runDeploy(deployEnv(sshd, { NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: "30" }), {
                signalWhen: (stderr) => {
                    if (stderr.includes("building the system configuration")) building();
                    return undefined;
                },
            });
            await firstBuilds;
            const second = runDeploy(deployEnv(sshd, { NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: "30" }));
            const [a, b] = await Promise.all([first, second]);
            const [loser, winner] = a.code === 0 ? [b, a] : [a, b];
            expect(winner.code).toBe(0);
            expect(loser.code).toBe(1);
            expect(loser.stderr).toMatch(/error: another deploy to 127\.0\.0\.1 port \d+ started before this one \(deploy [0-9a-f]{12}\) was confirmed, and rolled it back/);
            expect(loser.stderr).toMatch(/next: run one deploy per host at a time/);
            expect(loser.stderr).not.toContain("raise rollbackTimeoutSeconds");
            expect(JSON.parse(stdoutLines(winner)[0]).systemPath).toBe(sshd.systemPath());
        });
    },
);
