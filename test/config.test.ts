import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { execFileSync } from "node:child_process";
import { architectureOf, ConfigError, FLAKE_ATTR_PATTERN, parseSettings, qualifyKey, Settings } from "../lib/config";
import { parseNetwork } from "../lib/cidr";
import { NETWORK_FILE, NetworkFile, readNetworkFile } from "../lib/network";
import { loadStackConfig, StackFileError } from "../lib/stacks";

const goodNetwork: NetworkFile = { publicTcpPorts: [80, 443], problems: [] };
/** Bare project keys to config strings; `aws:region` and other namespaces as they are. */
type RawConfig = Record<string, string>;
/** A network an admin can connect from (a VPN's): not one of the documentation ranges, which warn. */
const base: RawConfig = { sshAllowedCidrs: '["192.168.10.0/24"]' };

/** The config as Pulumi hands it to the program: full keys, with `aws:region`. */
function fullConfig(raw: RawConfig, region: string): Record<string, string> {
    return Object.fromEntries([["aws:region", region], ...Object.entries(raw).map(([k, v]) => [qualifyKey(k), v])]);
}

function settingsOf(stack: string, raw: RawConfig, network: NetworkFile = goodNetwork, region = "eu-central-1"): Settings {
    return parseSettings(stack, fullConfig(raw, region), network);
}

