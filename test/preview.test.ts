/**
 * The offline preview, run as a person runs it: a child `node` process with the arguments of
 * package.json's `preview` script (npm left out for its noise).
 *
 * Golden files: test/golden/preview-<stack>.txt hold the whole text output, with the flake hash
 * replaced by FLAKE_HASH_TOKEN (the flake in nix/ changes on its own schedule; the tests check the
 * printed hash against flakeHash(nix/) separately). After an intended change of the program or of
 * the preview's format, regenerate them and review the diff:
 *
 *   UPDATE_GOLDEN=1 npx jest test/preview.test.ts
 */
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { ConfigError } from "../lib/config";
import { flakeHash } from "../lib/flakeHash";
import { SecretValue } from "../lib/offline";
import { loadSettings, PROJECT_DIR } from "../lib/stacks";
import type { PreviewReport, ResourceNode } from "../tools/previewReport";
import { previewNodeArgs } from "../tools/previewCommand";
import { RULES } from "../policy/rules";
import { runProgram } from "./support/program";

const GOLDEN_DIR = path.join(__dirname, "golden");
const FLAKE_HASH_TOKEN = "{{flakeHash(nix/)}}";
const NIX_DIR = path.join(PROJECT_DIR, "nix");

interface Result {
    status: number | null;
    stdout: string;
    stderr: string;
}

