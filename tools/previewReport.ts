/**
 * What the offline preview prints, built from one run of the program under the mocks
 * (lib/offline.ts): the resource tree, the data sources looked up at deploy, the stack outputs
 * and a count by type, as text for a person and as JSON for a machine.
 *
 * The report is built without secrets: every secret is replaced by REDACTED before anything is
 * rendered, so no rendering choice can print one. It is deterministic: siblings are sorted by
 * type and name (registration order depends on when inputs resolve), input keys are sorted, and
 * every placeholder comes from the resource's name, never from time or chance.
 */
import type { OfflineRun, RecordedResource } from "../lib/offline";
import { SecretValue } from "../lib/offline";
import type { PolicyResult } from "./policyCheck";

/** A secret, wherever it was; carries nothing of its value. */
export const REDACTED: { toJSON(): string } = Object.freeze({ toJSON: () => "[secret]" });

export interface ResourceNode {
    readonly type: string;
    readonly name: string;
    readonly urn: string;
    /** false for a component (a group of resources with no cloud object of its own). */
    readonly custom: boolean;
    readonly protect: boolean;
    readonly retainOnDelete: boolean;
    readonly ignoreChanges: string[];
    /** `Type name` of each resource this one waits for (explicit dependsOn and through its inputs). */
    readonly dependsOn: string[];
    readonly inputs: Record<string, unknown>;
    readonly children: ResourceNode[];
}

export interface DataSource {
    readonly token: string;
    readonly args: unknown;
    /** How many times the program looks it up with these arguments (once per host, say). */
    readonly calls: number;
}

export interface PreviewReport {
    readonly preview: "offline";
    readonly stack: string;
    readonly banner: string;
    /** Config keys given with --config, fully qualified. */
    readonly overrides: string[];
    readonly resources: ResourceNode[];
    readonly dataSources: DataSource[];
    readonly outputs: Record<string, unknown>;
    /** Resources (components included) by type, sorted by type. */
    readonly resourceCounts: Record<string, number>;
    readonly resourceTotal: number;
    /** How many of them are components. */
    readonly componentTotal: number;
    /** The policy pack's rules (policy/rules.ts) against these resources. */
    readonly policy: PolicyResult;
    /** The deploys (`command:local:Command`) grouped by the deploys they wait for (nixos-ec2:rollout). */
    readonly deployOrder: DeployStage[];
}

export interface DeployStage {
    /** Deploys that must have confirmed first; empty for the ones that start at once. */
    readonly after: string[];
    readonly deploys: string[];
}

/** Byte order, not locale order: the same on every machine. */
function compare(a: string, b: string): number {
    return a < b ? -1 : a > b ? 1 : 0;
}

/** `aws:ec2/instance:Instance` -> `Instance`. */
export function shortType(type: string): string {
    return type.split(":").pop() ?? type;
}

/**
 * How values that only a deploy can know read in the preview: lib/offline.ts's placeholders in
 * angle brackets (so that they stand out inside a string such as a URL), and the mocks' made-up
 * keys and suffixes replaced by what they stand for.
 */
function placeholderRewriter(standIns: Record<string, string>): (s: string) => string {
    const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    // Longest first, so that a value that contains another is replaced whole.
    const values = Object.keys(standIns).sort((a, b) => b.length - a.length || compare(a, b));
    const standIn = values.length > 0 ? new RegExp(values.map(escape).join("|"), "g") : undefined;
    return (s) => {
        let out = standIn ? s.replace(standIn, (v) => `<generated at deploy: ${standIns[v]}>`) : s;
        out = out.replace(/\((known after deploy|looked up at deploy)(: [^()]*)?\)/g, (_m, when: string, what?: string) => `<${when}${what ?? ""}>`);
        return out;
    };
}

