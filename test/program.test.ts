import { OfflineRun, SecretValue } from "../lib/offline";
import { parseSettings } from "../lib/config";
import { readNetworkFile } from "../lib/network";
import { listStacks, loadSettings, loadStackConfig } from "../lib/stacks";
import { runProgram } from "./support/program";
import { isSecret, plainStrings } from "./support/secrets";

describe("the stacks in the repository", () => {
    it("are staging and prod", () => {
        expect(listStacks()).toEqual(["prod", "staging"]);
    });

    it("Pulumi.staging.yaml loads to one x86_64 host named staging, without Elastic IP or protection", () => {
        const s = loadSettings("staging");
        expect(s.hosts.map((h) => [h.name, h.flakeAttr, h.instanceType, h.nixSystem])).toEqual([["staging", "staging", "t3.small", "x86_64-linux"]]);
        expect([s.elasticIp, s.terminationProtection, s.region]).toEqual([false, false, "eu-central-1"]);
    });

    it("Pulumi.prod.yaml loads to one host named prod, with Elastic IP and termination protection", () => {
        const s = loadSettings("prod");
        expect(s.hosts.map((h) => [h.name, h.flakeAttr, h.instanceType, h.nixSystem])).toEqual([["prod", "prod", "t3.small", "x86_64-linux"]]);
        expect([s.elasticIp, s.terminationProtection]).toEqual([true, true]);
    });

    it("take the Pulumi.yaml schema defaults, then the stack file, then overrides", () => {
        const config = loadStackConfig("prod", { instanceType: "t3.large", "aws:region": "us-east-1" });
        expect(config["nixos-ec2:instanceType"]).toBe("t3.large");
        expect(config["nixos-ec2:rootVolumeGiB"]).toBe("20");
        expect(config["nixos-ec2:hosts"]).toBe("{}");
        // Per-stack defaults are not in Pulumi.yaml (a declared default would apply to every stack).
        expect(config["nixos-ec2:elasticIp"]).toBeUndefined();
        expect(config["aws:region"]).toBe("us-east-1");
        expect(JSON.parse(config["nixos-ec2:sshAllowedCidrs"])).toEqual(["203.0.113.0/24"]);
    });

    it("get the same settings from the Pulumi.yaml schema defaults as from the program's own defaults", () => {
        // The CLI applies the schema defaults; the program falls back to its own when a key is unset.
        const { "nixos-ec2:sshAllowedCidrs": cidrs, "aws:region": region } = loadStackConfig("staging");
        const withSchemaDefaults = loadSettings("staging");
        const withoutThem = parseSettings("staging", { "nixos-ec2:sshAllowedCidrs": cidrs, "aws:region": region }, readNetworkFile());
        expect(withoutThem).toEqual(withSchemaDefaults);
    });

    it("allow SSH only from documentation ranges, and the program warns so, naming the key and each entry", async () => {
        const documentation = (i: number, cidr: string, rfc: string) =>
            `nixos-ec2:sshAllowedCidrs[${i}]: "${cidr}" is an address range reserved for documentation (${rfc}); no admin connects from it, so it lets no one in. ` +
            "Replace it with the networks you administer from.";
        const nobody = expect.stringMatching(/^nixos-ec2:sshAllowedCidrs: every entry is in a documentation range, so SSH is open to no one: .*\(600 s\)/);
        const expected: Record<string, unknown[]> = {
            staging: [documentation(0, "203.0.113.0/24", "RFC 5737"), documentation(1, "2001:db8::/32", "RFC 3849"), nobody],
            prod: [documentation(0, "203.0.113.0/24", "RFC 5737"), nobody],
        };
        for (const stack of ["staging", "prod"]) {
            expect(loadSettings(stack).warnings).toEqual(expected[stack]);
            // The program hands them to pulumi.log.warn, which `pulumi up` shows and the preview prints.
            expect((await runProgram(stack)).warnings).toEqual(loadSettings(stack).warnings);
        }
    });

    it("run under the mocks with the expected hosts and no unmocked data source", async () => {
        for (const stack of ["staging", "prod"]) {
            const run = await runProgram(stack);
            expect(Object.keys(run.outputs.hosts as object)).toEqual([stack]);
            expect(run.resources.filter((r) => r.type === "aws:ec2/instance:Instance").map((r) => r.name)).toEqual([`${stack}-instance`]);
            expect(run.unmockedInvokes).toEqual([]);
        }
    });
});

