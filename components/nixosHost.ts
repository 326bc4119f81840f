import * as pulumi from "@pulumi/pulumi";
import { Eip } from "@pulumi/aws/ec2/eip";
import { getAmiOutput } from "@pulumi/aws/ec2/getAmi";
import { Instance } from "@pulumi/aws/ec2/instance";
import { Architecture, NIXOS_AMI_OWNER } from "../lib/config";

/** IMDSv2 only, and one hop: a container on the host cannot reach the metadata (and user-data). */
const METADATA_OPTIONS = { httpEndpoint: "enabled", httpTokens: "required", httpPutResponseHopLimit: 1 };
const ROOT_VOLUME_TYPE = "gp3";
/** NixOS images log in as root (key only); the EC2 key pair lands in /root/.ssh/authorized_keys. */
export const ADMIN_USER = "root";

export interface NixosHostArgs {
    /** Stack name, for the Name tag and the SSH command. */
    readonly stack: string;
    /** Host name (a DNS label). */
    readonly hostName: string;
    readonly instanceType: pulumi.Input<string>;
    readonly rootVolumeGiB: pulumi.Input<number>;
    /** Architecture of the image to look up; follows the instance type. */
    readonly architecture: Architecture;
    /** Which instance of the host this is; another value replaces it from the current image. */
    readonly imageGeneration: number;
    /** NixOS release whose newest official image boots the host, e.g. "26.05". */
    readonly nixosRelease: string;
    /** A pinned AMI ID, used as given instead of the lookup. */
    readonly ami?: string;
    readonly securityGroupId: pulumi.Input<string>;
    /** Subnet to start in; the default VPC's default subnet when absent. */
    readonly subnetId?: pulumi.Input<string>;
    /** EC2 key pair whose public key root accepts. */
    readonly keyName: pulumi.Input<string>;
    /** The host's pre-generated SSH host key (OpenSSH private key; secret). */
    readonly hostPrivateKey: pulumi.Input<string>;
    /** Its public half, `ssh-ed25519 AAAA...`. */
    readonly hostPublicKey: pulumi.Input<string>;
    /** Give the host an Elastic IP. */
    readonly elasticIp: boolean;
    /** EC2 termination protection, against terminations from outside this stack. */
    readonly terminationProtection: boolean;
    /** Tags of the instance, its volume and its Elastic IP. */
    readonly tags: pulumi.Input<Record<string, pulumi.Input<string>>>;
}

/**
 * User-data the NixOS image's `apply-ec2-data` service reads before sshd starts: the ED25519 host
 * key, each newline of the private key replaced by `|`. It holds nothing else, so `amazon-init`
 * has no configuration to switch to and the first boot runs the image as published.
 */
export function hostKeyUserData(privateKey: string, publicKey: string): string {
    return `SSH_HOST_ED25519_KEY:${privateKey.trim().split("\n").join("|")}\nSSH_HOST_ED25519_KEY_PUB:${publicKey.trim()}\n`;
}

/** The name filter of the official images of a release (`nixos/26.05.<rev>-x86_64-linux`). */
export function amiNamePattern(release: string): string {
    return `nixos/${release}*`;
}

/**
 * The instance's resource name, and so its URN. It carries what an instance cannot change in place:
 * the image (`ignoreChanges: ["ami"]` keeps a running host on the image it booted) and the
 * architecture (an x86_64 image cannot boot on Graviton). A new name has no state, so Pulumi creates
 * a new instance from the current lookup and deletes the old one; the same name under `--replace`
 * would get the AMI recorded in state (pulumi/pulumi pkg/resource/deploy/step_generator.go,
 * processIgnoreChanges, resets ignored inputs to the old ones whenever an old state exists). The
 * defaults, x86_64 and generation 0, keep the name hosts had before, so they are not replaced.
 */
export function instanceResourceName(name: string, architecture: Architecture, imageGeneration: number): string {
    const arch = architecture === "arm64" ? "-arm64" : "";
    const generation = imageGeneration === 0 ? "" : `-gen${imageGeneration}`;
    return `${name}-instance${arch}${generation}`;
}

/**
 * A shell command that logs in to a host as the admin, trusting only its pinned host key.
 * OpenSSH closes inherited descriptors at start-up, so `-i <(...)` cannot pass the key: it goes to
 * a 0600 temporary file that the subshell's trap removes, and `KnownHostsCommand` (OpenSSH 8.5+)
 * supplies the one known host key (`%H` is the address, `[address]:port` off port 22).
 */
