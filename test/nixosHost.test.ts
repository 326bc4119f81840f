import { amiNamePattern, hostKeyUserData, instanceResourceName } from "../components/nixosHost";
import { OfflineRun, RecordedResource, SecretValue } from "../lib/offline";
import { childrenOf, resource, runProgram } from "./support/program";

const INSTANCE = "aws:ec2/instance:Instance";
const EIP = "aws:ec2/eip:Eip";
const SWITCH = "command:local:Command";

interface HostOutputs {
    instanceId: string;
    publicIp: string;
    hostPublicKey: string;
    sshCommand: string;
}
const hostsOf = (run: OfflineRun) => run.outputs.hosts as Record<string, HostOutputs>;
const instances = (run: OfflineRun) => run.resources.filter((r) => r.type === INSTANCE).map((r) => r.name);

describe("NixosHost", () => {
    let staging: OfflineRun;
    let prod: OfflineRun;
    beforeAll(async () => {
        staging = await runProgram("staging");
        prod = await runProgram("prod");
    });

    it("boots the instance with IMDSv2 (hop limit 1), an encrypted gp3 root, monitoring, the firewall and the admin key", () => {
        const instance = resource(staging, INSTANCE, "staging-instance");
        const sg = resource(staging, "aws:ec2/securityGroup:SecurityGroup", "hosts-sg");
        const keyPair = resource(staging, "aws:ec2/keyPair:KeyPair", "ssh-admin");
        const tags = { Project: "nixos-ec2", Stack: "staging", Name: "staging-staging" };
        expect(instance.inputs).toEqual({
            ami: "(looked up at deploy: newest AMI of owner 427812963091 named nixos/26.05* for x86_64)",
            instanceType: "t3.small",
            keyName: expect.any(String),
            vpcSecurityGroupIds: [expect.any(String)],
            associatePublicIpAddress: true,
            metadataOptions: { httpEndpoint: "enabled", httpTokens: "required", httpPutResponseHopLimit: 1 },
            rootBlockDevice: { volumeType: "gp3", volumeSize: 20, encrypted: true, deleteOnTermination: true },
            monitoring: true,
            disableApiTermination: false,
            userData: expect.any(SecretValue),
            tags,
            volumeTags: tags,
        });
        expect(instance.dependencies).toEqual(expect.arrayContaining([sg.urn, keyPair.urn]));
        expect(instance.ignoreChanges).toEqual(["ami"]);
        // Without termination protection there is no forceDestroy either: the inputs above are all.
        expect(instance.inputs).not.toHaveProperty("forceDestroy");
    });

    it("looks the image up by the official owner, the release's name pattern and the architecture", () => {
        expect(staging.invokes).toEqual([
            {
                token: "aws:ec2/getAmi:getAmi",
                args: {
                    owners: ["427812963091"],
                    mostRecent: true,
                    filters: [
                        { name: "name", values: ["nixos/26.05*"] },
                        { name: "architecture", values: ["x86_64"] },
                    ],
                },
            },
        ]);
        expect(staging.unmockedInvokes).toEqual([]);
    });

    it("uses the arm64 image for Graviton hosts, and a pinned AMI as given without a lookup", async () => {
        const arm = await runProgram("staging", { instanceType: "t4g.small", nixosRelease: "25.11" });
        expect(arm.invokes[0].args.filters).toEqual([
            { name: "name", values: ["nixos/25.11*"] },
            { name: "architecture", values: ["arm64"] },
        ]);
        const pinned = await runProgram("staging", { ami: "ami-0123456789abcdef0" });
        expect(pinned.invokes).toEqual([]);
        expect(resource(pinned, INSTANCE, "staging-instance").inputs.ami).toBe("ami-0123456789abcdef0");
    });

    it("puts only the host key lines in user-data, as a secret", () => {
        const instance = resource(staging, INSTANCE, "staging-instance");
        const userData = String((instance.inputs.userData as SecretValue).value);
        const lines = userData.trimEnd().split("\n");
        expect(lines).toHaveLength(2);
        expect(lines[0]).toMatch(/^SSH_HOST_ED25519_KEY:-----BEGIN OPENSSH PRIVATE KEY-----\|[A-Za-z0-9+/=|]+\|-----END OPENSSH PRIVATE KEY-----$/);
        const hosts = staging.outputs.hosts as Record<string, { hostPublicKey: string }>;
        expect(lines[1]).toBe(`SSH_HOST_ED25519_KEY_PUB:${hosts.staging.hostPublicKey}`);
    });

    it("hostKeyUserData joins the key's lines with | exactly as apply-ec2-data splits them", () => {
        const key = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAA\nBBB\n-----END OPENSSH PRIVATE KEY-----\n";
        const data = hostKeyUserData(key, "ssh-ed25519 AAAAkey\n");
        expect(data).toBe("SSH_HOST_ED25519_KEY:-----BEGIN OPENSSH PRIVATE KEY-----|AAA|BBB|-----END OPENSSH PRIVATE KEY-----\nSSH_HOST_ED25519_KEY_PUB:ssh-ed25519 AAAAkey\n");
        // What the NixOS service does: sed 's/|/\n/g; s/SSH_HOST_ED25519_KEY://; t; d'
        const restored = data
            .split("\n")
            .filter((l) => l.startsWith("SSH_HOST_ED25519_KEY:"))
            .map((l) => l.replace(/\|/g, "\n").replace("SSH_HOST_ED25519_KEY:", ""))
            .join("\n");
        expect(`${restored}\n`).toBe(key);
        expect(amiNamePattern("26.05")).toBe("nixos/26.05*");
    });

    it("gives prod an Elastic IP and termination protection, and staging neither", () => {
        // Termination protection stops the console and the AWS CLI; forceDestroy lets this stack
        // still delete the instance when it re-images it (README, "Moving a host to a newer NixOS image").
        expect(resource(prod, INSTANCE, "prod-instance").inputs).toMatchObject({ disableApiTermination: true, forceDestroy: true });
        const eip = resource(prod, "aws:ec2/eip:Eip", "prod-eip");
        expect(eip.inputs).toEqual({ domain: "vpc", instance: expect.any(String), tags: { Project: "nixos-ec2", Stack: "prod" } });
        expect(eip.dependencies).toContain(resource(prod, INSTANCE, "prod-instance").urn);
        expect(staging.resources.filter((r) => r.type === "aws:ec2/eip:Eip")).toEqual([]);
        const hosts = prod.outputs.hosts as Record<string, { publicIp: string }>;
        expect(hosts.prod.publicIp).toBe("(known after deploy: Elastic IP of prod-eip)");
    });

    it("exports the instance, its addresses, its URL, its host key and an SSH command that pins it", () => {
        const hosts = staging.outputs.hosts as Record<string, Record<string, unknown>>;
        const ip = "(known after deploy: public IP of staging-instance)";
        expect(hosts.staging).toEqual({
            flakeAttr: "staging",
            instanceType: "t3.small",
            instanceId: "(known after deploy: id of staging-instance)",
            publicIp: ip,
            publicDns: "(known after deploy: public DNS of staging-instance)",
            url: `http://${ip}/`,
            hostPublicKey: expect.stringMatching(/^ssh-ed25519 /),
            sshCommand:
                `(umask 077; key=$(mktemp) && trap 'rm -f "$key"' EXIT && pulumi stack output -s staging --show-secrets adminPrivateKey > "$key" && ` +
                `ssh -i "$key" -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile=/dev/null ` +
                `-o 'KnownHostsCommand=/usr/bin/env echo %H ${hosts.staging.hostPublicKey}' root@${ip})`,
            systemPath: "(known after deploy)",
            generation: "(known after deploy)",
            rebooted: "(known after deploy)",
        });
    });

    it("tags every taggable AWS resource with Project and Stack", () => {
        const taggable = prod.resources.filter((r) => r.custom && r.type.startsWith("aws:") && "tags" in r.inputs);
        expect(taggable.map((r) => r.type).sort()).toEqual([
            "aws:ec2/eip:Eip",
            "aws:ec2/instance:Instance",
            "aws:ec2/keyPair:KeyPair",
            "aws:ec2/securityGroup:SecurityGroup",
            "aws:kms/key:Key",
            "aws:s3/bucket:Bucket",
        ]);
        for (const r of taggable) expect(r.inputs.tags).toMatchObject({ Project: "nixos-ec2", Stack: "prod" });
        expect(childrenOf(prod, "nixos-ec2:index:NixosHost", "prod").map((r) => r.type)).toEqual([INSTANCE, "aws:ec2/eip:Eip"]);
    });
});

