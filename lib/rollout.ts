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
 * Every host once, in an order in which each canary comes before the hosts that wait for it.
 * The canary of a flakeAttr is its first host by name, so the choice does not depend on the order
 * in which the CLI hands over the `hosts` map; rename a host (or give it its own flakeAttr) to
 * choose another. A flakeAttr with one host has no canary and waits for nothing.
 */
export function rolloutPlan(hosts: readonly HostSettings[], rollout: Rollout): RolloutStep[] {
    if (rollout === "parallel") return hosts.map((host) => ({ host }));
    const groups = new Map<string, HostSettings[]>();
    for (const host of hosts) groups.set(host.flakeAttr, [...(groups.get(host.flakeAttr) ?? []), host]);
    const canaryOf = new Map<string, HostSettings>();
    for (const [attr, members] of groups) if (members.length > 1) canaryOf.set(attr, [...members].sort(byName)[0]);

    const steps = hosts.map((host): RolloutStep => {
        const canary = canaryOf.get(host.flakeAttr);
        if (canary === undefined) return { host };
        if (canary === host) {
            const others = (groups.get(host.flakeAttr) ?? []).filter((h) => h !== host).sort(byName);
            return { host, canaryFor: others.map((h) => h.name) };
        }
        return { host, afterCanary: canary.name };
    });
    return [...steps.filter((s) => s.afterCanary === undefined), ...steps.filter((s) => s.afterCanary !== undefined)];
}
