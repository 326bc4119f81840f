import { spawnSync } from "node:child_process";
import { chmodSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import * as path from "node:path";
import { sshCommand } from "../components/nixosHost";
import { sshdCommand, startSshd, TestSshd } from "./support/sshd";
import { tempDir } from "./support/tempDir";
import { describeWithTools } from "./support/tools";

/**
 * The `sshCommand` output, run as a user would run it, against a real OpenSSH server on loopback.
 * A stand-in `pulumi` on PATH answers `stack output --show-secrets adminPrivateKey`.
 */
describeWithTools([sshdCommand(), "ssh", "ssh-keygen", "bash", "mktemp"])("the sshCommand output", () => {
    let sshd: TestSshd;
    let work: string;
    beforeAll(async () => {
        sshd = await startSshd();
        await sshd.ready;
        work = tempDir("ssh-command-");
        mkdirSync(path.join(work, "bin"));
        mkdirSync(path.join(work, "tmp"));
        const keyFile = path.join(work, "admin-key");
        writeFileSync(keyFile, sshd.adminPrivateKey, { mode: 0o600 });
        // Records its arguments, and answers only the one question the command asks.
        const fakePulumi = path.join(work, "bin", "pulumi");
        writeFileSync(
            fakePulumi,
            `#!/usr/bin/env bash\nprintf '%s\\n' "$*" >> '${work}/pulumi-calls'\n` +
                `[[ "$*" == "stack output -s staging --show-secrets adminPrivateKey" ]] || exit 9\ncat '${keyFile}'\n`,
        );
        chmodSync(fakePulumi, 0o755);
    });
    afterAll(async () => {
        await sshd?.stop();
    });

    function run(command: string): { status: number | null; stdout: string; stderr: string } {
        const result = spawnSync("bash", ["-c", command], {
            input: "echo logged-in-as-$(id -un)\nexit\n",
            env: { PATH: `${work}/bin:${process.env.PATH}`, HOME: process.env.HOME, TMPDIR: path.join(work, "tmp") },
            encoding: "utf8",
            timeout: 20_000,
        });
        return { status: result.status, stdout: result.stdout, stderr: result.stderr };
    }

    it("logs in with the key from the stack output, trusting the pinned host key, and leaves no key file", () => {
        const result = run(sshCommand("staging", "127.0.0.1", sshd.hostPublicKey, sshd.port, sshd.user));
        expect(result.stdout).toContain(`logged-in-as-${sshd.user}`);
        expect(result.status).toBe(0);
        expect(readFileSync(path.join(work, "pulumi-calls"), "utf8").trim().split("\n").pop()).toBe("stack output -s staging --show-secrets adminPrivateKey");
        expect(readdirSync(path.join(work, "tmp"))).toEqual([]);
        expect(result.stdout + result.stderr).not.toContain("PRIVATE KEY");
    });

    it("refuses a host whose key is not the pinned one", () => {
        const otherKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGT132e+qnONjsm9xQQfd9oWrGJWQbfv8EoOwnp7SCGC";
        const result = run(sshCommand("staging", "127.0.0.1", otherKey, sshd.port, sshd.user));
        expect(result.status).not.toBe(0);
        expect(result.stdout).not.toContain("logged-in-as-");
        expect(result.stderr).toMatch(/Host key verification failed/);
        expect(readdirSync(path.join(work, "tmp"))).toEqual([]);
    });
});
