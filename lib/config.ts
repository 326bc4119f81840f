/**
 * The stack's configuration, parsed and validated in one place before any resource exists.
 *
 * Everything here is pure: it takes the raw config strings (as Pulumi hands them to a program)
 * and returns typed settings, or throws one ConfigError listing every problem at once.
 */
import { isIPv4, isIPv6 } from "node:net";
import { NetworkFile } from "./network";

export const PROJECT = "nixos-ec2";

/** Owner of the official NixOS AMIs (see the README's security notes). */
export const NIXOS_AMI_OWNER = "427812963091";

/** The stack on which SSH from the whole internet is refused. */
export const PRODUCTION_STACK = "prod";

export type Architecture = "x86_64" | "arm64";
export type NixSystem = "x86_64-linux" | "aarch64-linux";

export interface HostSettings {
    /** DNS-label-like host name; also the resource name suffix. */
    readonly name: string;
    /** `nixosConfigurations.<flakeAttr>` in nix/flake.nix. */
    readonly flakeAttr: string;
    readonly instanceType: string;
    readonly rootVolumeGiB: number;
    /** AMI architecture, from the instance type. */
    readonly architecture: Architecture;
    /** Nix system double, from the instance type. */
    readonly nixSystem: NixSystem;
}

export interface DeploySettings {
    readonly connectTimeoutSeconds: number;
    readonly rollbackTimeoutSeconds: number;
    readonly allowFailedUnits: boolean;
}

