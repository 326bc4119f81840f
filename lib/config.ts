/**
 * The stack's configuration: every key declared once (type, default, rules, description), the
 * rules between keys, and parseSettings, which turns the config Pulumi hands the program into
 * typed settings or one ConfigError that lists every problem, before any resource exists.
 *
 * Pulumi.yaml's `config:` section and the README's table are made from these declarations
 * (`npm run config-docs`); a test fails when either differs.
 */
import { closest, distance } from "fastest-levenshtein";
import { z } from "zod";
import { documentationRangeOf, networkList, wholeInternetCovered } from "./cidr";
import { cut, declare, KeyDeclaration, optionalId, readKey, show, trueOrFalse, wholeNumber } from "./configSchema";
import { hostSecretsSchema, SECRET_KEY_PREFIX, SECRET_NAMES_ALLOWED, SecretSettings, secretProblems, secretsOf } from "./hostSecrets";
import { NetworkFile } from "./network";

export const PROJECT = "nixos-ec2";

/** Owner of the official NixOS AMIs (see the README's security notes). */
export const NIXOS_AMI_OWNER = "427812963091";

/** The stack on which SSH from the whole internet is refused, and some defaults differ. */
export const PRODUCTION_STACK = "prod";

/**
 * AWS's default quota of inbound rules per security group, counted separately for IPv4 and IPv6
 * ("Inbound or outbound rules per security group", Amazon VPC quotas). Each SSH CIDR is one rule;
 * each public port takes one IPv4 and one IPv6 rule.
 */
export const RULES_PER_SECURITY_GROUP = 60;

export type Architecture = "x86_64" | "arm64";
export type NixSystem = "x86_64-linux" | "aarch64-linux";

const HOST_NAME = /^[a-z][a-z0-9-]{0,30}$/;
/**
 * A `nixosConfigurations` entry the deploy can name without quoting: a Nix identifier without `'`
 * (`.` would be an attribute path). deploy/nixos-deploy.sh holds the same pattern; a test keeps
 * the two equal.
 */
export const FLAKE_ATTR_PATTERN = "^[A-Za-z_][A-Za-z0-9_-]{0,62}$";
const INSTANCE_TYPE = /^([a-z]+)-?([0-9]+)([a-z0-9-]*)\.([a-z0-9-]+)$/;
const REGION = /^[a-z]{2}(-[a-z]+)+-[0-9]+$/;
/** "nixos-ec2-state-" + stack + "-" + 8-character suffix must fit S3's 63-character limit. */
const STACK_NAME = /^[a-z0-9][a-z0-9-]{0,37}$/;

function schemasOf<T extends Record<string, KeyDeclaration>>(keys: T): { [K in keyof T]: T[K]["schema"] } {
    return Object.fromEntries(Object.entries(keys).map(([k, d]) => [k, d.schema])) as { [K in keyof T]: T[K]["schema"] };
}

function hostOverrides() {
    const settings = Object.keys(HOST_KEYS).join(", ");
    return z
        .strictObject(schemasOf(HOST_KEYS), {
            error: (issue) =>
                issue.code === "unrecognized_keys" ? `unknown host setting; allowed: ${settings}` : `is not an object; allowed: {} or overrides of ${settings}`,
        })
        .partial();
}

const instanceType = declare({
    type: "string",
    default: "t3.small",
    allowed: "an EC2 instance type: family, generation, attributes, size (e.g. t3.small, t4g.medium, c7g.large)",
    description:
        "EC2 instance type of every host. Graviton types (t4g, c7g, m7g, a1, ...) boot the arm64 image and build aarch64-linux; others boot x86_64. " +
        "Moving a host between the two replaces it with a new instance (an instance cannot change architecture). " +
        "1 GiB types (t3.micro) are OOM-killed while evaluating nixpkgs.",
    schema: (bad) =>
        z
            .string(bad("is not an EC2 instance type"))
            .regex(INSTANCE_TYPE, bad("is not an EC2 instance type"))
            // mac1/mac2 are Apple hardware on dedicated hosts, for macOS AMIs only.
            .refine((t) => !t.startsWith("mac"), bad("is a Mac instance type, which runs macOS only")),
});

