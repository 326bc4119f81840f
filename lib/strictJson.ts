/**
 * JSON read the way a careful reader needs it: JSON.parse takes the last of two equal keys without
 * a word and says little about where text goes wrong. This reader refuses duplicate keys and
 * says where a problem is (line and column), using jsonc-parser's syntax tree, with comments and
 * trailing commas refused as plain JSON refuses them.
 */
import { getNodeValue, Node, ParseError, parseTree, printParseErrorCode } from "jsonc-parser";

export type JsonRead = { readonly ok: true; readonly value: unknown } | { readonly ok: false; readonly problem: string };

export interface JsonReadOptions {
    /**
     * Refuse number literals that are not plain whole numbers (`80.0`, `1e2`): Nix's
     * builtins.fromJSON reads them as floats, which a port option refuses.
     */
    readonly wholeNumbersOnly?: boolean;
}

const PHRASES: Record<string, string> = {
    InvalidSymbol: "an unexpected character",
    InvalidNumberFormat: "a malformed number",
    PropertyNameExpected: "a missing property name",
    ValueExpected: "a missing value",
    ColonExpected: "a missing ':'",
    CommaExpected: "a missing ','",
    CloseBraceExpected: "a missing '}'",
    CloseBracketExpected: "a missing ']'",
    EndOfFileExpected: "text after the end of the value",
    InvalidCommentToken: "a comment (JSON has none)",
    UnexpectedEndOfString: "a string that does not end",
    UnexpectedEndOfNumber: "a number that does not end",
    InvalidUnicode: "a bad \\u escape",
    InvalidEscapeCharacter: "a bad escape",
    InvalidCharacter: "a control character in a string",
};

/** 1-based line and column of a character offset. */
export function lineColumn(text: string, offset: number): string {
    const before = text.slice(0, offset).split("\n");
    return `line ${before.length} column ${before[before.length - 1].length + 1}`;
}

export function readJson(text: string, options: JsonReadOptions = {}): JsonRead {
    const errors: ParseError[] = [];
    const tree = parseTree(text, errors, { disallowComments: true, allowTrailingComma: false, allowEmptyContent: false });
    if (errors.length > 0 || tree === undefined) {
        const first = errors[0];
        const what = first ? (PHRASES[printParseErrorCode(first.error)] ?? printParseErrorCode(first.error)) : "no value";
        return { ok: false, problem: `is not valid JSON: ${what} at ${lineColumn(text, first?.offset ?? 0)}` };
    }
    const structural = walk(tree, text, options);
    if (structural) return { ok: false, problem: structural };
    // jsonc-parser is lenient in corners that JSON.parse (and the Pulumi CLI) are not.
    try {
        JSON.parse(text);
    } catch (e) {
        return { ok: false, problem: `is not valid JSON: ${(e as Error).message}` };
    }
    return { ok: true, value: getNodeValue(tree) };
}

function walk(node: Node, text: string, options: JsonReadOptions): string | undefined {
    if (node.type === "object") {
        const seen = new Set<string>();
        for (const property of node.children ?? []) {
            const [key, value] = property.children ?? [];
            const name = key.value as string;
            // JavaScript objects cannot hold this key as data: it would vanish into the prototype.
            if (name === "__proto__") return `has the key "__proto__" (at ${lineColumn(text, key.offset)}), which is not allowed`;
            if (seen.has(name)) return `has the key ${JSON.stringify(name)} twice (again at ${lineColumn(text, key.offset)}); each key may appear once`;
            seen.add(name);
            const inner = value && walk(value, text, options);
            if (inner) return inner;
        }
    } else if (node.type === "array") {
        for (const item of node.children ?? []) {
            const inner = walk(item, text, options);
            if (inner) return inner;
        }
    } else if (node.type === "number" && options.wholeNumbersOnly) {
        const literal = text.slice(node.offset, node.offset + node.length);
        if (!/^-?(0|[1-9][0-9]*)$/.test(literal)) {
            return `has ${literal} at ${lineColumn(text, node.offset)}, which Nix reads as a float; write whole numbers without a fraction or exponent`;
        }
    }
    return undefined;
}
