"use strict";
/**
 * `node --require ./tools/registerTs.js tools/preview.ts`: runs the project's TypeScript without
 * ts-node. Each .ts file is transpiled by the project's own TypeScript with the compiler options
 * of tsconfig.json (transpile only: type checking is `npm run typecheck`), and the output is
 * cached under node_modules/.cache keyed by the file's content, the TypeScript version and
 * tsconfig.json. A warm run loads neither a compiler nor a transpiler, which is what keeps the
 * offline preview close to the cost of loading the Pulumi SDK itself (see `npm run bench`);
 * ts-node or a transpile-on-require hook pays its own start-up on every run.
 * An edited file changes its key, so the cache is never stale; a cache that cannot be written
 * (read-only node_modules) only costs a transpile per run.
 *
 * Plain JavaScript, because it is what makes TypeScript loadable.
 */
const { createHash } = require("node:crypto");
const fs = require("node:fs");
const Module = require("node:module");
const path = require("node:path");

const PROJECT_DIR = path.join(__dirname, "..");
const TSCONFIG = path.join(PROJECT_DIR, "tsconfig.json");
const CACHE_DIR = path.join(PROJECT_DIR, "node_modules", ".cache", "nixos-ec2-ts");
/** Bump when this file changes what it emits: older cache entries are then never read. */
const EMIT_VERSION = "1";

let salt;
/** What, besides a file's content, decides its output. Read once per process; small files only. */
function cacheSalt() {
    if (salt === undefined) {
        const tsVersion = JSON.parse(fs.readFileSync(require.resolve("typescript/package.json"), "utf8")).version;
        salt = `${EMIT_VERSION}\0${tsVersion}\0${fs.readFileSync(TSCONFIG, "utf8")}\0`;
    }
    return salt;
}

let ts;
let compilerOptions;
function transpile(source, filename) {
    if (ts === undefined) {
        ts = require("typescript");
        const { config, error } = ts.readConfigFile(TSCONFIG, ts.sys.readFile);
        if (error) throw new Error(`${TSCONFIG}: ${ts.flattenDiagnosticMessageText(error.messageText, "\n")}`);
        const { options, errors } = ts.convertCompilerOptionsFromJson(config.compilerOptions ?? {}, PROJECT_DIR);
        if (errors.length > 0) throw new Error(`${TSCONFIG}: ${errors.map((e) => ts.flattenDiagnosticMessageText(e.messageText, "\n")).join("; ")}`);
        compilerOptions = { ...options, module: ts.ModuleKind.CommonJS, noEmit: false, declaration: false, sourceMap: false, inlineSourceMap: false };
    }
    return ts.transpileModule(source, { compilerOptions, fileName: filename, reportDiagnostics: false }).outputText;
}

function writeCache(file, text) {
    try {
        fs.mkdirSync(CACHE_DIR, { recursive: true });
        // Write then rename: a concurrent run reads either nothing or the whole file.
        const temporary = `${file}.${process.pid}.tmp`;
        fs.writeFileSync(temporary, text);
        fs.renameSync(temporary, file);
    } catch {
        // Not writable: the next run transpiles again.
    }
}

Module._extensions[".ts"] = function loadTypeScript(module, filename) {
    const source = fs.readFileSync(filename, "utf8");
    const key = createHash("sha256").update(cacheSalt()).update(source).digest("hex");
    const cached = path.join(CACHE_DIR, `${key}.js`);
    let js;
    try {
        js = fs.readFileSync(cached, "utf8");
    } catch {
        js = transpile(source, filename);
        writeCache(cached, js);
    }
    module._compile(js, filename);
};
