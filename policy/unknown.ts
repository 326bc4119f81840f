/**
 * During a preview the policy SDK hands rules an unknown-checking proxy: reading an input that
 * only the deploy can know throws its UnknownValueError (@pulumi/policy proxy.js, which is internal
 * and so not in its typings; the package is pinned in package.json).
 */
// eslint-disable-next-line @typescript-eslint/no-require-imports
const proxy = require("@pulumi/policy/proxy") as {
    UnknownValueError: new (...args: never[]) => Error;
    unknownCheckingProxy<T extends object>(value: T): T;
    unknownStringValue: string;
};

export const { unknownCheckingProxy, unknownStringValue } = proxy;

export function isUnknownValueError(e: unknown): boolean {
    return e instanceof proxy.UnknownValueError;
}

const UNKNOWN = Symbol("unknown until deploy");

/** `object[key]`, or UNKNOWN when the proxy says its value is known only after deploy. */
function peek(object: Record<string, unknown>, key: string): unknown {
    try {
        return object[key];
    } catch (e) {
        if (isUnknownValueError(e)) return UNKNOWN;
        throw e;
    }
}

/** `object[key]`, or undefined when its value is unknown until deploy (the rule then judges nothing). */
export function known(object: Record<string, unknown>, key: string): unknown {
    const value = peek(object, key);
    return value === UNKNOWN ? undefined : value;
}

/** Whether `object[key]` is set; a value that is unknown until deploy counts as set. */
export function isSet(object: Record<string, unknown> | undefined, key: string): boolean {
    if (object === undefined || object === null || !(key in object)) return false;
    const value = peek(object, key);
    return value === UNKNOWN || (value !== undefined && value !== null && value !== "");
}
