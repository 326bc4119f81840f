/**
 * How a config key is declared, and what is made from the declarations: reading and validating
 * the strings Pulumi hands a program (with zod), and the messages of every problem. lib/config.ts
 * holds the declarations themselves; tools/configDocs.ts makes Pulumi.yaml's `config:` section and
 * the README's table from them.
 */
import { z } from "zod";
import { readJson } from "./strictJson";

/** The types of Pulumi's project config schema (Pulumi.yaml `config.<key>.type`). */
export type PulumiType = "string" | "integer" | "boolean" | "array" | "object";

/** A zod `error` parameter: a problem phrase and what is allowed instead. */
export type Bad = (problem: string) => { error: string };

interface Declared<S extends z.ZodType> {
    /** How Pulumi.yaml declares the key, and so how its config string is read. */
    readonly type: PulumiType;
    /** The default; absent means the key must be set (the CLI demands it, and so does the program). */
    readonly default?: z.input<S>;
    /**
     * Defaults of particular stacks. Pulumi.yaml cannot say "true on prod": a declared default
     * applies to every stack, and a declared key without one is required. Such keys are therefore
     * left out of Pulumi.yaml's typed declarations (listed in a comment there) and defaulted here.
     */
    readonly stackDefaults?: Readonly<Record<string, z.input<S>>>;
    /** The README's default column when the default is not a value, e.g. "the host name". */
    readonly defaultDescription?: string;
    /** What a good value looks like; ends every message about this key and fills the README. */
    readonly allowed: string;
    /** One or two sentences for Pulumi.yaml and the README. */
    readonly description: string;
}

export interface KeyDeclaration<S extends z.ZodType = z.ZodType> extends Declared<S> {
    /** The value's rules; its output is the setting's type. */
    readonly schema: S;
}

/**
 * A key's declaration. `schema` builds the value's rules; `bad("is not an AMI ID")` is the error
 * of a check, which the key's `allowed` completes, so that a message is written once per key.
 */
export function declare<S extends z.ZodType>(declaration: Declared<S> & { readonly schema: (bad: Bad) => S }): KeyDeclaration<S> {
    const bad: Bad = (problem) => ({ error: `${problem}; allowed: ${declaration.allowed}` });
    return { ...declaration, schema: declaration.schema(bad) };
}

// Kinds of values that several keys share.

/** A whole number from `min` to `max`, as a config string ("20") or a JSON number (20). */
export function wholeNumber(bad: Bad, min: number, max: number) {
    return z
        .union([z.int(), z.string().regex(/^-?[0-9]+$/).transform(Number)], bad("is not allowed"))
        .pipe(z.int(bad("is not allowed")).min(min, bad("is not allowed")).max(max, bad("is not allowed")));
}

/** "true" or "false", as a config string or a JSON boolean. */
export function trueOrFalse(bad: Bad) {
    return z.union([z.boolean(), z.enum(["true", "false"]).transform((v) => v === "true")], bad("is not allowed"));
}

/** An AWS ID such as `vpc-0123abcd`, or "" for none. */
export function optionalId(bad: Bad, pattern: RegExp, problem: string) {
    return z
        .string(bad(problem))
        .regex(new RegExp(`^$|${pattern.source}`), bad(problem))
        .transform((v) => v || undefined);
}

/** A value as it appears in a message: JSON, cut when long, so one huge value cannot flood it. */
export function show(value: unknown, limit = 80): string {
    // JSON would print Infinity as null and -0 as 0.
    const text = typeof value === "number" && (!Number.isFinite(value) || Object.is(value, -0)) ? String(value) : JSON.stringify(value);
    return cut(text ?? String(value), limit);
}

export function cut(text: string, limit = 80): string {
    return text.length <= limit ? text : `${text.slice(0, limit)}… (${text.length} characters)`;
}

export type KeyResult<T> = { readonly ok: true; readonly value: T } | { readonly ok: false; readonly problems: string[] };

/**
 * Reads one key's config string (undefined or "" when unset) and validates it. `where` names the
 * key in messages (`nixos-ec2:hosts`); `stack` picks a stack default.
 */
export function readKey<S extends z.ZodType>(declaration: KeyDeclaration<S>, where: string, text: string | undefined, stack: string): KeyResult<z.output<S>> {
    let value: unknown;
    let shown: string;
    if (text === undefined || text === "") {
        value = declaration.stackDefaults?.[stack] ?? declaration.default;
        if (value === undefined) return { ok: false, problems: [`${where}: not set; allowed: ${declaration.allowed}; there is no default`] };
        shown = show(value);
    } else if (declaration.type === "array" || declaration.type === "object") {
        const read = readJson(text);
        shown = cut(text.replace(/\s+/g, " ")); // one line, however the JSON was laid out
        if (!read.ok) return { ok: false, problems: [`${where}: ${shown} ${read.problem}; allowed: ${declaration.allowed}`] };
        value = read.value;
    } else {
        value = text;
        shown = show(text);
    }
    const result = declaration.schema.safeParse(value, { reportInput: true });
    if (result.success) return { ok: true, value: result.data };
    const problems = result.error.issues.flatMap((issue) => describeIssue(issue, where, shown, declaration.allowed));
    return { ok: false, problems: [...new Set(problems)] };
}

/** A zod issue as `key[.path]: value problem; allowed: ...`. */
function describeIssue(issue: z.core.$ZodIssue, where: string, shown: string, allowed: string): string[] {
    const steps = issue.path.map((p) => (typeof p === "number" ? `[${p}]` : `.${String(p)}`));
    const at = `${where}${steps.join("")}`;
    // zod's own wording stands only where a check has no `error` of ours; say what is allowed then.
    const message = issue.message.includes("; allowed: ") ? issue.message : `is not allowed (${issue.message}); allowed: ${allowed}`;
    switch (issue.code) {
        case "unrecognized_keys":
            return issue.keys.map((k) => `${at}.${cut(k, 60)}: ${message}`);
        case "invalid_key": // a record's key: the message names it, at the record's own path
            return [`${where}${steps.slice(0, -1).join("")}: ${message}`];
        default:
            return [`${at}: ${issue.path.length > 0 ? show(issue.input) : shown} ${message}`];
    }
}