function problemsOf(stack: string, raw: RawConfig, network: NetworkFile = goodNetwork, region = "eu-central-1"): string[] {
    try {
        settingsOf(stack, raw, network, region);
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
    try {
        return readNetworkFile(file);
    } finally {
        rmSync(dir, { recursive: true, force: true });
    }
}

describe("parseSettings", () => {
    it("fills the documented defaults and one host named after the stack", () => {
        const s = settingsOf("staging", base);
        expect(s).toEqual({
            stack: "staging",
            region: "eu-central-1",
            sshAllowedCidrs: ["192.168.10.0/24"],
            nixosRelease: "26.05",
            ami: undefined,
            elasticIp: false,
            terminationProtection: false,
            vpcId: undefined,
            subnetId: undefined,
            rollout: "parallel",
            publicTcpPorts: [80, 443],
            hosts: [
                {
                    name: "staging",
                    flakeAttr: "staging",
                    instanceType: "t3.small",
                    rootVolumeGiB: 20,
                    rebootPolicy: "when-required",
                    architecture: "x86_64",
                    nixSystem: "x86_64-linux",
                    imageGeneration: 0,
                },
            ],
            deploy: { connectTimeoutSeconds: 600, buildTimeoutSeconds: 3600, activationTimeoutSeconds: 90, rollbackTimeoutSeconds: 120, allowFailedUnits: false },
            secrets: [],
            warnings: [],
        });
    });

    it("applies per-host overrides over the stack-wide values", () => {
        const s = settingsOf(
            "staging",
            {
                ...base,
                instanceType: "t3.medium",
                rootVolumeGiB: "30",
                rebootPolicy: "never",
                hosts: JSON.stringify({ web: {}, build: { instanceType: "c7g.xlarge", rootVolumeGiB: 100, rebootPolicy: "always", flakeAttr: "builder", imageGeneration: 3 } }),
            },
        );
        expect(s.hosts).toEqual([
            { name: "web", flakeAttr: "web", instanceType: "t3.medium", rootVolumeGiB: 30, rebootPolicy: "never", architecture: "x86_64", nixSystem: "x86_64-linux", imageGeneration: 0 },
            {
                name: "build",
                flakeAttr: "builder",
                instanceType: "c7g.xlarge",
                rootVolumeGiB: 100,
                rebootPolicy: "always",
                architecture: "arm64",
                nixSystem: "aarch64-linux",
                imageGeneration: 3,
            },
        ]);
    });

    it("treats empty strings (the schema defaults of optional keys) as unset", () => {
        const s = settingsOf("staging", { ...base, ami: "", vpcId: "", subnetId: "" });
        expect([s.ami, s.vpcId, s.subnetId]).toEqual([undefined, undefined, undefined]);
    });

    it("accepts world SSH on a stack other than prod, and a pinned AMI as given", () => {
        const s = settingsOf("staging", { ...base, sshAllowedCidrs: '["0.0.0.0/0", "::/0"]', ami: "ami-0123456789abcdef0" });
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
        ["IPv4 world SSH on prod", "prod", { sshAllowedCidrs: '["0.0.0.0/0"]' }, /^nixos-ec2:sshAllowedCidrs\[0\]: "0\.0\.0\.0\/0" opens SSH to the whole IPv4 internet, which stack "prod" refuses/],
        ["IPv6 world SSH on prod", "prod", { sshAllowedCidrs: '["203.0.113.0/24", "::/0"]' }, /^nixos-ec2:sshAllowedCidrs\[1\]: "::\/0" opens SSH to the whole IPv6 internet/],
        ["an unknown instance type format", "staging", { ...base, instanceType: "small" }, /^nixos-ec2:instanceType: "small" is not an EC2 instance type; allowed: .*e\.g\. t3\.small/],
        ["a bad AMI ID", "staging", { ...base, ami: "ami-123" }, /^nixos-ec2:ami: "ami-123" is not an AMI ID; allowed: "ami-" followed by 8 or 17 lowercase hex digits, or empty for the lookup$/],
        ["an upper-case AMI ID", "staging", { ...base, ami: "ami-0123456789ABCDEF0" }, /^nixos-ec2:ami: "ami-0123456789ABCDEF0" is not an AMI ID/],
        ["a bad release", "staging", { ...base, nixosRelease: "unstable" }, /^nixos-ec2:nixosRelease: "unstable" is not a NixOS release; allowed: a NixOS release, YY\.05 or YY\.11/],
        ["a bad host name", "staging", { ...base, hosts: '{"Web_1": {}}' }, /^nixos-ec2:hosts: host name "Web_1" is not allowed; allowed: \[a-z\]\[a-z0-9-\]\{0,30\}/],
        ["a host name that is too long", "staging", { ...base, hosts: JSON.stringify({ ["a".repeat(32)]: {} }) }, /^nixos-ec2:hosts: host name "a{32}" is not allowed/],
        ["a volume below 8 GiB", "staging", { ...base, rootVolumeGiB: "7" }, /^nixos-ec2:rootVolumeGiB: "7" is not allowed; allowed: a whole number from 8 to 16384$/],
        ["a fractional volume", "staging", { ...base, rootVolumeGiB: "8.5" }, /^nixos-ec2:rootVolumeGiB: "8\.5" is not allowed/],
        ["a host volume below 8 GiB", "staging", { ...base, hosts: '{"web": {"rootVolumeGiB": 4}}' }, /^nixos-ec2:hosts\.web\.rootVolumeGiB: 4 is not allowed; allowed: a whole number from 8/],
        ["a host map that is a list", "staging", { ...base, hosts: '["web"]' }, /^nixos-ec2:hosts: \["web"\] is not an object; allowed: a map of host names \(\[a-z\]\[a-z0-9-\]\{0,30\}\) to overrides/],
        ["a host map that is not JSON", "staging", { ...base, hosts: "web" }, /^nixos-ec2:hosts: web is not valid JSON: an unexpected character at line 1 column 1; allowed: a map/],
        ["an empty host map on a stack not named like a host", "1staging", { ...base, hosts: "{}" }, /^nixos-ec2:hosts: \{\} \(the default\) names no host, and the stack name "1staging" is not a host name/],
        ["a host whose overrides are not an object", "staging", { ...base, hosts: '{"web": "big"}' }, /^nixos-ec2:hosts\.web: "big" is not an object/],
        ["an unknown host setting", "staging", { ...base, hosts: '{"web": {"size": "big"}}' }, /^nixos-ec2:hosts\.web\.size: unknown host setting; allowed: instanceType, rootVolumeGiB, rebootPolicy, flakeAttr, imageGeneration$/],
        ["a bad flake attribute", "staging", { ...base, hosts: '{"web": {"flakeAttr": "a.b"}}' }, /^nixos-ec2:hosts\.web\.flakeAttr: "a\.b" is not a Nix attribute name/],
        ["a host with a bad instance type", "staging", { ...base, hosts: '{"web": {"instanceType": "huge"}}' }, /^nixos-ec2:hosts\.web\.instanceType: "huge" is not an EC2 instance type/],
        ["a boolean that is not true/false", "staging", { ...base, elasticIp: "yes" }, /^nixos-ec2:elasticIp: "yes" is not allowed; allowed: true or false$/],
        ["a VPC without a subnet", "staging", { ...base, vpcId: "vpc-0123abcd" }, /^nixos-ec2:vpcId\/nixos-ec2:subnetId: set both .* only vpcId is set$/],
        ["a bad subnet ID", "staging", { ...base, vpcId: "vpc-0123abcd", subnetId: "sub-1" }, /^nixos-ec2:subnetId: "sub-1" is not a subnet ID/],
        ["a connect timeout of zero", "staging", { ...base, deployConnectTimeoutSeconds: "0" }, /^nixos-ec2:deployConnectTimeoutSeconds: "0" is not allowed; allowed: a whole number from 5 to 7200$/],
        ["a rollback timeout too short to confirm", "staging", { ...base, rollbackTimeoutSeconds: "5" }, /^nixos-ec2:rollbackTimeoutSeconds: "5" is not allowed; allowed: a whole number from 30 to 3600$/],
        ["a misspelled key", "staging", { ...base, instancetype: "t3.small" }, /^nixos-ec2:instancetype: unknown key; the project's keys are sshAllowedCidrs, instanceType, .*; did you mean nixos-ec2:instanceType\?$/],
        ["a stack name that is not a host name, without hosts", "1staging", base, /^nixos-ec2:hosts: \{\} \(the default\) names no host, and the stack name "1staging" is not a host name/],
        ["a stack name that cannot name the state bucket", "Staging", { ...base, hosts: '{"web": {}}' }, /^stack name "Staging": must be 1-38 characters of a-z, 0-9 and "-"/],
        ["a CIDR with a zone ID", "staging", { sshAllowedCidrs: '["fe80::1%eth0/128"]' }, /^nixos-ec2:sshAllowedCidrs\[0\]: "fe80::1%eth0\/128" has a zone ID/],
        ["an IPv4-mapped IPv6 CIDR", "staging", { sshAllowedCidrs: '["::ffff:c633:6407/128"]' }, /sshAllowedCidrs\[0\]: "::ffff:c633:6407\/128" is an IPv4-mapped network.*write the IPv4 CIDR 198\.51\.100\.7\/32 instead/],
        ["an IPv6 CIDR with an embedded IPv4 address", "staging", { sshAllowedCidrs: '["::ffff:1.2.3.4/128"]' }, /sshAllowedCidrs\[0\]: "::ffff:1\.2\.3\.4\/128" embeds an IPv4 address/],
        ["an IPv4 address with leading zeros", "staging", { sshAllowedCidrs: '["010.0.0.0/8"]' }, /sshAllowedCidrs\[0\]: "010\.0\.0\.0\/8" is not written as four decimal numbers/],
        ["a network listed twice in two spellings", "staging", { sshAllowedCidrs: '["2001:db8::/32", "2001:0db8::/32"]' }, /^nixos-ec2:sshAllowedCidrs\[1\]: "2001:0db8::\/32" is the same network as "2001:db8::\/32", listed before it/],
        ["a CIDR that is not a string", "staging", { sshAllowedCidrs: '["203.0.113.0/24", 7]' }, /^nixos-ec2:sshAllowedCidrs\[1\]: 7 is not a CIDR string/],
        ["more SSH CIDRs than a security group holds", "staging", { sshAllowedCidrs: JSON.stringify(Array.from({ length: 59 }, (_, i) => `10.${i}.0.0/16`)) }, /^nixos-ec2:sshAllowedCidrs: 59 IPv4 CIDRs do not fit one security group; allowed: at most 58 /],
        ["world SSH on prod as 0::/0", "prod", { sshAllowedCidrs: '["0::/0"]' }, /^nixos-ec2:sshAllowedCidrs\[0\]: "0::\/0" opens SSH to the whole IPv6 internet/],
        ["world SSH on prod as eight zero groups", "prod", { sshAllowedCidrs: '["203.0.113.0/24", "0:0:0:0:0:0:0:0/0"]' }, /^nixos-ec2:sshAllowedCidrs\[1\]: "0:0:0:0:0:0:0:0\/0" opens SSH to the whole IPv6 internet/],
        ["world SSH on prod as two IPv4 halves", "prod", { sshAllowedCidrs: '["0.0.0.0/1", "128.0.0.0/1"]' }, /^nixos-ec2:sshAllowedCidrs: \["0\.0\.0\.0\/1","128\.0\.0\.0\/1"\] together open SSH to the whole IPv4 internet, which stack "prod" refuses/],
        ["world SSH on prod as two halves of IPv6 global unicast", "prod", { sshAllowedCidrs: '["2000::/4", "3000::/4", "203.0.113.0/24"]' }, /^nixos-ec2:sshAllowedCidrs: \["2000::\/4","3000::\/4"\] together open SSH to the whole IPv6 internet/],
        ["a host volume that is a list", "staging", { ...base, hosts: '{"web": {"rootVolumeGiB": [40]}}' }, /^nixos-ec2:hosts\.web\.rootVolumeGiB: \[40\] is not allowed; allowed: a whole number from 8 to 16384$/],
        ["a host volume with a fraction", "staging", { ...base, hosts: '{"web": {"rootVolumeGiB": 40.5}}' }, /^nixos-ec2:hosts\.web\.rootVolumeGiB: 40\.5 is not allowed/],
        ["a host instance type that is a list", "staging", { ...base, hosts: '{"web": {"instanceType": ["t3.small"]}}' }, /^nixos-ec2:hosts\.web\.instanceType: \["t3\.small"\] is not an EC2 instance type/],
        ["a volume that is a list", "staging", { ...base, rootVolumeGiB: "[40]" }, /^nixos-ec2:rootVolumeGiB: "\[40\]" is not allowed; allowed: a whole number from 8 to 16384$/],
        ["a boolean that is a list", "staging", { ...base, elasticIp: "[true]" }, /^nixos-ec2:elasticIp: "\[true\]" is not allowed; allowed: true or false$/],
        ["a host map with a host twice", "staging", { ...base, hosts: '{"web": {"instanceType": "t3.large"},\n "web": {}}' }, /^nixos-ec2:hosts: .* has the key "web" twice \(again at line 2 column 2\); each key may appear once; allowed: a map/],
        ["a host map that is cut off", "staging", { ...base, hosts: '{"web": {}' }, /^nixos-ec2:hosts: \{"web": \{\} is not valid JSON: a missing '\}' at line 1 column 11/],
        ["a flake attribute with a quote", "staging", { ...base, hosts: `{"web": {"flakeAttr": "web'"}}` }, /^nixos-ec2:hosts\.web\.flakeAttr: "web'" is not a Nix attribute name; allowed: a Nix attribute name matching/],
        ["a flake attribute starting with a digit", "staging", { ...base, hosts: '{"web": {"flakeAttr": "1web"}}' }, /^nixos-ec2:hosts\.web\.flakeAttr: "1web" is not a Nix attribute name/],
        ["a flake attribute of 64 characters", "staging", { ...base, hosts: JSON.stringify({ web: { flakeAttr: "a".repeat(64) } }) }, /^nixos-ec2:hosts\.web\.flakeAttr: "a{64}" is not a Nix attribute name/],
        ["a bad VPC ID with a subnet: one problem, not also 'only subnetId is set'", "staging", { ...base, vpcId: "vpc-x", subnetId: "subnet-0123abcd" }, /^nixos-ec2:vpcId: "vpc-x" is not a VPC ID/],
        ["a build deadline under a minute", "staging", { ...base, buildTimeoutSeconds: "30" }, /^nixos-ec2:buildTimeoutSeconds: "30" is not allowed; allowed: a whole number from 60 to 86400$/],
        ["an activation deadline not below the rollback timer", "staging", { ...base, activationTimeoutSeconds: "120" }, /^nixos-ec2:activationTimeoutSeconds: 120 is not below nixos-ec2:rollbackTimeoutSeconds \(120\); allowed: an activation deadline shorter than the rollback timer/],
        ["world SSH on prod as IPv6 global unicast", "prod", { sshAllowedCidrs: '["2000::/3"]' }, /^nixos-ec2:sshAllowedCidrs\[0\]: "2000::\/3" opens SSH to the whole IPv6 internet/],
        [
            "world SSH on prod as every public IPv4 block",
            "prod",
            { sshAllowedCidrs: JSON.stringify(["1.0.0.0/8", "2.0.0.0/7", "4.0.0.0/6", "8.0.0.0/5", "16.0.0.0/4", "32.0.0.0/3", "64.0.0.0/2", "128.0.0.0/2", "192.0.0.0/3"]) },
            /^nixos-ec2:sshAllowedCidrs: \["1\.0\.0\.0\/8",.* together open SSH to the whole IPv4 internet/,
        ],
        ["a host map with a __proto__ key", "staging", { ...base, hosts: '{"web": {}, "__proto__": {"instanceType": "zz"}}' }, /^nixos-ec2:hosts: .* has the key "__proto__" \(at line 1 column 13\), which is not allowed/],
        ["a Mac instance type", "staging", { ...base, instanceType: "mac2.metal" }, /^nixos-ec2:instanceType: "mac2\.metal" is a Mac instance type, which runs macOS only/],
        ["a pinned AMI for hosts of two architectures", "staging", { ...base, ami: "ami-0123456789abcdef0", hosts: '{"web": {}, "arm": {"instanceType": "t4g.small"}}' }, /^nixos-ec2:ami: "ami-0123456789abcdef0" is one image for hosts of two architectures \(t3\.small, t4g\.small\)/],
        ["a negative image generation", "staging", { ...base, hosts: '{"web": {"imageGeneration": -1}}' }, /^nixos-ec2:hosts\.web\.imageGeneration: -1 is not allowed; allowed: a whole number from 0 to 9999$/],
        ["an image generation above 9999", "staging", { ...base, hosts: '{"web": {"imageGeneration": 10000}}' }, /^nixos-ec2:hosts\.web\.imageGeneration: 10000 is not allowed; allowed: a whole number from 0 to 9999$/],
        ["a fractional image generation", "staging", { ...base, hosts: '{"web": {"imageGeneration": 1.5}}' }, /^nixos-ec2:hosts\.web\.imageGeneration: 1\.5 is not allowed/],
        ["an image generation that is a word", "staging", { ...base, hosts: '{"web": {"imageGeneration": "next"}}' }, /^nixos-ec2:hosts\.web\.imageGeneration: "next" is not allowed; allowed: a whole number from 0 to 9999$/],
        ["an image generation for the whole stack (it is per host)", "staging", { ...base, imageGeneration: "1" }, /^nixos-ec2:imageGeneration: unknown key; the project's keys are /],
        ["a volume of 1e400", "staging", { ...base, hosts: '{"web": {"rootVolumeGiB": 1e400}}' }, /^nixos-ec2:hosts\.web\.rootVolumeGiB: Infinity is not allowed/],
        ["a huge unknown key", "staging", { ...base, ["k".repeat(3000)]: "x" }, /^nixos-ec2:k{70}… \(3010 characters\): unknown key/],
        ["a bad reboot policy", "staging", { ...base, rebootPolicy: "sometimes" }, /^nixos-ec2:rebootPolicy: "sometimes" is not a reboot policy; allowed: never, when-required, always$/],
        ["a bad host reboot policy", "staging", { ...base, hosts: '{"web": {"rebootPolicy": true}}' }, /^nixos-ec2:hosts\.web\.rebootPolicy: true is not a reboot policy; allowed: never, when-required, always$/],
        ["a host override of a key that is not per host", "staging", { ...base, hosts: '{"web": {"elasticIp": true}}' }, /^nixos-ec2:hosts\.web\.elasticIp: unknown host setting; allowed: instanceType, rootVolumeGiB, rebootPolicy, flakeAttr, imageGeneration$/],
    ];

    it.each(badConfigs)("rejects %s", (_what, stack, raw, message) => {
        const problems = problemsOf(stack, raw);
        expect(problems).toEqual([expect.stringMatching(message)]);
    });

    it("rejects a missing or malformed aws:region", () => {
        expect(problemsOf("staging", base, goodNetwork, "")).toEqual([expect.stringMatching(/^aws:region: not set/)]);
        expect(problemsOf("staging", base, goodNetwork, "Frankfurt")).toEqual([expect.stringMatching(/^aws:region: "Frankfurt" is not an AWS region name/)]);
    });

    it("reports every error at once, in one message that names each key and value", () => {
        const raw = { sshAllowedCidrs: '["0.0.0.0/0"]', instanceType: "big", ami: "ami-1", rootVolumeGiB: "2", hosts: '{"A": {}}' };
        let error: ConfigError | undefined;
        try {
            settingsOf("prod", raw, networkFile('{"publicTcpPorts": [80, 70000]}'));
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
        ["not JSON", "{ports: 80}", /network\.json: is not valid JSON: an unexpected character at line 1 column 2; expected \{"publicTcpPorts": \[80, 443\]\}$/],
        ["without publicTcpPorts", '{"ports": [80]}', /publicTcpPorts is missing or not a list/],
        ["with port 0", '{"publicTcpPorts": [0]}', /publicTcpPorts\[0\] = 0 is out of range; allowed: a TCP port from 1 to 65535/],
        ["with port 65536", '{"publicTcpPorts": [80, 65536]}', /publicTcpPorts\[1\] = 65536 is out of range/],
        ["with a port as a string", '{"publicTcpPorts": ["80"]}', /publicTcpPorts\[0\] = "80" is out of range/],
        ["with port 22", '{"publicTcpPorts": [22]}', /publicTcpPorts\[0\] = 22 would open SSH to the world/],
        ["with a port twice", '{"publicTcpPorts": [80, 80]}', /publicTcpPorts\[1\] = 80 is listed twice/],
        ["with a port written as a float", '{"publicTcpPorts": [80.0, 443]}', /network\.json: has 80\.0 at line 1 column 21, which Nix reads as a float/],
        ["with a port written with an exponent", '{"publicTcpPorts": [80, 1e2]}', /network\.json: has 1e2 at line 1 column 25, which Nix reads as a float/],
        ["with a key twice", '{"publicTcpPorts": [80], "publicTcpPorts": [22]}', /network\.json: has the key "publicTcpPorts" twice/],
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

describe("parseNetwork", () => {
    it.each([
        ["0.0.0.0/0", "0.0.0.0/0"],
        ["203.0.113.7/32", "203.0.113.7/32"],
        ["10.0.0.0/8", "10.0.0.0/8"],
        ["::/0", "::/0"],
        ["0::0/0", "::/0"],
        ["2001:db8::/32", "2001:db8::/32"],
        ["2001:0DB8:0000::/32", "2001:db8::/32"],
        ["2001:db8:0:1::/64", "2001:db8:0:1::/64"],
        ["fe80::1/128", "fe80::1/128"],
    ])("accepts %s as %s", (text, canonical) => {
        expect(parseNetwork(text)).toMatchObject({ cidr: canonical, text });
    });
    it.each([
        ["10.0.0.1/8", "has host bits set (the network is 10.0.0.0/8)"],
        ["2001:db8::1/32", "has host bits set (the network is 2001:db8::/32)"],
        ["1.2.3.4/33", "has an IPv4 prefix above 32"],
        ["10.0.0.0/08", "has a prefix with a leading zero"],
        ["example.com/24", "is not an IPv4 or IPv6 CIDR"],
        ["0x0a.0.0.0/8", "is not written as four decimal numbers (a.b.c.d, no leading zeros)"],
        ["10/8", "is not written as four decimal numbers (a.b.c.d, no leading zeros)"],
        ["::ffff:0:0/96", "is an IPv4-mapped network, which never matches IPv6 traffic; write the IPv4 CIDR 0.0.0.0/0 instead"],
        ["/0", "is not an IPv4 or IPv6 CIDR"],
    ])("rejects %s", (c, problem) => {
        expect(parseNetwork(c)).toBe(problem);
    });
});

describe("the prod guard compares networks", () => {
    it("accepts on staging every spelling it refuses on prod", () => {
        for (const cidrs of [["0::/0"], ["0.0.0.0/1", "128.0.0.0/1"], ["::/1", "8000::/1"]]) {
            expect(settingsOf("staging", { sshAllowedCidrs: JSON.stringify(cidrs) }).sshAllowedCidrs).toHaveLength(cidrs.length);
            expect(problemsOf("prod", { sshAllowedCidrs: JSON.stringify(cidrs) })).toEqual([expect.stringContaining("SSH to the whole IPv")]);
        }
    });

    it("accepts on prod large networks that leave part of the internet out", () => {
        const cidrs = ["0.0.0.0/1", "128.0.0.0/2", "4000::/2", "8000::/1"];
        expect(settingsOf("prod", { sshAllowedCidrs: JSON.stringify(cidrs) }).sshAllowedCidrs).toEqual(cidrs);
    });

    it("hands the security group the canonical spelling", () => {
        expect(settingsOf("staging", { sshAllowedCidrs: '["2001:0DB8::/32", "203.0.113.0/24"]' }).sshAllowedCidrs).toEqual(["2001:db8::/32", "203.0.113.0/24"]);
    });

    it("fills a security group to its last rule, and no further", () => {
        const cidrs = (n: number) => JSON.stringify(Array.from({ length: n }, (_, i) => `2001:db8:${i.toString(16)}::/48`));
        expect(settingsOf("staging", { sshAllowedCidrs: cidrs(58) }).sshAllowedCidrs).toHaveLength(58);
        expect(problemsOf("staging", { sshAllowedCidrs: cidrs(59) })).toEqual([expect.stringMatching(/^nixos-ec2:sshAllowedCidrs: 59 IPv6 CIDRs do not fit/)]);
    });
});

describe("values and messages", () => {
    it("takes {} (the declared default of hosts) as one host named after the stack", () => {
        expect(settingsOf("staging", { ...base, hosts: "{}" }).hosts.map((h) => h.name)).toEqual(["staging"]);
    });

    it("defaults elasticIp and terminationProtection to true on prod only, and lets prod turn them off", () => {
        const pick = (s: Settings) => [s.elasticIp, s.terminationProtection];
        expect(pick(settingsOf("prod", base))).toEqual([true, true]);
        expect(pick(settingsOf("staging", base))).toEqual([false, false]);
        expect(pick(settingsOf("prod", { ...base, elasticIp: "false", terminationProtection: "false" }))).toEqual([false, false]);
    });

    it("shows a huge value cut, with its length", () => {
        const problems = problemsOf("staging", { ...base, nixosRelease: "9".repeat(100_000), hosts: JSON.stringify({ web: { flakeAttr: "x".repeat(5000) } }) });
        expect(problems).toHaveLength(2);
        expect(problems[0]).toMatch(/^nixos-ec2:nixosRelease: "9{79}… \(100002 characters\) is not a NixOS release/);
        expect(problems[1]).toMatch(/^nixos-ec2:hosts\.web\.flakeAttr: "x{79}… \(5002 characters\) is not a Nix attribute name/);
        for (const p of problems) expect(p.length).toBeLessThan(400);
    });

    it("warns about keys in a namespace that looks like a misspelt nixos-ec2, naming the likely key", () => {
        const s = settingsOf("staging", { ...base, "nixosec2:instanceType": "t3.large", "nixos_ec2:rootVolumGiB": "40", "nixos-ec:hosts": "{}", "aws:profile": "x", "tls:foo": "y" });
        expect([s.hosts[0].instanceType, s.hosts[0].rootVolumeGiB]).toEqual(["t3.small", 20]);
        expect(s.warnings).toEqual([
            'nixosec2:instanceType: ignored, because "nixosec2" is not this project\'s namespace; did you mean nixos-ec2:instanceType?',
            'nixos_ec2:rootVolumGiB: ignored, because "nixos_ec2" is not this project\'s namespace; did you mean nixos-ec2:rootVolumeGiB?',
            'nixos-ec:hosts: ignored, because "nixos-ec" is not this project\'s namespace; did you mean nixos-ec2:hosts?',
        ]);
    });
});

describe("SSH CIDRs from the documentation ranges", () => {
    const warningsOf = (cidrs: string[], raw: RawConfig = {}) => settingsOf("prod", { sshAllowedCidrs: JSON.stringify(cidrs), ...raw }).warnings;
    const entry = (i: number, text: string, where: string, rfc: string) =>
        `nixos-ec2:sshAllowedCidrs[${i}]: "${text}" ${where} an address range reserved for documentation (${rfc}); ` +
        "no admin connects from it, so it lets no one in. Replace it with the networks you administer from.";
    const nobody = (seconds: number) =>
        "nixos-ec2:sshAllowedCidrs: every entry is in a documentation range, so SSH is open to no one: a real pulumi up would wait " +
        `nixos-ec2:deployConnectTimeoutSeconds (${seconds} s) for each host's SSH and then fail its deploy.`;

    it("are accepted with a warning per entry, and one more when no entry is a real network", () => {
        expect(warningsOf(["203.0.113.0/24", "2001:db8::/32"])).toEqual([entry(0, "203.0.113.0/24", "is", "RFC 5737"), entry(1, "2001:db8::/32", "is", "RFC 3849"), nobody(600)]);
        expect(warningsOf(["192.0.2.0/24", "198.51.100.0/24", "3fff:0::/20"], { deployConnectTimeoutSeconds: "30" })).toEqual([
            entry(0, "192.0.2.0/24", "is", "RFC 5737"),
            entry(1, "198.51.100.0/24", "is", "RFC 5737"),
            entry(2, "3fff:0::/20", "is", "RFC 9637"),
            nobody(30),
        ]);
    });

    it("name the range an entry lies in, and say nothing more when another entry is a real network", () => {
        expect(warningsOf(["81.2.69.0/24", "203.0.113.7/32", "2001:db8:1::/48"])).toEqual([
            entry(1, "203.0.113.7/32", "is in 203.0.113.0/24,", "RFC 5737"),
            entry(2, "2001:db8:1::/48", "is in 2001:db8::/32,", "RFC 3849"),
        ]);
    });

    it("are not networks that only overlap one, nor IPv6 networks with the same numbers as an IPv4 one", () => {
        // ::c000:200/120 holds the same 128-bit numbers as ::192.0.2.0, but is IPv6.
        expect(warningsOf(["192.0.0.0/16", "2001:d00::/24", "::c000:200/120", "203.0.112.0/23"])).toEqual([]);
        expect(settingsOf("staging", base).warnings).toEqual([]);
    });

    it("are never errors: a configuration with one reports only its real problems", () => {
        expect(problemsOf("prod", { sshAllowedCidrs: '["203.0.113.0/24"]', rootVolumeGiB: "4" })).toEqual([expect.stringMatching(/^nixos-ec2:rootVolumeGiB: "4" is not allowed/)]);
    });
});

describe("flakeAttr: one rule for the program and the deploy script", () => {
    const script = path.join(__dirname, "..", "deploy", "nixos-deploy.sh");
    const scriptPattern = /local flake_attr_pattern='([^']*)'/.exec(require("node:fs").readFileSync(script, "utf8"))?.[1];
    const samples = ["web", "Web_2", "_x", "a-b", "a".repeat(63), "a".repeat(64), "a.b", "web'", "1web", "-web", "", "web;reboot", "we b", "wéb"];

    it("the script holds the same pattern as lib/config.ts", () => {
        expect(scriptPattern).toBe(FLAKE_ATTR_PATTERN);
    });

    it("bash and JavaScript read the pattern alike", () => {
        const bash = execFileSync("bash", ["-c", 'p=$1; shift; for a; do if [[ $a =~ $p ]]; then echo 1; else echo 0; fi; done', "_", scriptPattern!, ...samples], {
            encoding: "utf8",
            env: { ...process.env, LC_ALL: "C.UTF-8" },
        });
        const js = samples.map((a) => (new RegExp(FLAKE_ATTR_PATTERN).test(a) ? "1" : "0"));
        expect(bash.trim().split("\n")).toEqual(js);
        expect(js.filter((x) => x === "1")).toHaveLength(5);
    });
});

describe("stack files", () => {
    function project(files: Record<string, string>): string {
        const dir = mkdtempSync(path.join(tmpdir(), "stack-files-"));
        for (const [name, text] of Object.entries(files)) writeFileSync(path.join(dir, name), text);
        return dir;
    }

    it("a YAML syntax error names the file, line and column, without a stack trace", () => {
        const dir = project({ "Pulumi.yaml": "name: x\nruntime: nodejs\n", "Pulumi.broken.yaml": "config:\n  aws:region: eu-central-1\n  nixos-ec2:hosts: {web: {}\n" });
        let error: unknown;
        try {
            loadStackConfig("broken", {}, dir);
        } catch (e) {
            error = e;
        } finally {
            rmSync(dir, { recursive: true, force: true });
        }
        expect(error).toBeInstanceOf(StackFileError);
        expect((error as Error).message).toMatch(/^Pulumi\.broken\.yaml:4:1: not valid YAML: unexpected end of the stream within a flow collection$/);
    });

    it("a YAML mapping with a key twice is refused with its line", () => {
        const dir = project({ "Pulumi.yaml": "name: x\nruntime: nodejs\n", "Pulumi.twice.yaml": "config:\n  nixos-ec2:instanceType: t3.small\n  nixos-ec2:instanceType: t3.large\n" });
        try {
            expect(() => loadStackConfig("twice", {}, dir)).toThrow(/^Pulumi\.twice\.yaml:3:\d+: not valid YAML: duplicated mapping key$/);
        } finally {
            rmSync(dir, { recursive: true, force: true });
        }
    });
});
