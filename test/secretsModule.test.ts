/**
 * nix/modules/secrets.nix and nix/modules/sops.nix, evaluated with the stand-in lib
 * (test/support/eval-host.nix): what a host that uses a secret asks of systemd, what the deploy
 * reads from the system, the constants the modules share with the deploy scripts, and that every
 * stack gives each host the secrets its configuration uses.
 */
import { readFileSync } from "node:fs";
import * as path from "node:path";
import { SECRET_NAME_PATTERN } from "../lib/hostSecrets";
import { listStacks, loadSettings } from "../lib/stacks";
import { SOPS_FILES_DIR } from "../tools/sopsConfig";
import { NIX_DIR } from "./support/nix";
import { evalHost, HostEvaluation } from "./support/nixHost";
import { describeWithTools } from "./support/tools";

const REPO = path.join(__dirname, "..");
const read = (file: string) => readFileSync(path.join(REPO, file), "utf8");
const ADMIN = { web: { admin: { enable: true } } };

/** The secrets a host's configuration uses (nixosEc2.secrets), by name. */
function secretsUsed(host: HostEvaluation): string[] {
    return Object.keys((host.options.secrets as Record<string, unknown> | undefined) ?? {}).sort();
}

describe("what nix/modules/secrets.nix shares with the deploy scripts and the program", () => {
    const module = read("nix/modules/secrets.nix");
    const remote = read("deploy/remote-switch.sh");
    const local = read("deploy/nixos-deploy.sh");

    it("one pattern of secret names in lib/hostSecrets.ts, both deploy scripts and the module", () => {
        const bash = (script: string) => /^readonly SECRET_NAME_PATTERN='([^']+)'$/m.exec(script)?.[1];
        expect(bash(remote)).toBe(SECRET_NAME_PATTERN);
        expect(bash(local)).toBe(SECRET_NAME_PATTERN);
        // builtins.match matches the whole string, as ^...$ does.
        expect(`^${/namePattern = "([^"]+)";/.exec(module)?.[1]}$`).toBe(SECRET_NAME_PATTERN);
    });

    it("the directory services read, the file that lists each secret's units, and the boot guard's unit", () => {
        const stateDir = /^STATE_DIR=\$\{NIXOS_EC2_STATE_DIR:-([^}]+)\}$/m.exec(remote)?.[1];
        expect(/^readonly SECRETS_LINK=\$STATE_DIR\/(\S+)$/m.exec(remote)?.[1]).toBe("secrets");
        expect(/secretsDir = "([^"]+)";/.exec(module)?.[1]).toBe(`${stateDir}/secrets`);
        expect(/^readonly SECRET_UNITS_FILE=(\S+)$/m.exec(remote)?.[1]).toBe(`etc/${/unitsFile = "([^"]+)";/.exec(module)?.[1]}`);
        expect(/bootGuard = "([^"]+)";/.exec(module)?.[1]).toBe(/^readonly BOOT_GUARD_UNIT=(\S+)$/m.exec(remote)?.[1]);
    });
});