describe("a bad configuration", () => {
    async function attempt(overrides: Record<string, string>): Promise<{ error: unknown; registered: string[] }> {
        const registered: string[] = [];
        let error: unknown;
        await jest.isolateModulesAsync(async () => {
            const { runOffline } = await import("../lib/offline");
            const config = loadStackConfig("prod", overrides);
            error = await runOffline({ stack: "prod", config, onResource: (r) => registered.push(r.name), onWarning: () => undefined }).then(
                () => undefined,
                (e: unknown) => e,
            );
        });
        return { error, registered };
    }

    it("is refused before any resource is registered, with every problem in one message", async () => {
        const { error, registered } = await attempt({ sshAllowedCidrs: '["0.0.0.0/0"]', rootVolumeGiB: "4" });
        expect(error).toMatchObject({ name: "ConfigError" });
        expect((error as Error).message).toMatch(
            /^nixos-ec2: stack "prod" has 2 configuration errors; nothing was created:\n  - nixos-ec2:rootVolumeGiB: "4" is not allowed[^\n]*\n  - nixos-ec2:sshAllowedCidrs\[0\]: "0\.0\.0\.0\/0" opens SSH/,
        );
        expect(registered).toEqual([]);
    });

    it("while the same stack with a good configuration registers its resources", async () => {
        const { error, registered } = await attempt({});
        expect(error).toBeUndefined();
        expect(registered).toContain("prod-instance");
    });
});

describe("secrets", () => {
    let run: OfflineRun;
    beforeAll(async () => {
        run = await runProgram("staging", { hosts: '{"web": {}, "db": {}}' });
    });

    it("the admin private key output and every host's user-data are secret", () => {
        expect(isSecret(run.outputs.adminPrivateKey)).toBe(true);
        const instances = run.resources.filter((r) => r.type === "aws:ec2/instance:Instance");
        expect(instances).toHaveLength(2);
        for (const i of instances) expect(isSecret(i.inputs.userData)).toBe(true);
    });

    it("no private key appears outside a secret, in any resource input or output", () => {
        const plain = [...plainStrings(run.outputs), ...run.resources.flatMap((r) => plainStrings(r.inputs))];
        expect(plain.length).toBeGreaterThan(20);
        expect(plain.filter((s) => s.includes("PRIVATE KEY"))).toEqual([]);
        // The check can fail: the secret values do hold keys.
        expect(String((run.outputs.adminPrivateKey as SecretValue).value)).toContain("PRIVATE KEY");
    });
});

describe("a fleet", () => {
    it("has hosts that depend on the shared firewall and keys but never on each other (rollout: parallel)", async () => {
        const names = ["web", "db", "cache"];
        const run = await runProgram("staging", { hosts: JSON.stringify(Object.fromEntries(names.map((n) => [n, {}]))) });
        const urnsOf = (host: string) => {
            const own = run.resources.filter(
                (r) =>
                    (r.type === "nixos-ec2:index:NixosHost" || r.type === "nixos-ec2:index:NixosDeployment" || r.type === "tls:index/privateKey:PrivateKey") &&
                    (r.name === host || r.name === `ssh-host-${host}`),
            );
            const ownUrns = new Set(own.map((r) => r.urn));
            return new Set(run.resources.filter((r) => ownUrns.has(r.urn) || ownUrns.has(r.parent)).map((r) => r.urn));
        };
        for (const host of names) {
            const mine = urnsOf(host);
            expect(mine.size).toBeGreaterThanOrEqual(5);
            const others = new Set(names.filter((n) => n !== host).flatMap((n) => [...urnsOf(n)]));
            const dependencies = run.resources.filter((r) => mine.has(r.urn)).flatMap((r) => r.dependencies);
            expect(dependencies.length).toBeGreaterThan(0);
            expect(dependencies.filter((d) => others.has(d))).toEqual([]);
        }
    });
});
