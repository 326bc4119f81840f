/**
 * Runs the real program in-process under Pulumi's mock runtime: no CLI, no cloud, no network.
 * It records every resource the program registers (with its parent, inputs, dependencies and
 * options), every data-source call, and the stack outputs. The offline preview, the tests and the
 * benchmark all run the program through here.
 *
 * Cloud-assigned values (IDs, addresses, a looked-up AMI) come back as readable placeholders
 * that say what they will be; the deploy's output stays unknown, as in a real preview.
 */
import { createHash } from "node:crypto";
import * as path from "node:path";
import type * as PulumiModule from "@pulumi/pulumi";
import { ageRecipientOf } from "./age";
import { NIXOS_AMI_OWNER } from "./config";
import { ed25519PublicKeyOfSeed, formatEd25519PrivateKey, formatEd25519PublicKey } from "./opensshKey";
import { PROJECT_DIR, StackConfig } from "./stacks";

/** What an output that only a real deploy can know reads as. */
export const UNKNOWN = "(known after deploy)";

/** A secret value: it never prints, whatever prints it. Its `value` is there for assertions. */
export class SecretValue {
    constructor(readonly value: unknown) {}
    toJSON(): string {
        return "[secret]";
    }
    toString(): string {
        return "[secret]";
    }
    [Symbol.for("nodejs.util.inspect.custom")](): string {
        return "[secret]";
    }
}

export interface RecordedResource {
    readonly urn: string;
    readonly type: string;
    readonly name: string;
    /** URN of the parent; "" for top-level resources. */
    readonly parent: string;
    readonly custom: boolean;
    /** Inputs as registered; secret values are SecretValue. */
    readonly inputs: Record<string, unknown>;
    /** URNs this resource depends on (explicit and through its inputs). */
    readonly dependencies: string[];
    readonly protect: boolean;
    readonly retainOnDelete: boolean;
    readonly ignoreChanges: string[];
    /** Earlier names the resource answers to (alias URNs and alias specs, as JSON). */
    readonly aliases: string[];
}

export interface RecordedInvoke {
    readonly token: string;
    readonly args: Record<string, unknown>;
}

export interface OfflineRun {
    readonly stack: string;
    /** In registration order. */
    readonly resources: RecordedResource[];
    readonly invokes: RecordedInvoke[];
    /** Data-source tokens the mocks do not answer: a program change that needs a new mock. */
    readonly unmockedInvokes: string[];
    /** Stack outputs, resolved; secrets are SecretValue, unknowns are UNKNOWN. */
    readonly outputs: Record<string, unknown>;
    /**
     * Values the mocks made up for what a provider generates at deploy (a key's public half, a
     * random suffix, an auto-generated name), each to what it stands for: "public key of ssh-admin".
     * The program needs well-formed values to run; a preview shows what they stand for instead.
     */
    readonly standIns: Record<string, string>;
    /** What the program logged with `pulumi.log.warn`, in order. */
    readonly warnings: string[];
    /**
     * What the program logged with `pulumi.log.info`, in order, with the name of the resource it
     * was logged on. Not printed: the preview says the same in its own sections.
     */
    readonly notes: { readonly resource?: string; readonly message: string }[];
}

export interface OfflineOptions {
    readonly stack: string;
    /** Full keys (`nixos-ec2:hosts`, `aws:region`) to config strings, e.g. from loadStackConfig. */
    readonly config: StackConfig;
    /** The keys of `config` whose values are secrets (`pulumi config set --secret`). */
    readonly secretKeys?: readonly string[];
    /** The program module; the project's index.ts by default. */
    readonly program?: string;
    /** Receives each resource as it registers, so a caller sees them even when the program throws. */
    readonly onResource?: (resource: RecordedResource) => void;
    /**
     * Receives each warning the program logs. By default it is printed as the SDK prints a warning
     * outside an engine (`warning: [runtime] ...` on stderr), which is what `npm run preview` shows.
     */
    readonly onWarning?: (message: string) => void;
}

const AMI_TOKEN = "aws:ec2/getAmi:getAmi";

function digest(text: string, length: number): string {
    return createHash("sha256").update(text).digest("hex").slice(0, length);
}

/**
 * A real ED25519 key pair in OpenSSH's formats, the same for the same resource name: a stand-in for
 * what tls.PrivateKey generates, which the program derives from (the host's age recipient). Fake
 * only in that anyone can compute it from the name.
 */
