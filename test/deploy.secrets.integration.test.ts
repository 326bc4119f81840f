/**
 * Host secrets through deploy/nixos-deploy.sh and deploy/remote-switch.sh, against the fake host
 * (test/support/sshd.ts): what arrives where and how, what a failed, rolled-back or rebooted deploy
 * leaves, which units restart, and that no secret shows up anywhere else.
 *
 * The fake host runs as the test user, who stands in for root: its files are "root's" when they are
 * the test user's. Its units load credentials as systemd does (test/fixtures/start-unit), so the
 * tests read what a service would see in /run/credentials/<unit>/<name>.
 */
import { execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { encodeSecrets } from "../components/hostSecrets";
import { DEPLOY_TOOLS, deployId, expectNoSecretLeft, filesUnder, stdoutLines, useHosts, waitFor } from "./support/deployTest";
import { DEPLOY_SCRIPT, deployEnv, DeployRun, runDeploy, TestSshd } from "./support/sshd";
import { describeWithTools } from "./support/tools";

const WEB_ADMIN_1 = "admin:$6$salt-one$first-htpasswd-line-8c1f0e\n";
const WEB_ADMIN_2 = "admin:$6$salt-two$second-htpasswd-line-5a9b3d\n";
const API_TOKEN_1 = "api-token-one-4e7d2a91b0";
const USES = { webAdmin: ["nginx.service"], apiToken: ["api.service", "nginx.service"] };

function env(sshd: TestSshd, secrets?: Record<string, string>, overrides: Record<string, string> = {}): NodeJS.ProcessEnv {
    return deployEnv(sshd, { ...(secrets ? { NIXOS_EC2_SECRETS: encodeSecrets(secrets) } : {}), ...overrides });
}

/** Enough time for reboots (500 ms each) and the retries of the confirmation. */
function rebootEnv(sshd: TestSshd, secrets: Record<string, string>): NodeJS.ProcessEnv {
    return env(sshd, secrets, { NIXOS_EC2_CONNECT_TIMEOUT_SECONDS: "30", NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: "6" });
}

const link = (sshd: TestSshd) => path.join(sshd.stateDir, "secrets");
const sets = (sshd: TestSshd) => path.join(sshd.stateDir, "secrets.d");

/** The secrets in use on the host, by name. */
function installed(sshd: TestSshd): Record<string, string> {
    const dir = link(sshd);
    return Object.fromEntries(fs.readdirSync(dir).map((name) => [name, fs.readFileSync(path.join(dir, name), "utf8")]));
}

/** What a unit got as its credential, as systemd copied it; undefined when it has none. */
function credential(sshd: TestSshd, unit: string, id: string): string | undefined {
    const file = path.join(sshd.hostDir, "run", "credentials", unit, id);
    return fs.existsSync(file) ? fs.readFileSync(file, "utf8") : undefined;
}

function restarts(sshd: TestSshd, since = 0): string[] {
    return sshd.calls().slice(since).filter((call) => call.startsWith("systemctl restart"));
}

function pending(sshd: TestSshd): string {
    const file = path.join(sshd.stateDir, "pending-secrets");
    return fs.existsSync(file) ? fs.readFileSync(file, "utf8") : "";
}

/** Every form a value could leak in: as is, each line, base64 (NIXOS_EC2_SECRETS), hex. */
function leakForms(value: string): string[] {
    const lines = value.split("\n").filter((l) => l.length >= 8);
    return [value.trim(), ...lines, Buffer.from(value).toString("base64"), Buffer.from(value).toString("hex")];
}

/** The files a secret may be in: the host's sets, and systemd's credentials of its units (RAM on a real host). */
function allowedPlaces(sshd: TestSshd): string[] {
    return [`${sets(sshd)}/`, `${path.join(sshd.hostDir, "run", "credentials")}/`];
}

function expectSecretsNowhereElse(sshd: TestSshd, run: DeployRun, values: string[]): void {
    const texts: Array<[string, string]> = [
        ["stdout", run.stdout],
        ["stderr", run.stderr],
        ...filesUnder(sshd.dir)
            .filter((file) => !allowedPlaces(sshd).some((dir) => file.startsWith(dir)))
            .map((file): [string, string] => [file, fs.readFileSync(file, "latin1")]),
    ];
    for (const value of values) {
        for (const form of leakForms(value)) {
            for (const [where, text] of texts) {
                if (text.includes(form)) throw new Error(`a secret appears in ${where}`);
            }
        }
    }
    expect(fs.readdirSync(sshd.localTmp)).toEqual([]);
}

describeWithTools([...DEPLOY_TOOLS, "base64", "cmp"])("host secrets: deploy/nixos-deploy.sh against a loopback sshd", () => {
    const host = useHosts();

    test("the host's secrets arrive root-only (the test user stands in for root) behind one link, and the units that use them load them", async () => {
        const sshd = await host();
        sshd.setBehaviour({ secretUnits: USES });
        const run = await runDeploy(env(sshd, { webAdmin: WEB_ADMIN_1, apiToken: API_TOKEN_1 }));
        expect(run.stderr).not.toMatch(/error:/);
        expect(run.code).toBe(0);
        expect(JSON.parse(stdoutLines(run)[0])).toMatchObject({ generation: 2, rebooted: false });

        const id = deployId(run);
        expect(fs.lstatSync(link(sshd)).isSymbolicLink()).toBe(true);
        expect(fs.readlinkSync(link(sshd))).toBe(`secrets.d/${id}`);
        const uid = process.getuid?.();
        for (const dir of [sets(sshd), link(sshd)]) {
            const stat = fs.statSync(dir);
            expect({ dir, mode: stat.mode & 0o777, uid: stat.uid }).toEqual({ dir, mode: 0o700, uid });
        }
        expect(installed(sshd)).toEqual({ apiToken: API_TOKEN_1, webAdmin: WEB_ADMIN_1 });
        for (const name of ["apiToken", "webAdmin"]) {
            const stat = fs.statSync(path.join(link(sshd), name));
            expect({ name, mode: stat.mode & 0o777, uid: stat.uid }).toEqual({ name, mode: 0o400, uid });
        }
        expect(fs.readdirSync(sets(sshd))).toEqual([id]);
        expect(pending(sshd)).toBe("");

        expect(credential(sshd, "nginx.service", "webAdmin")).toBe(WEB_ADMIN_1);
        expect(credential(sshd, "nginx.service", "apiToken")).toBe(API_TOKEN_1);
        expect(credential(sshd, "api.service", "apiToken")).toBe(API_TOKEN_1);
        expect(credential(sshd, "api.service", "webAdmin")).toBeUndefined();
        // Both secrets are new, so both units that use them restart, in one call.
        expect(restarts(sshd)).toEqual(["systemctl restart api.service nginx.service"]);
        expect(run.stderr).toContain("handing the secrets apiToken, webAdmin to 127.0.0.1");
        expect(run.stderr).toContain("] received 2 secret(s): apiToken webAdmin");
        // The secrets rode on the deploy's first connection: still two in all.
        expect(sshd.acceptedLogins()).toBe(2);
        expectNoSecretLeft(sshd, run);
        expectSecretsNowhereElse(sshd, run, [WEB_ADMIN_1, API_TOKEN_1]);
    });

    test("a changed secret restarts exactly the units that use it, also when the system did not change; none changed, none restart", async () => {
        const sshd = await host();
        sshd.setBehaviour({ secretUnits: USES });
        expect((await runDeploy(env(sshd, { webAdmin: WEB_ADMIN_1, apiToken: API_TOKEN_1 }))).code).toBe(0);
        const system = sshd.systemPath();
        const apiCredential = path.join(sshd.hostDir, "run", "credentials", "api.service", "apiToken");
        const apiStarted = fs.statSync(apiCredential).ino;

        let since = sshd.calls().length;
        const changed = await runDeploy(env(sshd, { webAdmin: WEB_ADMIN_2, apiToken: API_TOKEN_1 }));
        expect(changed.code).toBe(0);
        expect(sshd.systemPath()).toBe(system);
        expect(sshd.generation()).toBe(2);
        expect(restarts(sshd, since)).toEqual(["systemctl restart nginx.service"]);
        expect(changed.stderr).toContain("] secrets changed (webAdmin): restarting nginx.service");
        expect(credential(sshd, "nginx.service", "webAdmin")).toBe(WEB_ADMIN_2);
        expect(fs.statSync(apiCredential).ino).toBe(apiStarted);
        expect(installed(sshd)).toEqual({ apiToken: API_TOKEN_1, webAdmin: WEB_ADMIN_2 });
        // The set it replaced is gone once the deploy is confirmed.
        expect(fs.readdirSync(sets(sshd))).toEqual([deployId(changed)]);

        since = sshd.calls().length;
        const same = await runDeploy(env(sshd, { webAdmin: WEB_ADMIN_2, apiToken: API_TOKEN_1 }));
        expect(same.code).toBe(0);
        expect(restarts(sshd, since)).toEqual([]);
        expect(installed(sshd)).toEqual({ apiToken: API_TOKEN_1, webAdmin: WEB_ADMIN_2 });
        expectSecretsNowhereElse(sshd, same, [WEB_ADMIN_1, WEB_ADMIN_2, API_TOKEN_1]);
    });

    test("a secret the host no longer gets is removed from it, and a host with no secrets keeps none", async () => {
        const sshd = await host();
        sshd.setBehaviour({ secretUnits: USES });
        expect((await runDeploy(env(sshd, { webAdmin: WEB_ADMIN_1, apiToken: API_TOKEN_1 }))).code).toBe(0);

        sshd.setBehaviour({ secretUnits: { webAdmin: ["nginx.service"] } });
        const fewer = await runDeploy(env(sshd, { webAdmin: WEB_ADMIN_1 }));
        expect(fewer.code).toBe(0);
        expect(installed(sshd)).toEqual({ webAdmin: WEB_ADMIN_1 });
        expect(fs.readdirSync(sets(sshd))).toEqual([deployId(fewer)]);
        // The new system has no api.service: the switch stopped it, and systemd removed its credentials.
        expect(fs.existsSync(path.join(sshd.hostDir, "run", "credentials", "api.service"))).toBe(false);
        expect(credential(sshd, "nginx.service", "apiToken")).toBeUndefined();

        sshd.setBehaviour({});
        const none = await runDeploy(env(sshd));
        expect(none.code).toBe(0);
        expect(none.stderr).toContain("] this host gets no secrets from this deploy");
        expect(installed(sshd)).toEqual({});
        expect(fs.readdirSync(sets(sshd))).toEqual([deployId(none)]);
        expect(filesUnder(sets(sshd))).toEqual([]);
    });

    describe("a deploy that fails leaves the previous secrets in place", () => {
        async function firstDeploy(): Promise<{ sshd: TestSshd; set: string }> {
            const sshd = await host();
            sshd.setBehaviour({ secretUnits: USES });
            const run = await runDeploy(env(sshd, { webAdmin: WEB_ADMIN_1, apiToken: API_TOKEN_1 }));
            expect(run.code).toBe(0);
            return { sshd, set: fs.readlinkSync(link(sshd)) };
        }

        function expectFirstSecrets(sshd: TestSshd, set: string): void {
            expect(fs.readlinkSync(link(sshd))).toBe(set);
            expect(installed(sshd)).toEqual({ apiToken: API_TOKEN_1, webAdmin: WEB_ADMIN_1 });
            expect(fs.readdirSync(sets(sshd))).toEqual([path.basename(set)]);
            expect(pending(sshd)).toBe("");
            expect(credential(sshd, "nginx.service", "webAdmin")).toBe(WEB_ADMIN_1);
        }

        test("a failed build: nothing of the new secrets stays", async () => {
            const { sshd, set } = await firstDeploy();
            sshd.setBehaviour({ secretUnits: USES, buildExit: 1 });
            const run = await runDeploy(env(sshd, { webAdmin: WEB_ADMIN_2, apiToken: API_TOKEN_1 }));
            expect(run.code).toBe(1);
            expectFirstSecrets(sshd, set);
            expectSecretsNowhereElse(sshd, run, [WEB_ADMIN_2]);
        });

        test("a failed activation rolls the secrets back with the system, and the units that use them restart on the old ones", async () => {
            const { sshd, set } = await firstDeploy();
            sshd.setBehaviour({ secretUnits: USES, switchExit: 1 });
            const since = sshd.calls().length;
            const run = await runDeploy(env(sshd, { webAdmin: WEB_ADMIN_2, apiToken: API_TOKEN_1 }));
            expect(run.code).toBe(1);
            expect(run.stderr).toMatch(/rolled back to generation 2/);
            expect(sshd.generation()).toBe(2);
            expectFirstSecrets(sshd, set);
            // The link pointed at the new set during the switch: its users read the old one again.
            expect(restarts(sshd, since)).toEqual(["systemctl restart nginx.service"]);
        });

        test("a unit that fails to restart on a changed secret rolls the deploy back", async () => {
            const { sshd, set } = await firstDeploy();
            sshd.setBehaviour({ secretUnits: USES, unitFails: ["api.service"] });
            const run = await runDeploy(env(sshd, { webAdmin: WEB_ADMIN_1, apiToken: "api-token-two-9d1e" }));
            expect(run.code).toBe(1);
            expect(run.stderr).toContain("Job for api.service failed because the control process exited with error code.");
            expect(run.stderr).toContain("restarting the units that use changed secrets failed");
            expect(fs.readlinkSync(link(sshd))).toBe(set);
            expect(installed(sshd)).toEqual({ apiToken: API_TOKEN_1, webAdmin: WEB_ADMIN_1 });
            expect(credential(sshd, "nginx.service", "apiToken")).toBe(API_TOKEN_1);
        });

        test("a system that locks the admin out is rolled back by the host's timer, secrets too", async () => {
            const { sshd, set } = await firstDeploy();
            sshd.setBehaviour({ secretUnits: USES, breakSsh: true });
            const run = await runDeploy(env(sshd, { webAdmin: WEB_ADMIN_2, apiToken: API_TOKEN_1 }, { NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: "3" }));
            expect(run.code).toBe(1);
            // Until the timer fires, the new system runs with its new secrets.
            expect(installed(sshd).webAdmin).toBe(WEB_ADMIN_2);
            await waitFor("the timer's rollback", () => fs.readFileSync(path.join(sshd.stateDir, "deploy.log"), "utf8").includes("rolled back to generation 2"), 10_000);
            expectFirstSecrets(sshd, set);
        });

        test("a system that uses a secret the host does not get is refused before anything changes", async () => {
            const { sshd, set } = await firstDeploy();
            sshd.setBehaviour({ secretUnits: { ...USES, dbPassword: ["db.service"] } });
            const run = await runDeploy(env(sshd, { webAdmin: WEB_ADMIN_2, apiToken: API_TOKEN_1 }));
            expect(run.code).toBe(1);
            expect(run.stderr).toContain("the new system uses the secret(s) dbPassword (nixosEc2.secrets), which this host does not get; this host was not changed");
            expect(run.stderr).toMatch(/error: #web uses host secrets that 127\.0\.0\.1 port \d+ does not get .*the host was not changed/);
            expect(run.stderr).toContain("name this host for each of them in nixos-ec2:hostSecrets");
            expect(sshd.generation()).toBe(2);
            expectFirstSecrets(sshd, set);
        });

        test("secrets the host cannot store fail the deploy at once; what arrived is removed", async () => {
            const { sshd, set } = await firstDeploy();
            sshd.setBehaviour({ secretUnits: USES, uploadFails: true });
            const since = sshd.calls().length;
            const run = await runDeploy(env(sshd, { webAdmin: WEB_ADMIN_2, apiToken: API_TOKEN_1 }));
            expect(run.code).toBe(1);
            expect(run.stderr).toMatch(/receiving the secrets into \S+\/secrets\.d\/\.incoming\.[0-9a-f]{12} failed \(tar exited 2\); removed them/);
            expect(run.stderr).toMatch(/error: 127\.0\.0\.1 port \d+ could not store the secrets .*nothing was changed/);
            expect(sshd.calls().slice(since).some((call) => call.startsWith("nixos-rebuild"))).toBe(false);
            sshd.setBehaviour({ secretUnits: USES });
            expectFirstSecrets(sshd, set);
        });

        test("a deploy refused for disk space takes the secrets it handed over with it", async () => {
            const { sshd, set } = await firstDeploy();
            sshd.setBehaviour({ secretUnits: USES, diskFreeKib: 100 });
            const run = await runDeploy(env(sshd, { webAdmin: WEB_ADMIN_2, apiToken: API_TOKEN_1 }));
            expect(run.code).toBe(1);
            expect(run.stderr).toContain("not enough disk space for the upload");
            expect(fs.readdirSync(sets(sshd)).filter((name) => name.startsWith("."))).toEqual([]);
            sshd.setBehaviour({ secretUnits: USES });
            expectFirstSecrets(sshd, set);
            expectSecretsNowhereElse(sshd, run, [WEB_ADMIN_2]);
        });

        test("secrets received before a long build are out of reach of another deploy's sweep of stale uploads", async () => {
            const { sshd, set } = await firstDeploy();
            sshd.setBehaviour({ secretUnits: USES, buildDelaySeconds: 4 });
            const running = runDeploy(env(sshd, { webAdmin: WEB_ADMIN_2, apiToken: API_TOKEN_1 }));
            // While it builds (it holds the lock), its set is no longer an upload that a sweep takes for stale.
            await waitFor("the build", () => sshd.calls().some((call) => call.startsWith("nixos-rebuild")) && fs.readdirSync(sets(sshd)).some((n) => n.startsWith(".received.")), 15_000);
            expect(fs.readdirSync(sets(sshd)).filter((name) => name.startsWith(".incoming."))).toEqual([]);
            // What remote_secrets_command's sweep does to an old .incoming.* set.
            execFileSync("find", [sets(sshd), "-maxdepth", "1", "-name", ".incoming.*", "-exec", "rm", "-rf", "{}", "+"]);
            const run = await running;
            expect(run.code).toBe(0);
            expect(installed(sshd)).toEqual({ apiToken: API_TOKEN_1, webAdmin: WEB_ADMIN_2 });
            expect(fs.readlinkSync(link(sshd))).not.toBe(set);
        });
    });

    test("through a reboot: the new boot gets the new secrets before its units start; a boot that fails goes back to the old ones", async () => {
        const sshd = await host();
        sshd.setBehaviour({ secretUnits: USES });
        expect((await runDeploy(rebootEnv(sshd, { webAdmin: WEB_ADMIN_1, apiToken: API_TOKEN_1 }))).code).toBe(0);

        sshd.setBehaviour({ secretUnits: USES, switchInhibitors: '{"dbus-implementation":"broker"}' });
        const booted = await runDeploy(rebootEnv(sshd, { webAdmin: WEB_ADMIN_2, apiToken: API_TOKEN_1 }));
        expect(booted.stderr).not.toMatch(/error:/);
        expect(booted.code).toBe(0);
        expect(JSON.parse(stdoutLines(booted)[0])).toMatchObject({ rebooted: true });
        expect(fs.readlinkSync(link(sshd))).toBe(`secrets.d/${deployId(booted)}`);
        expect(installed(sshd).webAdmin).toBe(WEB_ADMIN_2);
        // The boot started nginx after the boot guard had put the new set in place.
        expect(credential(sshd, "nginx.service", "webAdmin")).toBe(WEB_ADMIN_2);
        expect(fs.readFileSync(path.join(sshd.hostDir, "units", "nixos-ec2-boot-guard.service.log"), "utf8")).toContain(
            `deploy ${deployId(booted)}: its secrets are in place`,
        );
        expect(fs.readdirSync(sets(sshd))).toEqual([deployId(booted)]);
        const set2 = fs.readlinkSync(link(sshd));

        // Back to the old dbus also needs a reboot; this boot fails its health check and goes back.
        sshd.setBehaviour({ secretUnits: USES, health: "503" });
        const failed = await runDeploy(rebootEnv(sshd, { webAdmin: WEB_ADMIN_1, apiToken: API_TOKEN_1 }));
        expect(failed.code).toBe(1);
        await waitFor("the boot back into generation 3", () => sshd.boots() >= 3 && fs.existsSync(path.join(sshd.hostDir, "run", "booted-system")), 30_000);
        await waitFor("the old system's units", () => credential(sshd, "nginx.service", "webAdmin") !== undefined, 10_000);
        // Generation 3 is the one the second deploy booted and confirmed.
        expect(sshd.generation()).toBe(3);
        expect(fs.readlinkSync(link(sshd))).toBe(set2);
        expect(installed(sshd).webAdmin).toBe(WEB_ADMIN_2);
        expect(credential(sshd, "nginx.service", "webAdmin")).toBe(WEB_ADMIN_2);
        expect(fs.readdirSync(sets(sshd))).toEqual([path.basename(set2)]);
    });

    test("no secret is ever on a command line, in another process's environment, in the output, a log or a leftover file", async () => {
        const sshd = await host();
        sshd.setBehaviour({ secretUnits: USES, buildDelaySeconds: 0.5 });
        const values = [WEB_ADMIN_1, API_TOKEN_1];
        const forms = values.flatMap(leakForms);
        // What the kernel shows for the script once `#!/usr/bin/env bash` has run bash on it, and,
        // a moment before, for the same process while env still looks bash up on PATH.
        const scriptCommand = `bash\0${DEPLOY_SCRIPT}\0`;
        const scriptByEnv = `/usr/bin/env\0bash\0${DEPLOY_SCRIPT}\0`;
        let samples = 0;
        let sawScriptEnvironment = false;
        const seen: string[] = [];
        const read = (file: string): string | undefined => {
            try {
                return fs.readFileSync(file, "latin1");
            } catch {
                return undefined;
            }
        };
        // Every 2 ms, every process's argv and environment. The script's own environment holds the
        // secrets, as Pulumi's command provider starts it, and so does what the kernel shows for the
        // subshells it forks, which are copies of it (/proc/<pid>/environ is the environment a
        // program was started with); every program it runs gets them removed.
        const sample = setInterval(() => {
            samples += 1;
            for (const pid of fs.readdirSync("/proc").filter((p) => /^\d+$/.test(p))) {
                const cmdline = read(`/proc/${pid}/cmdline`);
                if (cmdline === undefined) continue;
                let environ = read(`/proc/${pid}/environ`) ?? "";
                if (cmdline === scriptCommand) {
                    // Proves the sampling sees what it looks for.
                    if (forms.some((f) => environ.includes(f))) sawScriptEnvironment = true;
                    environ = "";
                } else if (cmdline === scriptByEnv) environ = "";
                for (const [what, text] of [["argv", cmdline], ["environment", environ]]) {
                    if (forms.some((f) => text.includes(f))) seen.push(`${what} of ${cmdline.split("\0").join(" ")}`);
                }
            }
        }, 2);
        let run: DeployRun;
        try {
            run = await runDeploy(env(sshd, { webAdmin: WEB_ADMIN_1, apiToken: API_TOKEN_1 }));
        } finally {
            clearInterval(sample);
        }
        expect(run.code).toBe(0);
        expect(samples).toBeGreaterThan(20);
        expect(sawScriptEnvironment).toBe(true);
        expect([...new Set(seen)].slice(0, 5)).toEqual([]);
        expectSecretsNowhereElse(sshd, run, values);
    });
});