/** A plain copy of `value` with secrets REDACTED and placeholders rewritten; keys sorted if asked. */
function present(value: unknown, rewrite: (s: string) => string, sortKeys: boolean): unknown {
    if (value instanceof SecretValue) return REDACTED;
    if (typeof value === "string") return rewrite(value);
    if (Array.isArray(value)) return value.map((v) => present(v, rewrite, sortKeys));
    if (value !== null && typeof value === "object") {
        const entries = Object.entries(value);
        if (sortKeys) entries.sort(([a], [b]) => compare(a, b));
        return Object.fromEntries(entries.map(([k, v]) => [k, present(v, rewrite, sortKeys)]));
    }
    return value;
}

export function buildReport(run: OfflineRun, overrides: string[], policy: PolicyResult): PreviewReport {
    const rewrite = placeholderRewriter(run.standIns);
    const byUrn = new Map(run.resources.map((r) => [r.urn, r]));
    const order = (a: RecordedResource, b: RecordedResource) => compare(a.type, b.type) || compare(a.name, b.name);

    const node = (r: RecordedResource): ResourceNode => ({
        type: r.type,
        name: r.name,
        urn: r.urn,
        custom: r.custom,
        protect: r.protect,
        retainOnDelete: r.retainOnDelete,
        ignoreChanges: [...r.ignoreChanges].sort(compare),
        dependsOn: r.dependencies
            .map((urn) => byUrn.get(urn))
            .map((d, i) => (d ? `${shortType(d.type)} ${d.name}` : r.dependencies[i]))
            .sort(compare),
        inputs: present(r.inputs, rewrite, true) as Record<string, unknown>,
        children: run.resources
            .filter((c) => c.parent === r.urn)
            .sort(order)
            .map(node),
    });
    // A parent the program did not register (the stack itself) makes a resource top-level.
    const resources = run.resources
        .filter((r) => r.parent === "" || !byUrn.has(r.parent))
        .sort(order)
        .map(node);

    const lookups = new Map<string, DataSource>();
    for (const invoke of run.invokes) {
        const args = present(invoke.args, rewrite, true);
        const key = JSON.stringify([invoke.token, args]);
        const seen = lookups.get(key);
        lookups.set(key, { token: invoke.token, args, calls: (seen?.calls ?? 0) + 1 });
    }
    const dataSources = [...lookups.entries()].sort(([a], [b]) => compare(a, b)).map(([, d]) => d);

    const deployOrder = deployStages(run);

    const resourceCounts: Record<string, number> = {};
    for (const type of run.resources.map((r) => r.type).sort(compare)) resourceCounts[type] = (resourceCounts[type] ?? 0) + 1;

    return {
        preview: "offline",
        stack: run.stack,
        banner:
            `Offline preview of stack "${run.stack}": the program ran under Pulumi's mock runtime with this stack's ` +
            `configuration; nothing was created and no cloud was contacted.`,
        overrides: [...overrides].sort(compare),
        resources,
        dataSources,
        // The program's export order, which is the order its author chose to present them in.
        outputs: present(run.outputs, rewrite, false) as Record<string, unknown>,
        resourceCounts,
        resourceTotal: run.resources.length,
        componentTotal: run.resources.filter((r) => !r.custom).length,
        policy,
        deployOrder,
    };
}

const DEPLOY_TYPE = "command:local:Command";

/** The deploys by what they wait for: first those that start at once, then by the deploys awaited. */
function deployStages(run: OfflineRun): DeployStage[] {
    const deploys = run.resources.filter((r) => r.type === DEPLOY_TYPE);
    const nameOf = new Map(deploys.map((r) => [r.urn, r.name]));
    const stages = new Map<string, DeployStage>();
    for (const d of [...deploys].sort((a, b) => compare(a.name, b.name))) {
        const after = d.dependencies.flatMap((urn) => nameOf.get(urn) ?? []).sort(compare);
        const key = JSON.stringify(after);
        const stage = stages.get(key) ?? { after, deploys: [] };
        stage.deploys.push(d.name);
        stages.set(key, stage);
    }
    return [...stages.values()].sort((a, b) => a.after.length - b.after.length || compare(a.after.join(), b.after.join()));
}

