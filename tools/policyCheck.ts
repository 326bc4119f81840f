/**
 * Runs the policy pack's rules (policy/rules.ts) against the resources an offline run recorded,
 * the way the CLI's analyzer runs them (@pulumi/policy server.js): every resource policy on every
 * resource, then every stack policy on all of them, with inputs behind the SDK's own
 * unknown-checking proxy. An input only a deploy can know makes a rule skip that resource, as in
 * a real preview, where the SDK reports "can't run policy ... during preview".
 */
import type { EnforcementLevel, PolicyResource, ResourceValidationArgs, StackValidationArgs } from "@pulumi/policy";
import { OfflineRun, RecordedResource, SecretValue, UNKNOWN } from "../lib/offline";
import { Rule, RULES } from "../policy/rules";
import { isUnknownValueError, unknownCheckingProxy, unknownStringValue } from "../policy/unknown";

export interface Violation {
    readonly policy: string;
    readonly level: EnforcementLevel;
    /** `Type name` of the resource, or "" for a stack-wide violation. */
    readonly resource: string;
    readonly message: string;
}

export interface PolicyResult {
    /** The rules checked, by name. */
    readonly checked: string[];
    readonly violations: Violation[];
    /** Rules that could not judge a resource because an input is unknown until deploy. */
    readonly skipped: Array<{ readonly policy: string; readonly resource: string; readonly reason: string }>;
}

/** Whether a rule at this level stops `pulumi up` (the preview exits with its own status). */
export const blocks = (v: Violation) => v.level === "mandatory" || v.level === "remediate";

/** An input as the analyzer receives it: secrets unwrapped, unknowns as the SDK's sentinel. */
function asAnalyzed(value: unknown): unknown {
    if (value instanceof SecretValue) return asAnalyzed(value.value);
    if (typeof value === "string") return value.includes(UNKNOWN.slice(0, -1)) ? unknownStringValue : value;
    if (Array.isArray(value)) return value.map(asAnalyzed);
    if (value !== null && typeof value === "object") return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, asAnalyzed(v)]));
    return value;
}

const label = (r: { type: string; name: string }) => `${r.type.split(":").pop()} ${r.name}`;

function notApplicable(): never {
    throw new Error("not applicable");
}

function policyResources(recorded: readonly RecordedResource[]): PolicyResource[] {
    const byUrn = new Map<string, PolicyResource>();
    const resources = recorded.map((r) => {
        const resource = {
            type: r.type,
            name: r.name,
            urn: r.urn,
            props: unknownCheckingProxy(asAnalyzed(r.inputs) as Record<string, unknown>),
            opts: { protect: r.protect, ignoreChanges: r.ignoreChanges, aliases: [], additionalSecretOutputs: [], customTimeouts: {} },
            dependencies: [] as PolicyResource[],
            propertyDependencies: {},
            isType: () => false,
            asType: () => undefined,
        } as unknown as PolicyResource;
        byUrn.set(r.urn, resource);
        return resource;
    });
    recorded.forEach((r, i) => (resources[i].dependencies as PolicyResource[]).push(...r.dependencies.flatMap((u) => byUrn.get(u) ?? [])));
    return resources;
}

/** Runs one rule, collecting what it reports; an unknown input skips it, as the SDK does. */
async function runRule(rule: Rule, resources: PolicyResource[], result: PolicyResult): Promise<void> {
    const { policy } = rule;
    const level = policy.enforcementLevel ?? "advisory";
    const attempt = async (resource: string, run: (report: (message: string, urn?: string) => void) => unknown) => {
        try {
            await run((message, urn) => {
                const at = urn ? resources.find((r) => r.urn === urn) : undefined;
                result.violations.push({ policy: policy.name, level, resource: at ? label(at) : resource, message });
            });
        } catch (e) {
            if (!isUnknownValueError(e)) throw e;
            result.skipped.push({ policy: policy.name, resource, reason: (e as Error).message });
        }
    };
    if ("validateResource" in policy && policy.validateResource) {
        const validations = [policy.validateResource].flat();
        for (const r of resources) {
            const args = { ...r, stackTags: new Map(), getConfig: () => ({}), notApplicable } as unknown as ResourceValidationArgs;
            for (const validate of validations) await attempt(label(r), (report) => validate(args, report));
        }
    }
    if ("validateStack" in policy && policy.validateStack) {
        const validate = policy.validateStack;
        const args = { resources, stackTags: new Map(), getConfig: () => ({}), notApplicable } as unknown as StackValidationArgs;
        await attempt("", (report) => validate(args, report));
    }
}

/** Every rule of the pack against the resources of one offline run. */
export async function checkPolicies(run: OfflineRun, rules: readonly Rule[] = RULES): Promise<PolicyResult> {
    const resources = policyResources(run.resources);
    const result: PolicyResult = { checked: rules.map((r) => r.policy.name), violations: [], skipped: [] };
    for (const rule of rules) await runRule(rule, resources, result);
    return result;
}