describe("instanceResourceName", () => {
    it("keeps the name of x86_64 hosts at generation 0, and names the architecture and a later generation", () => {
        expect(instanceResourceName("web", "x86_64", 0)).toBe("web-instance");
        expect(instanceResourceName("web", "x86_64", 2)).toBe("web-instance-gen2");
        expect(instanceResourceName("web", "arm64", 0)).toBe("web-instance-arm64");
        expect(instanceResourceName("web", "arm64", 3)).toBe("web-instance-arm64-gen3");
    });
});

/**
 * A re-image is a new instance resource name: Pulumi has no state for it, so it creates the
 * instance from the image the lookup returns then, instead of the AMI an ignoreChanges keeps
 * for a resource it knows (even under `--replace`).
 */
describe("a new imageGeneration or architecture", () => {
    let before: OfflineRun;
    beforeAll(async () => {
        before = await runProgram("prod");
    });

    it("replaces the instance under a new name, from the lookup, with no alias to the old one", async () => {
        const after = await runProgram("prod", { hosts: '{"prod": {"imageGeneration": 1}}' });
        expect(instances(before)).toEqual(["prod-instance"]);
        expect(instances(after)).toEqual(["prod-instance-gen1"]);
        const [old, fresh] = [resource(before, INSTANCE, "prod-instance"), resource(after, INSTANCE, "prod-instance-gen1")];
        expect(fresh.urn).toBe(old.urn.replace(/::prod-instance$/, "::prod-instance-gen1"));
        // An alias would hand the new name the old state, and with it the old AMI.
        expect([old.aliases, fresh.aliases]).toEqual([[], []]);
        expect(fresh.inputs.ami).toBe("(looked up at deploy: newest AMI of owner 427812963091 named nixos/26.05* for x86_64)");
        expect(after.invokes.map((i) => i.token)).toEqual(["aws:ec2/getAmi:getAmi"]);
        // Otherwise the same instance: the same host key in user-data, the same settings, protected
        // and force-destroyable again, so that the next re-image works as this one does.
        expect(fresh.inputs).toEqual(old.inputs);
        expect(fresh.inputs).toMatchObject({ disableApiTermination: true, forceDestroy: true });
    });

    it("moves the Elastic IP, the deploy and the outputs to the new instance, and keeps the host key", async () => {
        const after = await runProgram("prod", { hosts: '{"prod": {"imageGeneration": 1}}' });
        const fresh = resource(after, INSTANCE, "prod-instance-gen1");
        const eip = resource(after, EIP, "prod-eip");
        expect(eip.urn).toBe(resource(before, EIP, "prod-eip").urn);
        expect(eip.inputs.instance).toBe("(known after deploy: id of prod-instance-gen1)");
        expect(eip.dependencies).toContain(fresh.urn);
        const deploy = resource(after, SWITCH, "prod-switch");
        expect(deploy.urn).toBe(resource(before, SWITCH, "prod-switch").urn);
        expect(deploy.inputs.triggers).toEqual([
            ...(resource(before, SWITCH, "prod-switch").inputs.triggers as string[]).slice(0, 2),
            "(known after deploy: id of prod-instance-gen1)",
            hostsOf(before).prod.hostPublicKey,
        ]);
        expect(deploy.dependencies).toEqual(expect.arrayContaining([fresh.urn, eip.urn]));
        expect(hostsOf(after).prod).toMatchObject({
            instanceId: "(known after deploy: id of prod-instance-gen1)",
            publicIp: "(known after deploy: Elastic IP of prod-eip)",
            hostPublicKey: hostsOf(before).prod.hostPublicKey,
            sshCommand: hostsOf(before).prod.sshCommand,
        });
        // The keys are the stack's, not the instance's: none of them is renamed or changed.
        const keys = (run: OfflineRun) => run.resources.filter((r) => r.type === "tls:index/privateKey:PrivateKey" || r.type === "aws:ec2/keyPair:KeyPair");
        expect(keys(after)).toEqual(keys(before));
    });

    it("touches no other host of a fleet", async () => {
        const fleet = await runProgram("staging", { hosts: '{"web": {}, "db": {}}' });
        const reimaged = await runProgram("staging", { hosts: '{"web": {}, "db": {"imageGeneration": 4}}' });
        const dbUrns = (run: OfflineRun, instance: string) => {
            const db = [resource(run, "nixos-ec2:index:NixosHost", "db").urn, resource(run, "nixos-ec2:index:NixosDeployment", "db").urn];
            return new Set(run.resources.filter((r) => db.includes(r.urn) || db.includes(r.parent) || r.name === instance).map((r) => r.urn));
        };
        const rest = (run: OfflineRun, instance: string): RecordedResource[] => run.resources.filter((r) => !dbUrns(run, instance).has(r.urn));
        expect(rest(fleet, "db-instance").length).toBeGreaterThan(10);
        expect(rest(reimaged, "db-instance-gen4")).toEqual(rest(fleet, "db-instance"));
        expect(instances(reimaged)).toEqual(["web-instance", "db-instance-gen4"]);
        expect(resource(reimaged, INSTANCE, "db-instance-gen4").inputs).toEqual(resource(fleet, INSTANCE, "db-instance").inputs);
    });

    it("moving a host to Graviton is a new instance from the arm64 image, never the x86_64 one kept in state", async () => {
        const arm = await runProgram("prod", { instanceType: "t4g.small" });
        expect(instances(arm)).toEqual(["prod-instance-arm64"]);
        const instance = resource(arm, INSTANCE, "prod-instance-arm64");
        expect(instance.aliases).toEqual([]);
        expect(instance.inputs).toMatchObject({
            instanceType: "t4g.small",
            ami: "(looked up at deploy: newest AMI of owner 427812963091 named nixos/26.05* for arm64)",
            disableApiTermination: true,
            forceDestroy: true,
        });
        expect(resource(arm, EIP, "prod-eip").inputs.instance).toBe("(known after deploy: id of prod-instance-arm64)");
        expect(hostsOf(arm).prod.hostPublicKey).toBe(hostsOf(before).prod.hostPublicKey);
        // Back to x86_64 is the old name, and so a new instance again; a generation adds to the name.
        expect(instances(await runProgram("prod", { instanceType: "t3.medium" }))).toEqual(["prod-instance"]);
        expect(instances(await runProgram("prod", { instanceType: "c7g.large", hosts: '{"prod": {"imageGeneration": 2}}' }))).toEqual(["prod-instance-arm64-gen2"]);
    });

    it("with a pinned AMI is a new instance from that AMI", async () => {
        const pinned = await runProgram("staging", { ami: "ami-0123456789abcdef0", hosts: '{"staging": {"imageGeneration": 1}}' });
        expect(resource(pinned, INSTANCE, "staging-instance-gen1").inputs.ami).toBe("ami-0123456789abcdef0");
        expect(pinned.invokes).toEqual([]);
    });
});
