/**
 * The README's `pulumi` commands, checked against the CLI: every command in its shell blocks and
 * inline code is one the table below knows, with only flags the CLI has, and the minimum CLI
 * version the Prerequisites name is the newest version any of them needs.
 */
import { readFileSync } from "node:fs";
import * as path from "node:path";
import { PROJECT_DIR } from "../lib/stacks";

interface CliCommand {
    /** Flags the README may use; `-s` is `--stack`. */
    readonly flags: readonly string[];
    /** The CLI version that brought the command (or the newest flag of it the README uses). */
    readonly since: string;
}

/**
 * Checked in pulumi/pulumi: `pulumi stack migrate <url> [stack-name]` with `--secrets-provider`,
 * `--target`, `--yes`, `--force` is in tag v3.254.0 (pkg/cmd/pulumi/stack/stack_migrate.go);
 * `up --continue-on-error` in v3.112.0, `state rename` in v3.26.0, `destroy --exclude-protected`
 * in v3.18.0. "3.0" marks commands that every 3.x has: among them `config set --secret` and
 * `config rm` (pkg/cmd/pulumi/config/config.go) and `stack output --json`
 * (pkg/cmd/pulumi/stack/stack_output.go).
 */
const CLI: Record<string, CliCommand> = {
    login: { flags: ["--local"], since: "3.0" },
    up: { flags: ["-s", "--replace", "--policy-pack"], since: "3.0" },
    "up --continue-on-error": { flags: ["-s", "--continue-on-error"], since: "3.112" },
    preview: { flags: ["-s", "--policy-pack"], since: "3.0" },
    refresh: { flags: ["-s"], since: "3.0" },
    destroy: { flags: ["-s"], since: "3.0" },
    "destroy --exclude-protected": { flags: ["-s", "--exclude-protected"], since: "3.18" },
    stack: { flags: ["-s", "--show-urns"], since: "3.0" },
    "stack init": { flags: [], since: "3.0" },
    // --json: pkg/cmd/pulumi/stack/stack_output.go (npm run status reads the outputs so).
    "stack output": { flags: ["-s", "--show-secrets", "--json"], since: "3.0" },
    "config set": { flags: ["-s", "--secret"], since: "3.0" },
    "config rm": { flags: ["-s"], since: "3.0" },
    "stack rm": { flags: ["-s", "--force", "--preserve-config"], since: "3.0" },
    "stack migrate": { flags: ["--secrets-provider", "--target", "--yes", "--force"], since: "3.254" },
    "state rename": { flags: ["-s"], since: "3.26" },
};

/** `type: object` in the project's config schema (Pulumi.yaml declares `hosts` so). */
const OBJECT_CONFIG_SINCE = "3.186";

const README = readFileSync(path.join(PROJECT_DIR, "README.md"), "utf8");

/** The lines of the README's sh blocks, without comments. */
function shellLines(): string[] {
    const blocks = [...README.matchAll(/^\s*```sh\n([\s\S]*?)^\s*```$/gm)].map((m) => m[1]);
    return blocks.flatMap((b) => b.split("\n")).map((l) => l.replace(/\s+#.*$/, "").trim()).filter((l) => l !== "");
}

/** Each `pulumi ...` command: in shell lines (also inside `$(...)` or after VAR=...), and in inline code. */
function commands(): string[] {
    const inShell = shellLines().flatMap((l) => [...l.matchAll(/(?:^|[\s(])(pulumi [^)|]*)/g)].map((m) => m[1].trim()));
    const inline = [...README.replace(/```[\s\S]*?```/g, "").matchAll(/`(?:[A-Z_]+=\S+ )?(pulumi [^`|]*)`/g)].map((m) => m[1].trim());
    return [...inShell, ...inline];
}

/** The table's entry for a command, by its subcommand words and flags. */
function lookUp(command: string): { key: string; flags: string[]; positional: string[] } {
    const words = command.split(/\s+/).slice(1);
    const sub = `${words[0]} ${words[1]}` in CLI ? `${words[0]} ${words[1]}` : words[0];
    const rest = words.slice(sub.split(" ").length);
    const flags = rest.filter((w) => w.startsWith("-")).map((w) => w.replace(/=.*$/, ""));
    const key = flags.map((f) => `${sub} ${f}`).find((k) => k in CLI) ?? sub;
    // Flag values count as positional here; the callers look only at the first words.
    return { key, flags, positional: rest.filter((w) => !w.startsWith("-")) };
}

function newest(versions: string[]): string {
    const parts = (v: string) => v.split(".").map(Number);
    return versions.reduce((a, b) => (parts(b)[0] > parts(a)[0] || (parts(b)[0] === parts(a)[0] && parts(b)[1] > parts(a)[1]) ? b : a));
}

describe("the README's pulumi commands", () => {
    const found = commands();

    it("are many, from the shell blocks and the prose", () => {
        expect(found.length).toBeGreaterThan(30);
        expect(found).toContain('pulumi stack migrate file://~ staging --secrets-provider "$SECRETS"');
        expect(found).toContain("pulumi stack output -s staging backendUrl");
    });

    it("are each a command of the table, with flags the CLI has", () => {
        const unknown = found.filter((c) => {
            const { key, flags } = lookUp(c);
            return !(key in CLI) || flags.some((f) => !CLI[key].flags.includes(f));
        });
        expect(unknown).toEqual([]);
    });

    it("need the CLI version the Prerequisites name, the newest any of them needs", () => {
        const pulumiYaml = readFileSync(path.join(PROJECT_DIR, "Pulumi.yaml"), "utf8");
        const needed = [...found.map((c) => CLI[lookUp(c).key].since), ...(/^\s+type: object$/m.test(pulumiYaml) ? [OBJECT_CONFIG_SINCE] : [])];
        expect(newest(needed)).toBe("3.254");
        expect(README).toMatch(new RegExp(`^- \\[Pulumi CLI\\]\\([^)]*\\) ${newest(needed).replace(".", "\\.")} or newer`, "m"));
    });

    it("move the state with stack migrate from the local backend, and never pipe an export into an import", () => {
        const migrations = found.filter((c) => lookUp(c).key === "stack migrate");
        expect(migrations.length).toBeGreaterThan(0);
        // `migrate <url> [stack-name]`: the backend the stack comes from, then its name.
        for (const m of migrations.filter((c) => lookUp(c).positional.length > 0)) expect(lookUp(m).positional.slice(0, 2)).toEqual(["file://~", "staging"]);
        expect(shellLines().filter((l) => /pulumi stack export.*\|.*pulumi stack import/.test(l))).toEqual([]);
        expect(shellLines().filter((l) => /pulumi stack (import|init)/.test(l) && !l.startsWith("pulumi stack init staging"))).toEqual([]);
    });

    it("re-image a host with imageGeneration, not with --replace, which keeps the AMI in state", () => {
        // Replacing a deploy Command (npm run status's advice for a drifted host) re-runs the deploy only.
        const deploy = /--replace 'urn:pulumi:\w+::nixos-ec2::nixos-ec2:index:NixosDeployment\$command:local:Command::[a-z0-9-]+-switch'$/;
        expect(shellLines().filter((l) => l.includes("--replace") && !deploy.test(l))).toEqual([]);
        expect(README).toMatch(/staging: \{ imageGeneration: 1 \}/);
    });
});
