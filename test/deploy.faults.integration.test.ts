/**
 * deploy/nixos-deploy.sh against a fake host (test/support/sshd.ts) under faults found by trying
 * it as an adversary would: each test shows the fault, and that the deploy now handles it.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { expectNoSecretLeft, stdoutLines, useHosts } from "./support/deployTest";
import { deployEnv, runDeploy, sshdCommand } from "./support/sshd";
import { describeWithTools } from "./support/tools";

describeWithTools([sshdCommand(), "ssh", "ssh-keygen", "tar", "flock", "setsid", "timeout", "sha256sum"])(
    "deploy/nixos-deploy.sh under faults",
    () => {
        const host = useHosts();

        test.each([
            ["a space", "with space"],
            ["ssh's % tokens", "per%cent %h %d %%"],
            ["quotes and a backslash", `quo"te's back\\slash`],
        ])("works with a TMPDIR that holds %s", async (_what, name) => {
            const sshd = await host();
            const tmp = path.join(sshd.localTmp, name);
            fs.mkdirSync(tmp);
            const run = await runDeploy(deployEnv(sshd, { TMPDIR: tmp }));
            expect(run.stderr).not.toMatch(/interception|error:/);
            expect(run.code).toBe(0);
            expect(JSON.parse(stdoutLines(run)[0])).toEqual({ systemPath: sshd.systemPath(), generation: 2 });
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
    },
);
