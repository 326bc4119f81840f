/**
 * Staged rollouts (`nixos-ec2:rollout`, README "Staged rollouts"): which host's deploy waits for
 * which. With `canary`, the hosts that share a flakeAttr deploy the same configuration, so one of
 * them goes first and the others' deploys depend on it: Pulumi starts a resource only after
 * everything it depends on was created or updated, and never starts one whose dependency failed.
 */
import { HostSettings, Rollout } from "./config";

/** A host and where its deploy stands in the rollout. */
export interface RolloutStep {
    readonly host: HostSettings;
    /** The canary of the host's flakeAttr, whose deploy must confirm before this one starts. */
    readonly afterCanary?: string;
    /** The hosts whose deploys wait for this one (it is their canary). */
    readonly canaryFor?: string[];
}

/** Byte order, not locale order: the same canary on every machine. */
function byName(a: HostSettings, b: HostSettings): number {
    return a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
}

/**
 * The groups of hosts that deploy together behind one canary, each in name order, and the canary
 * of each (its first host). A change reaches the hosts of a flakeAttr through the flake, which
 * all of them deploy, or through a secret, which only those that get it do (it is a trigger of
 * their deploys only); so the canary must be a host that every such change reaches: the first by
 * name of the hosts that get every secret any host of the flakeAttr gets. When no host gets them
 * all, the flakeAttr's hosts are grouped by the secrets they get, a canary in each group.
 */
function canaryGroups(hosts: readonly HostSettings[], secretsOf: (host: string) => readonly string[]): HostSettings[][] {
    const byAttr = new Map<string, HostSettings[]>();
    for (const host of [...hosts].sort(byName)) byAttr.set(host.flakeAttr, [...(byAttr.get(host.flakeAttr) ?? []), host]);
    const groups: HostSettings[][] = [];
    for (const members of byAttr.values()) {
        const secrets = new Map(members.map((h) => [h.name, new Set(secretsOf(h.name))]));
        const all = new Set(members.flatMap((h) => [...secrets.get(h.name)!]));
        const canary = members.find((h) => [...all].every((s) => secrets.get(h.name)!.has(s)));
        if (canary !== undefined) {
            groups.push([canary, ...members.filter((h) => h !== canary)]);
            continue;
        }
        const bySecrets = new Map<string, HostSettings[]>();
        for (const h of members) {
            const key = JSON.stringify([...secrets.get(h.name)!].sort());
            bySecrets.set(key, [...(bySecrets.get(key) ?? []), h]);
        }
        groups.push(...bySecrets.values());
    }
    return groups;
}

/**
 * Every host once, in an order in which each canary comes before the hosts that wait for it.
 * The canary of a flakeAttr is its first host by name (of those that get all its secrets, see
 * canaryGroups), so the choice does not depend on the order in which the CLI hands over the
 * `hosts` map; rename a host (or give it its own flakeAttr) to choose another. A flakeAttr with
 * one host has no canary and waits for nothing.
 */
export function rolloutPlan(hosts: readonly HostSettings[], rollout: Rollout, secretsOf: (host: string) => readonly string[] = () => []): RolloutStep[] {
    if (rollout === "parallel") return hosts.map((host) => ({ host }));
    const canaryOf = new Map<HostSettings, HostSettings>();
    const waiting = new Map<HostSettings, string[]>();
    for (const [canary, ...others] of canaryGroups(hosts, secretsOf)) {
        if (others.length === 0) continue;
        waiting.set(canary, others.map((h) => h.name));
        for (const h of others) canaryOf.set(h, canary);
    }
    const steps = hosts.map((host): RolloutStep => {
        const canary = canaryOf.get(host);
        if (canary !== undefined) return { host, afterCanary: canary.name };
        const others = waiting.get(host);
        return others === undefined ? { host } : { host, canaryFor: others };
    });
    return [...steps.filter((s) => s.afterCanary === undefined), ...steps.filter((s) => s.afterCanary !== undefined)];
}
