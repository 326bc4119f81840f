/**
 * The project's security rules as CrossGuard policies. policy/index.ts makes them a policy pack
 * for the real CLI (`pulumi preview --policy-pack policy`); the offline preview runs the same
 * objects against the resources it records (tools/policyCheck.ts). Constructing a PolicyPack
 * starts a gRPC server, so the rules live here, in a module that only describes them.
 *
 * Rules read resources by type token and inputs only (no resource classes), so checking them
 * loads nothing of @pulumi/aws. An input that is unknown during a preview makes the real SDK skip
 * the rule for that resource with an advisory note; the offline check does the same.
 */
import type { EnforcementLevel, PolicyResource, ReportViolation, ResourceValidationPolicy, StackValidationPolicy } from "@pulumi/policy";
import { Network, parseNetwork, wholeInternetCovered } from "../lib/cidr";
import { PRODUCTION_STACK } from "../lib/config";
import { stackTags } from "../lib/tags";
import { isSet, known } from "./unknown";

/** What a scanner calls the same property; "none" where it has no such check. */
export interface ScannerIds {
    readonly checkov: string;
    readonly trivy: string;
    readonly securityHub: string;
}

export interface Rule {
    readonly policy: ResourceValidationPolicy | StackValidationPolicy;
    readonly scanners: ScannerIds;
    /** Why the project holds to it, for the README. */
    readonly why: string;
}

const T = {
    instance: "aws:ec2/instance:Instance",
    volume: "aws:ebs/volume:Volume",
    securityGroup: "aws:ec2/securityGroup:SecurityGroup",
    securityGroupRule: "aws:ec2/securityGroupRule:SecurityGroupRule",
    ingressRule: "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
    egressRule: "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule",
    bucket: "aws:s3/bucket:Bucket",
    publicAccessBlock: "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock",
    versioning: "aws:s3/bucketVersioning:BucketVersioning",
    encryption: "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
    bucketPolicy: "aws:s3/bucketPolicy:BucketPolicy",
    kmsKey: "aws:kms/key:Key",
} as const;

/** AWS resource types that take `tags`, among those a program like this one creates. */
export const TAGGABLE_TYPES = [
    T.instance,
    T.volume,
    T.securityGroup,
    T.ingressRule,
    T.egressRule,
    T.bucket,
    T.kmsKey,
    "aws:ec2/eip:Eip",
    "aws:ec2/keyPair:KeyPair",
    "aws:ec2/vpc:Vpc",
    "aws:ec2/subnet:Subnet",
    "aws:ec2/internetGateway:InternetGateway",
    "aws:ec2/routeTable:RouteTable",
    "aws:ec2/networkInterface:NetworkInterface",
    "aws:ec2/launchTemplate:LaunchTemplate",
    "aws:iam/role:Role",
    "aws:iam/instanceProfile:InstanceProfile",
    "aws:route53/zone:Zone",
    "aws:cloudwatch/logGroup:LogGroup",
];

const SSH_PORT = 22;
const EGRESS_PORTS = [80, 443];

/** The stack a resource belongs to, from its URN (`urn:pulumi:<stack>::<project>::...`). */
export function stackOfUrn(urn: string): string {
    return urn.split("::")[0].split(":")[2] ?? "";
}

function describe(summary: string, scanners: ScannerIds): string {
    return `${summary} (checkov ${scanners.checkov}; trivy ${scanners.trivy}; Security Hub ${scanners.securityHub})`;
}

function resourceRule(
    name: string,
    enforcementLevel: EnforcementLevel,
    summary: string,
    scanners: ScannerIds,
    why: string,
    types: readonly string[],
    check: (props: Record<string, any>, report: ReportViolation, resource: { readonly type: string; readonly urn: string }) => void,
): Rule {
    return {
        scanners,
        why,
        policy: {
            name,
            description: describe(summary, scanners),
            enforcementLevel,
            validateResource: (args, report) => {
                if (types.includes(args.type)) check(args.props, report, args);
            },
        },
    };
}

function stackRule(name: string, summary: string, scanners: ScannerIds, why: string, check: (resources: PolicyResource[], report: ReportViolation) => void): Rule {
    return { scanners, why, policy: { name, description: describe(summary, scanners), enforcementLevel: "mandatory", validateStack: (args, report) => check(args.resources, report) } };
}

// --- Security group rules, inline or standalone ------------------------------------------------

interface IpRule {
    readonly protocol: string;
    readonly fromPort: number;
    readonly toPort: number;
    readonly cidrs: string[];
}

