import * as path from "node:path";
import * as pulumi from "@pulumi/pulumi";
import { Command } from "@pulumi/command/local/command";
import { DeploySettings, RebootPolicy } from "../lib/config";
import { flakeHash } from "../lib/flakeHash";

/**
 * Paths relative to the project directory, where `pulumi up` runs the program: inputs that hold
 * no absolute path stay the same in every clone, so a clone elsewhere does not re-deploy.
 */
export const DEPLOY_SCRIPT = "deploy/nixos-deploy.sh";
export const FLAKE_DIR = "nix";

export interface NixosDeploymentArgs {
    /** `nixosConfigurations.<flakeAttr>` to switch the host to. */
    readonly flakeAttr: string;
    /** The EC2 instance; a new instance is a new deploy. */
    readonly instanceId: pulumi.Input<string>;
    /** Address the deploy connects to. */
    readonly host: pulumi.Input<string>;
    /** User to log in as (root on the NixOS images). */
    readonly user: string;
    /** The admin's OpenSSH private key (secret). */
    readonly sshPrivateKey: pulumi.Input<string>;
    /** The only host key trusted, `ssh-ed25519 AAAA...`. */
    readonly hostPublicKey: pulumi.Input<string>;
    readonly settings: DeploySettings;
    /** Whether the deploy may reboot the host (the host's rebootPolicy). */
    readonly rebootPolicy: RebootPolicy;
    /** The flake directory to hash; defaults to nix/ of the project. */
    readonly flakeDir?: string;
    /** Rollout canary: the hosts of the same flakeAttr whose deploys start only after this one confirmed. */
    readonly canaryFor?: string[];
    /**
     * Rollout canary: the host of the same flakeAttr that deploys first. This deploy starts only after
     * that one confirmed, and not at all if it failed; that host's NixosDeployment goes in `opts.dependsOn`.
     */
    readonly afterCanary?: string;
    /**
     * The host's secrets as the deploy reads them (HostSecrets' payload; a secret). Absent: the host
     * gets none, and a deploy removes any it had.
     */
    readonly secrets?: pulumi.Input<string>;
    /** Changes whenever `secrets` does, and reveals nothing of them (HostSecrets' trigger; a secret). */
    readonly secretsTrigger?: pulumi.Input<string>;
}

export interface DeployResult {
    readonly systemPath: string;
    readonly generation: number;
    /** Whether the deploy rebooted the host into the new system. */
    readonly rebooted: boolean;
}

/** The deploy script's last stdout line: `{"systemPath":"/nix/store/...","generation":N,"rebooted":B}`. */
export function parseDeployResult(stdout: string): DeployResult {
    const last = stdout.trim().split("\n").pop() ?? "";
    let parsed: unknown;
    try {
        parsed = JSON.parse(last);
    } catch {
        throw new Error(`the deploy script's last line is not JSON: ${JSON.stringify(last.slice(0, 200))}`);
    }
    const { systemPath, generation, rebooted } = (parsed ?? {}) as Record<string, unknown>;
    if (
        typeof systemPath !== "string" ||
        !systemPath.startsWith("/nix/store/") ||
        typeof generation !== "number" ||
        !Number.isInteger(generation) ||
        typeof rebooted !== "boolean"
    ) {
        throw new Error(
            `the deploy script's result lacks systemPath (a /nix/store path), generation (an integer) or rebooted (true or false): ${last.slice(0, 200)}`,
        );
    }
    return { systemPath, generation, rebooted };
}

/**
 * A program run hashes each flake directory once, not once a host: the hash reads every file of
 * the flake, and a fleet deploys one flake to every host.
 */
const flakeHashes = new Map<string, string>();
function flakeHashOnce(dir: string): string {
    const key = path.resolve(dir);
    let hash = flakeHashes.get(key);
    if (hash === undefined) {
        hash = flakeHash(dir);
        flakeHashes.set(key, hash);
    }
    return hash;
}

