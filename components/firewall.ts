import * as pulumi from "@pulumi/pulumi";
import { SecurityGroup } from "@pulumi/aws/ec2/securityGroup";
import { isIPv6 } from "node:net";

const SSH_PORT = 22;
/** The host must reach the Nix binary cache and flake inputs (HTTPS) and plain-HTTP mirrors. */
const EGRESS_TCP_PORTS = [80, 443];
const WORLD_V4 = ["0.0.0.0/0"];
const WORLD_V6 = ["::/0"];

export interface FirewallArgs {
    /** IPv4 and IPv6 CIDRs that may reach SSH (TCP 22); validated by lib/config.ts. */
    readonly sshAllowedCidrs: string[];
    /** TCP ports open to the world, from nix/network.json. */
    readonly publicTcpPorts: number[];
    /** VPC of the group; the default VPC when absent. */
    readonly vpcId?: pulumi.Input<string>;
    /** Tags of the security group. */
    readonly tags: pulumi.Input<Record<string, pulumi.Input<string>>>;
}

/** The hosts' security group: SSH from the allowed CIDRs, the public web ports, egress HTTP(S) only. */
export class Firewall extends pulumi.ComponentResource {
    public readonly securityGroupId: pulumi.Output<string>;

    constructor(name: string, args: FirewallArgs, opts?: pulumi.ComponentResourceOptions) {
        super("nixos-ec2:index:Firewall", name, args, opts);

        const v4 = args.sshAllowedCidrs.filter((c) => !isIPv6(c.split("/")[0]));
        const v6 = args.sshAllowedCidrs.filter((c) => isIPv6(c.split("/")[0]));

        const group = new SecurityGroup(
            `${name}-sg`,
            {
                description: "nixos-ec2 hosts: SSH from allowed CIDRs, public web ports, egress HTTP(S) only",
                vpcId: args.vpcId,
                revokeRulesOnDelete: true,
                ingress: [
                    {
                        description: "SSH from nixos-ec2:sshAllowedCidrs",
                        protocol: "tcp",
                        fromPort: SSH_PORT,
                        toPort: SSH_PORT,
                        ...(v4.length > 0 ? { cidrBlocks: v4 } : {}),
                        ...(v6.length > 0 ? { ipv6CidrBlocks: v6 } : {}),
                    },
                    ...args.publicTcpPorts.map((port) => ({
                        description: `Public TCP ${port} (nix/network.json publicTcpPorts)`,
                        protocol: "tcp",
                        fromPort: port,
                        toPort: port,
                        cidrBlocks: WORLD_V4,
                        ipv6CidrBlocks: WORLD_V6,
                    })),
                ],
                egress: EGRESS_TCP_PORTS.map((port) => ({
                    description: `Outbound TCP ${port} (Nix binary cache, flake inputs, ACME)`,
                    protocol: "tcp",
                    fromPort: port,
                    toPort: port,
                    cidrBlocks: WORLD_V4,
                    ipv6CidrBlocks: WORLD_V6,
                })),
                tags: args.tags,
            },
            { parent: this },
        );

        this.securityGroupId = group.id;
        this.registerOutputs({ securityGroupId: this.securityGroupId });
    }
}