const rootVolumeGiB = declare({
    type: "integer",
    default: 20,
    allowed: "a whole number from 8 to 16384",
    description: "Root disk size in GiB (gp3, encrypted).",
    schema: (bad) => wholeNumber(bad, 8, 16384),
});

const flakeAttr = declare({
    type: "string",
    defaultDescription: "the host name",
    allowed: `a Nix attribute name matching ${FLAKE_ATTR_PATTERN} (letters, digits, _ and -)`,
    description: "The host's nixosConfigurations entry in nix/flake.nix; the host name by default.",
    schema: (bad) => z.string(bad("is not a Nix attribute name")).regex(new RegExp(FLAKE_ATTR_PATTERN), bad("is not a Nix attribute name")),
});

export const REBOOT_POLICIES = ["never", "when-required", "always"] as const;
export type RebootPolicy = (typeof REBOOT_POLICIES)[number];

const rebootPolicy = declare({
    type: "string",
    default: "when-required",
    allowed: REBOOT_POLICIES.join(", "),
    description:
        "Whether a deploy may reboot the host. when-required: only for a change that cannot be switched to live (a pre-switch check refuses it, " +
        "or the new init needs a reboot); the new system is booted once and confirmed, and a boot that fails or is not confirmed ends on the " +
        "previous generation. never: such a deploy fails and changes nothing. always: every deploy boots the new system.",
    schema: (bad) => z.enum(REBOOT_POLICIES, bad("is not a reboot policy")),
});

/** The largest imageGeneration: a host is re-imaged by hand, not thousands of times. */
const MAX_IMAGE_GENERATION = 9999;

const imageGeneration = declare({
    type: "integer",
    default: 0,
    allowed: `a whole number from 0 to ${MAX_IMAGE_GENERATION}`,
    description:
        "Change it (e.g. from 0 to 1) to replace this host on the next pulumi up with a new instance booted from the image the lookup finds then (or ami): " +
        "a fresh root disk; the host key, Elastic IP and flake deploy carry over. Otherwise a running host never changes image.",
    schema: (bad) => wholeNumber(bad, 0, MAX_IMAGE_GENERATION),
});

/** How the deploys of the hosts of one flakeAttr are staged (README "Staged rollouts"). */
export const ROLLOUTS = ["parallel", "canary"] as const;
export type Rollout = (typeof ROLLOUTS)[number];

/** What `hosts.<name>` may set: some stack-wide keys for one host, and the host's own. */
export const HOST_KEYS = { instanceType, rootVolumeGiB, rebootPolicy, flakeAttr, imageGeneration } satisfies Record<string, KeyDeclaration>;