export function fakeKeyPair(name: string): { publicKey: string; privateKey: string } {
    const seed = createHash("sha256").update(`seed:${name}`).digest();
    const check = createHash("sha256").update(`check:${name}`).digest().readUInt32BE(0);
    return { publicKey: `${formatEd25519PublicKey(ed25519PublicKeyOfSeed(seed))}\n`, privateKey: formatEd25519PrivateKey(seed, check) };
}

function amiDescription(args: Record<string, unknown>): string {
    const filters = (args.filters as Array<{ name: string; values: string[] }> | undefined) ?? [];
    const filter = (n: string) => filters.find((f) => f.name === n)?.values.join("|") ?? "?";
    const owners = ((args.owners as string[] | undefined) ?? []).join("|");
    return `(looked up at deploy: newest AMI of owner ${owners} named ${filter("name")} for ${filter("architecture")})`;
}

/**
 * Outputs of each resource type, as the provider would return them after create. Made-up values
 * that stand for generated ones are recorded in `standIns`.
 */
function mockState(
    type: string,
    name: string,
    inputs: Record<string, unknown>,
    unknown: string,
    standIns: Record<string, string>,
): Record<string, unknown> {
    const after = (what: string) => `(known after deploy: ${what})`;
    const standIn = (value: string, what: string) => {
        standIns[value] = what;
        return value;
    };
    switch (type) {
        case "tls:index/privateKey:PrivateKey": {
            const { publicKey, privateKey } = fakeKeyPair(name);
            standIn(publicKey.trim(), `public key of ${name}`);
            standIn(ageRecipientOf(publicKey), `age recipient of ${name}`);
            return { ...inputs, publicKeyOpenssh: publicKey, privateKeyOpenssh: privateKey };
        }
        case "random:index/randomBytes:RandomBytes": {
            const bytes = createHash("sha512").update(`bytes:${name}`).digest().subarray(0, Number(inputs.length ?? 32));
            return { ...inputs, hex: bytes.toString("hex"), base64: bytes.toString("base64") };
        }
        case "random:index/randomString:RandomString": {
            const result = digest(`suffix:${name}`, Number(inputs.length ?? 8)).replace(/[^a-z0-9]/g, "a");
            return { ...inputs, result: standIn(result, `random string of ${name}`) };
        }
        case "aws:ec2/keyPair:KeyPair":
            return {
                ...inputs,
                keyName: inputs.keyName ?? standIn(`${name}-${digest(name, 7)}`, `name of ${name}`),
                arn: after("key pair ARN"),
            };
        case "aws:ec2/securityGroup:SecurityGroup":
            return { ...inputs, arn: after("security group ARN") };
        case "aws:ec2/instance:Instance":
            return { ...inputs, publicIp: after(`public IP of ${name}`), publicDns: after(`public DNS of ${name}`), arn: after("instance ARN") };
        case "aws:ec2/eip:Eip":
            return { ...inputs, publicIp: after(`Elastic IP of ${name}`), publicDns: after(`Elastic IP DNS of ${name}`) };
        case "aws:kms/key:Key":
            return { ...inputs, arn: after("KMS key ARN"), keyId: after("KMS key ID") };
        case "aws:s3/bucket:Bucket":
            return { ...inputs, arn: `arn:aws:s3:::${inputs.bucket}` };
        case "command:local:Command":
            return { ...inputs, stdout: unknown, stderr: unknown };
        default:
            return { ...inputs };
    }
}

/** Resource IDs: readable placeholders except where the ID is a name the program chose. */
function mockId(type: string, name: string, inputs: Record<string, unknown>): string {
    if (type === "aws:s3/bucket:Bucket") return String(inputs.bucket);
    return `(known after deploy: id of ${name})`;
}

const SECRET_SIG_KEY = "4dabf18193072939515e22adb298388d";
const SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270";

/** Replace the runtime's secret markers with SecretValue, recursively. */
function markSecrets(value: unknown): unknown {
    if (Array.isArray(value)) return value.map(markSecrets);
    if (value !== null && typeof value === "object") {
        const o = value as Record<string, unknown>;
        if (o[SECRET_SIG_KEY] === SECRET_SIG) return new SecretValue(markSecrets(o.value));
        return Object.fromEntries(Object.entries(o).map(([k, v]) => [k, markSecrets(v)]));
    }
    return value;
}

type AnyOutput = { promise(): Promise<unknown>; isKnown: Promise<boolean>; isSecret: Promise<boolean> };

