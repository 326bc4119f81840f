/**
 * deploy/nixos-deploy.sh against a real OpenSSH server on 127.0.0.1 that plays the NixOS host
 * (test/support/sshd.ts): stand-ins for nixos-rebuild, nix-env, systemd-run, systemctl and curl
 * record their calls, and the system profile is a real symlink chain.
 */
import { execFileSync, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { deployEnv, freePort, runDeploy } from "./support/sshd";
import { flakeFiles } from "../lib/flakeHash";
import { DEPLOY_TOOLS, callIndex, deployId, expectNoSecretLeft, secretLines, stdoutLines, unitFile, useHosts } from "./support/deployTest";
import { describeWithTools } from "./support/tools";

const REPO = path.resolve(__dirname, "..");

/** Every script the project ships or runs on the fake host. */
function shellScripts(): string[] {
    const dirs = ["deploy", "test/fixtures", "test/fixtures/host-bin", "test/fixtures/fake-system"];
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
                "test/fixtures/start-unit",
                "test/fixtures/firmware-boot",
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

describeWithTools(DEPLOY_TOOLS)(
    "deploy/nixos-deploy.sh against a loopback sshd",
    () => {
        const host = useHosts();

        test("a deploy switches the host, copies the flake and prints the new system as its only stdout line", async () => {
            const sshd = await host();
            const run = await runDeploy(deployEnv(sshd));
            expect(run.stderr).toContain("confirmed");
            expect(run.code).toBe(0);

            const lines = stdoutLines(run);
            expect(lines).toHaveLength(1);
            expect(JSON.parse(lines[0])).toEqual({ systemPath: sshd.systemPath(), generation: 2, rebooted: false });
            expect(sshd.systemPath()).toMatch(new RegExp(`^${sshd.hostDir}/store/[0-9a-f]{32}-nixos-system-web$`));
            expect(sshd.currentSystem()).toBe(sshd.systemPath());

            const copied = path.join(sshd.stateDir, "flake");
            expect(fs.readFileSync(path.join(copied, "flake.nix"), "utf8")).toBe(
                fs.readFileSync(path.join(sshd.flakeDir, "flake.nix"), "utf8"),
            );
            expect(fs.readFileSync(path.join(copied, "modules", "web.nix"), "utf8")).toBe("{ ... }: { }\n");
            for (const dropping of ["result", "result-1", "modules/result-2", "flake.nix~", ".DS_Store", "modules/.#web.nix", "modules/.web.nix.swp"]) {
                expect(fs.existsSync(path.join(copied, dropping))).toBe(false);
            }
            // What the host got is exactly what the trigger hash covers.
            expect(flakeFiles(copied)).toEqual(flakeFiles(sshd.flakeDir));
            expect(flakeFiles(copied)).toEqual(expect.arrayContaining(["modules/result-codes.nix", "result-docs/index.md"]));
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

        test("the private key never reaches argv or the environment of any process the deploy starts", async () => {
            const sshd = await host();
            const spy = path.join(sshd.dir, "spy");
            const record = path.join(sshd.dir, "spy.log");
            fs.mkdirSync(spy);
            // Each wrapper records its argv and environment, and for ssh the mode of the key file.
            // The deploy quotes the path for ssh (IdentityFile="..."); this one has no % or backslash to undo.
            const keyMode = 'for a in "$@"; do case $a in IdentityFile=*) p=${a#IdentityFile=}; p=${p#\\"}; p=${p%\\"}; echo "key mode: $(stat -c %a "$p")";; esac; done';
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