export interface Settings {
    readonly stack: string;
    readonly region: string;
    readonly sshAllowedCidrs: string[];
    readonly nixosRelease: string;
    /** A pinned AMI ID; when absent the newest official image of `nixosRelease` is looked up. */
    readonly ami?: string;
    readonly elasticIp: boolean;
    readonly terminationProtection: boolean;
    readonly vpcId?: string;
    readonly subnetId?: string;
    readonly publicTcpPorts: number[];
    readonly hosts: HostSettings[];
    readonly deploy: DeploySettings;
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

/** The project's config keys; any other `nixos-ec2:` key is a typo and is refused. */
export const CONFIG_KEYS = [
    "sshAllowedCidrs",
    "instanceType",
    "nixosRelease",
    "ami",
    "rootVolumeGiB",
    "hosts",
    "elasticIp",
    "terminationProtection",
    "vpcId",
    "subnetId",
    "deployConnectTimeoutSeconds",
    "rollbackTimeoutSeconds",
    "allowFailedUnits",
] as const;

const HOST_OVERRIDE_KEYS = ["instanceType", "rootVolumeGiB", "flakeAttr"];

const DEFAULTS = {
    instanceType: "t3.small",
    nixosRelease: "26.05",
    rootVolumeGiB: 20,
    deployConnectTimeoutSeconds: 600,
    rollbackTimeoutSeconds: 120,
};

export const LIMITS = {
    rootVolumeGiB: { min: 8, max: 16384 },
    deployConnectTimeoutSeconds: { min: 5, max: 7200 },
    rollbackTimeoutSeconds: { min: 30, max: 3600 },
};

const HOST_NAME = /^[a-z][a-z0-9-]{0,30}$/;
const FLAKE_ATTR = /^[A-Za-z_][A-Za-z0-9_'-]*$/;
const INSTANCE_TYPE = /^([a-z]+)-?([0-9]+)([a-z0-9-]*)\.([a-z0-9-]+)$/;
const NIXOS_RELEASE = /^[0-9]{2}\.(05|11)$/;
const AMI_ID = /^ami-([0-9a-f]{8}|[0-9a-f]{17})$/;
const VPC_ID = /^vpc-([0-9a-f]{8}|[0-9a-f]{17})$/;
const SUBNET_ID = /^subnet-([0-9a-f]{8}|[0-9a-f]{17})$/;
const REGION = /^[a-z]{2}(-[a-z]+)+-[0-9]+$/;
/** "nixos-ec2-state-" + stack + "-" + 8-character suffix must fit S3's 63-character limit. */
const STACK_NAME = /^[a-z0-9][a-z0-9-]{0,37}$/;

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

/** A CIDR whose address is the network address itself (no host bits set), as AWS requires. */
export function cidrProblem(cidr: string): string | undefined {
    const m = /^([^/]+)\/([0-9]{1,3})$/.exec(cidr);
    if (!m) return "is not a CIDR (address/prefix)";
    const [, address, prefixText] = m;
    const prefix = Number(prefixText);
    if (isIPv4(address)) {
        if (prefix > 32) return "has an IPv4 prefix above 32";
        const bits = address
            .split(".")
            .map((o) => Number(o).toString(2).padStart(8, "0"))
            .join("");
        if (bits.slice(prefix).includes("1")) return `has host bits set (the network is ${networkOf(bits, prefix, 4)}/${prefix})`;
        return undefined;
    }
    if (isIPv6(address)) {
        if (prefix > 128) return "has an IPv6 prefix above 128";
        const bits = ipv6Bits(address);
        if (bits === undefined) return "is not an IPv4 or IPv6 CIDR";
        if (bits.slice(prefix).includes("1")) return `has host bits set (the network is ${networkOf(bits, prefix, 6)}/${prefix})`;
        return undefined;
    }
    return "is not an IPv4 or IPv6 CIDR";
}

function ipv6Bits(address: string): string | undefined {
    if (address.includes(".")) return undefined; // embedded IPv4 forms are not accepted by security groups
    const [head, tail] = address.includes("::") ? address.split("::") : [address, undefined];
    const left = head ? head.split(":") : [];
    const right = tail ? tail.split(":") : [];
    const missing = 8 - left.length - right.length;
    const groups = tail === undefined ? left : [...left, ...Array(missing).fill("0"), ...right];
    if (groups.length !== 8) return undefined;
    return groups.map((g) => parseInt(g, 16).toString(2).padStart(16, "0")).join("");
}

function networkOf(bits: string, prefix: number, family: 4 | 6): string {
    const masked = bits.slice(0, prefix).padEnd(bits.length, "0");
    if (family === 4) {
        return [0, 8, 16, 24].map((i) => parseInt(masked.slice(i, i + 8), 2)).join(".");
    }
    const groups = [];
    for (let i = 0; i < 128; i += 16) groups.push(parseInt(masked.slice(i, i + 16), 2).toString(16));
    return groups.join(":").replace(/(^|:)0(:0)+(:|$)/, "::");
}

const WORLD = ["0.0.0.0/0", "::/0"];

/** Raw config: bare project keys (no `nixos-ec2:` prefix) to the strings Pulumi passes a program. */
export type RawConfig = Readonly<Record<string, string | undefined>>;

/** `instanceType` -> `nixos-ec2:instanceType`; a key with a namespace (`aws:region`) as it is. */
export function qualifyKey(key: string): string {
    return key.includes(":") ? key : `${PROJECT}:${key}`;
}

/** The project's own keys of a full config map (`nixos-ec2:hosts` -> `hosts`). */
export function projectKeys(config: Readonly<Record<string, string>>): RawConfig {
    const raw: Record<string, string> = {};
    for (const [key, value] of Object.entries(config)) {
        if (key.startsWith(`${PROJECT}:`)) raw[key.slice(PROJECT.length + 1)] = value;
    }
    return raw;
}

/**
 * Parse and validate. `raw` holds the project's keys without namespace; `region` is `aws:region`;
 * `network` is nix/network.json as read by `readNetworkFile`.
 */
export function parseSettings(stack: string, raw: RawConfig, region: string | undefined, network: NetworkFile): Settings {
    const problems: string[] = [...network.problems];
    const key = (k: string) => `${PROJECT}:${k}`;
    const value = (k: string): string | undefined => {
        const v = raw[k];
        return v === undefined || v === "" ? undefined : v;
    };
    const show = (v: unknown) => JSON.stringify(v);

    for (const k of Object.keys(raw)) {
        if (!(CONFIG_KEYS as readonly string[]).includes(k)) {
            problems.push(`${key(k)}: unknown key; the project's keys are ${CONFIG_KEYS.join(", ")}`);
        }
    }

    if (!STACK_NAME.test(stack)) {
        problems.push(
            `stack name ${show(stack)}: must be 1-38 characters of a-z, 0-9 and "-", starting with a letter or digit ` +
                `(it is part of the state bucket's name)`,
        );
    }

    if (region === undefined || region === "") {
        problems.push(`aws:region: not set; set the AWS region of this stack, e.g. eu-central-1`);
    } else if (!REGION.test(region)) {
        problems.push(`aws:region: ${show(region)} is not an AWS region name (e.g. eu-central-1, us-east-1)`);
    }

    const json = (text: string): unknown => {
        try {
            return JSON.parse(text);
        } catch {
            return Symbol.for("invalid");
        }
    };

    // sshAllowedCidrs
    const sshAllowedCidrs: string[] = [];
    const cidrsText = value("sshAllowedCidrs");
    if (cidrsText === undefined) {
        problems.push(
            `${key("sshAllowedCidrs")}: not set; list the IPv4/IPv6 CIDRs that may reach SSH (port 22), ` +
                `e.g. ["203.0.113.7/32"]; there is no default`,
        );
    } else {
        const list = json(cidrsText);
        if (!Array.isArray(list) || list.length === 0 || !list.every((c) => typeof c === "string")) {
            problems.push(`${key("sshAllowedCidrs")}: ${cidrsText} is not a non-empty list of CIDR strings, e.g. ["203.0.113.7/32"]`);
        } else {
            list.forEach((cidr: string, i: number) => {
                const problem = cidrProblem(cidr);
                if (problem) {
                    problems.push(
                        `${key("sshAllowedCidrs")}[${i}]: ${show(cidr)} ${problem}; allowed: an IPv4 or IPv6 CIDR such as 203.0.113.0/24 or 2001:db8::/32`,
                    );
                } else if (stack === PRODUCTION_STACK && WORLD.includes(cidr)) {
                    problems.push(
                        `${key("sshAllowedCidrs")}[${i}]: ${show(cidr)} opens SSH to the whole internet, which stack "${PRODUCTION_STACK}" refuses; ` +
                            `allowed: the CIDRs of the networks your admins connect from`,
                    );
                } else {
                    sshAllowedCidrs.push(cidr);
                }
            });
        }
    }

    const instanceTypeProblem = (k: string, v: string) =>
        architectureOf(v) === undefined
            ? `${k}: ${show(v)} is not an EC2 instance type (family, generation, attributes, size; e.g. t3.small, t4g.medium, c7g.large)`
            : undefined;

    const integer = (k: string, text: string, min: number, max: number): number | undefined => {
        const n = Number(text);
        if (!/^-?[0-9]+$/.test(text.trim()) || !Number.isSafeInteger(n) || n < min || n > max) {
            problems.push(`${k}: ${show(text)} is not allowed; allowed: a whole number from ${min} to ${max}`);
            return undefined;
        }
        return n;
    };

    const boolean = (k: string, fallback: boolean): boolean => {
        const text = value(k);
        if (text === undefined) return fallback;
        if (text === "true" || text === "false") return text === "true";
        problems.push(`${key(k)}: ${show(text)} is not allowed; allowed: true or false`);
        return fallback;
    };

    const instanceType = value("instanceType") ?? DEFAULTS.instanceType;
    const itProblem = instanceTypeProblem(key("instanceType"), instanceType);
    if (itProblem) problems.push(itProblem);

    const nixosRelease = value("nixosRelease") ?? DEFAULTS.nixosRelease;
    if (!NIXOS_RELEASE.test(nixosRelease)) {
        problems.push(`${key("nixosRelease")}: ${show(nixosRelease)} is not a NixOS release; allowed: YY.05 or YY.11, e.g. 26.05`);
    }

    const ami = value("ami");
    if (ami !== undefined && !AMI_ID.test(ami)) {
        problems.push(`${key("ami")}: ${show(ami)} is not an AMI ID; allowed: "ami-" followed by 8 or 17 lowercase hex digits`);
    }

    const rootText = value("rootVolumeGiB");
    const rootVolumeGiB =
        rootText === undefined
            ? DEFAULTS.rootVolumeGiB
            : (integer(key("rootVolumeGiB"), rootText, LIMITS.rootVolumeGiB.min, LIMITS.rootVolumeGiB.max) ?? DEFAULTS.rootVolumeGiB);

    const elasticIp = boolean("elasticIp", false);
    const terminationProtection = boolean("terminationProtection", false);
    const allowFailedUnits = boolean("allowFailedUnits", false);

    const vpcId = value("vpcId");
    const subnetId = value("subnetId");
    if (vpcId !== undefined && !VPC_ID.test(vpcId)) {
        problems.push(`${key("vpcId")}: ${show(vpcId)} is not a VPC ID; allowed: "vpc-" followed by 8 or 17 hex digits`);
    }
    if (subnetId !== undefined && !SUBNET_ID.test(subnetId)) {
        problems.push(`${key("subnetId")}: ${show(subnetId)} is not a subnet ID; allowed: "subnet-" followed by 8 or 17 hex digits`);
    }
    if ((vpcId === undefined) !== (subnetId === undefined)) {
        problems.push(
            `${key("vpcId")}/${key("subnetId")}: set both (a subnet of that VPC for the hosts) or neither (the default VPC); ` +
                `only ${vpcId === undefined ? "subnetId" : "vpcId"} is set`,
        );
    }

    const timeout = (k: "deployConnectTimeoutSeconds" | "rollbackTimeoutSeconds") => {
        const text = value(k);
        return text === undefined ? DEFAULTS[k] : (integer(key(k), text, LIMITS[k].min, LIMITS[k].max) ?? DEFAULTS[k]);
    };
    const connectTimeoutSeconds = timeout("deployConnectTimeoutSeconds");
    const rollbackTimeoutSeconds = timeout("rollbackTimeoutSeconds");

    // hosts
    const hosts: HostSettings[] = [];
    const host = (name: string, overrides: Record<string, unknown>, where: string) => {
        let ok = true;
        for (const k of Object.keys(overrides)) {
            if (!HOST_OVERRIDE_KEYS.includes(k)) {
                problems.push(`${where}.${k}: unknown host setting; allowed: ${HOST_OVERRIDE_KEYS.join(", ")}`);
                ok = false;
            }
        }
        let hostType = instanceType;
        if (overrides.instanceType !== undefined) {
            const p =
                typeof overrides.instanceType === "string"
                    ? instanceTypeProblem(`${where}.instanceType`, overrides.instanceType)
                    : `${where}.instanceType: ${show(overrides.instanceType)} is not an EC2 instance type (e.g. t3.small)`;
            if (p) {
                problems.push(p);
                ok = false;
            } else {
                hostType = overrides.instanceType as string;
            }
        }
        let hostVolume = rootVolumeGiB;
        if (overrides.rootVolumeGiB !== undefined) {
            const v = integer(`${where}.rootVolumeGiB`, String(overrides.rootVolumeGiB), LIMITS.rootVolumeGiB.min, LIMITS.rootVolumeGiB.max);
            if (v === undefined) ok = false;
            else hostVolume = v;
        }
        let flakeAttr = name;
        if (overrides.flakeAttr !== undefined) {
            if (typeof overrides.flakeAttr !== "string" || !FLAKE_ATTR.test(overrides.flakeAttr)) {
                problems.push(`${where}.flakeAttr: ${show(overrides.flakeAttr)} is not a Nix attribute name (letters, digits, _, ', -; not starting with a digit)`);
                ok = false;
            } else {
                flakeAttr = overrides.flakeAttr;
            }
        }
        const architecture = architectureOf(hostType);
        if (ok && architecture !== undefined) {
            hosts.push({ name, flakeAttr, instanceType: hostType, rootVolumeGiB: hostVolume, architecture, nixSystem: nixSystemOf(architecture) });
        }
    };

    const hostsText = value("hosts");
    if (hostsText === undefined) {
        if (HOST_NAME.test(stack)) {
            host(stack, {}, key("hosts"));
        } else {
            problems.push(
                `${key("hosts")}: not set, and the stack name ${show(stack)} is not a host name ([a-z][a-z0-9-]{0,30}); ` +
                    `set ${key("hosts")} to name the hosts, e.g. {"web": {}}`,
            );
        }
    } else {
        const map = json(hostsText);
        if (typeof map !== "object" || map === null || Array.isArray(map)) {
            problems.push(`${key("hosts")}: ${hostsText} is not an object; allowed: a map of host name to overrides, e.g. {"web": {"instanceType": "t3.medium"}}`);
        } else if (Object.keys(map).length === 0) {
            problems.push(`${key("hosts")}: {} names no host; allowed: a map of at least one host name to overrides, e.g. {"web": {}}`);
        } else {
            for (const [name, overrides] of Object.entries(map as Record<string, unknown>)) {
                const where = `${key("hosts")}.${name}`;
                if (!HOST_NAME.test(name)) {
                    problems.push(`${key("hosts")}: host name ${show(name)} is not allowed; allowed: [a-z][a-z0-9-]{0,30} (a DNS label)`);
                } else if (overrides === null || typeof overrides !== "object" || Array.isArray(overrides)) {
                    problems.push(`${where}: ${show(overrides)} is not an object; allowed: {} or overrides of ${HOST_OVERRIDE_KEYS.join(", ")}`);
                } else {
                    host(name, overrides as Record<string, unknown>, where);
                }
            }
        }
    }

    if (problems.length > 0) throw new ConfigError(stack, problems);

    return {
        stack,
        region: region as string,
        sshAllowedCidrs,
        nixosRelease,
        ami,
        elasticIp,
        terminationProtection,
        vpcId,
        subnetId,
        publicTcpPorts: network.publicTcpPorts,
        hosts,
        deploy: { connectTimeoutSeconds, rollbackTimeoutSeconds, allowFailedUnits },
    };
}
