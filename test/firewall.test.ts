import { OfflineRun } from "../lib/offline";
import { childrenOf, runProgram } from "./support/program";

const SG = "aws:ec2/securityGroup:SecurityGroup";

describe("Firewall", () => {
    let staging: OfflineRun;
    let prod: OfflineRun;
    beforeAll(async () => {
        staging = await runProgram("staging");
        prod = await runProgram("prod");
    });

    it("creates exactly one security group with SSH from the allowed CIDRs, the public ports, and HTTP(S)-only egress", () => {
        const children = childrenOf(staging, "nixos-ec2:index:Firewall", "hosts");
        expect(children.map((c) => [c.type, c.name])).toEqual([[SG, "hosts-sg"]]);
        const world = { cidrBlocks: ["0.0.0.0/0"], ipv6CidrBlocks: ["::/0"] };
        expect(children[0].inputs).toEqual({
            description: "nixos-ec2 hosts: SSH from allowed CIDRs, public web ports, egress HTTP(S) only",
            revokeRulesOnDelete: true,
            ingress: [
                {
                    description: "SSH from nixos-ec2:sshAllowedCidrs",
                    protocol: "tcp",
                    fromPort: 22,
                    toPort: 22,
                    cidrBlocks: ["203.0.113.0/24"],
                    ipv6CidrBlocks: ["2001:db8::/32"],
                },
                { description: "Public TCP 80 (nix/network.json publicTcpPorts)", protocol: "tcp", fromPort: 80, toPort: 80, ...world },
                { description: "Public TCP 443 (nix/network.json publicTcpPorts)", protocol: "tcp", fromPort: 443, toPort: 443, ...world },
            ],
            egress: [
                { description: "Outbound TCP 80 (Nix binary cache, flake inputs, ACME)", protocol: "tcp", fromPort: 80, toPort: 80, ...world },
                { description: "Outbound TCP 443 (Nix binary cache, flake inputs, ACME)", protocol: "tcp", fromPort: 443, toPort: 443, ...world },
            ],
            tags: { Project: "nixos-ec2", Stack: "staging" },
        });
    });

    it("leaves out the address family that has no allowed CIDR", () => {
        const [sg] = childrenOf(prod, "nixos-ec2:index:Firewall", "hosts");
        const ssh = (sg.inputs.ingress as Array<Record<string, unknown>>)[0];
        expect(ssh.cidrBlocks).toEqual(["203.0.113.0/24"]);
        expect(ssh).not.toHaveProperty("ipv6CidrBlocks");
    });

    it("puts the group in the configured VPC and the hosts in its subnet", async () => {
        const run = await runProgram("staging", { vpcId: "vpc-0123abcd", subnetId: "subnet-0123abcd" });
        const [sg] = childrenOf(run, "nixos-ec2:index:Firewall", "hosts");
        expect(sg.inputs.vpcId).toBe("vpc-0123abcd");
        const [instance] = childrenOf(run, "nixos-ec2:index:NixosHost", "staging");
        expect(instance.inputs.subnetId).toBe("subnet-0123abcd");
    });

    it("every rule and the group have a description", () => {
        const [sg] = childrenOf(prod, "nixos-ec2:index:Firewall", "hosts");
        const rules = [...(sg.inputs.ingress as Array<{ description?: string }>), ...(sg.inputs.egress as Array<{ description?: string }>)];
        expect(rules.length).toBeGreaterThan(0);
        for (const rule of rules) expect(rule.description).toMatch(/\S/);
        expect(sg.inputs.description).toMatch(/\S/);
    });
});
