/**
 * deploy/nixos-deploy.sh against a fake host (test/support/sshd.ts) when the new system cannot be
 * switched to live: a boot of the new system, once, through a real reboot of the fake host (every
 * process and SSH connection dies, sshd comes back after a delay with a new boot ID and an empty
 * run/), its confirmation, and the rollbacks that survive the reboot.
 */
import { execFileSync, spawn } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { DEPLOY_TOOLS, deployId, expectNoSecretLeft, stdoutLines, useHosts, waitFor } from "./support/deployTest";
import { deployEnv, runDeploy, TestSshd } from "./support/sshd";
import { describeWithTools } from "./support/tools";

/** A change of a switch inhibitor, as 26.05's move of dbus to dbus-broker (nixpkgs #512050). */
const DBUS_BROKER = '{"dbus-implementation":"broker"}';

/** Enough time for the reboots (500 ms each) and the retries of the confirmation. */
function rebootEnv(sshd: TestSshd, overrides: Record<string, string> = {}): NodeJS.ProcessEnv {
    return deployEnv(sshd, { NIXOS_EC2_CONNECT_TIMEOUT_SECONDS: "30", NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: "6", ...overrides });
}

/** The system GRUB boots by default: the first menuentry of grub.cfg. */
function grubDefault(sshd: TestSshd): string {
    const cfg = fs.readFileSync(path.join(sshd.hostDir, "boot", "grub", "grub.cfg"), "utf8");
    const match = /init=(\S+)\/init/.exec(cfg);
    if (!match) {
        throw new Error(`no entry in grub.cfg:\n${cfg}`);
    }
    return match[1];
}

function grubNextEntry(sshd: TestSshd): string {
    const env = path.join(sshd.hostDir, "boot", "grub", "grubenv");
    return fs.existsSync(env) ? (/^next_entry=(.*)$/m.exec(fs.readFileSync(env, "utf8"))?.[1] ?? "") : "";
}