function preview(...args: string[]): Result {
    const env = { ...process.env };
    delete env.NIXOS_EC2_PROBE;
    delete env.NODE_OPTIONS;
    const r = spawnSync(process.execPath, [...previewNodeArgs(), ...args], { cwd: PROJECT_DIR, env, encoding: "utf8", maxBuffer: 64 << 20 });
    return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/**
 * What a preview of each committed stack prints on stderr, and nothing else: the stack files allow
 * SSH only from documentation ranges, which the program warns about (lib/config.ts).
 */
const DOCUMENTATION_WARNINGS: Record<string, string> = {
    staging:
        'warning: [runtime] nixos-ec2:sshAllowedCidrs[0]: "203.0.113.0/24" is an address range reserved for documentation (RFC 5737); ' +
        "no admin connects from it, so it lets no one in. Replace it with the networks you administer from.\n" +
        'warning: [runtime] nixos-ec2:sshAllowedCidrs[1]: "2001:db8::/32" is an address range reserved for documentation (RFC 3849); ' +
        "no admin connects from it, so it lets no one in. Replace it with the networks you administer from.\n" +
        "warning: [runtime] nixos-ec2:sshAllowedCidrs: every entry is in a documentation range, so SSH is open to no one: " +
        "a real pulumi up would wait nixos-ec2:deployConnectTimeoutSeconds (600 s) for each host's SSH and then fail its deploy.\n",
    prod:
        'warning: [runtime] nixos-ec2:sshAllowedCidrs[0]: "203.0.113.0/24" is an address range reserved for documentation (RFC 5737); ' +
        "no admin connects from it, so it lets no one in. Replace it with the networks you administer from.\n" +
        "warning: [runtime] nixos-ec2:sshAllowedCidrs: every entry is in a documentation range, so SSH is open to no one: " +
        "a real pulumi up would wait nixos-ec2:deployConnectTimeoutSeconds (600 s) for each host's SSH and then fail its deploy.\n",
};

/** A preview of `stack` that exits 0 with exactly the stack's documentation warnings on stderr. */
function ok(stack: string, ...args: string[]): string {
    const r = preview(stack, ...args);
    if (r.status !== 0 || r.stderr !== DOCUMENTATION_WARNINGS[stack]) throw new Error(`preview ${stack} ${args.join(" ")} exited ${r.status}: ${r.stderr}`);
    return r.stdout;
}

function json(stack: string, ...args: string[]): PreviewReport {
    return JSON.parse(ok(stack, ...args, "--json")) as PreviewReport;
}

function allNodes(nodes: ResourceNode[]): ResourceNode[] {
    return nodes.flatMap((n) => [n, ...allNodes(n.children)]);
}

function node(report: PreviewReport, type: string, name: string): ResourceNode {
    const found = allNodes(report.resources).filter((n) => n.type === type && n.name === name);
    if (found.length !== 1) throw new Error(`expected one ${type} ${name}, found ${found.length}`);
    return found[0];
}

function occurrences(text: string, needle: string): number {
    return text.split(needle).length - 1;
}

describe.each(["staging", "prod"])("npm run preview -- %s", (stack) => {
    let text: string;
    let report: PreviewReport;
    beforeAll(() => {
        text = ok(stack);
        report = json(stack);
    });

    it("prints the flake hash of nix/ as the deploy's first trigger", () => {
        const hash = flakeHash(NIX_DIR);
        expect(node(report, "command:local:Command", `${stack}-switch`).inputs.triggers).toEqual([
            hash,
            stack,
            `<known after deploy: id of ${stack}-instance>`,
            `<generated at deploy: public key of ssh-host-${stack}>`,
        ]);
        expect(occurrences(text, hash)).toBe(1);
    });

    it("matches its golden file, the flake hash aside", () => {
        const normalized = text.split(flakeHash(NIX_DIR)).join(FLAKE_HASH_TOKEN);
        const golden = path.join(GOLDEN_DIR, `preview-${stack}.txt`);
        if (process.env.UPDATE_GOLDEN === "1") writeFileSync(golden, normalized);
        expect(existsSync(golden)).toBe(true);
        expect(normalized).toBe(readFileSync(golden, "utf8"));
    });

    it("starts with the offline banner, then the count by type, and ends with the policy section: every rule passed", () => {
        const lines = text.trimEnd().split("\n");
        expect(lines[0]).toBe(
            `Offline preview of stack "${stack}": the program ran under Pulumi's mock runtime with this stack's configuration; ` +
                "nothing was created and no cloud was contacted.",
        );
        const countsAt = lines.indexOf(`Resources by type (${report.resourceTotal}, of which 5 components):`);
        expect(countsAt).toBeGreaterThan(0);
        const policyAt = lines.indexOf(`Policy pack nixos-ec2 (policy/): ${report.policy.checked.length} rules checked, 0 violations (0 mandatory)`);
        expect(policyAt).toBeGreaterThan(countsAt);
        expect(lines.slice(countsAt + 1, policyAt - 1)).toEqual(Object.entries(report.resourceCounts).map(([type, n]) => `  ${n}  ${type}`));
        expect(lines.slice(policyAt + 1)).toEqual(["  every rule passed"]);
        expect(report.policy).toEqual({ checked: RULES.map((r) => r.policy.name), violations: [], skipped: [] });
        expect(report.policy.checked).toHaveLength(12);
    });

    it("--json holds the same resources as the text, as a tree of components and children", () => {
        const nodes = allNodes(report.resources);
        expect(nodes).toHaveLength(report.resourceTotal);
        for (const n of nodes) expect(text).toContain(`${n.type} ${n.name}`);
        expect(report.resources.map((n) => n.type)).toEqual([
            "nixos-ec2:index:Firewall",
            "nixos-ec2:index:NixosDeployment",
            "nixos-ec2:index:NixosHost",
            "nixos-ec2:index:SshKeys",
            "nixos-ec2:index:StateStore",
        ]);
        expect(node(report, "nixos-ec2:index:Firewall", "hosts").children.map((c) => c.name)).toEqual(["hosts-sg"]);
        expect(report.stack).toBe(stack);
        expect(report.preview).toBe("offline");
    });

    it("shows what a reviewer checks: SSH CIDRs, instance type, volume, IMDS, bucket protections", () => {
        const sg = node(report, "aws:ec2/securityGroup:SecurityGroup", "hosts-sg").inputs as { ingress: Array<Record<string, unknown>> };
        expect(sg.ingress[0]).toMatchObject({ fromPort: 22, toPort: 22, cidrBlocks: ["203.0.113.0/24"] });
        const instance = node(report, "aws:ec2/instance:Instance", `${stack}-instance`);
        expect(instance.inputs).toMatchObject({
            instanceType: "t3.small",
            rootBlockDevice: { volumeSize: 20, volumeType: "gp3", encrypted: true },
            metadataOptions: { httpTokens: "required", httpPutResponseHopLimit: 1 },
            ami: "<looked up at deploy: newest AMI of owner 427812963091 named nixos/26.05* for x86_64>",
        });
        expect(instance.ignoreChanges).toEqual(["ami"]);
        expect(node(report, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock", "state-public-access")).toMatchObject({
            protect: true,
            retainOnDelete: true,
            inputs: { blockPublicAcls: true, blockPublicPolicy: true, ignorePublicAcls: true, restrictPublicBuckets: true },
        });
        expect(text).toContain(`aws:s3/bucket:Bucket state-bucket  [protect, retainOnDelete]`);
        expect(report.dataSources).toEqual([
            {
                token: "aws:ec2/getAmi:getAmi",
                calls: 1,
                args: {
                    filters: [
                        { name: "name", values: ["nixos/26.05*"] },
                        { name: "architecture", values: ["x86_64"] },
                    ],
                    mostRecent: true,
                    owners: ["427812963091"],
                },
            },
        ]);
    });

    it("prints values only a deploy knows as what they will be, not as made-up values", () => {
        const hosts = report.outputs.hosts as Record<string, Record<string, unknown>>;
        const ip = stack === "prod" ? `<known after deploy: Elastic IP of prod-eip>` : `<known after deploy: public IP of staging-instance>`;
        expect(hosts[stack]).toMatchObject({
            publicIp: ip,
            url: `http://${ip}/`,
            hostPublicKey: `<generated at deploy: public key of ssh-host-${stack}>`,
            systemPath: "<known after deploy>",
            generation: "<known after deploy>",
        });
        expect(report.outputs.backendUrl).toBe(`s3://nixos-ec2-state-${stack}-<generated at deploy: random string of state-suffix>?region=eu-central-1`);
        expect(text).not.toMatch(/ssh-ed25519 AAAA/);
    });
});

describe("secrets", () => {
    /** Every string under a SecretValue, however deep. */
    function secretStrings(value: unknown, inSecret = false): string[] {
        if (value instanceof SecretValue) return secretStrings(value.value, true);
        if (typeof value === "string") return inSecret ? [value] : [];
        if (Array.isArray(value)) return value.flatMap((v) => secretStrings(v, inSecret));
        if (value !== null && typeof value === "object") return Object.values(value).flatMap((v) => secretStrings(v, inSecret));
        return [];
    }

    it("never print, in text or JSON, for any stack or fleet", async () => {
        const hosts = '{"web":{},"db":{}}';
        const run = await runProgram("prod", { hosts });
        // The private keys and the user-data that carries them: their base64 lines are what must not leak.
        const material = [...run.resources.map((r) => r.inputs), run.outputs]
            .flatMap((v) => secretStrings(v))
            .filter((s) => s.includes("PRIVATE KEY"))
            .flatMap((s) => s.split(/[\n|]/))
            .filter((line) => /^[A-Za-z0-9+/=]{40,}$/.test(line));
        expect(material.length).toBeGreaterThanOrEqual(3 * 2);

        for (const [stack, ...args] of [["prod", "--config", `hosts=${hosts}`], ["staging"]]) {
            for (const out of [ok(stack, ...args), ok(stack, ...args, "--json")]) {
                expect(out).not.toContain("PRIVATE KEY");
                expect(out).not.toContain("SSH_HOST_ED25519_KEY");
                for (const line of material) expect(out).not.toContain(line);
            }
        }
    });

    it("print as [secret] where they are", () => {
        const report = json("prod");
        expect(node(report, "aws:ec2/instance:Instance", "prod-instance").inputs.userData).toBe("[secret]");
        expect(node(report, "command:local:Command", "prod-switch").inputs.environment).toBe("[secret]");
        expect(node(report, "nixos-ec2:index:NixosHost", "prod").inputs.hostPrivateKey).toBe("[secret]");
        expect(report.outputs.adminPrivateKey).toBe("[secret]");
        const text = ok("prod");
        expect(text).toContain("      userData: [secret]\n");
        expect(text).toContain("  adminPrivateKey: [secret]\n");
    });
});

describe("--config overrides", () => {
    it("apply after the stack file, to project keys, host maps and aws:region", () => {
        const report = json(
            "prod",
            "--config",
            "instanceType=t3.large",
            "--config",
            'hosts={"web":{},"db":{"instanceType":"t4g.medium","rootVolumeGiB":50}}',
            "--config=aws:region=us-east-1",
            "-c",
            "elasticIp=false",
        );
        expect(report.overrides).toEqual(["aws:region", "nixos-ec2:elasticIp", "nixos-ec2:hosts", "nixos-ec2:instanceType"]);
        expect(node(report, "aws:ec2/instance:Instance", "web-instance").inputs).toMatchObject({ instanceType: "t3.large", rootBlockDevice: { volumeSize: 20 } });
        // A Graviton host's instance name carries its architecture: moving it to x86_64 or back is a new instance.
        expect(node(report, "aws:ec2/instance:Instance", "db-instance-arm64").inputs).toMatchObject({
            instanceType: "t4g.medium",
            rootBlockDevice: { volumeSize: 50 },
            ami: "<looked up at deploy: newest AMI of owner 427812963091 named nixos/26.05* for arm64>",
        });
        // Pulumi.prod.yaml turns elasticIp on; the override turns it off.
        expect(report.resourceCounts["aws:ec2/eip:Eip"]).toBeUndefined();
        expect(report.outputs.backendUrl).toMatch(/\?region=us-east-1$/);
        expect(Object.keys(report.outputs.hosts as object)).toEqual(["web", "db"]);
        expect(report.dataSources.map((d) => [d.token, d.calls])).toEqual([
            ["aws:ec2/getAmi:getAmi", 1],
            ["aws:ec2/getAmi:getAmi", 1],
        ]);
    });

    it("show a canary rollout: the deploys of a flakeAttr's other hosts after its first, in text and JSON", () => {
        const hosts = 'hosts={"web-b":{"flakeAttr":"web"},"web-a":{"flakeAttr":"web"},"db":{}}';
        const text = ok("prod", "--config", hosts);
        expect(text).toContain(
            "\nDeploy order (nixos-ec2:rollout): a deploy starts once the deploys it waits for have confirmed:\n" +
                "  at once: db-switch, web-a-switch\n" +
                "  after web-a-switch: web-b-switch\n",
        );
        expect(text).toMatch(/\n└─ command:local:Command web-b-switch\n[\s\S]*?\(depends on: Command web-a-switch, /);
        const report = json("prod", "--config", hosts);
        expect(report.deployOrder).toEqual([
            { after: [], deploys: ["db-switch", "web-a-switch"] },
            { after: ["web-a-switch"], deploys: ["web-b-switch"] },
        ]);
        expect(node(report, "nixos-ec2:index:NixosDeployment", "web-a").inputs.canaryFor).toEqual(["web-b"]);
        expect(node(report, "nixos-ec2:index:NixosDeployment", "web-b").inputs.afterCanary).toBe("web-a");
        const parallel = json("prod", "--config", hosts, "--config", "rollout=parallel");
        expect(parallel.deployOrder).toEqual([{ after: [], deploys: ["db-switch", "web-a-switch", "web-b-switch"] }]);
    });

    it("that name real SSH networks leave stderr empty: the warnings are only about the documentation ranges", () => {
        for (const stack of ["staging", "prod"]) {
            const r = preview(stack, "--config", 'sshAllowedCidrs=["81.2.69.0/24", "2a02:8010::/32"]');
            expect([r.status, r.stderr]).toEqual([0, ""]);
            expect(r.stdout).toContain("81.2.69.0/24");
        }
    });

    it("are listed, by key, under the banner", () => {
        const text = ok("staging", "--config", "rootVolumeGiB=30");
        expect(text.split("\n")[1]).toBe("Overrides given with --config: nixos-ec2:rootVolumeGiB");
        expect(text).toContain("volumeSize: 30");
    });
});

describe("failures", () => {
    it("a bad configuration exits 1 and prints only the configuration errors, on stderr", () => {
        const overrides = { sshAllowedCidrs: '["0.0.0.0/0"]', rootVolumeGiB: "4" };
        let expected: ConfigError | undefined;
        try {
            loadSettings("prod", overrides);
        } catch (e) {
            expected = e as ConfigError;
        }
        expect(expected).toBeInstanceOf(ConfigError);
        const r = preview("prod", ...Object.entries(overrides).flatMap(([k, v]) => ["--config", `${k}=${v}`]));
        expect(r.status).toBe(1);
        expect(r.stdout).toBe("");
        expect(r.stderr).toBe(`${expected?.message}\n`);
        expect(r.stderr).toMatch(/^nixos-ec2: stack "prod" has 2 configuration errors; nothing was created:\n/);
    });

    it("a key in a misspelt namespace is previewed without it, with a warning on stderr that names the likely key", () => {
        const r = preview("staging", "--config", "nixosec2:instanceType=t3.large");
        expect(r.status).toBe(0);
        expect(r.stderr).toBe(
            'warning: [runtime] nixosec2:instanceType: ignored, because "nixosec2" is not this project\'s namespace; did you mean nixos-ec2:instanceType?\n' +
                DOCUMENTATION_WARNINGS.staging,
        );
        expect(r.stdout).toContain("instanceType: t3.small");
        expect(r.stdout).not.toContain("t3.large");
    });

    it("a program that breaks mandatory rules prints the whole preview and exits 4, its violations in the policy section", () => {
        const r = preview("prod", "--program", "test/fixtures/policyViolations.ts");
        expect(r.stderr).toBe("");
        expect(r.status).toBe(4);
        const section = r.stdout.slice(r.stdout.indexOf("\nPolicy pack nixos-ec2"));
        expect(r.stdout.indexOf("Resources by type (4, of which 0 components):")).toBeGreaterThan(0);
        expect(section.split("\n").slice(1, 3)).toEqual([
            "Policy pack nixos-ec2 (policy/): 12 rules checked, 15 violations (11 mandatory)",
            '  mandatory ec2-imdsv2-required on Instance legacy: metadataOptions.httpTokens is "optional"; it must be "required" (IMDSv2)',
        ]);
        for (const rule of ["ebs-encrypted", "ssh-from-named-networks-prod", "egress-http-https-only", "s3-bucket-private", "s3-bucket-versioned", "s3-bucket-kms-encrypted", "s3-bucket-tls-only", "kms-key-rotation", "user-data-host-key-only"]) {
            expect(section).toMatch(new RegExp(`^  mandatory ${rule} on `, "m"));
        }
        expect(section).toContain("  advisory tags-on-everything on Key unrotated: tag Project is undefined");
        expect(section).not.toContain("ssh-from-named-networks on");
    });

    it("the same program on staging reports world SSH as advisory", () => {
        const r = preview("staging", "--program", "test/fixtures/policyViolations.ts", "--json");
        expect(r.status).toBe(4);
        const report = JSON.parse(r.stdout) as PreviewReport;
        const ssh = report.policy.violations.filter((v) => v.policy.startsWith("ssh-from-named-networks"));
        expect(ssh).toEqual([
            { policy: "ssh-from-named-networks", level: "advisory", resource: "SecurityGroup open", message: "SSH (TCP 22) is open to the whole IPv4 internet; allow only named networks" },
        ]);
    });

    it("an unknown stack exits 2 and names the stacks there are", () => {
        const r = preview("qa");
        expect(r.status).toBe(2);
        expect(r.stdout).toBe("");
        expect(r.stderr).toBe('preview: unknown stack "qa": there is no Pulumi.qa.yaml; the stacks are prod, staging\n');
    });

    it.each([
        [["--yaml"], 'unknown option "--yaml"'],
        [["staging", "prod"], 'one stack at a time: got "staging" and "prod"'],
        [["--config"], "--config needs KEY=VALUE"],
        [["--config", "instanceType"], '--config "instanceType": expected KEY=VALUE'],
        [["--config", "bad key=1"], '--config "bad key=1": expected KEY=VALUE'],
    ])("bad arguments %j exit 2 with the usage", (args, message) => {
        const r = preview(...args);
        expect(r.status).toBe(2);
        expect(r.stdout).toBe("");
        expect(r.stderr).toContain(`preview: ${message}`);
        expect(r.stderr).toContain("usage: npm run preview -- [STACK] [--config KEY=VALUE]... [--json]");
    });

    it("a program that fails some other way exits 3 with its error, and says how to get its stack trace", () => {
        const dir = mkdtempSync(path.join(tmpdir(), "preview-failure-"));
        try {
            // Preloaded after the TS loader: components/firewall.ts throws as it loads.
            const inject = path.join(dir, "throw.js");
            writeFileSync(
                inject,
                `const Module = require("node:module");
                 const load = Module._extensions[".ts"];
                 Module._extensions[".ts"] = (m, file) =>
                     file.endsWith("${path.sep}components${path.sep}firewall.ts") ? m._compile("throw new Error('firewall exploded')", file) : load(m, file);\n`,
            );
            const args = previewNodeArgs();
            const r = spawnSync(process.execPath, [...args.slice(0, -1), "--require", inject, ...args.slice(-1)], { cwd: PROJECT_DIR, encoding: "utf8" });
            expect(r.status).toBe(3);
            expect(r.stdout).toBe("");
            expect(r.stderr).toBe(
                "preview: the program failed: Error: firewall exploded\n(for the stack trace: NODE_OPTIONS=--stack-trace-limit=50 npm run preview -- ...)\n",
            );
        } finally {
            rmSync(dir, { recursive: true, force: true });
        }
    });

    it("--help prints the usage and exits 0", () => {
        const r = preview("--help");
        expect(r.status).toBe(0);
        expect(r.stdout).toMatch(/^usage: npm run preview -- /);
    });
});

describe("determinism", () => {
    it("two runs print the same bytes, as text and as JSON", () => {
        const args = ["--config", 'hosts={"b":{},"a":{"instanceType":"c7g.large"}}'];
        expect(ok("staging", ...args)).toBe(ok("staging", ...args));
        expect(ok("staging", ...args, "--json")).toBe(ok("staging", ...args, "--json"));
    });

    it("staging is the default stack", () => {
        const r = preview();
        expect(r.status).toBe(0);
        expect(r.stderr).toBe(DOCUMENTATION_WARNINGS.staging);
        expect(r.stdout).toBe(ok("staging"));
    });
});

describe("what the preview loads", () => {
    it("is the SDK files the program needs, not @pulumi/aws whole; the benchmark's floor loads exactly those", () => {
        const dir = mkdtempSync(path.join(tmpdir(), "preview-probe-"));
        try {
            const probe = (args: string[], file: string): string[] => {
                const r = spawnSync(process.execPath, ["--require", "./tools/benchProbe.js", ...args], {
                    cwd: PROJECT_DIR,
                    env: { ...process.env, NIXOS_EC2_PROBE: path.join(dir, file) },
                    encoding: "utf8",
                });
                expect(r.status).toBe(0);
                return (JSON.parse(readFileSync(path.join(dir, file), "utf8")) as { sdkModules: string[] }).sdkModules;
            };
            const loaded = probe([...previewNodeArgs(), "staging"], "preview.json");
            // Node reports real paths; node_modules may be a link (a git worktree sharing one).
            const modulesDir = realpathSync(path.join(PROJECT_DIR, "node_modules"));
            const rel = loaded.map((f) => path.relative(modulesDir, f));
            expect(rel).toContain(path.join("@pulumi", "pulumi", "index.js"));
            expect(rel).toContain(path.join("@pulumi", "aws", "ec2", "instance.js"));
            expect(rel).not.toContain(path.join("@pulumi", "aws", "index.js"));
            expect(rel).not.toContain(path.join("@pulumi", "aws", "ec2", "index.js"));

            expect(probe(["tools/benchFloor.js", path.join(dir, "preview.json")], "floor.json")).toEqual(loaded);
        } finally {
            rmSync(dir, { recursive: true, force: true });
        }
    });
});