export function sshCommand(stack: string, address: string, hostPublicKey: string, port = 22, user = ADMIN_USER): string {
    const portOption = port === 22 ? "" : `-p ${port} `;
    return (
        `(umask 077; key=$(mktemp) && trap 'rm -f "$key"' EXIT && ` +
        `pulumi stack output -s ${stack} --show-secrets adminPrivateKey > "$key" && ` +
        `ssh ${portOption}-i "$key" -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile=/dev/null ` +
        `-o 'KnownHostsCommand=/usr/bin/env echo %H ${hostPublicKey.trim()}' ${user}@${address})`
    );
}

/** One EC2 instance booted from the official NixOS image. */
export class NixosHost extends pulumi.ComponentResource {
    public readonly instanceId: pulumi.Output<string>;
    public readonly amiId: pulumi.Output<string>;
    public readonly publicIp: pulumi.Output<string>;
    public readonly publicDns: pulumi.Output<string>;
    public readonly url: pulumi.Output<string>;
    public readonly hostPublicKey: pulumi.Output<string>;
    /** A command that opens a shell on the host, trusting only its pinned host key. */
    public readonly sshCommand: pulumi.Output<string>;

    constructor(name: string, args: NixosHostArgs, opts?: pulumi.ComponentResourceOptions) {
        // imageGeneration 0 is left out of the component's recorded inputs, so that hosts from before
        // the setting existed preview without a change.
        super("nixos-ec2:index:NixosHost", name, { ...args, imageGeneration: args.imageGeneration || undefined }, opts);

        this.amiId =
            args.ami !== undefined
                ? pulumi.output(args.ami)
                : getAmiOutput(
                      {
                          owners: [NIXOS_AMI_OWNER],
                          mostRecent: true,
                          filters: [
                              { name: "name", values: [amiNamePattern(args.nixosRelease)] },
                              { name: "architecture", values: [args.architecture] },
                          ],
                      },
                      { parent: this },
                  ).id;

        const instanceTags = pulumi.output(args.tags).apply((t) => ({ ...t, Name: `${args.stack}-${args.hostName}` }));
        const instance = new Instance(
            instanceResourceName(name, args.architecture, args.imageGeneration),
            {
                ami: this.amiId,
                instanceType: args.instanceType,
                keyName: args.keyName,
                vpcSecurityGroupIds: [args.securityGroupId],
                subnetId: args.subnetId,
                associatePublicIpAddress: true,
                metadataOptions: METADATA_OPTIONS,
                rootBlockDevice: { volumeType: ROOT_VOLUME_TYPE, volumeSize: args.rootVolumeGiB, encrypted: true, deleteOnTermination: true },
                monitoring: true,
                disableApiTermination: args.terminationProtection,
                // Termination protection blocks the console, the AWS CLI and other tools; this stack
                // may still delete its own instance, or a re-image would stop after the new host is
                // up. The provider reads forceDestroy from state at delete, so it is set with the
                // protection from the instance's first `pulumi up` (@pulumi/aws ec2/instance.d.ts,
                // forceDestroy; terraform-provider-aws #43722).
                ...(args.terminationProtection ? { forceDestroy: true } : {}),
                userData: pulumi.secret(
                    pulumi.all([args.hostPrivateKey, args.hostPublicKey]).apply(([key, pub]) => hostKeyUserData(key, pub)),
                ),
                tags: instanceTags,
                volumeTags: instanceTags,
            },
            // A newer image must never replace a running host: NixOS upgrades in place through the
            // flake. A re-image is a new resource name (instanceResourceName), never an alias.
            { parent: this, ignoreChanges: ["ami"] },
        );

        let publicIp: pulumi.Output<string> = instance.publicIp;
        let publicDns: pulumi.Output<string> = instance.publicDns;
        if (args.elasticIp) {
            const eip = new Eip(`${name}-eip`, { domain: "vpc", instance: instance.id, tags: args.tags }, { parent: this });
            publicIp = eip.publicIp;
            publicDns = eip.publicDns;
        }

        this.instanceId = instance.id;
        this.publicIp = publicIp;
        this.publicDns = publicDns;
        this.url = pulumi.interpolate`http://${publicIp}/`;
        this.hostPublicKey = pulumi.output(args.hostPublicKey);
        this.sshCommand = pulumi.all([publicIp, this.hostPublicKey]).apply(([ip, key]) => sshCommand(args.stack, ip, key));
        this.registerOutputs({
            instanceId: this.instanceId,
            amiId: this.amiId,
            publicIp: this.publicIp,
            publicDns: this.publicDns,
            url: this.url,
            hostPublicKey: this.hostPublicKey,
            sshCommand: this.sshCommand,
        });
    }
}