/** The ingress or egress rules of a security group or of a standalone rule resource. */
function ipRules(type: string, props: Record<string, any>, direction: "ingress" | "egress"): IpRule[] {
    const plain = (r: Record<string, any>): IpRule => ({
        protocol: protocolName(r.protocol ?? r.ipProtocol),
        fromPort: Number(r.fromPort ?? 0),
        toPort: Number(r.toPort ?? 65535),
        cidrs: [...(r.cidrBlocks ?? []), ...(r.ipv6CidrBlocks ?? []), ...(r.cidrIpv4 ? [r.cidrIpv4] : []), ...(r.cidrIpv6 ? [r.cidrIpv6] : [])],
    });
    if (type === T.securityGroup) return ((props[direction] ?? []) as Record<string, any>[]).map(plain);
    if (type === T.securityGroupRule) return props.type === direction ? [plain(props)] : [];
    if (type === (direction === "ingress" ? T.ingressRule : T.egressRule)) return [plain(props)];
    return [];
}

/** AWS takes protocol names in any case and IANA numbers: "TCP", "6" and "tcp" are one. */
function protocolName(value: unknown): string {
    const text = String(value ?? "").toLowerCase();
    return ({ "6": "tcp", "17": "udp", "1": "icmp", all: "-1" } as Record<string, string>)[text] ?? text;
}

const allProtocols = (p: string) => p === "-1";
const coversPort = (r: IpRule, port: number) => allProtocols(r.protocol) || (r.protocol === "tcp" && r.fromPort <= port && port <= r.toPort);

/**
 * The security group a resource's ingress rules belong to: the group itself, or for a
 * standalone rule the group it depends on (by its ID when that is known instead).
 */
function groupOf(resource: PolicyResource): string {
    if (resource.type === T.securityGroup) return resource.urn;
    const group = (resource.dependencies ?? []).find((d) => d.type === T.securityGroup);
    return group?.urn ?? `id:${String(known(resource.props, "securityGroupId") ?? resource.urn)}`;
}

/** Per security group, the networks its rules (inline and standalone together) let reach SSH. */
function sshNetworksByGroup(resources: PolicyResource[], prod: boolean): Map<string, { urn: string; networks: Network[] }> {
    const groups = new Map<string, { urn: string; networks: Network[] }>();
    for (const r of resources) {
        if (!SG_TYPES.includes(r.type) || (stackOfUrn(r.urn) === PRODUCTION_STACK) !== prod) continue;
        const networks = ipRules(r.type, r.props, "ingress")
            .filter((rule) => coversPort(rule, SSH_PORT))
            .flatMap((rule) => rule.cidrs.map(parseNetwork))
            .filter((n): n is Network => typeof n !== "string");
        const key = groupOf(r);
        const entry = groups.get(key) ?? { urn: r.type === T.securityGroup ? r.urn : key.startsWith("id:") ? r.urn : key, networks: [] };
        entry.networks.push(...networks);
        groups.set(key, entry);
    }
    return groups;
}

const SG_TYPES: readonly string[] = [T.securityGroup, T.securityGroupRule, T.ingressRule, T.egressRule];

/**
 * A pack's enforcement level is fixed per rule, so world SSH is two rules: mandatory for the
 * resources of the stack named prod (read from the URN), advisory for every other stack's.
 */
function worldSshRule(prod: boolean): Rule {
    const scanners = { checkov: "CKV_AWS_24", trivy: "AVD-AWS-0107", securityHub: "EC2.13" };
    const summary = prod
        ? `On the stack named ${PRODUCTION_STACK}, no security group opens SSH to the whole internet, counting its inline and standalone rules together`
        : `On stacks other than ${PRODUCTION_STACK}, a security group that opens SSH to the whole internet is reported`;
    return {
        scanners,
        why: "SSH is the way in as root; it is opened to the admins' networks only (nixos-ec2:sshAllowedCidrs).",
        policy: {
            name: prod ? "ssh-from-named-networks-prod" : "ssh-from-named-networks",
            description: describe(summary, scanners),
            enforcementLevel: prod ? "mandatory" : "advisory",
            validateStack: (args, report) => {
                for (const { urn, networks } of sshNetworksByGroup(args.resources, prod).values()) {
                    const families = wholeInternetCovered(networks);
                    if (families.length > 0) report(`SSH (TCP 22) is open to the whole IPv${families.join(" and IPv")} internet; allow only named networks`, urn);
                }
            },
        },
    };
}

// --- S3 companions of a bucket ------------------------------------------------------------------

/** The resources of `type` that configure `bucket` (they depend on it). */
function companions(resources: PolicyResource[], bucket: PolicyResource, type: string): PolicyResource[] {
    return resources.filter((r) => r.type === type && (r.dependencies ?? []).some((d) => d.urn === bucket.urn));
}

