/**
 * `npm run sops-config`, run as a person runs it, against a stand-in Pulumi CLI that answers
 * `pulumi stack output --json -s STACK` with the outputs of the real program (run under the mocks,
 * whose host keys are real ED25519 keys): the .sops.yaml it writes, and that a file encrypted to a
 * rule's recipients opens with each host's key, as sops-nix opens it on the host, and with no other.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { chmodSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import * as path from "node:path";
import * as yaml from "js-yaml";
import { ageIdentityOf, ageRecipientOf } from "../lib/age";
import { fakeKeyPair, OfflineRun, SecretValue } from "../lib/offline";
import { PROJECT_DIR } from "../lib/stacks";
import { runProgram } from "./support/program";
import { tempDir } from "./support/tempDir";
import { describeWithTools } from "./support/tools";

interface SopsYaml {
    creation_rules: Array<{ path_regex: string; key_groups: Array<{ age: string[] }> }>;
}

/**
 * What `pulumi stack output --json` prints: the outputs with every secret as "[secret]" (no
 * --show-secrets: display.MassageSecrets in pkg/backend/display/json.go), as Go's JSON encoder
 * writes a map (keys sorted, two-space indent, a final newline: pkg/cmd/pulumi/ui/json.go).
 */
function cliJson(outputs: Record<string, unknown>): string {
    const blind = (v: unknown): unknown => {
        if (v instanceof SecretValue) return "[secret]";
        if (Array.isArray(v)) return v.map(blind);
        if (v !== null && typeof v === "object") return Object.fromEntries(Object.keys(v).sort().map((k) => [k, blind((v as Record<string, unknown>)[k])]));
        return v;
    };
    return `${JSON.stringify(blind(outputs), null, 2)}\n`;
}

/**
 * A stand-in `pulumi` for `stack output`, after pkg/cmd/pulumi/stack/stack_output.go: `--json`
 * (`-j`) and `--stack` (`-s`) anywhere among the arguments, an optional property name; an unknown
 * stack fails as the backend says it (pkg/backend/backenderr/backenderr.go, "no stack named '%s'
 * found"), and an unknown property as stack_output.go does; the CLI exits 255 on an error.
 * `--show-secrets` is refused, so that a test fails if the tool ever asks for secrets.
 */
function fakePulumi(dir: string): string {
    const bin = path.join(dir, "bin");
    mkdirSync(bin);
    const file = path.join(bin, "pulumi");
    writeFileSync(
        file,
        `#!/usr/bin/env bash
set -euo pipefail
printf '%s\\n' "$*" >>${JSON.stringify(path.join(dir, "calls"))}
[[ \${1:-} == stack && \${2:-} == output ]] || { echo "error: the stand-in answers only stack output" >&2; exit 255; }
shift 2
json=false stack="" name=""
while (($#)); do
    case $1 in
    --json | -j) json=true ;;
    --stack | -s) stack=$2; shift ;;
    --show-secrets) echo "error: the stand-in refuses --show-secrets" >&2; exit 255 ;;
    -*) echo "error: unknown flag: $1" >&2; exit 255 ;;
    *) name=$1 ;;
    esac
    shift
done
[[ $json == true && -z $name ]] || { echo "error: the stand-in answers only --json for all outputs" >&2; exit 255; }
outputs=${JSON.stringify(path.join(dir, "stacks"))}/$stack.json
[[ -f $outputs ]] || { echo "error: no stack named '$stack' found" >&2; exit 255; }
cat "$outputs"
`,
    );
    chmodSync(file, 0o755);
    mkdirSync(path.join(dir, "stacks"));
    return bin;
}

