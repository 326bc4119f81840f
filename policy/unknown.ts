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

/** Whether `object[key]` is set; a value that is unknown until deploy counts as set. */
export function isSet(object: Record<string, unknown> | undefined, key: string): boolean {
    if (object === undefined || object === null || !(key in object)) return false;
    try {
        const value = object[key];
        return value !== undefined && value !== null && value !== "";
    } catch (e) {
        if (isUnknownValueError(e)) return true;
        throw e;
    }
}
