import * as pulumi from "@pulumi/pulumi";
import { Alias } from "@pulumi/aws/kms/alias";
import { Key } from "@pulumi/aws/kms/key";
import { Bucket } from "@pulumi/aws/s3/bucket";
import { BucketLifecycleConfiguration } from "@pulumi/aws/s3/bucketLifecycleConfiguration";
import { BucketPolicy } from "@pulumi/aws/s3/bucketPolicy";
import { BucketPublicAccessBlock } from "@pulumi/aws/s3/bucketPublicAccessBlock";
import { BucketServerSideEncryptionConfiguration } from "@pulumi/aws/s3/bucketServerSideEncryptionConfiguration";
import { BucketVersioning } from "@pulumi/aws/s3/bucketVersioning";
import { RandomString } from "@pulumi/random/randomString";

/** Older versions of state files are kept this long, for recovering from a bad `pulumi up`. */
const NONCURRENT_VERSION_DAYS = 90;
const INCOMPLETE_UPLOAD_DAYS = 7;
/** The longest waiting period KMS allows: a mistaken deletion can be cancelled for 30 days. */
const KEY_DELETION_WINDOW_DAYS = 30;

export interface StateStoreArgs {
    /** Stack name; part of the bucket name and the key alias. */
    readonly stack: string;
    /** AWS region, for the backend and secrets-provider URLs. */
    readonly region: pulumi.Input<string>;
    /** Tags of the bucket and the key. */
    readonly tags: pulumi.Input<Record<string, pulumi.Input<string>>>;
}

/**
 * The S3 bucket and KMS key that hold this stack's Pulumi state and encrypt its secrets.
 * Everything here is protected and retained: `pulumi destroy --exclude-protected` removes the
 * hosts and keeps the state, and nothing here can be deleted by accident.
 */
export class StateStore extends pulumi.ComponentResource {
    /** `s3://<bucket>?region=<region>`, for `pulumi login`. */
    public readonly backendUrl: pulumi.Output<string>;
    /** `awskms://alias/nixos-ec2-<stack>?region=<region>`, for `pulumi stack change-secrets-provider`. */
    public readonly secretsProvider: pulumi.Output<string>;
    public readonly bucketName: pulumi.Output<string>;
    public readonly keyArn: pulumi.Output<string>;

    constructor(name: string, args: StateStoreArgs, opts?: pulumi.ComponentResourceOptions) {
        super("nixos-ec2:index:StateStore", name, args, opts);
        const keep = { parent: this, protect: true, retainOnDelete: true };

        const key = new Key(
            `${name}-key`,
            {
                description: `nixos-ec2 ${args.stack}: Pulumi state bucket encryption and secrets provider`,
                enableKeyRotation: true,
                deletionWindowInDays: KEY_DELETION_WINDOW_DAYS,
                tags: args.tags,
            },
            keep,
        );
        const aliasName = `alias/nixos-ec2-${args.stack}`;
        new Alias(`${name}-key-alias`, { name: aliasName, targetKeyId: key.keyId }, keep);

        // The suffix is part of the bucket's name: losing it would rename, and so replace, the bucket.
        const suffix = new RandomString(`${name}-suffix`, { length: 8, special: false, upper: false }, keep);
        const bucket = new Bucket(
            `${name}-bucket`,
            { bucket: pulumi.interpolate`nixos-ec2-state-${args.stack}-${suffix.result}`, forceDestroy: false, tags: args.tags },
            keep,
        );

        const versioning = new BucketVersioning(
            `${name}-versioning`,
            { bucket: bucket.id, versioningConfiguration: { status: "Enabled" } },
            keep,
        );
        new BucketServerSideEncryptionConfiguration(
            `${name}-encryption`,
            {
                bucket: bucket.id,
                rules: [{ applyServerSideEncryptionByDefault: { sseAlgorithm: "aws:kms", kmsMasterKeyId: key.arn }, bucketKeyEnabled: true }],
            },
            keep,
        );
        const publicAccess = new BucketPublicAccessBlock(
            `${name}-public-access`,
            { bucket: bucket.id, blockPublicAcls: true, blockPublicPolicy: true, ignorePublicAcls: true, restrictPublicBuckets: true },
            keep,
        );
        new BucketPolicy(
            `${name}-tls-only`,
            {
                bucket: bucket.id,
                policy: pulumi.jsonStringify({
                    Version: "2012-10-17",
                    Statement: [
                        {
                            Sid: "DenyRequestsWithoutTls",
                            Effect: "Deny",
                            Principal: "*",
                            Action: "s3:*",
                            Resource: [bucket.arn, pulumi.interpolate`${bucket.arn}/*`],
                            Condition: { Bool: { "aws:SecureTransport": "false" } },
                        },
                    ],
                }),
            },
            // S3 rejects concurrent changes to a bucket's access settings.
            { ...keep, dependsOn: [publicAccess] },
        );
        new BucketLifecycleConfiguration(
            `${name}-lifecycle`,
            {
                bucket: bucket.id,
                rules: [
                    {
                        id: "expire-old-state-versions",
                        status: "Enabled",
                        filter: {},
                        noncurrentVersionExpiration: { noncurrentDays: NONCURRENT_VERSION_DAYS },
                        abortIncompleteMultipartUpload: { daysAfterInitiation: INCOMPLETE_UPLOAD_DAYS },
                    },
                ],
            },
            // Noncurrent-version rules need versioning in place first.
            { ...keep, dependsOn: [versioning] },
        );

        this.bucketName = bucket.bucket;
        this.keyArn = key.arn;
        this.backendUrl = pulumi.interpolate`s3://${bucket.bucket}?region=${args.region}`;
        this.secretsProvider = pulumi.interpolate`awskms://${aliasName}?region=${args.region}`;
        this.registerOutputs({
            backendUrl: this.backendUrl,
            secretsProvider: this.secretsProvider,
            bucketName: this.bucketName,
            keyArn: this.keyArn,
        });
    }
}