function sopsConfig(bin: string, ...args: string[]) {
    const result = spawnSync(process.execPath, ["--require", "./tools/registerTs.js", "tools/sopsConfig.ts", ...args], {
        cwd: PROJECT_DIR,
        env: { ...process.env, PATH: `${bin}:${process.env.PATH ?? ""}` },
        encoding: "utf8",
    });
    return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

describeWithTools(["bash", "age", "age-keygen"])("npm run sops-config", () => {
    let dir: string;
    let bin: string;
    let staging: OfflineRun;
    let admin: { identity: string; recipient: string };
    beforeAll(async () => {
        dir = tempDir("sops-config-");
        bin = fakePulumi(dir);
        // Two hosts of staging deploy one configuration; prod deploys its own.
        staging = await runProgram("staging", { hosts: JSON.stringify({ web: {}, web2: { flakeAttr: "web" } }) });
        writeFileSync(path.join(dir, "stacks", "staging.json"), cliJson(staging.outputs));
        writeFileSync(path.join(dir, "stacks", "prod.json"), cliJson((await runProgram("prod")).outputs));
        const identity = path.join(dir, "admin.key");
        execFileSync("age-keygen", ["-o", identity], { stdio: "ignore" });
        admin = { identity, recipient: execFileSync("age-keygen", ["-y", identity], { encoding: "utf8" }).trim() };
    });

    const recipientOf = (name: string) => ageRecipientOf(fakeKeyPair(`ssh-host-${name}`).publicKey);

    it("writes a rule per configuration the stacks deploy, for its hosts' recipients and the admins'", () => {
        const file = path.join(dir, "sops.yaml");
        const run = sopsConfig(bin, "staging", "prod", "--admin", admin.recipient, "--file", file);
        expect(run.stderr).toBe(`sops-config: wrote ${path.relative(PROJECT_DIR, file)} (2 creation rules)\n`);
        expect(run.status).toBe(0);
        const text = readFileSync(file, "utf8");
        expect(text).toMatch(/^# Made by `npm run sops-config -- staging prod` from the stacks' ageRecipients outputs/);
        const config = yaml.load(text) as SopsYaml;
        expect(config.creation_rules).toEqual([
            { path_regex: "(^|/)nix/secrets/prod\\.yaml$", key_groups: [{ age: [recipientOf("prod"), admin.recipient] }] },
            { path_regex: "(^|/)nix/secrets/web\\.yaml$", key_groups: [{ age: [recipientOf("web"), recipientOf("web2"), admin.recipient] }] },
        ]);
        expect((staging.outputs.ageRecipients as Record<string, string>).web).toBe(recipientOf("web"));
        expect(text).toContain(`${recipientOf("web2")} # host web2 of stack staging\n`);
        // Only the outputs, never their secrets.
        expect(readFileSync(path.join(dir, "calls"), "utf8").trim().split("\n").slice(-2)).toEqual(["stack output --json -s staging", "stack output --json -s prod"]);
    });

    it("gives sops rules that match each file by its path from the project root, and nothing else", () => {
        const config = yaml.load(sopsConfig(bin, "staging", "prod", "--print").stdout) as SopsYaml;
        // sops compiles path_regex with Go's regexp; these use nothing Go and JavaScript read differently.
        const web = new RegExp(config.creation_rules[1].path_regex);
        expect(["nix/secrets/web.yaml", "/home/me/nixos-ec2/nix/secrets/web.yaml"].map((p) => web.test(p))).toEqual([true, true]);
        expect(["nix/secrets/web.yaml.bak", "nix/secrets/prod.yaml", "nix/secrets/webXyaml", "other-nix/secrets/web.yaml"].map((p) => web.test(p))).toEqual([false, false, false, false]);
    });

    it("encrypts so that each host of the rule decrypts with its SSH host key's identity (as sops-nix does), the admin too, and no other host", () => {
        const config = yaml.load(sopsConfig(bin, "staging", "prod", "--admin", admin.recipient, "--print").stdout) as SopsYaml;
        const recipients = config.creation_rules[1].key_groups[0].age;
        const plaintext = "the data key of nix/secrets/web.yaml\n";
        const encrypted = execFileSync("age", ["--encrypt", ...recipients.flatMap((r) => ["--recipient", r])], { input: plaintext });
        const decrypt = (identity: string) => spawnSync("age", ["--decrypt", "--identity", identity], { input: encrypted, encoding: "utf8" });
        for (const host of ["web", "web2", "prod"]) {
            const identity = path.join(dir, `${host}.identity`);
            writeFileSync(identity, `${ageIdentityOf(fakeKeyPair(`ssh-host-${host}`).privateKey)}\n`, { mode: 0o600 });
            expect({ host, out: decrypt(identity).stdout }).toEqual({ host, out: host === "prod" ? "" : plaintext });
        }
        expect(decrypt(admin.identity).stdout).toBe(plaintext);
    });

    it("fails, saying why, for a stack the CLI does not know, outputs of an older program, or a bad admin recipient", () => {
        const unknown = sopsConfig(bin, "nope", "--print");
        expect(unknown.status).toBe(1);
        expect(unknown.stderr).toBe("sops-config: pulumi stack output --json -s nope failed (exit status 255): error: no stack named 'nope' found\n");

        const old = { ...staging.outputs } as Record<string, unknown>;
        delete old.ageRecipients;
        writeFileSync(path.join(dir, "stacks", "old.json"), cliJson(old));
        const older = sopsConfig(bin, "old", "--print");
        expect(older.status).toBe(1);
        expect(older.stderr).toBe("sops-config: stack old has no ageRecipients output; run `pulumi up -s old` with this version of the program first\n");

        const bad = sopsConfig(bin, "staging", "--admin", "ssh-ed25519 AAAA");
        expect(bad.status).toBe(2);
        expect(bad.stderr).toMatch(/^sops-config: --admin "ssh-ed25519 AAAA" is not an age recipient/);
        expect(sopsConfig(bin).stderr).toMatch(/^sops-config: name at least one stack\n\nusage: npm run sops-config/);
    });
});
