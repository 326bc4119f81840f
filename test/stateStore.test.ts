import { OfflineRun } from "../lib/offline";
import { childrenOf, runProgram } from "./support/program";

describe("StateStore", () => {
    let run: OfflineRun;
    beforeAll(async () => {
        run = await runProgram("staging");
    });
    const byType = (type: string) => childrenOf(run, "nixos-ec2:index:StateStore", "state").filter((c) => c.type === type);
    const one = (type: string) => {
        const found = byType(type);
        expect(found).toHaveLength(1);
        return found[0];
    };
    const tags = { Project: "nixos-ec2", Stack: "staging" };

    it("creates exactly the bucket, its settings, the key and its alias, and the name suffix", () => {
        expect(childrenOf(run, "nixos-ec2:index:StateStore", "state").map((c) => c.type).sort()).toEqual([
            "aws:kms/alias:Alias",
            "aws:kms/key:Key",
            "aws:s3/bucket:Bucket",
            "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration",
            "aws:s3/bucketPolicy:BucketPolicy",
            "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock",
            "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
            "aws:s3/bucketVersioning:BucketVersioning",
            "random:index/randomString:RandomString",
        ]);
    });

    it("names the bucket nixos-ec2-state-<stack>-<random suffix>", () => {
        const suffix = one("random:index/randomString:RandomString");
        expect(suffix.inputs).toEqual({ length: 8, special: false, upper: false });
        const bucket = one("aws:s3/bucket:Bucket");
        expect(bucket.inputs).toEqual({ bucket: expect.stringMatching(/^nixos-ec2-state-staging-[a-z0-9]{8}$/), forceDestroy: false, tags });
        expect(bucket.dependencies).toContain(suffix.urn);
    });

    it("turns on versioning, SSE-KMS with a bucket key, all four public-access blocks", () => {
        const bucket = one("aws:s3/bucket:Bucket");
        const key = one("aws:kms/key:Key");
        expect(one("aws:s3/bucketVersioning:BucketVersioning").inputs).toEqual({ bucket: bucket.inputs.bucket, versioningConfiguration: { status: "Enabled" } });
        const encryption = one("aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration");
        expect(encryption.inputs).toEqual({
            bucket: bucket.inputs.bucket,
            rules: [{ applyServerSideEncryptionByDefault: { sseAlgorithm: "aws:kms", kmsMasterKeyId: expect.any(String) }, bucketKeyEnabled: true }],
        });
        expect(encryption.dependencies).toContain(key.urn);
        expect(one("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock").inputs).toEqual({
            bucket: bucket.inputs.bucket,
            blockPublicAcls: true,
            blockPublicPolicy: true,
            ignorePublicAcls: true,
            restrictPublicBuckets: true,
        });
    });

    it("denies every request made without TLS", () => {
        const bucket = one("aws:s3/bucket:Bucket");
        const policy = one("aws:s3/bucketPolicy:BucketPolicy");
        const arn = `arn:aws:s3:::${bucket.inputs.bucket}`;
        expect(JSON.parse(policy.inputs.policy as string)).toEqual({
            Version: "2012-10-17",
            Statement: [
                {
                    Sid: "DenyRequestsWithoutTls",
                    Effect: "Deny",
                    Principal: "*",
                    Action: "s3:*",
                    Resource: [arn, `${arn}/*`],
                    Condition: { Bool: { "aws:SecureTransport": "false" } },
                },
            ],
        });
    });

    it("expires noncurrent versions after 90 days and aborts incomplete uploads after 7", () => {
        const lifecycle = one("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration");
        expect(lifecycle.inputs.rules).toEqual([
            {
                id: "expire-old-state-versions",
                status: "Enabled",
                filter: {},
                noncurrentVersionExpiration: { noncurrentDays: 90 },
                abortIncompleteMultipartUpload: { daysAfterInitiation: 7 },
            },
        ]);
        expect(lifecycle.dependencies).toContain(one("aws:s3/bucketVersioning:BucketVersioning").urn);
    });

    it("creates a rotating KMS key with the alias alias/nixos-ec2-<stack>", () => {
        const key = one("aws:kms/key:Key");
        expect(key.inputs).toEqual({
            description: "nixos-ec2 staging: Pulumi state bucket encryption and secrets provider",
            enableKeyRotation: true,
            deletionWindowInDays: 30,
            tags,
        });
        const alias = one("aws:kms/alias:Alias");
        expect(alias.inputs).toEqual({ name: "alias/nixos-ec2-staging", targetKeyId: expect.any(String) });
        expect(alias.dependencies).toContain(key.urn);
    });

    it("protects and retains everything, so destroy never loses state", () => {
        const children = childrenOf(run, "nixos-ec2:index:StateStore", "state");
        for (const child of children) {
            expect([child.name, child.protect, child.retainOnDelete]).toEqual([child.name, true, true]);
        }
    });

    it("exports the backend URL and the secrets provider", () => {
        const bucket = one("aws:s3/bucket:Bucket");
        expect(run.outputs.backendUrl).toBe(`s3://${bucket.inputs.bucket}?region=eu-central-1`);
        expect(run.outputs.secretsProvider).toBe("awskms://alias/nixos-ec2-staging?region=eu-central-1");
    });
});
