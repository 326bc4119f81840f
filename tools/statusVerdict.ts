/**
 * One verdict per host, from what the stack says was deployed and what the host reported
 * (tools/statusProbe.ts), and what to do about it. README "Fleet status" explains each.
 */
import type { HostFacts, Probe } from "./statusProbe";

export type VerdictKind = "in-sync" | "deploying" | "rolled-back" | "drifted" | "unhealthy" | "needs-reboot" | "unreachable";

/** In the order the summary lists them; the exit status is decided by the worst. */
export const VERDICT_KINDS: readonly VerdictKind[] = ["in-sync", "deploying", "rolled-back", "drifted", "unhealthy", "needs-reboot", "unreachable"];

/** What the stack's outputs record of the host's last successful deploy. */
export interface Deployed {
    readonly systemPath?: string;
    readonly generation?: number;
}

export interface Verdict {
    readonly kind: VerdictKind;
    /** `in sync`, `drifted: switched outside Pulumi`, `rolled back: <reason>`, ... */
    readonly text: string;
    /** The facts behind it, for a person, one sentence each. */
    readonly why: string[];
}

/** The reason of an outcome line of deploys/<id> (`rolled-back generation=N reason=...`). */
function reasonOf(outcome: string): string {
    return /\breason=(.*)$/.exec(outcome)?.[1] ?? outcome;
}

function generationOf(outcome: string): number | undefined {
    const g = /\bgeneration=(\d+)/.exec(outcome)?.[1];
    return g === undefined ? undefined : Number(g);
}

/** A store path as a person reads it: its name, with the hash cut to 8 characters. */
export function shortPath(p: string | undefined): string {
    if (!p) return "(none)";
    const base = p.split("/").pop() ?? p;
    const m = /^([0-9a-z]{32})-(.*)$/.exec(base);
    return m ? `${m[1].slice(0, 8)}…-${m[2]}` : base;
}

function healthProblems(h: HostFacts): string[] {
    const problems: string[] = [];
    if (h.failedUnits.length > 0) problems.push(`${h.failedUnits.length === 1 ? "unit" : "units"} ${h.failedUnits.join(", ")} failed`);
    // Degraded only by certificates that wait for DNS: the deploy counts that as a success too.
    else if (h.systemState !== "running" && !(h.systemState === "degraded" && h.pendingCertificates.length > 0))
        problems.push(`systemd reports the system as ${h.systemState || "unknown"}`);
    if (!h.health.ok) problems.push(`health check ${h.health.url} failed: ${h.health.detail}`);
    return problems;
}

/**
 * Checked in this order, the first that applies: unreachable; a rollback that failed (unhealthy);
 * a deploy not confirmed yet; the newest deploy rolled back; a system that is not the deployed
 * one, running or in the profile (drifted); failed units or health check (unhealthy); a kernel,
 * initrd or kernel modules that only a reboot would bring (needs reboot); else in sync.
 */