/**
 * Switches one host to its flake configuration whenever the flake, the host, its key or its secrets
 * change. What the component depends on (`opts.dependsOn`, a rollout's canary) the deploy itself
 * waits for: a component's own dependencies do not hold back its children. A secret in `triggers`
 * stays a secret through @pulumi/command: its provider (built on pulumi-go-provider's infer) marks
 * an output secret when the input of the same name contains a secret (infer/resource.go,
 * markSecret and ensureDefaultSecrets), so `triggers` is kept encrypted in state, and only the
 * changed host is replaced.
 */
export class NixosDeployment extends pulumi.ComponentResource {
    /** SHA-256 of the flake directory the host was switched to. */
    public readonly flakeHash: string;
    public readonly systemPath: pulumi.Output<string>;
    public readonly generation: pulumi.Output<number>;
    /** Whether the last deploy rebooted the host. */
    public readonly rebooted: pulumi.Output<boolean>;

    constructor(name: string, args: NixosDeploymentArgs, opts?: pulumi.ComponentResourceOptions) {
        super("nixos-ec2:index:NixosDeployment", name, args, opts);

        this.flakeHash = flakeHashOnce(args.flakeDir ?? FLAKE_DIR);
        const run = `bash ${DEPLOY_SCRIPT}`;
        const command = new Command(
            `${name}-switch`,
            {
                create: run,
                update: run,
                // Nothing to undo on the host: destroying the deploy goes with destroying the instance.
                // A host without secrets keeps the four triggers it had before secrets existed.
                triggers: [
                    this.flakeHash,
                    args.flakeAttr,
                    args.instanceId,
                    args.hostPublicKey,
                    ...(args.secretsTrigger === undefined ? [] : [pulumi.secret(args.secretsTrigger)]),
                ],
                addPreviousOutputInEnv: false,
                environment: {
                    NIXOS_EC2_HOST: args.host,
                    NIXOS_EC2_USER: args.user,
                    NIXOS_EC2_SSH_PRIVATE_KEY: pulumi.secret(args.sshPrivateKey),
                    NIXOS_EC2_HOST_PUBLIC_KEY: args.hostPublicKey,
                    NIXOS_EC2_FLAKE_DIR: FLAKE_DIR,
                    NIXOS_EC2_FLAKE_ATTR: args.flakeAttr,
                    NIXOS_EC2_CONNECT_TIMEOUT_SECONDS: String(args.settings.connectTimeoutSeconds),
                    NIXOS_EC2_BUILD_TIMEOUT_SECONDS: String(args.settings.buildTimeoutSeconds),
                    NIXOS_EC2_ACTIVATION_TIMEOUT_SECONDS: String(args.settings.activationTimeoutSeconds),
                    NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: String(args.settings.rollbackTimeoutSeconds),
                    NIXOS_EC2_ALLOW_FAILED_UNITS: String(args.settings.allowFailedUnits),
                    NIXOS_EC2_REBOOT_POLICY: args.rebootPolicy,
                    ...(args.secrets === undefined ? {} : { NIXOS_EC2_SECRETS: pulumi.secret(args.secrets) }),
                },
            },
            // Dependencies are not inputs: adding or removing a canary re-runs no deploy.
            { parent: this, dependsOn: opts?.dependsOn },
        );

        if (args.canaryFor !== undefined && args.canaryFor.length > 0) {
            // `pulumi up` prints it under this host's deployment, beside the deploy's error when
            // it fails: the deploy Command cannot say it itself without the hosts as an input,
            // which would re-run the canary's deploy whenever a host joins or leaves its group.
            void pulumi.log.info(
                `rollout canary of flakeAttr ${args.flakeAttr}: the deploys of ${args.canaryFor.join(", ")} start only after this host's deploy confirmed; ` +
                    "if it fails, they are not started and keep running the systems they run now",
                this,
            );
        }

        const result = command.stdout.apply(parseDeployResult);
        this.systemPath = result.systemPath;
        this.generation = result.generation;
        this.rebooted = result.rebooted;
        this.registerOutputs({ flakeHash: this.flakeHash, systemPath: this.systemPath, generation: this.generation, rebooted: this.rebooted });
    }
}