/** An SSH session of its own that would run for two minutes; resolves with ssh's exit status. */
function idleSession(sshd: TestSshd): Promise<number | null> {
    const key = path.join(sshd.dir, "idle-key");
    fs.writeFileSync(key, sshd.adminPrivateKey, { mode: 0o600 });
    const known = path.join(sshd.dir, "idle-known-hosts");
    fs.writeFileSync(known, `[127.0.0.1]:${sshd.port} ${sshd.hostPublicKey}\n`);
    const ssh = spawn(
        "ssh",
        ["-F", "/dev/null", "-p", String(sshd.port), "-i", key, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", `UserKnownHostsFile=${known}`, "-o", "StrictHostKeyChecking=yes", `${sshd.user}@127.0.0.1`, "sleep 120"],
        { stdio: "ignore" },
    );
    return new Promise((resolve) => ssh.once("exit", (code) => resolve(code)));
}

function outcome(sshd: TestSshd, id: string): string {
    return fs.readFileSync(path.join(sshd.stateDir, "deploys", id), "utf8").trim();
}

function initialSystem(sshd: TestSshd): string {
    return fs.realpathSync(path.join(sshd.hostDir, "profiles", "system-1-link"));
}

/** The host ran and boots generation 1 again, after `boots` boots, and no deploy waits for one. */
async function expectBackOnGeneration1(sshd: TestSshd, boots: number): Promise<void> {
    await waitFor(`boot ${boots} of the host`, () => sshd.boots() >= boots && fs.existsSync(path.join(sshd.hostDir, "run", "booted-system")), 30_000);
    expect(sshd.boots()).toBe(boots);
    expect(sshd.generation()).toBe(1);
    expect(sshd.bootedSystem()).toBe(initialSystem(sshd));
    expect(sshd.currentSystem()).toBe(initialSystem(sshd));
    expect(grubDefault(sshd)).toBe(initialSystem(sshd));
    expect(grubNextEntry(sshd)).toBe("");
    expect(fs.existsSync(path.join(sshd.stateDir, "pending-boot"))).toBe(false);
    expect(fs.readFileSync(path.join(sshd.stateDir, "pending-rollback"), "utf8")).toBe("");
}

describeWithTools(DEPLOY_TOOLS)(
    "deploy/nixos-deploy.sh against a loopback sshd: changes that need a reboot",
    () => {
        const host = useHosts();

        test("a change a pre-switch check refuses is deployed by booting the new system once, then confirmed and made the default", async () => {
            const sshd = await host();
            const bootBefore = sshd.bootId();
            const idle = idleSession(sshd);
            await waitFor("the idle session to log in", () => sshd.acceptedLogins() === 1, 10_000);
            sshd.setBehaviour({ switchInhibitors: DBUS_BROKER });
            const run = await runDeploy(rebootEnv(sshd));
            // The reboot ended every connection, not only the deploy's: ssh says 255 when the server goes away.
            expect(await idle).toBe(255);
            fs.rmSync(path.join(sshd.dir, "idle-key"));
            expect(run.stderr).not.toMatch(/error:/);
            expect(run.code).toBe(0);
            expect(stdoutLines(run)).toEqual([JSON.stringify({ systemPath: sshd.systemPath(), generation: 2, rebooted: true })]);
            expect(sshd.boots()).toBe(1);
            expect(sshd.bootId()).not.toBe(bootBefore);
            expect(sshd.bootedSystem()).toBe(sshd.systemPath());
            expect(sshd.currentSystem()).toBe(sshd.systemPath());
            expect(grubDefault(sshd)).toBe(sshd.systemPath());
            expect(sshd.systemPath()).toMatch(/-nixos-system-web$/);
            expect(run.stderr).toContain("the pre-switch check refuses a live switch");
            expect(run.stderr).toContain("Pre-switch check 'switchInhibitors' failed");
            expect(run.stderr).toMatch(/rebooting 127\.0\.0\.1 port \d+ into it \(generation 1 stays the boot default until it is confirmed\)/);
            expect(run.stderr).toMatch(/generation 2 booted \(boot ID \S+ before, \S+ now\); rollback disarmed/);
            expect(outcome(sshd, deployId(run))).toBe("confirmed generation=2 rebooted");
            // What reaches the stack's state stays small through a reboot too.
            expect(Buffer.byteLength(run.stdout + run.stderr)).toBeLessThan(16 * 1024);
            expect(fs.existsSync(path.join(sshd.stateDir, "pending-boot"))).toBe(false);
            // Never switched live; booted once through GRUB's one-shot entry, the old system still the default.
            const calls = sshd.calls();
            expect(calls.some((call) => /^switch-to-configuration\[\S+-nixos-system-web\] switch/.test(call))).toBe(false);
            expect(calls).toContain(`grub-editenv ${path.join(sshd.hostDir, "boot", "grub", "grubenv")} set next_entry=NixOS\\ -\\ All\\ configurations\\>NixOS\\ -\\ Configuration\\ 2\\ \\(2026-12-01\\ -\\ 26.05.20261201.0000000\\ \\(Fake\\)\\)`);
            const oldBoot = calls.findIndex((call) => /^switch-to-configuration\[\S+-nixos-system-initial\] boot$/.test(call));
            const reboot = calls.indexOf("systemctl reboot");
            const newBoot = calls.findIndex((call) => /^switch-to-configuration\[\S+-nixos-system-web\] boot$/.test(call));
            expect(oldBoot).toBeGreaterThan(-1);
            expect(reboot).toBeGreaterThan(oldBoot);
            expect(newBoot).toBeGreaterThan(reboot);
            // The boot guard armed the rollback at boot, and the confirmation stopped it.
            const timer = path.join(sshd.hostDir, "units", `nixos-ec2-rollback-${deployId(run)}.timer`);
            expect(fs.existsSync(`${timer}.armed`)).toBe(true);
            expect(fs.existsSync(`${timer}.stopped`)).toBe(true);
            expect(fs.existsSync(`${timer}.fired`)).toBe(false);
            expectNoSecretLeft(sshd, run);
        });

        test("a new init interface is found before the switch and deployed through a reboot", async () => {
            const sshd = await host();
            sshd.setBehaviour({ initInterface: "systemd 3" });
            const run = await runDeploy(rebootEnv(sshd));
            expect(run.code).toBe(0);
            expect(JSON.parse(stdoutLines(run)[0])).toEqual({ systemPath: sshd.systemPath(), generation: 2, rebooted: true });
            expect(run.stderr).toContain("the new init interface (systemd 3) differs from the running one (systemd 2)");
            expect(sshd.calls().some((call) => /^switch-to-configuration\[\S+-nixos-system-web\] (switch|check)/.test(call))).toBe(false);
            expect(sshd.bootedSystem()).toBe(sshd.systemPath());
        });

        test("a switch that exits 100 (needs a reboot) after installing itself as the default is booted on trial instead", async () => {
            const sshd = await host();
            sshd.setBehaviour({ switchExit: 100 });
            const run = await runDeploy(rebootEnv(sshd));
            expect(run.code).toBe(0);
            expect(JSON.parse(stdoutLines(run)[0])).toEqual({ systemPath: sshd.systemPath(), generation: 2, rebooted: true });
            expect(run.stderr).toContain("switch-to-configuration exited 100: the new init needs a reboot");
            const calls = sshd.calls();
            const live = calls.findIndex((call) => /^switch-to-configuration\[\S+-nixos-system-web\] switch$/.test(call));
            const oldBoot = calls.findIndex((call) => /^switch-to-configuration\[\S+-nixos-system-initial\] boot$/.test(call));
            expect(live).toBeGreaterThan(-1);
            expect(oldBoot).toBeGreaterThan(live);
            expect(sshd.bootedSystem()).toBe(sshd.systemPath());
            expect(grubDefault(sshd)).toBe(sshd.systemPath());
        });

        test("a pre-switch refusal by a switch-to-configuration without `check` is found by the live switch and booted on trial", async () => {
            const sshd = await host();
            sshd.setBehaviour({ switchInhibitors: DBUS_BROKER, oldSwitch: true });
            const run = await runDeploy(rebootEnv(sshd));
            expect(run.code).toBe(0);
            expect(run.stderr).toContain("switch-to-configuration check exited 1; trying the live switch");
            expect(run.stderr).toContain("the pre-switch check refused a live switch");
            expect(JSON.parse(stdoutLines(run)[0])).toEqual({ systemPath: sshd.systemPath(), generation: 2, rebooted: true });
        });

        test("rebootPolicy always boots even a change that could be switched live", async () => {
            const sshd = await host();
            const run = await runDeploy(rebootEnv(sshd, { NIXOS_EC2_REBOOT_POLICY: "always" }));
            expect(run.code).toBe(0);
            expect(run.stderr).toContain("the new system needs a reboot: rebootPolicy is always");
            expect(JSON.parse(stdoutLines(run)[0])).toEqual({ systemPath: sshd.systemPath(), generation: 2, rebooted: true });
            expect(sshd.boots()).toBe(1);
        });

        test("rebootPolicy never refuses a change that needs a reboot before touching the host's system", async () => {
            const sshd = await host();
            sshd.setBehaviour({ switchInhibitors: DBUS_BROKER });
            const run = await runDeploy(rebootEnv(sshd, { NIXOS_EC2_REBOOT_POLICY: "never" }));
            expect(run.code).toBe(1);
            expect(run.stdout).toBe("");
            expect(run.stderr).toMatch(/#web cannot be switched to live on 127\.0\.0\.1 port \d+ and needs a reboot, which rebootPolicy=never forbids; the host was not changed and still runs generation 1/);
            expect(run.stderr).toContain("set rebootPolicy to when-required for this host");
            expect(sshd.generation()).toBe(1);
            expect(sshd.currentSystem()).toBe(initialSystem(sshd));
            expect(grubDefault(sshd)).toBe(initialSystem(sshd));
            expect(sshd.boots()).toBe(0);
            expect(sshd.calls().filter((call) => /^(nix-env|systemctl reboot|grub-editenv)|\] (switch|boot)$/.test(call))).toEqual([]);
            expect(outcome(sshd, deployId(run))).toBe("refused generation=1 reason=needs a reboot");
        });

        test("rebootPolicy never undoes a switch that exited 100: profile and boot default back on the old generation", async () => {
            const sshd = await host();
            sshd.setBehaviour({ switchExit: 100 });
            const run = await runDeploy(rebootEnv(sshd, { NIXOS_EC2_REBOOT_POLICY: "never" }));
            expect(run.code).toBe(1);
            expect(run.stderr).toContain("rebootPolicy=never forbids");
            expect(sshd.generation()).toBe(1);
            expect(sshd.currentSystem()).toBe(initialSystem(sshd));
            expect(grubDefault(sshd)).toBe(initialSystem(sshd));
            expect(sshd.boots()).toBe(0);
        });

        test("a new boot that locks the admin out ends, by itself, on the old generation, booted", async () => {
            const sshd = await host();
            sshd.setBehaviour({ switchInhibitors: DBUS_BROKER, breakSsh: true });
            const run = await runDeploy(rebootEnv(sshd));
            expect(run.code).toBe(1);
            expect(run.stderr).toMatch(/after the reboot, 127\.0\.0\.1 port \d+ refused the SSH key for user '\S+' .*Permission denied/);
            expect(run.stderr).toContain("the host reboots into generation 1 by itself within 6s (rollbackTimeoutSeconds) of its boot");
            await expectBackOnGeneration1(sshd, 2);
            expect(outcome(sshd, deployId(run))).toMatch(/^rolled-back generation=1 reason=deploy \S+ was not confirmed within 6s of booting generation 2$/);
            // The old system lets the admin in again.
            expect(fs.readFileSync(path.join(sshd.hostDir, "authorized_keys"), "utf8")).toBe(fs.readFileSync(path.join(sshd.hostDir, "admin.pub"), "utf8"));
        });

        test("a new boot whose health check fails reboots into the old generation", async () => {
            const sshd = await host();
            sshd.setBehaviour({ switchInhibitors: DBUS_BROKER, health: "503" });
            const run = await runDeploy(rebootEnv(sshd));
            expect(run.code).toBe(1);
            expect(run.stderr).toMatch(/health check \S+ failed after 5 attempts/);
            expect(run.stderr).toMatch(/the new system on 127\.0\.0\.1 port \d+ did not pass after the reboot, and the host goes back to generation 1, booted/);
            await expectBackOnGeneration1(sshd, 2);
            expect(outcome(sshd, deployId(run))).toMatch(/^rolled-back generation=1 reason=health check/);
            expect(Buffer.byteLength(run.stdout + run.stderr)).toBeLessThan(16 * 1024);
        });

        test("a new kernel that panics comes back on the old generation at once, and the deploy says so", async () => {
            const sshd = await host();
            sshd.setBehaviour({ switchInhibitors: DBUS_BROKER, bootPanics: true });
            const run = await runDeploy(rebootEnv(sshd));
            expect(run.code).toBe(1);
            expect(sshd.calls().some((call) => /^firmware-boot: kernel panic in \S+-nixos-system-web/.test(call))).toBe(true);
            expect(run.stderr).toMatch(/the host came back on \S+-nixos-system-initial, not on generation 2/);
            await expectBackOnGeneration1(sshd, 1);
            expect(outcome(sshd, deployId(run))).toMatch(/^rolled-back generation=1 reason=the host came back on/);
        });

        test("a panicking kernel after a system that has the boot guard: the old system's guard records the rollback, and the deploy says so", async () => {
            const sshd = await host();
            const first = await runDeploy(rebootEnv(sshd));
            expect(first.code).toBe(0);
            const second = path.join(sshd.hostDir, "profiles", "system-2-link");
            const guarded = fs.realpathSync(second);
            sshd.setBehaviour({ switchInhibitors: DBUS_BROKER, bootPanics: true });
            const run = await runDeploy(rebootEnv(sshd));
            expect(run.code).toBe(1);
            expect(run.stderr).toMatch(/the new boot on 127\.0\.0\.1 port \d+ did not hold: the host is back on generation 2, booted/);
            expect(outcome(sshd, deployId(run))).toMatch(/^rolled-back generation=2 reason=the host did not come up on generation 3 and booted \S+ \(GRUB's default\) instead$/);
            expect(sshd.generation()).toBe(2);
            expect(sshd.bootedSystem()).toBe(guarded);
            expect(grubDefault(sshd)).toBe(guarded);
            expect(fs.existsSync(path.join(sshd.stateDir, "pending-boot"))).toBe(false);
        });

        test("a deploy that dies before asking for the reboot leaves the host as it was: the timer undoes the prepared boot", async () => {
            const sshd = await host();
            sshd.setBehaviour({ switchInhibitors: DBUS_BROKER });
            const run = await runDeploy(rebootEnv(sshd, { NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: "3" }), {
                killWhen: (stderr) => stderr.includes("will be booted once"),
            });
            expect(run.signal).toBe("SIGKILL");
            const id = deployId(run);
            await waitFor("the prepared boot to be undone", () => fs.existsSync(path.join(sshd.stateDir, "deploys", id)) && outcome(sshd, id).startsWith("rolled-back"), 20_000);
            expect(outcome(sshd, id)).toBe(`rolled-back generation=1 reason=deploy ${id} did not reboot the host within 3s of preparing the boot`);
            await expectBackOnGeneration1(sshd, 0);
        });

        test("a trial boot that failed while no deploy waited does not block the next deploy (the old system has no guard)", async () => {
            const sshd = await host();
            sshd.setBehaviour({ switchInhibitors: DBUS_BROKER, bootPanics: true });
            const first = await runDeploy(rebootEnv(sshd), { killWhen: (stderr) => stderr.includes("to come back with the same host key") });
            expect(first.signal).toBe("SIGKILL");
            await waitFor("the host to boot", () => sshd.boots() === 1, 20_000);
            expect(fs.existsSync(path.join(sshd.stateDir, "pending-boot"))).toBe(true);
            sshd.setBehaviour({});
            const run = await runDeploy(rebootEnv(sshd));
            expect(run.stderr).toContain(`deploy ${deployId(first)}: generation 2 did not come up; the host booted generation 1 again`);
            expect(run.code).toBe(0);
            expect(outcome(sshd, deployId(first))).toMatch(/^rolled-back generation=1 reason=the host did not come up on generation 2/);
            expect(JSON.parse(stdoutLines(run)[0])).toEqual({ systemPath: sshd.systemPath(), generation: 3, rebooted: false });
        });

        test("a live switch that the host reboots before it is confirmed is rolled back at boot, and ends booted on the old generation", async () => {
            const sshd = await host();
            const run = await runDeploy(rebootEnv(sshd, { NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: "120" }), {
                killWhen: (stderr) => /\] switched to generation 2$/m.test(stderr),
            });
            expect(run.signal).toBe("SIGKILL");
            await waitFor("the switch to end", () => fs.existsSync(path.join(sshd.stateDir, "deploys", deployId(run))) && outcome(sshd, deployId(run)).startsWith("switched"), 10_000);
            // Someone reboots the host (the console, say) while the deploy is unconfirmed; GRUB's default is the new system.
            execFileSync(path.join(sshd.hostDir, "bin", "systemctl"), ["reboot"]);
            await expectBackOnGeneration1(sshd, 2);
            expect(outcome(sshd, deployId(run))).toBe(`rolled-back generation=1 reason=the host rebooted before deploy ${deployId(run)} was confirmed`);
        });

        test("a pre-switch check other than the switch inhibitors fails the deploy instead of rebooting", async () => {
            const sshd = await host();
            sshd.setBehaviour({ preSwitchFails: true });
            const run = await runDeploy(rebootEnv(sshd));
            expect(run.code).toBe(1);
            expect(run.stderr).toContain("switch-to-configuration check exited 1; trying the live switch");
            expect(run.stderr).toContain("Pre-switch check 'siteSafetyPolicy' failed");
            expect(run.stderr).toMatch(/switching 127\.0\.0\.1 port \d+ to #web failed and the host rolled back to generation 1/);
            expect(run.stderr).not.toContain("needs a reboot");
            expect(sshd.boots()).toBe(0);
            expect(sshd.generation()).toBe(1);
        });

        test("where GRUB cannot clear the one-shot entry itself, the deploy does, so the rollback reboot boots the old generation", async () => {
            const sshd = await host();
            sshd.setBehaviour({ switchInhibitors: DBUS_BROKER, health: "503", grubenvReadonly: true });
            const run = await runDeploy(rebootEnv(sshd));
            expect(run.code).toBe(1);
            await expectBackOnGeneration1(sshd, 2);
        });

        test("a new system without the boot guard is refused before anything changes", async () => {
            const sshd = await host();
            sshd.setBehaviour({ switchInhibitors: DBUS_BROKER, noBootGuard: true });
            const run = await runDeploy(rebootEnv(sshd));
            expect(run.code).toBe(1);
            expect(run.stderr).toContain("the new system has no nixos-ec2-boot-guard.service (nix/modules/boot-guard.nix), which a reboot's rollback needs; nothing was changed");
            expect(sshd.generation()).toBe(1);
            expect(sshd.boots()).toBe(0);
            expect(sshd.calls().filter((call) => /^(nix-env|systemctl reboot|grub-editenv)/.test(call))).toEqual([]);
        });

        test("a build that is not a NixOS system (no nixos-version) is never activated", async () => {
            const sshd = await host();
            sshd.setBehaviour({ notNixos: true });
            const run = await runDeploy(rebootEnv(sshd));
            expect(run.code).toBe(1);
            expect(run.stderr).toMatch(/has no nixos-version file, so it is not a NixOS system/);
            expect(sshd.generation()).toBe(1);
            expect(sshd.calls().filter((call) => /^(nix-env|switch-to-configuration)/.test(call))).toEqual([]);
        });
    },
);