/** The stack-wide keys, in the order of the README's table. */
export const KEYS = {
    sshAllowedCidrs: declare({
        type: "array",
        allowed: 'a non-empty list of IPv4/IPv6 network CIDRs, each once, e.g. ["203.0.113.0/24", "2001:db8::/32"]',
        description:
            "Networks that may reach SSH (TCP 22); every stack must say who may connect. Network addresses only (10.0.0.0/8, not 10.0.0.1/8). " +
            `On the stack named ${PRODUCTION_STACK}, entries that together cover the whole IPv4 or IPv6 internet are refused.`,
        schema: networkList,
    }),
    instanceType,
    nixosRelease: declare({
        type: "string",
        default: "26.05",
        allowed: "a NixOS release, YY.05 or YY.11 (e.g. 26.05)",
        description: "NixOS release whose newest official AMI boots NEW hosts (running hosts are never replaced).",
        schema: (bad) => z.string(bad("is not a NixOS release")).regex(/^[0-9]{2}\.(05|11)$/, bad("is not a NixOS release")),
    }),
    ami: declare({
        type: "string",
        default: "",
        allowed: '"ami-" followed by 8 or 17 lowercase hex digits, or empty for the lookup',
        description: "Pin an exact AMI ID instead of the lookup of the newest official image; used as given.",
        schema: (bad) => optionalId(bad, /^ami-([0-9a-f]{8}|[0-9a-f]{17})$/, "is not an AMI ID"),
    }),
    rootVolumeGiB,
    hosts: declare({
        type: "object",
        default: {},
        allowed: 'a map of host names ([a-z][a-z0-9-]{0,30}) to overrides, e.g. {"web": {}, "build": {"instanceType": "c7g.xlarge"}}',
        description:
            "The hosts of the stack, each with overrides of the keys marked per host, its flakeAttr and its imageGeneration. Empty ({}) means one host named after the stack.",
        schema: (bad) =>
            z.record(z.string().regex(HOST_NAME), hostOverrides(), {
                error: (issue) =>
                    issue.code === "invalid_key"
                        ? `host name ${show(issue.input)} is not allowed; allowed: [a-z][a-z0-9-]{0,30} (a DNS label)`
                        : bad("is not an object").error,
            }),
    }),
    elasticIp: declare({
        type: "boolean",
        default: false,
        stackDefaults: { [PRODUCTION_STACK]: true },
        allowed: "true or false",
        description: "Give each host an Elastic IP, a public address that survives stop/start.",
        schema: trueOrFalse,
    }),
    terminationProtection: declare({
        type: "boolean",
        default: false,
        stackDefaults: { [PRODUCTION_STACK]: true },
        allowed: "true or false",
        description:
            "Turn on EC2 termination protection for every host: the console, the AWS CLI and other tools cannot terminate it. " +
            "This stack still can (a re-image, pulumi destroy): the instance also gets forceDestroy.",
        schema: trueOrFalse,
    }),
    vpcId: declare({
        type: "string",
        default: "",
        allowed: '"vpc-" followed by 8 or 17 hex digits, or empty for the default VPC',
        description: "VPC for the security group. Set together with subnetId.",
        schema: (bad) => optionalId(bad, /^vpc-([0-9a-f]{8}|[0-9a-f]{17})$/, "is not a VPC ID"),
    }),
    subnetId: declare({
        type: "string",
        default: "",
        allowed: '"subnet-" followed by 8 or 17 hex digits, or empty for the default VPC',
        description: "Subnet (of vpcId) the hosts start in; it must give them a public address. Set together with vpcId.",
        schema: (bad) => optionalId(bad, /^subnet-([0-9a-f]{8}|[0-9a-f]{17})$/, "is not a subnet ID"),
    }),
    deployConnectTimeoutSeconds: declare({
        type: "integer",
        default: 600,
        allowed: "a whole number from 5 to 7200",
        description: "How long a deploy waits for a host's SSH to come up, in seconds.",
        schema: (bad) => wholeNumber(bad, 5, 7200),
    }),
    rollbackTimeoutSeconds: declare({
        type: "integer",
        default: 120,
        allowed: "a whole number from 30 to 3600",
        description:
            "After the build, how long the host waits for the deploy to confirm the new system over a new SSH connection before it rolls itself back, in seconds. " +
            "It has to cover activation plus the confirmation.",
        schema: (bad) => wholeNumber(bad, 30, 3600),
    }),
    buildTimeoutSeconds: declare({
        type: "integer",
        default: 3600,
        allowed: "a whole number from 60 to 86400",
        description:
            "How long the host may take to build the new system (nixos-rebuild build) before the deploy gives up, in seconds; the host is then unchanged. " +
            "A first build on a small instance downloads most of a system, so the default is generous.",
        schema: (bad) => wholeNumber(bad, 60, 86400),
    }),
    activationTimeoutSeconds: declare({
        type: "integer",
        default: 90,
        allowed: "a whole number from 10 to 3570, below rollbackTimeoutSeconds",
        description:
            "How long switch-to-configuration may take to activate the new system before the host rolls back, in seconds. " +
            "The rollback timer runs from the end of the build, so this must be shorter than rollbackTimeoutSeconds.",
        schema: (bad) => wholeNumber(bad, 10, 3570),
    }),
    rebootPolicy,
    allowFailedUnits: declare({
        type: "boolean",
        default: false,
        allowed: "true or false",
        description: 'Count a switch that leaves failed systemd units (exit 4, "degraded") as a success.',
        schema: trueOrFalse,
    }),
    rollout: declare({
        type: "string",
        default: "parallel",
        stackDefaults: { [PRODUCTION_STACK]: "canary" },
        allowed: ROLLOUTS.join(", "),
        description:
            "How a flake change reaches the hosts of one flakeAttr. parallel: every host deploys at once. canary: the first of them by name deploys first, " +
            "and the others start only after it confirmed; if it fails they are not touched. A flakeAttr with one host is the same either way.",
        schema: (bad) => z.enum(ROLLOUTS, bad("is not a rollout")),
    }),
    hostSecrets: declare({
        type: "object",
        default: {},
        allowed: `a map of secret ${SECRET_NAMES_ALLOWED} to "all" or a list of host names, e.g. {"webAdmin": ["staging"], "apiToken": "all"}`,
        description:
            "Which hosts get which secret. Each secret's value is the Pulumi secret nixos-ec2:secret.<name> (pulumi config set --secret); " +
            "each deploy writes a host's secrets to /var/lib/nixos-ec2/secrets/<name> (root, 0400) over its SSH connection, and removes those it no longer gets.",
        schema: hostSecretsSchema,
    }),
} satisfies Record<string, KeyDeclaration>;

