import { isSecret } from "./support/secrets";
import { OfflineRun, SecretValue } from "../lib/offline";
import { childrenOf, resource, runProgram } from "./support/program";

describe("SshKeys", () => {
    let run: OfflineRun;
    beforeAll(async () => {
        run = await runProgram("staging", { hosts: '{"web": {}, "db": {}}' });
    });

    it("creates an ED25519 admin key registered as the EC2 key pair, and one ED25519 host key per host", () => {
        const children = childrenOf(run, "nixos-ec2:index:SshKeys", "ssh");
        expect(children.map((c) => [c.type, c.name, c.inputs])).toEqual([
            ["tls:index/privateKey:PrivateKey", "ssh-admin", { algorithm: "ED25519" }],
            ["tls:index/privateKey:PrivateKey", "ssh-host-web", { algorithm: "ED25519" }],
            ["tls:index/privateKey:PrivateKey", "ssh-host-db", { algorithm: "ED25519" }],
            [
                "aws:ec2/keyPair:KeyPair",
                "ssh-admin",
                { publicKey: expect.stringMatching(/^ssh-ed25519 AAAA[A-Za-z0-9+/=]+$/), tags: { Project: "nixos-ec2", Stack: "staging" } },
            ],
        ]);
        const keyPair = resource(run, "aws:ec2/keyPair:KeyPair", "ssh-admin");
        expect(keyPair.inputs.publicKey).toBe(run.outputs.adminPublicKey);
    });

    it("exports the admin private key as a secret, and the public key in the clear", () => {
        expect(isSecret(run.outputs.adminPrivateKey)).toBe(true);
        expect(String((run.outputs.adminPrivateKey as SecretValue).value)).toMatch(/^-----BEGIN OPENSSH PRIVATE KEY-----/);
        expect(isSecret(run.outputs.adminPublicKey)).toBe(false);
    });

    it("gives each host its own host key", () => {
        const hosts = run.outputs.hosts as Record<string, { hostPublicKey: string }>;
        expect(hosts.web.hostPublicKey).toMatch(/^ssh-ed25519 /);
        expect(hosts.db.hostPublicKey).toMatch(/^ssh-ed25519 /);
        expect(hosts.web.hostPublicKey).not.toBe(hosts.db.hostPublicKey);
    });
});
