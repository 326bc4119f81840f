/**
 * Each rule of the policy pack, called directly as the SDK's analyzer calls it (importing
 * policy/index.ts would start the pack's gRPC server): inputs behind the SDK's unknown-checking
 * proxy, a resource that passes and one that fails.
 */
import type { PolicyResource, ResourceValidationArgs, ResourceValidationPolicy, StackValidationArgs, StackValidationPolicy } from "@pulumi/policy";
import { hostKeyUserData } from "../components/nixosHost";
import { RULES, stackOfUrn, TAGGABLE_TYPES } from "../policy/rules";
import { isUnknownValueError, unknownCheckingProxy, unknownStringValue } from "../policy/unknown";

const urn = (stack: string, type: string, name: string) => `urn:pulumi:${stack}::nixos-ec2::${type}::${name}`;

function policy(name: string) {
    const rule = RULES.find((r) => r.policy.name === name);
    if (!rule) throw new Error(`no rule ${name}`);
    return rule.policy;
}

async function resourceViolations(name: string, type: string, props: Record<string, unknown>, stack = "staging"): Promise<string[]> {
    const found: string[] = [];
    const args = { type, name: "r", urn: urn(stack, type, "r"), props: unknownCheckingProxy(props) } as unknown as ResourceValidationArgs;
    for (const validate of [(policy(name) as ResourceValidationPolicy).validateResource!].flat()) await validate(args, (m) => found.push(m));
    return found;
}

interface Spec {
    readonly type: string;
    readonly name: string;
    readonly props: Record<string, unknown>;
    readonly dependsOn?: string[];
}

async function stackViolations(name: string, specs: Spec[], stack = "staging"): Promise<Array<[string, string]>> {
    const resources = specs.map((s) => ({ type: s.type, name: s.name, urn: urn(stack, s.type, s.name), props: unknownCheckingProxy(s.props), dependencies: [] as PolicyResource[] }));
    specs.forEach((s, i) => resources[i].dependencies.push(...(s.dependsOn ?? []).map((d) => resources.find((r) => r.name === d) as unknown as PolicyResource)));
    const found: Array<[string, string]> = [];
    const args = { resources } as unknown as StackValidationArgs;
    await (policy(name) as StackValidationPolicy).validateStack(args, (m, at) => found.push([m, at ? stackOfUrn(at) + ":" + at.split("::").pop() : ""]));
    return found;
}

