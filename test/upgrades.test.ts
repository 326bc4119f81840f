/**
 * nix/modules/upgrades.nix: staging's nightly upgrade moves nixpkgs to its branch head without
 * writing the lock file, and never meets a deploy half way: it holds the deploy's lock for its
 * whole run and skips the night while a deploy awaits its confirmation. The lock preamble is
 * evaluated from the module (stand-in lib) and run here with bash and util-linux's flock.
 */
import { ChildProcess, execFileSync, spawn } from "node:child_process";
import { chmodSync, cpSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import * as path from "node:path";
import { evalFlakeStructure } from "./support/nix";
import { evalHost, HostEvaluation, Ordered, runJobScript } from "./support/nixHost";
import { tempDir } from "./support/tempDir";
import { describeWithTools } from "./support/tools";

const REMOTE_SWITCH = path.join(__dirname, "..", "deploy", "remote-switch.sh");
const STATE_DIR = "/var/lib/nixos-ec2";
/** nixos/modules/tasks/auto-upgrade.nix's `script` has no order of its own: the default, 1000. */
const DEFAULT_ORDER = 1000;
/** Stands in for auto-upgrade.nix's `nixos-rebuild switch` line, after the preamble. */
const UPGRADE_COMMAND = `echo UPGRADE-RAN
if flock -n "$NIXOS_EC2_TEST_LOCK" true; then echo LOCK-FREE; else echo LOCK-HELD; fi
`;

/** What remote-switch.sh says about the lock and the pending files. */
function remoteSwitchFacts(): { stateDir: string; lockWaitSeconds: number; takesLockOnFd9: boolean; pendingFiles: string[] } {
    const script = readFileSync(REMOTE_SWITCH, "utf8");
    const stateDir = /^STATE_DIR=\$\{NIXOS_EC2_STATE_DIR:-([^}]+)\}$/m.exec(script)?.[1];
    const wait = /^readonly LOCK_WAIT_SECONDS=(\d+)$/m.exec(script)?.[1];
    if (stateDir === undefined || wait === undefined) throw new Error(`${REMOTE_SWITCH}: no STATE_DIR default or LOCK_WAIT_SECONDS`);
    return {
        stateDir,
        lockWaitSeconds: Number(wait),
        takesLockOnFd9: /exec 9>>"\$STATE_DIR\/lock"\n\s*if ! flock -n 9; then[\s\S]*?flock -w "\$LOCK_WAIT_SECONDS" 9/.test(script),
        pendingFiles: [...new Set([...script.matchAll(/\$STATE_DIR\/(pending-[a-z-]+)/g)].map((m) => `${stateDir}/${m[1]}`))].sort(),
    };
}