async function resolveOutputs(pulumi: typeof PulumiModule, value: unknown): Promise<unknown> {
    if (pulumi.Output.isInstance(value)) {
        const o = value as unknown as AnyOutput;
        const [known, secret, inner] = await Promise.all([o.isKnown, o.isSecret, o.promise()]);
        const resolved = known ? await resolveOutputs(pulumi, inner) : UNKNOWN;
        return secret ? new SecretValue(resolved) : resolved;
    }
    if (Array.isArray(value)) return Promise.all(value.map((v) => resolveOutputs(pulumi, v)));
    if (value !== null && typeof value === "object" && !(value instanceof SecretValue)) {
        const entries = await Promise.all(Object.entries(value).map(async ([k, v]) => [k, await resolveOutputs(pulumi, v)] as const));
        return Object.fromEntries(entries);
    }
    return value;
}

/**
 * Run the program once. Load it in a fresh module registry per run (a new process, or
 * jest.isolateModulesAsync): the Pulumi SDK keeps its state per loaded copy.
 */
export async function runOffline(options: OfflineOptions): Promise<OfflineRun> {
    // Loaded here, not at the top, so that the caller's module registry decides which copy runs.
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const pulumi: typeof PulumiModule = require("@pulumi/pulumi");
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const rpc = require("@pulumi/pulumi/runtime/rpc");

    const resources: RecordedResource[] = [];
    const invokes: RecordedInvoke[] = [];
    const unmockedInvokes: string[] = [];
    const standIns: Record<string, string> = {};
    const warnings: string[] = [];
    const notes: { resource?: string; message: string }[] = [];

    await pulumi.runtime.setMocks(
        {
            newResource: (args) => ({
                id: mockId(args.type, args.name, args.inputs),
                state: mockState(args.type, args.name, args.inputs, rpc.unknownValue, standIns),
            }),
            call: (args) => {
                invokes.push({ token: args.token, args: args.inputs });
                if (args.token === AMI_TOKEN) {
                    const owners = args.inputs.owners as string[] | undefined;
                    return { id: amiDescription(args.inputs), owners: owners ?? [NIXOS_AMI_OWNER] };
                }
                unmockedInvokes.push(args.token);
                return {};
            },
        },
        "nixos-ec2",
        options.stack,
        // A dry run, as `pulumi preview` is: unknown values stay unknown instead of reaching apply().
        true,
    );
    pulumi.runtime.setAllConfig(options.config, [...(options.secretKeys ?? [])]);

    // The mock monitor hands `newResource` no parent, dependencies or options: record them here.
    const monitor = pulumi.runtime.getMonitor() as unknown as {
        registerResource(req: any, callback: (err: unknown, resp: any) => void): void;
    };
    const register = monitor.registerResource.bind(monitor);
    monitor.registerResource = (req, callback) =>
        register(req, (err, resp) => {
            if (!err) {
                const recorded: RecordedResource = {
                    urn: resp.getUrn(),
                    type: req.getType(),
                    name: req.getName(),
                    parent: req.getParent(),
                    custom: req.getCustom(),
                    inputs: markSecrets(rpc.deserializeProperties(req.getObject())) as Record<string, unknown>,
                    dependencies: [...req.getDependenciesList()].sort(),
                    protect: Boolean(req.getProtect()),
                    retainOnDelete: Boolean(req.getRetainondelete()),
                    ignoreChanges: [...req.getIgnorechangesList()],
                    aliases: [
                        ...req.getAliasurnsList(),
                        ...req.getAliasesList().map((a: { toObject(): unknown }) => JSON.stringify(a.toObject())),
                    ],
                };
                resources.push(recorded);
                options.onResource?.(recorded);
            }
            callback(err, resp);
        });

    // The program's warnings (lib/readSettings.ts) are recorded for the caller, and printed unless it takes them.
    const log = pulumi.log as { warn: typeof pulumi.log.warn; info: typeof pulumi.log.info };
    const printWarning = log.warn;
    log.warn = (message, ...rest) => {
        warnings.push(message);
        if (options.onWarning) {
            options.onWarning(message);
            return Promise.resolve();
        }
        return printWarning(message, ...rest);
    };
    log.info = (message, resource) => {
        notes.push({ resource: (resource as { __name?: string } | undefined)?.__name, message });
        return Promise.resolve();
    };

    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const program = require(options.program ?? path.join(PROJECT_DIR, "index.ts")) as Record<string, unknown>;
    const exported = Object.fromEntries(Object.entries(program).filter(([k]) => k !== "__esModule" && k !== "default"));
    const outputs = (await resolveOutputs(pulumi, exported)) as Record<string, unknown>;
    await (pulumi.runtime as unknown as { waitForRPCs(): Promise<void> }).waitForRPCs();

    return { stack: options.stack, resources, invokes, unmockedInvokes, outputs, standIns, warnings, notes };
}