function everyBucket(
    resources: PolicyResource[],
    report: ReportViolation,
    type: string,
    ok: (props: Record<string, any>, bucket: PolicyResource) => boolean,
    missing: string,
): void {
    for (const bucket of resources.filter((r) => r.type === T.bucket)) {
        if (!companions(resources, bucket, type).some((c) => ok(c.props, bucket))) report(missing, bucket.urn);
    }
}

/** A policy that denies every S3 action on the bucket and its objects to anyone without TLS, with no other condition. */
function deniesPlainHttp(policyText: unknown, bucketName: unknown): boolean {
    let document: any;
    try {
        document = typeof policyText === "string" ? JSON.parse(policyText) : policyText;
    } catch {
        return false;
    }
    const arn = `arn:aws:s3:::${String(bucketName)}`;
    const statements = Array.isArray(document?.Statement) ? document.Statement : [document?.Statement];
    return statements.some((st: any) => {
        const resources = [st?.Resource].flat();
        const conditions = st?.Condition ?? {};
        return (
            st?.Effect === "Deny" &&
            (st.Principal === "*" || st.Principal?.AWS === "*") &&
            [st.Action].flat().some((a: unknown) => a === "s3:*") &&
            resources.includes(arn) &&
            resources.includes(`${arn}/*`) &&
            Object.keys(conditions).length === 1 &&
            Object.keys(conditions.Bool ?? {}).length === 1 &&
            String(conditions.Bool?.["aws:SecureTransport"]) === "false"
        );
    });
}

/** The host key as components/nixosHost.ts writes it: the private key with its newlines as "|", then the public key. */
const USER_DATA_LINES = [
    /^SSH_HOST_ED25519_KEY:-----BEGIN OPENSSH PRIVATE KEY-----(\|[A-Za-z0-9+/=]+)+\|-----END OPENSSH PRIVATE KEY-----$/,
    /^SSH_HOST_ED25519_KEY_PUB:ssh-ed25519 [A-Za-z0-9+/]+={0,2}( [!-~]+)?$/,
];

function decodeBase64(value: unknown): string | undefined {
    return typeof value === "string" ? Buffer.from(value, "base64").toString("utf8") : undefined;
}