describeWithTools(["nix-instantiate", "bash", "flock", "shellcheck"])("nightly upgrades (nix/modules/upgrades.nix)", () => {
    let staging: HostEvaluation;
    let prod: HostEvaluation;
    let nixpkgsUrl: string;
    beforeAll(async () => {
        [staging, prod, { nixpkgsUrl }] = await Promise.all([evalHost("staging"), evalHost("prod"), evalFlakeStructure()]);
    });
    const preamble = (): string => (staging.config.systemd.services["nixos-upgrade"].script as Ordered<string>).content;

    describe("what the module sets", () => {
        it("turns the nightly upgrade on for staging only", () => {
            expect(staging.config.system.autoUpgrade.enable).toBe(true);
            expect(staging.config.system.autoUpgrade.flake).toBe("path:/nix/store/stand-in-source#staging");
            expect(prod.config.system.autoUpgrade).toBeUndefined();
            // Only the boot guard (nix/modules/boot-guard.nix), which every host has.
            expect(Object.keys(prod.config.systemd.services)).toEqual(["nixos-ec2-boot-guard"]);
        });

        it("moves nixpkgs to the head of flake.nix's branch with the current flag, and writes no lock file", () => {
            expect(nixpkgsUrl).toMatch(/^github:NixOS\/nixpkgs\/nixos-\d\d\.\d\d$/);
            expect(staging.config.system.autoUpgrade.flags).toEqual([
                "--override-input",
                "nixpkgs",
                nixpkgsUrl,
                "--no-write-lock-file",
                "--print-build-logs",
            ]);
        });

        it("follows an edit of flake.nix's nixpkgs branch (written once, there)", async () => {
            const dir = path.join(tempDir("nixos-ec2-upgrades-"), "nix");
            cpSync(path.join(__dirname, "..", "nix"), dir, { recursive: true });
            const flake = path.join(dir, "flake.nix");
            writeFileSync(flake, readFileSync(flake, "utf8").replace("nixos-26.05", "nixos-26.11"));
            const edited = await evalHost("staging", {}, dir);
            expect(edited.config.system.autoUpgrade.flags.slice(0, 3)).toEqual(["--override-input", "nixpkgs", "github:NixOS/nixpkgs/nixos-26.11"]);
        });

        it("passes no flag that the unquoted shell line of auto-upgrade.nix would split or expand", () => {
            for (const flag of staging.config.system.autoUpgrade.flags as string[]) expect(flag).toMatch(/^[A-Za-z0-9:/._#=-]+$/);
            expect(staging.config.system.autoUpgrade.flake).toMatch(/^[A-Za-z0-9:/._#=-]+$/);
        });

        it("puts the lock preamble before the module's nixos-rebuild line (mkBefore on a types.lines script)", () => {
            const script = staging.config.systemd.services["nixos-upgrade"].script as Ordered<string>;
            expect(script._type).toBe("order");
            expect(script.priority).toBeLessThan(DEFAULT_ORDER);
        });

        it("takes the lock the deploy takes, on the same descriptor, and waits as long as a deploy does", () => {
            const facts = remoteSwitchFacts();
            expect(facts.takesLockOnFd9).toBe(true);
            expect(facts.stateDir).toBe(STATE_DIR);
            expect(preamble()).toContain(`[ -d ${facts.stateDir} ] || mkdir -m 0700 ${facts.stateDir}\nexec 9>>${facts.stateDir}/lock\n`);
            expect(preamble()).toContain(`lock_wait_seconds=${facts.lockWaitSeconds}\n`);
            expect(preamble()).toMatch(/flock -n 9;[\s\S]*flock -w "\$lock_wait_seconds" 9;/);
        });

        it("checks every pending-* file that the deploy writes", () => {
            const { pendingFiles } = remoteSwitchFacts();
            expect(pendingFiles).toContain(`${STATE_DIR}/pending-rollback`);
            const checked = /for pending in ([^;]+); do/.exec(preamble())?.[1].split(" ") ?? [];
            expect(checked).toEqual(expect.arrayContaining([`${STATE_DIR}/pending-rollback`, `${STATE_DIR}/pending-boot`]));
            for (const file of pendingFiles) expect(checked).toContain(file);
        });

        it("writes a script that shellcheck passes", () => {
            const file = path.join(tempDir("nixos-ec2-upgrades-"), "nixos-upgrade-start");
            writeFileSync(file, `#!/usr/bin/env bash\nset -e\n${preamble()}${UPGRADE_COMMAND}`);
            expect(() => execFileSync("shellcheck", [file], { encoding: "utf8" })).not.toThrow();
        });
    });

    describe("the preamble, run", () => {
        let stateDir: string;
        let holder: ChildProcess | undefined;
        beforeEach(() => {
            stateDir = tempDir("nixos-ec2-state-");
        });
        afterEach(() => {
            // The holder leads its own process group: its shell and sleep go with it.
            try {
                if (holder?.pid !== undefined) process.kill(-holder.pid, "SIGKILL");
            } catch {
                // Already gone: the hold ended by itself.
            }
            holder = undefined;
        });

        /** The preamble with the state directory (and, if given, the lock wait) moved for the test. */
        const run = (waitSeconds?: number) => {
            let script = preamble().split(STATE_DIR).join(stateDir);
            // Nothing here may touch this machine's own state directory.
            expect(script).not.toContain("/var/lib/");
            if (waitSeconds !== undefined) script = script.replace(/^lock_wait_seconds=\d+$/m, `lock_wait_seconds=${waitSeconds}`);
            return runJobScript(script + UPGRADE_COMMAND, { NIXOS_EC2_TEST_LOCK: path.join(stateDir, "lock") });
        };

        /** Holds the lock from another process, as a deploy's switch unit does, for `seconds`. */
        const holdLock = (seconds: number): Promise<void> =>
            new Promise((resolve, reject) => {
                holder = spawn("flock", [path.join(stateDir, "lock"), "-c", `echo held; sleep ${seconds}`], {
                    stdio: ["ignore", "pipe", "inherit"],
                    detached: true,
                });
                holder.stdout?.once("data", () => resolve());
                holder.once("error", reject);
            });

        it("upgrades when no deploy is running, and holds the lock while it does", async () => {
            const { status, output } = await run();
            expect(status).toBe(0);
            expect(output).toContain(`nixos-ec2: holding ${stateDir}/lock until this upgrade ends`);
            expect(output).toContain("UPGRADE-RAN\nLOCK-HELD\n");
        });

        it("upgrades on a host that was switched by hand, never deployed: makes the state directory first, private", async () => {
            rmSync(stateDir, { recursive: true });
            const { status, output } = await run();
            expect({ status, output }).toEqual({ status: 0, output: expect.stringContaining("UPGRADE-RAN\nLOCK-HELD\n") });
            expect(statSync(stateDir).mode & 0o777).toBe(0o700);
        });

        it("leaves the mode of a state directory that exists alone", async () => {
            chmodSync(stateDir, 0o750);
            expect((await run()).status).toBe(0);
            expect(statSync(stateDir).mode & 0o777).toBe(0o750);
        });

        it("upgrades after a confirmed deploy, which leaves the pending files empty", async () => {
            writeFileSync(path.join(stateDir, "pending-rollback"), "");
            writeFileSync(path.join(stateDir, "pending-boot"), "");
            const { status, output } = await run();
            expect(status).toBe(0);
            expect(output).toContain("UPGRADE-RAN");
        });

        it.each(["pending-rollback", "pending-boot"])("skips the night, exiting 0, while %s says a deploy awaits its confirmation", async (name) => {
            writeFileSync(path.join(stateDir, name), "20261201T0440-ab12 41\n");
            const { status, output } = await run();
            expect(status).toBe(0);
            expect(output).toContain(
                `nixos-ec2: skipping tonight's upgrade: a deploy is waiting for its confirmation (${stateDir}/${name}: 20261201T0440-ab12 41)`,
            );
            expect(output).not.toContain("UPGRADE-RAN");
        });

        it("waits for a deploy that holds the lock, then upgrades", async () => {
            await holdLock(1.5);
            const started = Date.now();
            const { status, output } = await run();
            expect(status).toBe(0);
            expect(output).toContain(`nixos-ec2: a deploy or rollback holds ${stateDir}/lock; waiting up to 600 s`);
            expect(output).toContain("UPGRADE-RAN\nLOCK-HELD\n");
            expect(Date.now() - started).toBeGreaterThanOrEqual(1000);
        });

        it("skips the night, exiting 0, when the lock stays held for the whole wait", async () => {
            await holdLock(30);
            const { status, output } = await run(1);
            expect(status).toBe(0);
            expect(output).toContain(`nixos-ec2: skipping tonight's upgrade: ${stateDir}/lock is still held after 1 s (a deploy is building or switching)`);
            expect(output).not.toContain("UPGRADE-RAN");
        });
    });
});
