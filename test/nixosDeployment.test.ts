import { chmodSync, cpSync, mkdirSync, symlinkSync, utimesSync, writeFileSync } from "node:fs";
import * as path from "node:path";
import { parseDeployResult } from "../components/nixosDeployment";
import { readFileSync } from "node:fs";
import { BUILD_LINK_NAMES, flakeFiles, flakeHash, IGNORED_NAMES } from "../lib/flakeHash";
import { OfflineRun, SecretValue } from "../lib/offline";
import { PROJECT_DIR } from "../lib/stacks";
import { childrenOf, resource, runProgram } from "./support/program";
import { tempDir } from "./support/tempDir";

const NIX_DIR = path.join(PROJECT_DIR, "nix");

function cloneOfNix(): string {
    const dir = path.join(tempDir("clone-"), "nix");
    cpSync(NIX_DIR, dir, { recursive: true });
    return dir;
}

describe("NixosDeployment", () => {
    let run: OfflineRun;
    beforeAll(async () => {
        run = await runProgram("prod");
    });

    it("runs the deploy script with relative paths, and the key as a secret in its environment", () => {
        const [command] = childrenOf(run, "nixos-ec2:index:NixosDeployment", "prod");
        expect(command.type).toBe("command:local:Command");
        expect(command.inputs.create).toBe("bash deploy/nixos-deploy.sh");
        expect(command.inputs.update).toBe("bash deploy/nixos-deploy.sh");
        expect(command.inputs.addPreviousOutputInEnv).toBe(false);
        expect(command.inputs.environment).toBeInstanceOf(SecretValue);
        const env = (command.inputs.environment as SecretValue).value as Record<string, string>;
        expect(env).toEqual({
            NIXOS_EC2_HOST: "(known after deploy: Elastic IP of prod-eip)",
            NIXOS_EC2_USER: "root",
            NIXOS_EC2_SSH_PRIVATE_KEY: expect.stringMatching(/^-----BEGIN OPENSSH PRIVATE KEY-----\n/),
            NIXOS_EC2_HOST_PUBLIC_KEY: (run.outputs.hosts as Record<string, { hostPublicKey: string }>).prod.hostPublicKey,
            NIXOS_EC2_FLAKE_DIR: "nix",
            NIXOS_EC2_FLAKE_ATTR: "prod",
            NIXOS_EC2_CONNECT_TIMEOUT_SECONDS: "600",
            NIXOS_EC2_BUILD_TIMEOUT_SECONDS: "3600",
            NIXOS_EC2_ACTIVATION_TIMEOUT_SECONDS: "90",
            NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: "120",
            NIXOS_EC2_ALLOW_FAILED_UNITS: "false",
            NIXOS_EC2_REBOOT_POLICY: "when-required",
        });
        expect(JSON.stringify(command.inputs)).not.toContain("PRIVATE KEY");
    });

    it("triggers on the flake hash, the flake attribute, the instance and the host key", () => {
        const command = resource(run, "command:local:Command", "prod-switch");
        const hosts = run.outputs.hosts as Record<string, { instanceId: string; hostPublicKey: string }>;
        expect(command.inputs.triggers).toEqual([flakeHash(NIX_DIR), "prod", hosts.prod.instanceId, hosts.prod.hostPublicKey]);
        expect(flakeHash(NIX_DIR)).toMatch(/^[0-9a-f]{64}$/);
    });

    it("depends on its instance and its Elastic IP", () => {
        const command = resource(run, "command:local:Command", "prod-switch");
        expect(command.dependencies).toEqual(
            expect.arrayContaining([resource(run, "aws:ec2/instance:Instance", "prod-instance").urn, resource(run, "aws:ec2/eip:Eip", "prod-eip").urn]),
        );
    });

    it("hands each host its own rebootPolicy, the stack-wide one unless the host overrides it", async () => {
        const fleet = await runProgram("staging", { rebootPolicy: "never", hosts: '{"staging": {"rebootPolicy": "always"}, "web": {}}' });
        const policyOf = (name: string) =>
            ((resource(fleet, "command:local:Command", `${name}-switch`).inputs.environment as SecretValue).value as Record<string, string>).NIXOS_EC2_REBOOT_POLICY;
        expect([policyOf("staging"), policyOf("web")]).toEqual(["always", "never"]);
    });

    it("has the same triggers in a second run of the same program", async () => {
        const again = await runProgram("prod");
        expect(resource(again, "command:local:Command", "prod-switch").inputs.triggers).toEqual(resource(run, "command:local:Command", "prod-switch").inputs.triggers);
    });
});

