import { SecretValue } from "../../lib/offline";

export function isSecret(value: unknown): boolean {
    return value instanceof SecretValue;
}

/** Every string in `value` that is not under a SecretValue, for scanning plain data for keys. */
export function plainStrings(value: unknown): string[] {
    if (value instanceof SecretValue) return [];
    if (typeof value === "string") return [value];
    if (Array.isArray(value)) return value.flatMap(plainStrings);
    if (value !== null && typeof value === "object") return Object.values(value).flatMap(plainStrings);
    return [];
}