/** The rules, in the order of the README's table. */
export const RULES: Rule[] = [
    resourceRule(
        "ec2-imdsv2-required",
        "mandatory",
        "EC2 instances require IMDSv2 tokens with a hop limit of 1",
        { checkov: "CKV_AWS_79 (hop limit: CKV_AWS_341, launch templates only)", trivy: "AVD-AWS-0028", securityHub: "EC2.8" },
        "User-data holds the host's private key; IMDSv1 and a hop limit above 1 let an SSRF or a container read it.",
        [T.instance],
        (props, report) => {
            const m = props.metadataOptions ?? {};
            if (m.httpTokens !== "required") report(`metadataOptions.httpTokens is ${JSON.stringify(m.httpTokens)}; it must be "required" (IMDSv2)`);
            if (m.httpPutResponseHopLimit !== 1) report(`metadataOptions.httpPutResponseHopLimit is ${JSON.stringify(m.httpPutResponseHopLimit)}; it must be 1`);
        },
    ),
    resourceRule(
        "ebs-encrypted",
        "mandatory",
        "EBS volumes (root, attached and standalone) are encrypted",
        { checkov: "CKV_AWS_8", trivy: "AVD-AWS-0131", securityHub: "EC2.3" },
        "The root volume holds the host's keys and the deploy's secrets.",
        [T.instance, T.volume],
        (props, report) => {
            if (props.rootBlockDevice?.encrypted !== true && props.encrypted !== true) report("the root block device is not encrypted");
            for (const [i, d] of ((props.ebsBlockDevices ?? []) as Record<string, any>[]).entries()) {
                if (d.encrypted !== true) report(`ebsBlockDevices[${i}] is not encrypted`);
            }
        },
    ),
    worldSshRule(true),
    worldSshRule(false),
    resourceRule(
        "egress-http-https-only",
        "mandatory",
        "Security groups let hosts out on TCP 80 and 443 only",
        { checkov: "CKV_AWS_382", trivy: "AVD-AWS-0104 (stricter: any egress to the internet)", securityHub: "none" },
        "A host needs the Nix binary cache, flake inputs and ACME (HTTP/HTTPS); nothing else leaves, which limits what a compromised service can reach.",
        SG_TYPES,
        (props, report, { type }) => {
            for (const r of ipRules(type, props, "egress")) {
                const single = r.protocol === "tcp" && r.fromPort === r.toPort && EGRESS_PORTS.includes(r.fromPort);
                if (!single) report(`egress ${r.protocol} ${r.fromPort}-${r.toPort} is allowed; only TCP 80 and 443 may leave`);
            }
        },
    ),
    stackRule(
        "s3-bucket-private",
        "S3 buckets block every kind of public access",
        { checkov: "CKV_AWS_53, CKV_AWS_54, CKV_AWS_55, CKV_AWS_56", trivy: "AVD-AWS-0086, AVD-AWS-0087, AVD-AWS-0091, AVD-AWS-0093", securityHub: "S3.8" },
        "The state bucket holds every stack's state, secrets included (encrypted).",
        (resources, report) =>
            everyBucket(
                resources,
                report,
                T.publicAccessBlock,
                (p) => p.blockPublicAcls === true && p.blockPublicPolicy === true && p.ignorePublicAcls === true && p.restrictPublicBuckets === true,
                "no BucketPublicAccessBlock with all four settings true",
            ),
    ),
    stackRule(
        "s3-bucket-versioned",
        "S3 buckets keep versions",
        { checkov: "CKV_AWS_21", trivy: "AVD-AWS-0090", securityHub: "S3.14" },
        "A bad `pulumi up` or a deleted checkpoint can be undone from an older version of the state.",
        (resources, report) => everyBucket(resources, report, T.versioning, (p) => p.versioningConfiguration?.status === "Enabled", "versioning is not enabled"),
    ),
    stackRule(
        "s3-bucket-kms-encrypted",
        "S3 buckets encrypt by default with a KMS key",
        { checkov: "CKV_AWS_145", trivy: "AVD-AWS-0132", securityHub: "S3.17" },
        "Reading the state then needs the KMS key too, which is also the stack's secrets provider.",
        (resources, report) =>
            everyBucket(
                resources,
                report,
                T.encryption,
                (p) =>
                    ((p.rules ?? []) as Record<string, any>[]).some(
                        (r) =>
                            String(r.applyServerSideEncryptionByDefault?.sseAlgorithm ?? "").startsWith("aws:kms") &&
                            isSet(r.applyServerSideEncryptionByDefault, "kmsMasterKeyId"),
                    ),
                "no default encryption with a KMS key",
            ),
    ),
    stackRule(
        "s3-bucket-tls-only",
        "S3 bucket policies deny requests without TLS",
        { checkov: "CKV_AWS_379 (only for buckets made public by ACL)", trivy: "none", securityHub: "S3.5" },
        "State and secrets must not cross the network in the clear, whatever client reads them.",
        (resources, report) =>
            everyBucket(resources, report, T.bucketPolicy, (p, bucket) => deniesPlainHttp(p.policy, bucket.props.bucket), 'no bucket policy denying every request to the bucket and its objects with "aws:SecureTransport": "false"'),
    ),
    resourceRule(
        "kms-key-rotation",
        "mandatory",
        "KMS keys rotate every year",
        { checkov: "CKV_AWS_7", trivy: "AVD-AWS-0065", securityHub: "KMS.4" },
        "The key protects the state and the stack's secrets for as long as the stack lives.",
        [T.kmsKey],
        (props, report) => {
            if (props.enableKeyRotation !== true) report("enableKeyRotation is not true");
        },
    ),
    resourceRule(
        "user-data-host-key-only",
        "mandatory",
        "Instance user-data holds nothing but the host's SSH key lines",
        { checkov: "CKV_AWS_46 (AWS credentials in user-data)", trivy: "AVD-AWS-0029 (AWS credentials in user-data)", securityHub: "none" },
        "User-data is readable through the metadata service and by principals allowed ec2:DescribeInstanceAttribute; only the host key, which must be there for SSH to be trusted from the first connection, may be.",
        [T.instance],
        (props, report) => {
            const texts = [known(props, "userData"), decodeBase64(known(props, "userDataBase64"))].filter((t): t is string => typeof t === "string");
            for (const text of texts) {
                const lines = text.split("\n").filter((l) => l !== "");
                const other = lines.findIndex((l, i) => !USER_DATA_LINES.some((re) => re.test(l)) || lines.indexOf(l) !== i);
                if (other >= 0) report(`user-data line ${other + 1} is not one of the two SSH_HOST_ED25519_KEY lines; user-data may hold only the host key`);
                else if (lines.length > 2) report("user-data holds more than the two host key lines");
            }
        },
    ),
    resourceRule(
        "tags-on-everything",
        "advisory",
        `AWS resources that take tags carry ${Object.keys(stackTags("")).join(" and ")}`,
        { checkov: "none", trivy: "none", securityHub: "none" },
        "Cost and ownership: every resource can be traced to its project and stack.",
        TAGGABLE_TYPES,
        (props, report, { urn }) => {
            const expected = stackTags(stackOfUrn(urn));
            for (const [k, v] of Object.entries(expected)) {
                if (props.tags?.[k] !== v) report(`tag ${k} is ${JSON.stringify(props.tags?.[k])}; it must be ${JSON.stringify(v)}`);
            }
        },
    ),
];