// ---- text ----

/** Containers whose one-line form is at most this long print on one line. */
const INLINE_WIDTH = 100;

type Scalar = string | number | boolean | null | typeof REDACTED;

function isScalar(v: unknown): v is Scalar {
    return v === null || v === REDACTED || ["string", "number", "boolean"].includes(typeof v);
}

/**
 * A string prints bare unless it could be read as something else: empty or padded, a number,
 * boolean or null, or the secret marker (which starts with `[`), or, inside a one-line list, text
 * with the list's own punctuation. Placeholders (`<known after deploy: ...>`) print bare; the JSON
 * form is the unambiguous one.
 */
function scalarText(v: Scalar, inline: boolean): string {
    if (v === REDACTED) return "[secret]";
    if (typeof v !== "string") return String(v);
    const ambiguous =
        v === "" ||
        v !== v.trim() ||
        /[\u0000-\u001f\u007f]/.test(v) ||
        /^(true|false|null|[-+]?(\d|\.\d)[\d.eE+-]*)$/.test(v) ||
        /^["'[{#-]/.test(v) ||
        (inline && /[,[\]{}]/.test(v));
    return ambiguous ? JSON.stringify(v) : v;
}

function keyText(k: string): string {
    return /^[A-Za-z0-9_.:/-]+$/.test(k) ? k : JSON.stringify(k);
}

/** `[a, b]` or `{k: v}` when every element is a scalar and it fits; undefined otherwise. */
function inlineText(v: unknown[] | Record<string, unknown>): string | undefined {
    const items = Array.isArray(v) ? v : Object.values(v);
    if (!items.every(isScalar)) return undefined;
    const text = Array.isArray(v)
        ? `[${v.map((x) => scalarText(x as Scalar, true)).join(", ")}]`
        : `{${Object.entries(v)
              .map(([k, x]) => `${keyText(k)}: ${scalarText(x as Scalar, true)}`)
              .join(", ")}}`;
    return text.length <= INLINE_WIDTH ? text : undefined;
}

/** A JSON document inside a string (a bucket policy), parsed for reading; undefined if it is not one. */
function embeddedJson(v: string): object | undefined {
    if (!/^\s*[[{]/.test(v)) return undefined;
    try {
        const parsed: unknown = JSON.parse(v);
        return parsed !== null && typeof parsed === "object" ? parsed : undefined;
    } catch {
        return undefined;
    }
}

/** Lines of `label: value`, nested two spaces a level; `label` undefined for a list item's body. */
function valueLines(label: string, value: unknown): string[] {
    if (typeof value === "string") {
        const json = embeddedJson(value);
        if (json !== undefined) return blockLines(`${label} (JSON)`, json);
    }
    if (isScalar(value)) return [`${label}: ${scalarText(value, false)}`];
    if (value === undefined) return [`${label}: undefined`];
    return blockLines(label, value as object);
}

function blockLines(label: string, value: object): string[] {
    const container = value as unknown[] | Record<string, unknown>;
    const empty = Array.isArray(container) ? container.length === 0 : Object.keys(container).length === 0;
    if (empty) return [`${label}: ${Array.isArray(container) ? "[]" : "{}"}`];
    const inline = inlineText(container);
    if (inline !== undefined) return [`${label}: ${inline}`];
    return [`${label}:`, ...bodyLines(container).map((l) => `  ${l}`)];
}

/** The lines of an object's entries or a list's items, unindented. */
function bodyLines(value: unknown[] | Record<string, unknown>): string[] {
    if (!Array.isArray(value)) return Object.entries(value).flatMap(([k, v]) => valueLines(keyText(k), v));
    return value.flatMap((item) => {
        if (isScalar(item)) return [`- ${scalarText(item, false)}`];
        if (item !== null && typeof item === "object") {
            const inline = inlineText(item as Record<string, unknown>);
            if (inline !== undefined) return [`- ${inline}`];
            const lines = bodyLines(item as Record<string, unknown>);
            return lines.map((l, i) => (i === 0 ? `- ${l}` : `  ${l}`));
        }
        return [`- ${String(item)}`];
    });
}

function headerText(n: ResourceNode): string {
    const options = [
        ...(n.protect ? ["protect"] : []),
        ...(n.retainOnDelete ? ["retainOnDelete"] : []),
        ...(n.ignoreChanges.length > 0 ? [`ignoreChanges: ${n.ignoreChanges.join(", ")}`] : []),
    ];
    return `${n.type} ${n.name}${options.length > 0 ? `  [${options.join(", ")}]` : ""}`;
}

/** A resource, its inputs, and its children below it, drawn as a tree. */
function treeLines(n: ResourceNode, prefix: string, connector: string, childPrefix: string): string[] {
    const lines = [`${prefix}${connector}${headerText(n)}`];
    const body = `${childPrefix}${n.children.length > 0 ? "│ " : "  "}  `;
    for (const l of bodyLines(n.inputs)) lines.push(`${body}${l}`);
    if (n.dependsOn.length > 0) lines.push(`${body}(depends on: ${n.dependsOn.join(", ")})`);
    n.children.forEach((c, i) => {
        const last = i === n.children.length - 1;
        lines.push(...treeLines(c, childPrefix, last ? "└─ " : "├─ ", `${childPrefix}${last ? "   " : "│  "}`));
    });
    return lines;
}

export function renderText(report: PreviewReport): string {
    const lines: string[] = [report.banner];
    if (report.overrides.length > 0) lines.push(`Overrides given with --config: ${report.overrides.join(", ")}`);

    lines.push("", `Resources that \`pulumi up\` would create (${report.resourceTotal}), each component with its children:`);
    for (const top of report.resources) lines.push("", ...treeLines(top, "", "", ""));

    lines.push("", "Deploy order (nixos-ec2:rollout): a deploy starts once the deploys it waits for have confirmed:");
    for (const stage of report.deployOrder) {
        const when = stage.after.length === 0 ? "at once" : `after ${stage.after.join(", ")}`;
        lines.push(`  ${when}: ${stage.deploys.join(", ")}`);
    }

    if (report.dataSources.length > 0) {
        lines.push("", "Data sources looked up at deploy:");
        for (const d of report.dataSources) {
            lines.push(`  ${d.token}${d.calls > 1 ? ` (${d.calls} calls)` : ""}`);
            lines.push(...bodyLines(d.args as Record<string, unknown>).map((l) => `    ${l}`));
        }
    }

    lines.push("", "Outputs:");
    lines.push(...bodyLines(report.outputs).map((l) => `  ${l}`));

    lines.push("", `Resources by type (${report.resourceTotal}, of which ${report.componentTotal} components):`);
    const width = String(Math.max(...Object.values(report.resourceCounts), 0)).length;
    for (const [type, count] of Object.entries(report.resourceCounts)) lines.push(`  ${String(count).padStart(width)}  ${type}`);

    lines.push(...policyLines(report.policy));
    return `${lines.join("\n")}\n`;
}

function policyLines(policy: PolicyResult): string[] {
    const { checked, violations, skipped } = policy;
    const mandatory = violations.filter((v) => v.level === "mandatory" || v.level === "remediate").length;
    const lines = ["", `Policy pack nixos-ec2 (policy/): ${checked.length} rules checked, ${violations.length} violations (${mandatory} mandatory)`];
    for (const v of violations) lines.push(`  ${v.level} ${v.policy}${v.resource ? ` on ${v.resource}` : ""}: ${v.message}`);
    for (const s of skipped) lines.push(`  skipped ${s.policy}${s.resource ? ` on ${s.resource}` : ""}: ${s.reason}`);
    if (violations.length === 0 && skipped.length === 0) lines.push("  every rule passed");
    return lines;
}

export function renderJson(report: PreviewReport): string {
    return `${JSON.stringify(report, null, 2)}\n`;
}
