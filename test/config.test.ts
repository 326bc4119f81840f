import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { architectureOf, cidrProblem, ConfigError, parseSettings, RawConfig } from "../lib/config";
import { NETWORK_FILE, NetworkFile, readNetworkFile } from "../lib/network";

const goodNetwork: NetworkFile = { publicTcpPorts: [80, 443], problems: [] };
const base: RawConfig = { sshAllowedCidrs: '["203.0.113.0/24"]' };

function problemsOf(stack: string, raw: RawConfig, network: NetworkFile = goodNetwork, region = "eu-central-1"): string[] {
    try {
        parseSettings(stack, raw, region, network);
    } catch (e) {
        expect(e).toBeInstanceOf(ConfigError);
        return (e as ConfigError).problems;
    }
    throw new Error("expected a ConfigError");
}

function networkFile(content: string | undefined): NetworkFile {
    const dir = mkdtempSync(path.join(tmpdir(), "network-"));
    const file = path.join(dir, "network.json");
    if (content !== undefined) writeFileSync(file, content);
    return readNetworkFile(file);
}

describe("parseSettings", () => {
    it("fills the documented defaults and one host named after the stack", () => {
        const s = parseSettings("staging", base, "eu-central-1", goodNetwork);
        expect(s).toEqual({
            stack: "staging",
            region: "eu-central-1",
            sshAllowedCidrs: ["203.0.113.0/24"],
            nixosRelease: "26.05",
            ami: undefined,
            elasticIp: false,
            terminationProtection: false,
            vpcId: undefined,
            subnetId: undefined,
            publicTcpPorts: [80, 443],
            hosts: [
                { name: "staging", flakeAttr: "staging", instanceType: "t3.small", rootVolumeGiB: 20, architecture: "x86_64", nixSystem: "x86_64-linux" },
            ],
            deploy: { connectTimeoutSeconds: 600, rollbackTimeoutSeconds: 120, allowFailedUnits: false },
        });
    });

    it("applies per-host overrides over the stack-wide values", () => {
        const s = parseSettings(
            "staging",
            {
                ...base,
                instanceType: "t3.medium",
                rootVolumeGiB: "30",
                hosts: JSON.stringify({ web: {}, build: { instanceType: "c7g.xlarge", rootVolumeGiB: 100, flakeAttr: "builder" } }),
            },
            "eu-central-1",
            goodNetwork,
        );
        expect(s.hosts).toEqual([
            { name: "web", flakeAttr: "web", instanceType: "t3.medium", rootVolumeGiB: 30, architecture: "x86_64", nixSystem: "x86_64-linux" },
            { name: "build", flakeAttr: "builder", instanceType: "c7g.xlarge", rootVolumeGiB: 100, architecture: "arm64", nixSystem: "aarch64-linux" },
        ]);
    });

    it("treats empty strings (the schema defaults of optional keys) as unset", () => {
        const s = parseSettings("staging", { ...base, ami: "", vpcId: "", subnetId: "" }, "eu-central-1", goodNetwork);
        expect([s.ami, s.vpcId, s.subnetId]).toEqual([undefined, undefined, undefined]);
    });

    it("accepts world SSH on a stack other than prod, and a pinned AMI as given", () => {
        const s = parseSettings("staging", { ...base, sshAllowedCidrs: '["0.0.0.0/0", "::/0"]', ami: "ami-0123456789abcdef0" }, "eu-central-1", goodNetwork);
        expect(s.sshAllowedCidrs).toEqual(["0.0.0.0/0", "::/0"]);
        expect(s.ami).toBe("ami-0123456789abcdef0");
    });

    // Each row: a bad config and the message it must be rejected with.
    const badConfigs: Array<[string, string, RawConfig, RegExp]> = [
        ["a CIDR that is not an address", "staging", { sshAllowedCidrs: '["10.0.0.300/8"]' }, /^nixos-ec2:sshAllowedCidrs\[0\]: "10\.0\.0\.300\/8" is not an IPv4 or IPv6 CIDR; allowed: /],
        ["a CIDR with host bits", "staging", { sshAllowedCidrs: '["10.1.2.3/8"]' }, /^nixos-ec2:sshAllowedCidrs\[0\]: "10\.1\.2\.3\/8" has host bits set \(the network is 10\.0\.0\.0\/8\)/],
        ["an IPv6 prefix over 128", "staging", { sshAllowedCidrs: '["2001:db8::/129"]' }, /sshAllowedCidrs\[0\]: "2001:db8::\/129" has an IPv6 prefix above 128/],
        ["a CIDR without prefix", "staging", { sshAllowedCidrs: '["203.0.113.7"]' }, /sshAllowedCidrs\[0\]: "203\.0\.113\.7" is not a CIDR/],
        ["no sshAllowedCidrs at all", "staging", {}, /^nixos-ec2:sshAllowedCidrs: not set; .*there is no default/],
        ["sshAllowedCidrs that is not a list", "staging", { sshAllowedCidrs: '"203.0.113.0/24"' }, /^nixos-ec2:sshAllowedCidrs: "203\.0\.113\.0\/24" is not a non-empty list of CIDR strings/],
        ["IPv4 world SSH on prod", "prod", { sshAllowedCidrs: '["0.0.0.0/0"]' }, /^nixos-ec2:sshAllowedCidrs\[0\]: "0\.0\.0\.0\/0" opens SSH to the whole internet, which stack "prod" refuses/],
        ["IPv6 world SSH on prod", "prod", { sshAllowedCidrs: '["203.0.113.0/24", "::/0"]' }, /^nixos-ec2:sshAllowedCidrs\[1\]: "::\/0" opens SSH to the whole internet/],
        ["an unknown instance type format", "staging", { ...base, instanceType: "small" }, /^nixos-ec2:instanceType: "small" is not an EC2 instance type .*e\.g\. t3\.small/],
        ["a bad AMI ID", "staging", { ...base, ami: "ami-123" }, /^nixos-ec2:ami: "ami-123" is not an AMI ID; allowed: "ami-" followed by 8 or 17 lowercase hex digits$/],
        ["an upper-case AMI ID", "staging", { ...base, ami: "ami-0123456789ABCDEF0" }, /^nixos-ec2:ami: "ami-0123456789ABCDEF0" is not an AMI ID/],
        ["a bad release", "staging", { ...base, nixosRelease: "unstable" }, /^nixos-ec2:nixosRelease: "unstable" is not a NixOS release; allowed: YY\.05 or YY\.11/],
        ["a bad host name", "staging", { ...base, hosts: '{"Web_1": {}}' }, /^nixos-ec2:hosts: host name "Web_1" is not allowed; allowed: \[a-z\]\[a-z0-9-\]\{0,30\}/],
        ["a host name that is too long", "staging", { ...base, hosts: JSON.stringify({ ["a".repeat(32)]: {} }) }, /^nixos-ec2:hosts: host name "a{32}" is not allowed/],
        ["a volume below 8 GiB", "staging", { ...base, rootVolumeGiB: "7" }, /^nixos-ec2:rootVolumeGiB: "7" is not allowed; allowed: a whole number from 8 to 16384$/],
        ["a fractional volume", "staging", { ...base, rootVolumeGiB: "8.5" }, /^nixos-ec2:rootVolumeGiB: "8\.5" is not allowed/],
        ["a host volume below 8 GiB", "staging", { ...base, hosts: '{"web": {"rootVolumeGiB": 4}}' }, /^nixos-ec2:hosts\.web\.rootVolumeGiB: "4" is not allowed; allowed: a whole number from 8/],
        ["a host map that is a list", "staging", { ...base, hosts: '["web"]' }, /^nixos-ec2:hosts: \["web"\] is not an object; allowed: a map of host name to overrides/],
        ["a host map that is a string", "staging", { ...base, hosts: "web" }, /^nixos-ec2:hosts: web is not an object/],
        ["an empty host map", "staging", { ...base, hosts: "{}" }, /^nixos-ec2:hosts: \{\} names no host/],
        ["a host whose overrides are not an object", "staging", { ...base, hosts: '{"web": "big"}' }, /^nixos-ec2:hosts\.web: "big" is not an object/],
        ["an unknown host setting", "staging", { ...base, hosts: '{"web": {"size": "big"}}' }, /^nixos-ec2:hosts\.web\.size: unknown host setting; allowed: instanceType, rootVolumeGiB, flakeAttr$/],
        ["a bad flake attribute", "staging", { ...base, hosts: '{"web": {"flakeAttr": "a.b"}}' }, /^nixos-ec2:hosts\.web\.flakeAttr: "a\.b" is not a Nix attribute name/],
        ["a host with a bad instance type", "staging", { ...base, hosts: '{"web": {"instanceType": "huge"}}' }, /^nixos-ec2:hosts\.web\.instanceType: "huge" is not an EC2 instance type/],
        ["a boolean that is not true/false", "staging", { ...base, elasticIp: "yes" }, /^nixos-ec2:elasticIp: "yes" is not allowed; allowed: true or false$/],
        ["a VPC without a subnet", "staging", { ...base, vpcId: "vpc-0123abcd" }, /^nixos-ec2:vpcId\/nixos-ec2:subnetId: set both .* only vpcId is set$/],
        ["a bad subnet ID", "staging", { ...base, vpcId: "vpc-0123abcd", subnetId: "sub-1" }, /^nixos-ec2:subnetId: "sub-1" is not a subnet ID/],
        ["a connect timeout of zero", "staging", { ...base, deployConnectTimeoutSeconds: "0" }, /^nixos-ec2:deployConnectTimeoutSeconds: "0" is not allowed; allowed: a whole number from 5 to 7200$/],
        ["a rollback timeout too short to confirm", "staging", { ...base, rollbackTimeoutSeconds: "5" }, /^nixos-ec2:rollbackTimeoutSeconds: "5" is not allowed; allowed: a whole number from 30 to 3600$/],
        ["a misspelled key", "staging", { ...base, instancetype: "t3.small" }, /^nixos-ec2:instancetype: unknown key; the project's keys are sshAllowedCidrs, instanceType/],
        ["a stack name that is not a host name, without hosts", "Staging", base, /^nixos-ec2:hosts: not set, and the stack name "Staging" is not a host name/],
    ];

    it.each(badConfigs)("rejects %s", (_what, stack, raw, message) => {
        const problems = problemsOf(stack, raw);
        expect(problems.some((p) => message.test(p))).toBe(true);
    });

    it("rejects a missing or malformed aws:region", () => {
        expect(problemsOf("staging", base, goodNetwork, "")).toEqual([expect.stringMatching(/^aws:region: not set/)]);
        expect(problemsOf("staging", base, goodNetwork, "Frankfurt")).toEqual([expect.stringMatching(/^aws:region: "Frankfurt" is not an AWS region name/)]);
    });

    it("reports every error at once, in one message that names each key and value", () => {
        const raw = { sshAllowedCidrs: '["0.0.0.0/0"]', instanceType: "big", ami: "ami-1", rootVolumeGiB: "2", hosts: '{"A": {}}' };
        let error: ConfigError | undefined;
        try {
            parseSettings("prod", raw, "eu-central-1", networkFile('{"publicTcpPorts": [80, 70000]}'));
        } catch (e) {
            error = e as ConfigError;
        }
        expect(error).toBeInstanceOf(ConfigError);
        expect(error!.problems).toHaveLength(6);
        expect(error!.message).toMatch(/^nixos-ec2: stack "prod" has 6 configuration errors; nothing was created:\n/);
        for (const fragment of ['"0.0.0.0/0"', '"big"', '"ami-1"', '"2"', '"A"', "70000"]) expect(error!.message).toContain(fragment);
    });
});

describe("nix/network.json", () => {
    it("the project's file opens 80 and 443", () => {
        expect(readNetworkFile(NETWORK_FILE)).toEqual({ publicTcpPorts: [80, 443], problems: [] });
    });

    it.each([
        ["missing", undefined, /network\.json: missing; it must hold \{"publicTcpPorts": \[80, 443\]\}/],
        ["not JSON", "{ports: 80}", /network\.json: not valid JSON/],
        ["without publicTcpPorts", '{"ports": [80]}', /publicTcpPorts is missing or not a list/],
        ["with port 0", '{"publicTcpPorts": [0]}', /publicTcpPorts\[0\] = 0 is out of range; allowed: a TCP port from 1 to 65535/],
        ["with port 65536", '{"publicTcpPorts": [80, 65536]}', /publicTcpPorts\[1\] = 65536 is out of range/],
        ["with a port as a string", '{"publicTcpPorts": ["80"]}', /publicTcpPorts\[0\] = "80" is out of range/],
        ["with port 22", '{"publicTcpPorts": [22]}', /publicTcpPorts\[0\] = 22 would open SSH to the world/],
        ["with a port twice", '{"publicTcpPorts": [80, 80]}', /publicTcpPorts\[1\] = 80 is listed twice/],
    ])("is rejected when %s", (_what, content, message) => {
        const network = networkFile(content);
        expect(network.problems).toEqual([expect.stringMatching(message)]);
        expect(problemsOf("staging", base, network)).toEqual([expect.stringMatching(message)]);
    });
});

describe("architectureOf", () => {
    it.each([
        ["t3.small", "x86_64"],
        ["m7i.metal-24xl", "x86_64"],
        ["g4dn.xlarge", "x86_64"],
        ["t4g.small", "arm64"],
        ["c7g.large", "arm64"],
        ["c7gn.medium", "arm64"],
        ["m7gd.xlarge", "arm64"],
        ["im4gn.large", "arm64"],
        ["a1.large", "arm64"],
        ["g5g.xlarge", "arm64"],
    ])("%s is %s", (type, arch) => {
        expect(architectureOf(type)).toBe(arch);
    });

    it.each(["small", "t3", "T3.small", "t3.", ".small", "t3 small"])("%s is not an instance type", (type) => {
        expect(architectureOf(type)).toBeUndefined();
    });
});

describe("cidrProblem", () => {
    it.each(["0.0.0.0/0", "203.0.113.7/32", "10.0.0.0/8", "::/0", "2001:db8::/32", "2001:db8:0:1::/64", "fe80::1/128"])("accepts %s", (c) => {
        expect(cidrProblem(c)).toBeUndefined();
    });
    it.each([
        ["10.0.0.1/8", "has host bits set (the network is 10.0.0.0/8)"],
        ["2001:db8::1/32", "has host bits set (the network is 2001:db8::/32)"],
        ["1.2.3.4/33", "has an IPv4 prefix above 32"],
        ["example.com/24", "is not an IPv4 or IPv6 CIDR"],
        ["::ffff:1.2.3.4/128", "is not an IPv4 or IPv6 CIDR"],
    ])("rejects %s", (c, problem) => {
        expect(cidrProblem(c)).toBe(problem);
    });
});