describe("flakeHash", () => {
    it("is the same for a clone elsewhere and after touching every file's mtime", () => {
        const clone = cloneOfNix();
        expect(flakeHash(clone)).toBe(flakeHash(NIX_DIR));
        const past = new Date("2001-02-03T04:05:06Z");
        for (const f of flakeFiles(clone)) utimesSync(path.join(clone, f), past, past);
        expect(flakeHash(clone)).toBe(flakeHash(NIX_DIR));
    });

    it("changes with a file's content, a new file, a renamed file and the executable bit", () => {
        const base = flakeHash(NIX_DIR);
        const edited = cloneOfNix();
        writeFileSync(path.join(edited, "network.json"), '{"publicTcpPorts": [80]}\n');
        const added = cloneOfNix();
        writeFileSync(path.join(added, "extra.nix"), "{ }\n");
        const renamed = cloneOfNix();
        cpSync(path.join(renamed, "network.json"), path.join(renamed, "network2.json"));
        const executable = cloneOfNix();
        chmodSync(path.join(executable, "network.json"), 0o755);
        const hashes = [base, ...[edited, added, renamed, executable].map(flakeHash)];
        expect(new Set(hashes).size).toBe(hashes.length);
    });

    it("ignores build result links and editor droppings", () => {
        const clone = cloneOfNix();
        symlinkSync("/nix/store/00000000000000000000000000000000-nixos-system", path.join(clone, "result"));
        symlinkSync("/nix/store/00000000000000000000000000000000-other", path.join(clone, "result-1"));
        for (const junk of ["network.json~", ".#flake.nix", "#flake.nix#", ".flake.nix.swp", ".DS_Store"]) writeFileSync(path.join(clone, junk), "junk");
        expect(flakeFiles(clone)).toEqual(flakeFiles(NIX_DIR));
        expect(flakeHash(clone)).toBe(flakeHash(NIX_DIR));
    });

    it("keeps files and directories that are only named like build links, and changes with them", () => {
        const base = flakeHash(NIX_DIR);
        const clone = cloneOfNix();
        writeFileSync(path.join(clone, "result-codes.nix"), "{ }\n");
        expect(flakeFiles(clone)).toContain("result-codes.nix");
        expect(flakeHash(clone)).not.toBe(base);
        const withDir = cloneOfNix();
        mkdirSync(path.join(withDir, "result"));
        writeFileSync(path.join(withDir, "result", "x.nix"), "{ }\n");
        expect(flakeFiles(withDir)).toContain("result/x.nix");
    });
});

describe("what a deploy copies", () => {
    it("names what it leaves out as the trigger hash does: droppings by name, build links only as links", () => {
        const script = readFileSync(path.join(PROJECT_DIR, "deploy", "nixos-deploy.sh"), "utf8");
        const find = /find \. ([\s\S]*?)-o -print0/.exec(script)?.[1] ?? "";
        const [pruned, links] = find.split("-prune");
        const names = (text: string) => [...text.matchAll(/-name '?([^' )\\]+)'?/g)].map((m) => m[1]).sort();
        expect(names(pruned)).toEqual([...IGNORED_NAMES].sort());
        expect(links).toMatch(/-type l/);
        expect(names(links)).toEqual([...BUILD_LINK_NAMES].sort());
    });
});

describe("parseDeployResult", () => {
    it("reads the script's last line", () => {
        expect(parseDeployResult('progress\n{"systemPath":"/nix/store/abc-nixos-system-prod","generation":42,"rebooted":true}\n')).toEqual({
            systemPath: "/nix/store/abc-nixos-system-prod",
            generation: 42,
            rebooted: true,
        });
    });
    it.each([
        ["no JSON", "done\n", /last line is not JSON: "done"/],
        ["no store path", '{"systemPath":"/tmp/x","generation":1,"rebooted":false}', /lacks systemPath/],
        ["a fractional generation", '{"systemPath":"/nix/store/x","generation":1.5,"rebooted":false}', /generation \(an integer\)/],
        ["no reboot flag", '{"systemPath":"/nix/store/x","generation":1}', /rebooted \(true or false\)/],
        ["a reboot flag that is a string", '{"systemPath":"/nix/store/x","generation":1,"rebooted":"false"}', /rebooted \(true or false\)/],
        ["nothing", "", /last line is not JSON/],
    ])("refuses %s", (_what, stdout, message) => {
        expect(() => parseDeployResult(stdout)).toThrow(message);
    });
});