describeWithTools(["nix-instantiate"])("nix/modules/secrets.nix (stand-in lib)", () => {
    let prod: HostEvaluation;
    let withAdmin: HostEvaluation;
    beforeAll(async () => {
        [prod, withAdmin] = await Promise.all([evalHost("prod"), evalHost("prod", ADMIN)]);
    });

    it("does nothing on a host that uses no secret", () => {
        expect(prod.options.secrets).toEqual({});
        expect(prod.config.environment.etc).toBeUndefined();
        expect(Object.keys(prod.config.systemd.services)).toEqual(["nixos-ec2-boot-guard"]);
    });

    it("gives a secret's units its credential, starts them after the boot guard, and lists them for the deploy", () => {
        expect(withAdmin.options.secrets).toEqual({
            webAdmin: {
                restartUnits: ["nginx.service"],
                loadCredential: true,
                path: "/var/lib/nixos-ec2/secrets/webAdmin",
                credential: "webAdmin:/var/lib/nixos-ec2/secrets/webAdmin",
            },
        });
        expect(withAdmin.config.systemd.services.nginx).toEqual({
            after: ["nixos-ec2-boot-guard.service"],
            serviceConfig: { LoadCredential: ["webAdmin:/var/lib/nixos-ec2/secrets/webAdmin"] },
        });
        expect(withAdmin.config.environment.etc["nixos-ec2/secret-units"]).toEqual({ text: "webAdmin nginx.service\n" });
        expect((withAdmin.config.assertions as Array<{ assertion: boolean }>).every((a) => a.assertion)).toBe(true);
    });

    it("lists every secret with all its units, loads only what is asked, and wires only services", async () => {
        const host = await evalHost("prod", {
            secrets: { apiToken: { restartUnits: ["api.service", "api.socket"] }, rootOnly: { restartUnits: ["backup.service"], loadCredential: false } },
        });
        expect(host.config.environment.etc["nixos-ec2/secret-units"].text).toBe("apiToken api.service api.socket\nrootOnly backup.service\n");
        expect(host.config.systemd.services.api).toEqual({ after: ["nixos-ec2-boot-guard.service"], serviceConfig: { LoadCredential: ["apiToken:/var/lib/nixos-ec2/secrets/apiToken"] } });
        expect(host.config.systemd.services.backup).toEqual({ after: ["nixos-ec2-boot-guard.service"], serviceConfig: { LoadCredential: [] } });
        expect(Object.keys(host.config.systemd.services).sort()).toEqual(["api", "backup", "nixos-ec2-boot-guard"]);
    });

    it("refuses a secret whose name the deploy would refuse", async () => {
        const host = await evalHost("prod", { secrets: { "db password": { restartUnits: [] } } });
        const failed = (host.config.assertions as Array<{ assertion: boolean; message: string }>).filter((a) => !a.assertion).map((a) => a.message);
        expect(failed).toEqual([expect.stringContaining("nixosEc2.secrets.db password: a secret's name matches")]);
    });

    it("refuses a unit named without its type, which would get no credential", async () => {
        const host = await evalHost("prod", { secrets: { apiToken: { restartUnits: ["api", "api.service", "x.socket"] } } });
        const failed = (host.config.assertions as Array<{ assertion: boolean; message: string }>).filter((a) => !a.assertion).map((a) => a.message);
        expect(failed).toEqual(['nixosEc2.secrets.apiToken.restartUnits: "api" is not a unit name with its type; write e.g. "nginx.service".']);
    });

    it("serves /admin from nginx's credential, behind basic auth, only where admin is on", () => {
        const admin = withAdmin.config.services.nginx.virtualHosts.todo.locations["= /admin"];
        expect(admin.extraConfig).toContain("auth_basic_user_file /run/credentials/nginx.service/webAdmin;");
        expect(admin.extraConfig).toMatch(/^stub_status;$/m);
        expect(prod.config.services.nginx.virtualHosts.todo.locations["= /admin"]).toBeUndefined();
        expect(withAdmin.config.services.nginx.virtualHosts.loopback.locations["= /admin"]).toBeUndefined();
    });

    it("every stack gives each host every secret its configuration uses (the deploy refuses a system otherwise)", async () => {
        const problems: string[] = [];
        for (const stack of listStacks()) {
            const settings = loadSettings(stack);
            for (const h of settings.hosts) {
                const given = settings.secrets.filter((s) => s.hosts.includes(h.name)).map((s) => s.name);
                for (const name of secretsUsed(await evalHost(h.flakeAttr))) {
                    if (!given.includes(name)) problems.push(`stack ${stack}, host ${h.name}: uses ${name}, which nixos-ec2:hostSecrets does not give it`);
                }
            }
        }
        expect(problems).toEqual([]);
        // Would be caught: staging with /admin and no secret for it.
        const staging = loadSettings("staging");
        expect(secretsUsed(await evalHost("staging", ADMIN)).filter((n) => !staging.secrets.some((s) => s.name === n))).toEqual(["webAdmin"]);
    });
});

describeWithTools(["nix-instantiate"])("nix/modules/sops.nix (stand-in lib)", () => {
    it("is off until a host turns it on", async () => {
        const prod = await evalHost("prod");
        expect(prod.options.sops).toEqual({ enable: false, file: path.join(NIX_DIR, "secrets", "prod.yaml") });
        expect(prod.config.sops).toBeUndefined();
    });

    it("decrypts the host's own file with its SSH host key, and says how to make the file", async () => {
        const host = await evalHost("prod", { sops: { enable: true } });
        const ssh = read("nix/modules/ssh.nix");
        const hostKey = /path = "([^"]+)";/.exec(ssh)?.[1];
        expect(host.config.sops).toEqual({
            defaultSopsFile: path.join(NIX_DIR, "secrets", "prod.yaml"),
            age: { sshKeyPaths: [hostKey] },
            gnupg: { sshKeyPaths: [] },
        });
        // npm run sops-config writes its rules for the same path.
        expect(path.relative(REPO, host.config.sops.defaultSopsFile)).toBe(`${SOPS_FILES_DIR}/prod.yaml`);
        const failed = (host.config.assertions as Array<{ assertion: boolean; message: string }>).filter((a) => !a.assertion).map((a) => a.message);
        expect(failed).toEqual([expect.stringContaining("run `npm run sops-config -- <stack>`, then create it with `sops nix/secrets/prod.yaml` in the dev shell")]);
    });
});