export type KeyName = keyof typeof KEYS;
/** Every key's validated value. */
export type Values = { [K in KeyName]: z.output<(typeof KEYS)[K]["schema"]> };

/** One host: its overrides over the stack-wide values, and what its instance type implies. */
export interface HostSettings {
    /** DNS-label-like host name; also the resource name suffix. */
    readonly name: string;
    /** `nixosConfigurations.<flakeAttr>` in nix/flake.nix. */
    readonly flakeAttr: z.output<typeof flakeAttr.schema>;
    readonly instanceType: Values["instanceType"];
    readonly rootVolumeGiB: Values["rootVolumeGiB"];
    readonly rebootPolicy: Values["rebootPolicy"];
    /** AMI architecture, from the instance type. */
    readonly architecture: Architecture;
    /** Which instance of the host this is: a new value is a new instance from the current image. */
    readonly imageGeneration: z.output<typeof imageGeneration.schema>;
    /** Nix system double, from the instance type. */
    readonly nixSystem: NixSystem;
}

export interface DeploySettings {
    readonly connectTimeoutSeconds: Values["deployConnectTimeoutSeconds"];
    readonly buildTimeoutSeconds: Values["buildTimeoutSeconds"];
    readonly activationTimeoutSeconds: Values["activationTimeoutSeconds"];
    readonly rollbackTimeoutSeconds: Values["rollbackTimeoutSeconds"];
    readonly allowFailedUnits: Values["allowFailedUnits"];
}

/** What the program reads: the keys' values, arranged for the components. */
export interface Settings extends Pick<Values, "nixosRelease" | "ami" | "elasticIp" | "terminationProtection" | "vpcId" | "subnetId" | "rollout"> {
    readonly stack: string;
    readonly region: string;
    /** Canonical network CIDRs. */
    readonly sshAllowedCidrs: string[];
    readonly publicTcpPorts: number[];
    readonly hosts: HostSettings[];
    readonly deploy: DeploySettings;
    /** The host secrets, by name, each with the hosts that get it (the values stay in config). */
    readonly secrets: SecretSettings[];
    /**
     * Config that is not wrong but probably not meant: a key in a misspelt namespace, an SSH CIDR
     * from the documentation ranges.
     */
    readonly warnings: string[];
}

/** Every configuration problem of a stack, reported together. */
export class ConfigError extends Error {
    constructor(
        readonly stack: string,
        readonly problems: string[],
    ) {
        super(
            `${PROJECT}: stack "${stack}" has ${problems.length} configuration ` +
                `error${problems.length === 1 ? "" : "s"}; nothing was created:\n` +
                problems.map((p) => `  - ${p}`).join("\n"),
        );
        this.name = "ConfigError";
    }
}

/**
 * Graviton instance families carry a `g` among the attributes after the generation
 * (t4g, c7gn, m7gd, im4gn, x8g); `a1` is the first-generation Graviton.
 */
export function architectureOf(instanceType: string): Architecture | undefined {
    const m = INSTANCE_TYPE.exec(instanceType);
    if (!m) return undefined;
    const [, family, generation, attributes] = m;
    const graviton = attributes.includes("g") || (family === "a" && generation === "1");
    return graviton ? "arm64" : "x86_64";
}

