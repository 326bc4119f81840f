/**
 * Makes Pulumi.yaml's `config:` section and the README's configuration table from the key
 * declarations in lib/config.ts, and the README's policy table from policy/rules.ts.
 * `npm run config-docs` writes them; test/configDocs.test.ts fails when a committed file differs
 * from what this makes.
 */
import { readFileSync, writeFileSync } from "node:fs";
import * as path from "node:path";
import * as yaml from "js-yaml";
import { HOST_KEYS, KEYS, PROJECT } from "../lib/config";
import { KeyDeclaration } from "../lib/configSchema";
import { RULES } from "../policy/rules";

export const PULUMI_YAML = path.join(__dirname, "..", "Pulumi.yaml");
export const README = path.join(__dirname, "..", "README.md");
export const TABLE_START = "<!-- config-table: made by `npm run config-docs` from lib/config.ts -->";
export const TABLE_END = "<!-- config-table end -->";
export const POLICY_START = "<!-- policy-table: made by `npm run config-docs` from policy/rules.ts -->";
export const POLICY_END = "<!-- policy-table end -->";

const CONFIG_HEADER = [
    "# Made by `npm run config-docs` from the declarations in lib/config.ts: change them there.",
    "config:",
].join("\n");

function pulumiDeclaration(d: KeyDeclaration): Record<string, unknown> {
    return {
        type: d.type,
        ...(d.type === "array" ? { items: { type: "string" } } : {}),
        ...(d.default !== undefined ? { default: d.default } : {}),
        description: d.description,
    };
}

/** Pulumi.yaml's `config:` section, with the comment before it, through the end of the file. */
export function renderPulumiConfig(): string {
    const typed = Object.entries(KEYS).filter(([, d]) => !("stackDefaults" in d));
    const perStack = Object.entries(KEYS).filter(([, d]) => "stackDefaults" in d);
    const body = yaml.dump(Object.fromEntries(typed.map(([k, d]) => [k, pulumiDeclaration(d)])), { lineWidth: 100, indent: 2 });
    const comment = [
        "Keys whose default differs by stack are not declared here: a declared default applies to every",
        "stack, and a declared key without a default must be set on every stack. lib/config.ts",
        "validates and defaults them:",
        ...perStack.map(([k, d]) => `  ${k} (${d.type}): ${defaultText(d, "plain")}. ${d.description}`),
    ];
    return `${CONFIG_HEADER}\n${indent(body)}${comment.map((l) => `  # ${l}`).join("\n")}\n`;
}

function indent(text: string): string {
    return text
        .split("\n")
        .map((l) => (l === "" ? l : `  ${l}`))
        .join("\n");
}

function defaultText(d: KeyDeclaration, style: "markdown" | "plain"): string {
    const code = (v: unknown) => {
        const text = typeof v === "string" ? v : JSON.stringify(v);
        return style === "markdown" ? `\`${text}\`` : text;
    };
    if (d.default === undefined) return "none: required";
    const base = d.default === "" ? "empty" : code(d.default);
    const stacks = Object.entries(d.stackDefaults ?? {}).map(([stack, v]) => `${code(v)} on ${stack}`);
    return stacks.length > 0 ? `${base}; ${stacks.join(", ")}` : base;
}

const cell = (text: string) => text.replace(/\|/g, "\\|");

/** The README's table of config keys, between its markers. */
export function renderReadmeTable(): string {
    const perHost = new Set(Object.keys(HOST_KEYS));
    const rows = Object.entries(KEYS).map(([k, d]) => {
        const name = perHost.has(k) ? `\`${k}\` (also per host)` : `\`${k}\``;
        return `| ${name} | ${d.type} | ${cell(defaultText(d, "markdown"))} | ${cell(d.allowed)} | ${cell(d.description)} |`;
    });
    const hostOnly = Object.entries(HOST_KEYS)
        .filter(([k]) => !(k in KEYS))
        .map(([k, d]) => `| \`hosts.<name>.${k}\` | ${d.type} | ${cell(d.defaultDescription ?? defaultText(d, "markdown"))} | ${cell(d.allowed)} | ${cell(d.description)} |`);
    return [
        TABLE_START,
        `All keys are in the \`${PROJECT}\` namespace.`,
        "",
        "| key | type | default | allowed | what it does |",
        "| --- | --- | --- | --- | --- |",
        ...rows,
        ...hostOnly,
        TABLE_END,
    ].join("\n");
}

/** The README's table of the policy pack's rules, between its markers. */
export function renderPolicyTable(): string {
    const rows = RULES.map(({ policy, scanners, why }) => {
        const summary = policy.description.replace(/ \(checkov .*\)$/, "");
        return `| \`${policy.name}\` | ${cell(summary)} | ${policy.enforcementLevel} | ${cell(scanners.checkov)} | ${cell(scanners.trivy)} | ${cell(scanners.securityHub)} | ${cell(why)} |`;
    });
    return [POLICY_START, "| rule | what it checks | level | checkov | trivy | Security Hub | why |", "| --- | --- | --- | --- | --- | --- | --- |", ...rows, POLICY_END].join("\n");
}

/** `text` with what stands between `start` and `end` replaced by `block` (markers included). */
function between(text: string, start: string, end: string, block: string, file: string): string {
    const from = text.indexOf(start);
    const to = text.indexOf(end);
    if (from < 0 || to < from) throw new Error(`${file} has no markers ${start} ... ${end}`);
    return `${text.slice(0, from)}${block}${text.slice(to + end.length)}`;
}

/** The files as they should be: Pulumi.yaml with its config section, the README with its tables. */
export function renderedFiles(): Record<string, string> {
    const pulumiYaml = readFileSync(PULUMI_YAML, "utf8");
    const head = pulumiYaml.split(/^(?:# Made by `npm run config-docs`.*\n)?config:$/m)[0];
    let readme = readFileSync(README, "utf8");
    readme = between(readme, TABLE_START, TABLE_END, renderReadmeTable(), "README.md");
    readme = between(readme, POLICY_START, POLICY_END, renderPolicyTable(), "README.md");
    return { [PULUMI_YAML]: `${head}${renderPulumiConfig()}`, [README]: readme };
}

if (require.main === module) {
    for (const [file, text] of Object.entries(renderedFiles())) {
        writeFileSync(file, text);
        console.log(`config-docs: wrote ${path.relative(process.cwd(), file)}`);
    }
}
