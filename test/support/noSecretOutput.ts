/**
 * Loaded before every test file: a test that prints a private key fails, whichever key it is.
 * (The keys in tests are fakes from the mocks or throwaway keys, but the habit is what counts.)
 */
const KEY_MARKER = /PRIVATE KEY-----/;

for (const stream of [process.stdout, process.stderr]) {
    const write = stream.write.bind(stream) as (...args: unknown[]) => boolean;
    stream.write = ((chunk: unknown, ...rest: unknown[]) => {
        if (KEY_MARKER.test(String(chunk))) throw new Error("a test tried to print a private key");
        return write(chunk, ...rest);
    }) as typeof stream.write;
}
function printable(value: unknown): string {
    if (typeof value === "string") return value;
    try {
        return JSON.stringify(value) ?? String(value);
    } catch {
        return String(value);
    }
}

for (const method of ["log", "info", "warn", "error", "debug"] as const) {
    const original = console[method].bind(console);
    console[method] = (...args: unknown[]) => {
        if (args.some((a) => KEY_MARKER.test(printable(a)))) {
            throw new Error("a test tried to print a private key");
        }
        original(...args);
    };
}
