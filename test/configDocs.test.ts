import { readFileSync } from "node:fs";
import * as path from "node:path";
import * as yaml from "js-yaml";
import { HOST_KEYS, KEYS, PROJECT } from "../lib/config";
import { KeyDeclaration, readKey } from "../lib/configSchema";
import { renderedFiles } from "../tools/configDocs";

describe("files made from the key declarations (npm run config-docs)", () => {
    it.each(Object.entries(renderedFiles()).map(([file, text]) => [path.basename(file), file, text]))("%s is up to date", (_name, file, expected) => {
        const actual = readFileSync(file, "utf8");
        if (actual !== expected) {
            throw new Error(`${path.basename(file)} differs from the declarations in lib/config.ts; run \`npm run config-docs\` and commit the result`);
        }
    });

    const project = yaml.load(readFileSync(path.join(__dirname, "..", "Pulumi.yaml"), "utf8")) as { config: Record<string, Record<string, unknown>> };

    it("Pulumi.yaml declares every key without a per-stack default, with the types Pulumi's project schema takes", () => {
        const expected = Object.entries(KEYS)
            .filter(([, d]) => !("stackDefaults" in d))
            .map(([k]) => k);
        expect(Object.keys(project.config)).toEqual(expected);
        expect(project.config.hosts).toMatchObject({ type: "object", default: {} });
        for (const declaration of Object.values(project.config)) {
            // pulumi/pulumi sdk/go/common/workspace/project.json (simpleConfigType; object since CLI 3.186)
            expect(["string", "integer", "boolean", "array", "object"]).toContain(declaration.type);
            if (declaration.type === "array") expect(declaration.items).toEqual({ type: "string" });
        }
    });

    it("every default, for every stack, passes the key's own rules", () => {
        for (const [name, d] of [...Object.entries(KEYS), ...Object.entries(HOST_KEYS)]) {
            for (const stack of ["staging", ...Object.keys(("stackDefaults" in d && d.stackDefaults) || {})]) {
                if (d.default === undefined && !("stackDefaults" in d)) continue;
                expect(readKey(d as KeyDeclaration, `${PROJECT}:${name}`, undefined, stack)).toMatchObject({ ok: true });
            }
        }
    });
});