export function nixSystemOf(architecture: Architecture): NixSystem {
    return architecture === "arm64" ? "aarch64-linux" : "x86_64-linux";
}

/** `instanceType` -> `nixos-ec2:instanceType`; a key with a namespace (`aws:region`) as it is. */
export function qualifyKey(key: string): string {
    return key.includes(":") ? key : `${PROJECT}:${key}`;
}

const key = (k: string) => `${PROJECT}:${k}`;

/** Full config keys (`nixos-ec2:hosts`, `aws:region`) to the strings Pulumi hands a program. */
export type FullConfig = Readonly<Record<string, string>>;

/** The values of the project's keys; undefined where a key has problems (they are in `problems`). */
function readValues(stack: string, config: FullConfig, problems: string[]): Partial<Values> {
    const values: Partial<Record<KeyName, unknown>> = {};
    for (const name of Object.keys(KEYS) as KeyName[]) {
        const result = readKey(KEYS[name] as KeyDeclaration, key(name), config[key(name)], stack);
        if (result.ok) values[name] = result.value;
        else problems.push(...result.problems);
    }
    return values as Partial<Values>;
}

/** Keys of the project's namespace that it does not have, and keys in a misspelt namespace. */
function strayKeys(config: FullConfig, problems: string[], warnings: string[]): void {
    const names = Object.keys(KEYS);
    for (const full of Object.keys(config)) {
        const at = full.indexOf(":");
        if (at < 0) continue;
        const [namespace, name] = [full.slice(0, at), full.slice(at + 1)];
        // Secrets' values (lib/hostSecrets.ts checks them); their keys are no typos of a project key.
        if (namespace === PROJECT && name.startsWith(SECRET_KEY_PREFIX)) continue;
        if (namespace === PROJECT && name === "secret") continue;
        if (namespace === PROJECT && !names.includes(name)) {
            const near = closest(name, names);
            const hint = distance(name.toLowerCase(), near.toLowerCase()) <= 3 ? `; did you mean ${key(near)}?` : "";
            problems.push(`${cut(key(name), 80)}: unknown key; the project's keys are ${names.join(", ")}${hint}`);
        } else if (namespace !== PROJECT && isMisspeltProject(namespace)) {
            const near = names.includes(name) ? name : closest(name, names);
            warnings.push(`${cut(full, 80)}: ignored, because "${cut(namespace, 40)}" is not this project's namespace; did you mean ${key(near)}?`);
        }
    }
}

function isMisspeltProject(namespace: string): boolean {
    const squashed = (s: string) => s.toLowerCase().replace(/[^a-z0-9]/g, "");
    return squashed(namespace) === squashed(PROJECT) || distance(namespace.toLowerCase(), PROJECT) <= 2;
}

type Rule = (values: Partial<Values>, stack: string, network: NetworkFile) => string[];

/** A rule between keys, checked only once every key it reads is valid (set or defaulted). */
function rule<K extends KeyName>(keys: readonly K[], check: (values: Pick<Values, K>, stack: string, network: NetworkFile) => string[]): Rule {
    return (values, stack, network) => (keys.every((k) => k in values) ? check(values as Pick<Values, K>, stack, network) : []);
}

