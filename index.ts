import * as pulumi from "@pulumi/pulumi";
import { Firewall } from "./components/firewall";
import { HostSecrets } from "./components/hostSecrets";
import { ADMIN_USER, NixosHost } from "./components/nixosHost";
import { NixosDeployment } from "./components/nixosDeployment";
import { SshKeys } from "./components/sshKeys";
import { StateStore } from "./components/stateStore";
import { readSecretValues, readSettings } from "./lib/readSettings";
import { rolloutPlan } from "./lib/rollout";
import { stackTags } from "./lib/tags";

// Every configuration error is reported here, before any resource is registered.
const settings = readSettings();
const tags = stackTags(settings.stack);

const stateStore = new StateStore("state", { stack: settings.stack, region: settings.region, tags });

const firewall = new Firewall("hosts", {
    sshAllowedCidrs: settings.sshAllowedCidrs,
    publicTcpPorts: settings.publicTcpPorts,
    vpcId: settings.vpcId,
    tags,
});

const keys = new SshKeys("ssh", { hostNames: settings.hosts.map((h) => h.name), tags });

// Only a stack with secrets has the component (and its trigger key).
const secrets =
    settings.secrets.length === 0
        ? undefined
        : new HostSecrets("secrets", {
              recipients: Object.fromEntries(settings.secrets.map((s) => [s.name, s.hosts])),
              values: readSecretValues(settings),
          });

const servers = Object.fromEntries(
    settings.hosts.map((host) => [
        host.name,
        new NixosHost(host.name, {
            stack: settings.stack,
            hostName: host.name,
            instanceType: host.instanceType,
            rootVolumeGiB: host.rootVolumeGiB,
            architecture: host.architecture,
            imageGeneration: host.imageGeneration,
            nixosRelease: settings.nixosRelease,
            ami: settings.ami,
            securityGroupId: firewall.securityGroupId,
            subnetId: settings.subnetId,
            keyName: keys.keyPairName,
            hostPrivateKey: keys.hostKeys[host.name].privateKey,
            hostPublicKey: keys.hostKeys[host.name].publicKey,
            elasticIp: settings.elasticIp,
            terminationProtection: settings.terminationProtection,
            tags,
        }),
    ]),
);

// The plan lists each rollout canary before the hosts whose deploys wait for it.
const deployments: Record<string, NixosDeployment> = {};
const secretsOfHost = (name: string) => settings.secrets.filter((s) => s.hosts.includes(name)).map((s) => s.name);
for (const { host, canaryFor, afterCanary } of rolloutPlan(settings.hosts, settings.rollout, secretsOfHost)) {
    const server = servers[host.name];
    deployments[host.name] = new NixosDeployment(
        host.name,
        {
            flakeAttr: host.flakeAttr,
            instanceId: server.instanceId,
            host: server.publicIp,
            user: ADMIN_USER,
            sshPrivateKey: keys.adminPrivateKey,
            hostPublicKey: server.hostPublicKey,
            settings: settings.deploy,
            rebootPolicy: host.rebootPolicy,
            secrets: secrets?.hosts[host.name]?.payload,
            secretsTrigger: secrets?.hosts[host.name]?.trigger,
            canaryFor,
            afterCanary,
        },
        { dependsOn: afterCanary === undefined ? [] : [deployments[afterCanary]] },
    );
}

export const hosts = Object.fromEntries(
    settings.hosts.map((host) => {
        const [server, deployment] = [servers[host.name], deployments[host.name]];
        return [
            host.name,
            {
                flakeAttr: host.flakeAttr,
                instanceType: host.instanceType,
                instanceId: server.instanceId,
                publicIp: server.publicIp,
                publicDns: server.publicDns,
                url: server.url,
                sshCommand: server.sshCommand,
                hostPublicKey: server.hostPublicKey,
                systemPath: deployment.systemPath,
                generation: deployment.generation,
                rebooted: deployment.rebooted,
            },
        ];
    }),
);
export const backendUrl = stateStore.backendUrl;
export const secretsProvider = stateStore.secretsProvider;
export const adminPublicKey = keys.adminPublicKey;
export const adminPrivateKey = pulumi.secret(keys.adminPrivateKey);
/** Each host's age recipient, for sops (`npm run sops-config`). */
export const ageRecipients = Object.fromEntries(settings.hosts.map((host) => [host.name, keys.hostKeys[host.name].ageRecipient]));