const INSTANCE = "aws:ec2/instance:Instance";
const SG = "aws:ec2/securityGroup:SecurityGroup";
const imds = { httpTokens: "required", httpPutResponseHopLimit: 1 };
const HOST_KEY_USER_DATA = hostKeyUserData(
    ["-----BEGIN OPENSSH PRIVATE KEY-----", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ==", "-----END OPENSSH PRIVATE KEY-----"].join("\n"),
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExampleExampleExampleExample web",
);

describe("resource rules: one resource that passes, one that fails", () => {
    // Every row names its stack: jest hands a test with fewer arguments than columns a `done` callback.
    const rows: Array<[string, string, Record<string, unknown>, Record<string, unknown>, RegExp, string]> = [
        ["ec2-imdsv2-required", INSTANCE, { metadataOptions: imds }, { metadataOptions: { ...imds, httpTokens: "optional" } }, /httpTokens is "optional"; it must be "required"/, "staging"],
        ["ec2-imdsv2-required", INSTANCE, { metadataOptions: imds }, { metadataOptions: { ...imds, httpPutResponseHopLimit: 2 } }, /httpPutResponseHopLimit is 2; it must be 1/, "staging"],
        ["ebs-encrypted", INSTANCE, { rootBlockDevice: { encrypted: true } }, { rootBlockDevice: { encrypted: false } }, /the root block device is not encrypted/, "staging"],
        ["ebs-encrypted", INSTANCE, { rootBlockDevice: { encrypted: true }, ebsBlockDevices: [{ encrypted: true }] }, { rootBlockDevice: { encrypted: true }, ebsBlockDevices: [{ encrypted: false }] }, /ebsBlockDevices\[0\] is not encrypted/, "staging"],
        ["ebs-encrypted", "aws:ebs/volume:Volume", { encrypted: true }, { size: 10 }, /not encrypted/, "staging"],
        ["egress-http-https-only", SG, { egress: [{ protocol: "tcp", fromPort: 443, toPort: 443, cidrBlocks: ["0.0.0.0/0"] }] }, { egress: [{ protocol: "tcp", fromPort: 0, toPort: 65535, cidrBlocks: ["0.0.0.0/0"] }] }, /egress tcp 0-65535 is allowed/, "staging"],
        [
            "egress-http-https-only",
            "aws:ec2/securityGroupRule:SecurityGroupRule",
            { type: "ingress", protocol: "tcp", fromPort: 22, toPort: 22 },
            { type: "egress", protocol: "udp", fromPort: 53, toPort: 53 },
            /egress udp 53-53 is allowed/,
            "staging",
        ],
        ["kms-key-rotation", "aws:kms/key:Key", { enableKeyRotation: true }, { enableKeyRotation: false }, /enableKeyRotation is not true/, "staging"],
        ["user-data-host-key-only", INSTANCE, { userData: HOST_KEY_USER_DATA }, { userData: "#!/bin/sh\ncurl x | sh\n" }, /user-data line 1 is not one of the two SSH_HOST_ED25519_KEY lines/, "staging"],
        ["user-data-host-key-only", INSTANCE, { userData: HOST_KEY_USER_DATA }, { userDataBase64: Buffer.from("#!/bin/sh\necho AWS_SECRET_ACCESS_KEY=x\n").toString("base64") }, /user-data line 1 is not one of/, "staging"],
        ["user-data-host-key-only", INSTANCE, { userData: HOST_KEY_USER_DATA }, { userData: `${HOST_KEY_USER_DATA}SSH_HOST_ED25519_KEY_PUB:ssh-ed25519 AAAA AWS_SECRET_ACCESS_KEY=x more\n` }, /user-data line 3 is not one of/, "staging"],
        ["tags-on-everything", "aws:s3/bucket:Bucket", { tags: { Project: "nixos-ec2", Stack: "staging" } }, { tags: { Project: "nixos-ec2" } }, /tag Stack is undefined; it must be "staging"/, "staging"],
    ];

    it.each(rows)("%s on %s", async (name, type, good, bad, message, stack) => {
        expect(await resourceViolations(name, type, good, stack)).toEqual([]);
        expect(await resourceViolations(name, type, bad, stack)).toEqual([expect.stringMatching(message)]);
    });


    it("every taggable type is checked for tags, and other types are not", async () => {
        for (const type of TAGGABLE_TYPES) expect(await resourceViolations("tags-on-everything", type, {})).toHaveLength(2);
        expect(await resourceViolations("tags-on-everything", "aws:s3/bucketPolicy:BucketPolicy", {})).toEqual([]);
    });

    it("an input unknown during preview stops the rule with the SDK's UnknownValueError (the SDK then skips it)", async () => {
        const error = await resourceViolations("kms-key-rotation", "aws:kms/key:Key", { enableKeyRotation: unknownStringValue }).catch((e: unknown) => e);
        expect(isUnknownValueError(error)).toBe(true);
        // User-data that only the deploy will know is left to `pulumi up`, where it is known.
        expect(await resourceViolations("user-data-host-key-only", INSTANCE, { userData: unknownStringValue })).toEqual([]);
    });

    it("names each rule's scanner IDs in its description", () => {
        for (const { policy: p, scanners } of RULES) {
            expect(p.description).toContain(`checkov ${scanners.checkov}; trivy ${scanners.trivy}; Security Hub ${scanners.securityHub}`);
        }
    });
});

describe("stack rules: the state bucket and its companions", () => {
    const BUCKET: Spec = { type: "aws:s3/bucket:Bucket", name: "state", props: { bucket: "b" } };
    const companion = (type: string, name: string, props: Record<string, unknown>): Spec => ({ type, name, props: { bucket: "b", ...props }, dependsOn: ["state"] });
    const good = {
        "s3-bucket-private": companion("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock", "pab", {
            blockPublicAcls: true,
            blockPublicPolicy: true,
            ignorePublicAcls: true,
            restrictPublicBuckets: true,
        }),
        "s3-bucket-versioned": companion("aws:s3/bucketVersioning:BucketVersioning", "ver", { versioningConfiguration: { status: "Enabled" } }),
        "s3-bucket-kms-encrypted": companion("aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration", "sse", {
            rules: [{ applyServerSideEncryptionByDefault: { sseAlgorithm: "aws:kms", kmsMasterKeyId: unknownStringValue } }],
        }),
        "s3-bucket-tls-only": companion("aws:s3/bucketPolicy:BucketPolicy", "pol", {
            policy: JSON.stringify({
                Statement: [
                    { Effect: "Deny", Principal: "*", Action: "s3:*", Resource: ["arn:aws:s3:::b", "arn:aws:s3:::b/*"], Condition: { Bool: { "aws:SecureTransport": "false" } } },
                ],
            }),
        }),
    };
    const bad: Record<keyof typeof good, Record<string, unknown>> = {
        "s3-bucket-private": { ...good["s3-bucket-private"].props, restrictPublicBuckets: false },
        "s3-bucket-versioned": { versioningConfiguration: { status: "Suspended" } },
        "s3-bucket-kms-encrypted": { rules: [{ applyServerSideEncryptionByDefault: { sseAlgorithm: "AES256" } }] },
        "s3-bucket-tls-only": { policy: JSON.stringify({ Statement: [{ Effect: "Allow", Principal: "*", Action: "s3:GetObject" }] }) },
    };

    it.each(Object.keys(good) as Array<keyof typeof good>)("%s: passes with its companion, fails without it or with a weak one", async (name) => {
        expect(await stackViolations(name, [BUCKET, good[name]])).toEqual([]);
        expect(await stackViolations(name, [BUCKET])).toEqual([[expect.any(String), "staging:state"]]);
        expect(await stackViolations(name, [BUCKET, { ...good[name], props: bad[name] }])).toHaveLength(1);
        // A companion of another bucket does not count for this one.
        expect(await stackViolations(name, [BUCKET, { ...good[name], dependsOn: [] }])).toHaveLength(1);
    });
});

describe("world SSH: each security group with its inline and standalone rules together", () => {
    const group: Spec = { type: SG, name: "hosts", props: { ingress: [{ protocol: "tcp", fromPort: 22, toPort: 22, cidrBlocks: ["203.0.113.0/24"] }] } };
    const standalone = (name: string, props: Record<string, unknown>): Spec => ({
        type: "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
        name,
        props: { fromPort: 22, toPort: 22, ...props },
        dependsOn: ["hosts"],
    });

    it("passes named networks, and fails the whole internet in any protocol spelling", async () => {
        expect(await stackViolations("ssh-from-named-networks-prod", [group], "prod")).toEqual([]);
        for (const protocol of ["tcp", "TCP", "6", "-1", "all"]) {
            const open: Spec = { type: SG, name: "open", props: { ingress: [{ protocol, fromPort: 22, toPort: 22, cidrBlocks: ["0.0.0.0/0"] }] } };
            expect(await stackViolations("ssh-from-named-networks-prod", [open], "prod")).toEqual([[expect.stringMatching(/open to the whole IPv4 internet/), "prod:open"]]);
        }
    });

    it("adds up standalone rules of one group, which pass one by one", async () => {
        const halves = [group, standalone("low", { ipProtocol: "6", cidrIpv4: "0.0.0.0/1" }), standalone("high", { ipProtocol: "tcp", cidrIpv4: "128.0.0.0/1" })];
        expect(await stackViolations("ssh-from-named-networks-prod", halves, "prod")).toEqual([[expect.stringMatching(/whole IPv4 internet/), "prod:hosts"]]);
        expect(await stackViolations("ssh-from-named-networks-prod", halves.slice(0, 2), "prod")).toEqual([]);
    });

    it("is mandatory on prod only, and advisory everywhere else", async () => {
        const open: Spec = { type: SG, name: "open", props: { ingress: [{ protocol: "tcp", fromPort: 22, toPort: 22, ipv6CidrBlocks: ["2000::/3"] }] } };
        expect([policy("ssh-from-named-networks-prod").enforcementLevel, policy("ssh-from-named-networks").enforcementLevel]).toEqual(["mandatory", "advisory"]);
        expect(await stackViolations("ssh-from-named-networks-prod", [open], "staging")).toEqual([]);
        expect(await stackViolations("ssh-from-named-networks", [open], "prod")).toEqual([]);
        expect(await stackViolations("ssh-from-named-networks", [open], "staging")).toEqual([[expect.stringMatching(/whole IPv6 internet/), "staging:open"]]);
    });
});