/** The rules that are not about one key. */
const RULES: Rule[] = [
    rule(["vpcId", "subnetId"], function vpcWithSubnet({ vpcId, subnetId }) {
        if (vpcId === undefined && subnetId === undefined) return [];
        if (vpcId !== undefined && subnetId !== undefined) return [];
        const only = vpcId === undefined ? "subnetId" : "vpcId";
        return [`${key("vpcId")}/${key("subnetId")}: set both (a subnet of that VPC for the hosts) or neither (the default VPC); only ${only} is set`];
    }),
    rule(["sshAllowedCidrs"], function noWorldSshOnProd({ sshAllowedCidrs }, stack) {
        if (stack !== PRODUCTION_STACK) return [];
        return wholeInternetCovered(sshAllowedCidrs).map((family) => {
            const alone = sshAllowedCidrs.findIndex((n) => wholeInternetCovered([n]).length > 0 && n.family === family);
            const what =
                alone >= 0
                    ? `${key("sshAllowedCidrs")}[${alone}]: ${show(sshAllowedCidrs[alone].text)} opens`
                    : `${key("sshAllowedCidrs")}: ${show(sshAllowedCidrs.filter((n) => n.family === family).map((n) => n.text))} together open`;
            return `${what} SSH to the whole IPv${family} internet, which stack "${PRODUCTION_STACK}" refuses; allowed: the CIDRs of the networks your admins connect from`;
        });
    }),
    rule(["sshAllowedCidrs"], function fitsOneSecurityGroup({ sshAllowedCidrs }, _stack, network) {
        const room = RULES_PER_SECURITY_GROUP - network.publicTcpPorts.length;
        return ([4, 6] as const)
            .filter((family) => sshAllowedCidrs.filter((n) => n.family === family).length > room)
            .map(
                (family) =>
                    `${key("sshAllowedCidrs")}: ${sshAllowedCidrs.filter((n) => n.family === family).length} IPv${family} CIDRs do not fit one security group; ` +
                    `allowed: at most ${room} (AWS's default ${RULES_PER_SECURITY_GROUP} inbound rules per group and family, less one for each of the ${network.publicTcpPorts.length} public ports)`,
            );
    }),
    rule(["activationTimeoutSeconds", "rollbackTimeoutSeconds"], function activationBeforeRollback({ activationTimeoutSeconds, rollbackTimeoutSeconds }) {
        if (activationTimeoutSeconds < rollbackTimeoutSeconds) return [];
        return [
            `${key("activationTimeoutSeconds")}: ${activationTimeoutSeconds} is not below ${key("rollbackTimeoutSeconds")} (${rollbackTimeoutSeconds}); ` +
                `allowed: an activation deadline shorter than the rollback timer, which runs from the end of the build and must also cover the confirmation`,
        ];
    }),
    rule(["ami", "instanceType", "hosts"], function oneArchitectureForAPinnedAmi({ ami, instanceType, hosts }) {
        if (ami === undefined) return [];
        const perHost = Object.values(hosts).map((h) => h.instanceType ?? instanceType);
        const types = new Set(perHost.length > 0 ? perHost : [instanceType]);
        const architectures = new Set([...types].map(architectureOf));
        if (architectures.size < 2) return [];
        return [
            `${key("ami")}: ${show(ami)} is one image for hosts of two architectures (${[...types].join(", ")}); ` +
                `allowed: a pinned AMI only when every host's instance type has its architecture, or no pinned AMI (the lookup finds one per architecture)`,
        ];
    }),
    rule(["hosts"], function hostsOrHostName({ hosts }, stack) {
        if (Object.keys(hosts).length > 0 || HOST_NAME.test(stack)) return [];
        return [
            `${key("hosts")}: {} (the default) names no host, and the stack name ${show(stack)} is not a host name ([a-z][a-z0-9-]{0,30}); ` +
                `set ${key("hosts")} to name the hosts, e.g. {"web": {}}`,
        ];
    }),
];

/**
 * Rules whose findings are warnings: the configuration works (the offline preview runs), but not as
 * meant. Checked once every key is valid.
 */
const WARNING_RULES: Rule[] = [
    rule(["sshAllowedCidrs", "deployConnectTimeoutSeconds"], function sshFromDocumentationRanges({ sshAllowedCidrs, deployConnectTimeoutSeconds }) {
        const examples = sshAllowedCidrs.flatMap((n, i) => {
            const range = documentationRangeOf(n);
            return range ? [{ i, n, range }] : [];
        });
        const warnings = examples.map(({ i, n, range }) => {
            const where = n.cidr === range.cidr ? "is" : `is in ${range.cidr},`;
            return (
                `${key("sshAllowedCidrs")}[${i}]: ${show(n.text)} ${where} an address range reserved for documentation (${range.rfc}); ` +
                `no admin connects from it, so it lets no one in. Replace it with the networks you administer from.`
            );
        });
        if (examples.length === sshAllowedCidrs.length) {
            warnings.push(
                `${key("sshAllowedCidrs")}: every entry is in a documentation range, so SSH is open to no one: a real pulumi up would wait ` +
                    `${key("deployConnectTimeoutSeconds")} (${deployConnectTimeoutSeconds} s) for each host's SSH and then fail its deploy.`,
            );
        }
        return warnings;
    }),
];