export function verdictOf(deployed: Deployed, probe: Probe): Verdict {
    if (!probe.reachable) return { kind: "unreachable", text: "unreachable", why: [probe.why.message] };
    const h = probe.facts;
    const last = h.lastDeploy;
    const outcome = last?.outcome ?? "";
    const deployedText = `Pulumi deployed generation ${deployed.generation ?? "?"} (${shortPath(deployed.systemPath)})`;
    const runsText = `the host runs ${shortPath(h.currentSystem)}, its profile is generation ${h.profileGeneration ?? "?"} (${shortPath(h.profileSystem)})`;

    if (last && outcome.startsWith("rollback-failed")) {
        return {
            kind: "unhealthy",
            text: `unhealthy: the rollback of deploy ${last.id} failed (${reasonOf(outcome)})`,
            why: [`deploy ${last.id} ended "${outcome}"`, runsText, deployedText],
        };
    }
    const pending = h.pendingBoot?.deploy ?? h.pendingRollback?.deploy;
    if (pending !== undefined) {
        const what = h.pendingBoot
            ? `deploy ${pending} waits for its reboot into generation ${h.pendingBoot.generation} and its confirmation`
            : `deploy ${pending} switched the host and is not confirmed yet; unconfirmed, the host rolls back to generation ${h.pendingRollback?.generation}`;
        return { kind: "deploying", text: `deploying: deploy ${pending} is not confirmed yet`, why: [what, runsText, deployedText] };
    }

    const known = deployed.systemPath !== undefined && deployed.generation !== undefined;
    const runsDeployed = known && h.currentSystem === deployed.systemPath;
    const bootsDeployed = known && h.profileSystem === deployed.systemPath && h.profileGeneration === deployed.generation;
    if (last && outcome.startsWith("rolled-back")) {
        const back = generationOf(outcome);
        const onIt = h.profileGeneration === back && h.currentSystem === h.profileSystem;
        if ((runsDeployed && bootsDeployed) || onIt) {
            const rollback = h.lastRollback ? [`last rollback: ${h.lastRollback}`] : [];
            return {
                kind: "rolled-back",
                text: `rolled back: ${reasonOf(outcome)}`,
                why: [`the newest deploy, ${last.id}, was rolled back to generation ${back ?? "?"}`, ...rollback, runsText, deployedText],
            };
        }
    }
    if (!known) return { kind: "drifted", text: "drifted: the stack records no deploy of this host", why: [runsText] };
    if (!runsDeployed || !bootsDeployed) {
        const lastText = last ? [`the newest deploy on the host's records is ${last.id}: ${outcome || "no outcome recorded"}`] : [];
        return { kind: "drifted", text: "drifted: switched outside Pulumi", why: [runsText, deployedText, ...lastText] };
    }
    const problems = healthProblems(h);
    if (problems.length > 0) return { kind: "unhealthy", text: `unhealthy: ${problems.join("; ")}`, why: problems };
    if (h.bootChanges.length > 0) {
        return {
            kind: "needs-reboot",
            text: "needs reboot",
            why: [`the running ${h.bootChanges.join(", ")} ${h.bootChanges.length === 1 ? "is" : "are"} the booted system's (${shortPath(h.bootedSystem)}), not the deployed system's`],
        };
    }
    return {
        kind: "in-sync",
        text: "in sync",
        why: h.pendingCertificates.map((c) => `the certificate for ${c} is not issued yet (its order waits for the name to resolve to this host; HTTP serves meanwhile)`),
    };
}

/** 0: every host in sync; 2: some host unreachable (nothing can be said of it); 1: otherwise. */
export function exitStatusOf(kinds: readonly VerdictKind[]): 0 | 1 | 2 {
    if (kinds.includes("unreachable")) return 2;
    return kinds.every((k) => k === "in-sync") ? 0 : 1;
}

/** What names a host to the user: the stack and the URN of its deploy Command. */
export interface HostContext {
    readonly stack: string;
    readonly host: string;
    readonly deployUrn: string;
}

/** What to do about a verdict; the last step of a drift is the command that re-deploys the host. */
export function nextSteps(verdict: Verdict, probe: Probe, c: HostContext): string[] {
    const redeploy = `pulumi up -s ${c.stack} --replace '${c.deployUrn}'`;
    switch (verdict.kind) {
        case "in-sync":
            return [];
        case "deploying":
            return ["wait until the deploy confirms or the host rolls itself back (within rollbackTimeoutSeconds), then ask again"];
        case "rolled-back":
            return [
                `the host runs the last confirmed generation; read why on the host (cat /var/lib/nixos-ec2/deploy.log), fix the flake and run pulumi up -s ${c.stack}`,
            ];
        case "drifted":
            return [
                "if the change on the host is wanted, put it into the flake; either way, re-deploy the flake (pulumi up alone does not, as the flake did not change):",
                redeploy,
            ];
        case "unhealthy":
            return [
                "on the host: systemctl --failed, journalctl -u <unit>; fix the flake and pulumi up (or, for a passing failure, systemctl restart <unit>)",
            ];
        case "needs-reboot":
            return [`reboot it in a quiet moment: systemctl reboot on the host (its sshCommand output logs in); it boots the deployed generation`];
        case "unreachable": {
            const kind = probe.reachable ? "other" : probe.why.kind;
            if (kind === "host-key") {
                return [
                    "do not work around it: compare with the fingerprints in the instance's console output (-----BEGIN SSH HOST KEY FINGERPRINTS-----); if the instance was replaced outside Pulumi, pulumi refresh",
                ];
            }
            if (kind === "auth") return ["the host does not accept the stack's admin key: check users.users.root.openssh.authorizedKeys in the flake"];
            if (kind === "deadline") return ["the host is overloaded or the network slow; ask again with a longer --timeout"];
            return ["check that the instance runs, that its security group allows SSH from this machine's address, and that the address is current (pulumi refresh)"];
        }
    }
}
