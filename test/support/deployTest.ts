/**
 * What the deploy integration tests share: fake hosts per test file, and the checks of what a
 * deploy leaves on the host, in its output and under its TMPDIR.
 */
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { DeployRun, sshdCommand, SshdOptions, startSshd, TestSshd } from "./sshd";

/** What the deploy integration tests need on this machine (describeWithTools). */
export const DEPLOY_TOOLS = [sshdCommand(), "ssh", "ssh-keygen", "tar", "flock", "setsid", "timeout", "sha256sum", "pgrep"];

export const TAIL_HEADER = /---- last 40 lines of \S+ on \S+ ----/;

/**
 * Fake hosts for one test file: `host()` starts one, and every host a test started is stopped
 * after it (with the ControlMaster a deploy killed on purpose left behind).
 */
export function useHosts(): (options?: SshdOptions) => Promise<TestSshd> {
    const hosts: TestSshd[] = [];
    afterEach(async () => {
        for (const sshd of hosts.splice(0)) {
            for (const work of fs.existsSync(sshd.localTmp) ? fs.readdirSync(sshd.localTmp) : []) {
                const socket = path.join(sshd.localTmp, work, "cm");
                if (fs.existsSync(socket)) {
                    spawnSync("ssh", ["-o", `ControlPath=${socket}`, "-O", "exit", "x"], { stdio: "ignore" });
                }
            }
            await sshd.stop();
        }
    });
    return async (options: SshdOptions = {}) => {
        const sshd = await startSshd(options);
        hosts.push(sshd);
        return sshd;
    };
}

export function stdoutLines(run: DeployRun): string[] {
    return run.stdout.split("\n").filter((line) => line !== "");
}

export function deployId(run: DeployRun): string {
    const match = /\(deploy ([0-9a-f]{12})\)/.exec(run.stderr);
    if (!match) {
        throw new Error(`no deploy id in:\n${run.stderr}`);
    }
    return match[1];
}

export function unitFile(sshd: TestSshd, run: DeployRun, suffix: string): string {
    return path.join(sshd.hostDir, "units", `nixos-ec2-rollback-${deployId(run)}.timer.${suffix}`);
}

/**
 * The base64 lines of the admin key that carry key material. The first line is left out:
 * it holds only the format header, the same in every unencrypted ED25519 key (the host's too).
 */
export function secretLines(sshd: TestSshd): string[] {
    const body = sshd.adminPrivateKey.split("\n").filter((line) => line !== "" && !line.startsWith("-----"));
    return body.slice(1).filter((line) => line.length >= 20);
}

export function filesUnder(dir: string): string[] {
    return fs.readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
        const full = path.join(dir, entry.name);
        if (entry.isDirectory()) {
            return filesUnder(full);
        }
        return entry.isFile() ? [full] : [];
    });
}

/** The key is in no output, no recorded call, no log or file of the host, and no temp file is left. */
export function expectNoSecretLeft(sshd: TestSshd, run: DeployRun): void {
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

export async function waitFor(what: string, condition: () => boolean, timeoutMs: number): Promise<void> {
    const started = Date.now();
    while (!condition()) {
        if (Date.now() - started > timeoutMs) {
            throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
        }
        await new Promise((resolve) => setTimeout(resolve, 100));
    }
}

/** Waits for the host's rollback to end: its last log line follows the old system's activation. */
export async function waitForRollback(sshd: TestSshd, timeoutMs: number): Promise<void> {
    const log = path.join(sshd.stateDir, "deploy.log");
    await waitFor("the host to finish rolling back", () => fs.existsSync(log) && /\] rolled back to generation 1$/m.test(fs.readFileSync(log, "utf8")), timeoutMs);
}

export function callIndex(sshd: TestSshd, pattern: RegExp): number {
    return sshd.calls().findIndex((call) => pattern.test(call));
}

/** The failure output: the log tail from the host, then the error line of the deploy. */
export function expectRolledBackWithLogTail(sshd: TestSshd, run: DeployRun, logLine: string): void {
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

export function controlMasterPid(sshd: TestSshd): number | undefined {
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