function stackProblems(stack: string, region: string | undefined): string[] {
    const problems: string[] = [];
    if (!STACK_NAME.test(stack)) {
        problems.push(
            `stack name ${show(stack)}: must be 1-38 characters of a-z, 0-9 and "-", starting with a letter or digit ` +
                `(it is part of the state bucket's name)`,
        );
    }
    if (region === undefined || region === "") problems.push(`aws:region: not set; set the AWS region of this stack, e.g. eu-central-1`);
    else if (!REGION.test(region)) problems.push(`aws:region: ${show(region)} is not an AWS region name (e.g. eu-central-1, us-east-1)`);
    return problems;
}

/** The hosts with the stack-wide values under their overrides, and what their instance types imply. */
function hostsOf(stack: string, v: Values): HostSettings[] {
    const entries: Array<[string, Values["hosts"][string]]> = Object.keys(v.hosts).length > 0 ? Object.entries(v.hosts) : [[stack, {}]];
    return entries.map(([name, overrides]) => {
        const instanceType = overrides.instanceType ?? v.instanceType;
        const architecture = architectureOf(instanceType) as Architecture; // the instanceType pattern guarantees one
        return {
            name,
            flakeAttr: overrides.flakeAttr ?? name,
            instanceType,
            rootVolumeGiB: overrides.rootVolumeGiB ?? v.rootVolumeGiB,
            rebootPolicy: overrides.rebootPolicy ?? v.rebootPolicy,
            architecture,
            nixSystem: nixSystemOf(architecture),
            imageGeneration: overrides.imageGeneration ?? Number(imageGeneration.default),
        };
    });
}

function hostNamesOf(stack: string, hosts: Values["hosts"]): string[] {
    return Object.keys(hosts).length > 0 ? Object.keys(hosts) : [stack];
}

/**
 * Parse and validate the config Pulumi hands the program (full keys, as `allConfig()` returns
 * them; `secretKeys` are those Pulumi holds as secrets); `network` is nix/network.json as read by
 * `readNetworkFile`.
 */
export function parseSettings(stack: string, config: FullConfig, network: NetworkFile, secretKeys: readonly string[] = []): Settings {
    const region = config["aws:region"];
    const problems = [...network.problems, ...stackProblems(stack, region)];
    const warnings: string[] = [];
    strayKeys(config, problems, warnings);
    const values = readValues(stack, config, problems);
    for (const rule of RULES) problems.push(...rule(values, stack, network));
    if (values.hostSecrets !== undefined && values.hosts !== undefined) {
        problems.push(...secretProblems({ project: PROJECT, stack, hostSecrets: values.hostSecrets, hostNames: hostNamesOf(stack, values.hosts), config, secretKeys }));
    }
    if (problems.length > 0) throw new ConfigError(stack, problems);
    for (const rule of WARNING_RULES) warnings.push(...rule(values, stack, network));

    const v = values as Values;
    return {
        stack,
        region,
        sshAllowedCidrs: v.sshAllowedCidrs.map((n) => n.cidr),
        nixosRelease: v.nixosRelease,
        ami: v.ami,
        elasticIp: v.elasticIp,
        terminationProtection: v.terminationProtection,
        vpcId: v.vpcId,
        subnetId: v.subnetId,
        rollout: v.rollout,
        publicTcpPorts: network.publicTcpPorts,
        hosts: hostsOf(stack, v),
        deploy: {
            connectTimeoutSeconds: v.deployConnectTimeoutSeconds,
            buildTimeoutSeconds: v.buildTimeoutSeconds,
            activationTimeoutSeconds: v.activationTimeoutSeconds,
            rollbackTimeoutSeconds: v.rollbackTimeoutSeconds,
            allowFailedUnits: v.allowFailedUnits,
        },
        secrets: secretsOf(PROJECT, v.hostSecrets, hostNamesOf(stack, v.hosts)),
        warnings,
    };
}
