/**
 * Host secrets under the mock runtime: the configuration's rules (nixos-ec2:hostSecrets and the
 * nixos-ec2:secret.<name> values), that every value stays a secret on its way to the deploy
 * (lib/offline.ts records what the program registers, secrets as SecretValue), which hosts a change
 * re-deploys, and what the offline preview prints.
 */
import { spawnSync } from "node:child_process";
import { createHash, createHmac } from "node:crypto";
import { copyFileSync, mkdirSync, writeFileSync } from "node:fs";
import * as path from "node:path";
import { encodeSecrets, secretsTrigger } from "../components/hostSecrets";
import { ConfigError, parseSettings } from "../lib/config";
import { MAX_SECRET_BYTES_PER_HOST, SECRET_NAME_PATTERN } from "../lib/hostSecrets";
import { readNetworkFile } from "../lib/network";
import { OfflineRun, RecordedResource, SecretValue } from "../lib/offline";
import { loadSettings, loadStack, offlineSecretPlaceholder, PROJECT_DIR } from "../lib/stacks";
import { previewNodeArgs } from "../tools/previewCommand";
import { resource, runConfig, runProgram } from "./support/program";
import { plainStrings } from "./support/secrets";
import { tempDir } from "./support/tempDir";

const A = "first-secret-value-7f3a91c2"; // goes to web
const B = "second-secret-value-0d4e6b18\nwith a second line"; // goes to every host
const TWO_HOSTS = JSON.stringify({ web: {}, db: {} });

/** Overrides of the staging stack: two hosts, secret a for web, b for all; secret.* are secrets. */
function withSecrets(extra: Record<string, string> = {}): Record<string, string> {
    return { hosts: TWO_HOSTS, hostSecrets: JSON.stringify({ a: ["web"], b: "all" }), "secret.a": A, "secret.b": B, ...extra };
}

/** Every form a secret value could leak in: as is, a line of it, base64 (the payload), hex, and its SHA-256. */
function leakForms(value: string): string[] {
    const forms = [value, ...value.split("\n").filter((l) => l.length >= 8), Buffer.from(value).toString("base64"), Buffer.from(value).toString("hex")];
    return [...forms, createHash("sha256").update(value).digest("hex")];
}

function expectNoPlainSecret(run: OfflineRun, values: string[]): void {
    const plain = [...run.resources.flatMap((r) => plainStrings(r.inputs)), ...plainStrings(run.outputs)];
    for (const value of values) {
        for (const form of leakForms(value)) {
            // Booleans only: a failing toContain would print the value.
            expect(plain.some((s) => s.includes(form))).toBe(false);
        }
    }
}

function command(run: OfflineRun, host: string): RecordedResource {
    return resource(run, "command:local:Command", `${host}-switch`);
}

function environmentOf(run: OfflineRun, host: string): Record<string, string> {
    const env = command(run, host).inputs.environment;
    expect(env).toBeInstanceOf(SecretValue);
    return (env as SecretValue).value as Record<string, string>;
}

/** The deploy's triggers, whatever of them is secret. */
function triggersOf(run: OfflineRun, host: string): unknown[] {
    const t = command(run, host).inputs.triggers;
    return (t instanceof SecretValue ? t.value : t) as unknown[];
}

/** The mocks' RandomBytes (lib/offline.ts): what the HMAC key is under them. */
function triggerKey(run: OfflineRun): string {
    const key = resource(run, "random:index/randomBytes:RandomBytes", "secrets-trigger-key");
    expect(key.inputs).toEqual({ length: 32 });
    return createHash("sha512").update("bytes:secrets-trigger-key").digest().subarray(0, 32).toString("hex");
}

describe("nixos-ec2:hostSecrets and nixos-ec2:secret.<name> (configuration)", () => {
    const base = { "aws:region": "eu-central-1", "nixos-ec2:sshAllowedCidrs": '["192.168.10.0/24"]', "nixos-ec2:hosts": TWO_HOSTS };
    const problemsOf = (config: Record<string, string>, secretKeys?: string[]): string[] => {
        const keys = secretKeys ?? Object.keys(config).filter((k) => k.startsWith("nixos-ec2:secret."));
        try {
            parseSettings("staging", { ...base, ...config }, readNetworkFile(), keys);
        } catch (e) {
            expect(e).toBeInstanceOf(ConfigError);
            return (e as ConfigError).problems;
        }
        throw new Error("expected a ConfigError");
    };

    it("reads which hosts get which secret, 'all' meaning every host of the stack", () => {
        const s = parseSettings(
            "staging",
            { ...base, "nixos-ec2:hostSecrets": JSON.stringify({ b: "all", a: ["web"] }), "nixos-ec2:secret.a": A, "nixos-ec2:secret.b": B },
            readNetworkFile(),
            ["nixos-ec2:secret.a", "nixos-ec2:secret.b"],
        );
        expect(s.secrets).toEqual([
            { name: "a", configKey: "nixos-ec2:secret.a", hosts: ["web"] },
            { name: "b", configKey: "nixos-ec2:secret.b", hosts: ["web", "db"] },
        ]);
        expect(JSON.stringify(s)).not.toContain("first-secret");
    });

    it("has no secrets by default, and the committed stacks have none", () => {
        expect(parseSettings("staging", base, readNetworkFile()).secrets).toEqual([]);
        for (const stack of ["staging", "prod"]) expect(loadSettings(stack).secrets).toEqual([]);
    });

    it.each([
        [
            "a secret named but not set",
            { "nixos-ec2:hostSecrets": '{"a": ["web"]}' },
            "nixos-ec2:hostSecrets.a: names the secret a, but nixos-ec2:secret.a is not set; set it with `pulumi config set --secret nixos-ec2:secret.a` (the value on standard input or at the prompt), or remove a from nixos-ec2:hostSecrets",
        ],
        [
            "a secret named but set to nothing",
            { "nixos-ec2:hostSecrets": '{"a": ["web"]}', "nixos-ec2:secret.a": "" },
            "nixos-ec2:hostSecrets.a: names the secret a, but nixos-ec2:secret.a is not set;",
        ],
        [
            "a secret set but named nowhere",
            { "nixos-ec2:secret.orphan": A },
            "nixos-ec2:secret.orphan: is set, but nixos-ec2:hostSecrets names no secret orphan, so no host would get it; add \"orphan\": \"all\" (or a list of hosts) to nixos-ec2:hostSecrets, or remove it with `pulumi config rm nixos-ec2:secret.orphan`",
        ],
        [
            "an unknown host",
            { "nixos-ec2:hostSecrets": '{"a": ["web", "wbe"]}', "nixos-ec2:secret.a": A },
            'nixos-ec2:hostSecrets.a[1]: "wbe" is not a host of stack "staging"; allowed: "all" or hosts of the stack (web, db)',
        ],
        [
            "a host named twice",
            { "nixos-ec2:hostSecrets": '{"a": ["web", "web"]}', "nixos-ec2:secret.a": A },
            'nixos-ec2:hostSecrets.a[1]: lists "web" a second time; allowed: each host once',
        ],
        [
            "no host at all",
            { "nixos-ec2:hostSecrets": '{"a": []}', "nixos-ec2:secret.a": A },
            "nixos-ec2:hostSecrets.a: [] is an empty list, which names no host; allowed: a map of secret names matching",
        ],
        [
            "a value that is no list of hosts",
            { "nixos-ec2:hostSecrets": '{"a": 3}', "nixos-ec2:secret.a": A },
            'nixos-ec2:hostSecrets.a: 3 is neither "all" nor a list of host names; allowed: a map of secret names matching',
        ],
        [
            "a name that is no file name",
            { "nixos-ec2:hostSecrets": '{"../etc": "all"}' },
            `nixos-ec2:hostSecrets: secret name "../etc" is not allowed; allowed: names matching ${SECRET_NAME_PATTERN} (letters, digits, _ and -)`,
        ],
        [
            "a value under a name that is no secret name",
            { "nixos-ec2:secret.a b": A },
            `nixos-ec2:secret.a b: "a b" is not a secret name; allowed: names matching ${SECRET_NAME_PATTERN}`,
        ],
        [
            "secrets set with --path, as one object",
            { "nixos-ec2:secret": JSON.stringify({ a: A }) },
            "nixos-ec2:secret: is an object (set with --path?); allowed: each secret as its own key, nixos-ec2:secret.<name>, set without --path",
        ],
        [
            "more than one environment variable can hold",
            { "nixos-ec2:hostSecrets": '{"a": "all"}', "nixos-ec2:secret.a": "x".repeat(MAX_SECRET_BYTES_PER_HOST + 1) },
            "nixos-ec2:hostSecrets: the secrets of host web take 65 KiB; allowed: at most 64 KiB a host",
        ],
    ])("refuses %s, naming the key", (_what, config, message) => {
        const problems = problemsOf(config);
        expect(problems).toEqual(expect.arrayContaining([expect.stringContaining(message)]));
        for (const p of problems) for (const form of leakForms(A)) expect(p.includes(form)).toBe(false);
    });

    it("refuses a value set in plain text (without --secret), without showing it", () => {
        const problems = problemsOf({ "nixos-ec2:hostSecrets": '{"a": "all"}', "nixos-ec2:secret.a": A }, []);
        expect(problems).toEqual([
            "nixos-ec2:secret.a: is set in plain text (without --secret), so Pulumi.staging.yaml holds its value unencrypted; " +
                "set it again with `pulumi config set --secret nixos-ec2:secret.a`, and change the secret itself if that file was ever committed",
        ]);
    });

    it("reports every problem at once, with the other keys' problems", () => {
        const problems = problemsOf({ instanceType: "x", "nixos-ec2:instanceType": "nope", "nixos-ec2:hostSecrets": '{"a": ["wbe"]}', "nixos-ec2:secret.b": B });
        expect(problems.filter((p) => p.startsWith("nixos-ec2:hostSecrets") || p.startsWith("nixos-ec2:secret"))).toHaveLength(3);
        expect(problems.some((p) => p.startsWith("nixos-ec2:instanceType:"))).toBe(true);
    });

    it("reads a stack file's secure values as secrets it cannot decrypt offline, and a plain value as plain", () => {
        const dir = tempDir("secret-stack-");
        copyFileSync(path.join(PROJECT_DIR, "Pulumi.yaml"), path.join(dir, "Pulumi.yaml"));
        mkdirSync(path.join(dir, "nix"));
        copyFileSync(path.join(PROJECT_DIR, "nix", "network.json"), path.join(dir, "nix", "network.json"));
        writeFileSync(
            path.join(dir, "Pulumi.test.yaml"),
            [
                "config:",
                "  aws:region: eu-central-1",
                '  nixos-ec2:sshAllowedCidrs: ["192.168.10.0/24"]',
                '  nixos-ec2:hostSecrets: {webAdmin: all, token: all}',
                "  nixos-ec2:secret.webAdmin:",
                "    secure: v1:0123456789abcdef:ciphertext",
                `  nixos-ec2:secret.token: ${A}`,
                "",
            ].join("\n"),
        );
        const { config, secretKeys } = loadStack("test", {}, dir);
        expect(secretKeys).toEqual(["nixos-ec2:secret.webAdmin"]);
        expect(config["nixos-ec2:secret.webAdmin"]).toBe(offlineSecretPlaceholder("test", "nixos-ec2:secret.webAdmin"));
        expect(() => loadSettings("test", {}, dir)).toThrow("nixos-ec2:secret.token: is set in plain text (without --secret), so Pulumi.test.yaml holds its value unencrypted");
        // A --config override of a secret.<name> key stands for `pulumi config set --secret`.
        expect(loadSettings("test", { "secret.token": A }, dir).secrets.map((s) => s.name)).toEqual(["token", "webAdmin"]);
    });
});

describe("host secrets in the program (mock runtime)", () => {
    let run: OfflineRun;
    beforeAll(async () => {
        run = await runProgram("staging", withSecrets());
    });

    it("hands each deploy exactly its host's secrets, in NIXOS_EC2_SECRETS, a secret", () => {
        expect(environmentOf(run, "web").NIXOS_EC2_SECRETS).toBe(encodeSecrets({ a: A, b: B }));
        expect(environmentOf(run, "db").NIXOS_EC2_SECRETS).toBe(encodeSecrets({ b: B }));
        expect(encodeSecrets({ b: B, a: A }).split("\n")).toEqual([`a ${Buffer.from(A).toString("base64")}`, `b ${Buffer.from(B).toString("base64")}`]);
    });

    it("keeps every value secret on its way: config, components, the command, the outputs", () => {
        expectNoPlainSecret(run, [A, B, encodeSecrets({ a: A, b: B }), encodeSecrets({ b: B })]);
        const component = resource(run, "nixos-ec2:index:HostSecrets", "secrets");
        expect(component.inputs.values).toBeInstanceOf(SecretValue);
        expect(component.inputs.recipients).toEqual({ a: ["web"], b: ["web", "db"] });
        for (const host of ["web", "db"]) {
            const deployment = resource(run, "nixos-ec2:index:NixosDeployment", host);
            expect(deployment.inputs.secrets).toBeInstanceOf(SecretValue);
            expect(deployment.inputs.secretsTrigger).toBeInstanceOf(SecretValue);
            expect(command(run, host).inputs.triggers).toBeInstanceOf(SecretValue);
        }
        expect(run.warnings.filter((w) => !w.includes("sshAllowedCidrs"))).toEqual([]);
    });

    it("triggers a re-deploy by an HMAC under a secret random key, never a plain hash of a secret", () => {
        const key = triggerKey(run);
        const payload = encodeSecrets({ a: A, b: B });
        const trigger = triggersOf(run, "web")[4];
        expect(trigger).toBe(createHmac("sha256", Buffer.from(key, "hex")).update(payload).digest("hex"));
        expect(trigger).toBe(secretsTrigger(key, payload));
        expect(trigger).not.toBe(createHash("sha256").update(payload).digest("hex"));
        expect(secretsTrigger("00".repeat(32), payload)).not.toBe(trigger);
        expectNoPlainSecret(run, [key]);
    });

    it("gives a stack without secrets no trigger key, no fifth trigger and no NIXOS_EC2_SECRETS", async () => {
        const plain = await runProgram("staging", { hosts: TWO_HOSTS });
        expect(plain.resources.filter((r) => r.type === "random:index/randomBytes:RandomBytes" || r.type === "nixos-ec2:index:HostSecrets")).toEqual([]);
        for (const host of ["web", "db"]) {
            expect(triggersOf(plain, host)).toHaveLength(4);
            expect(command(plain, host).inputs.triggers).not.toBeInstanceOf(SecretValue);
            expect(environmentOf(plain, host).NIXOS_EC2_SECRETS).toBeUndefined();
            // A host that gets no secret keeps the triggers it had without any.
            expect(triggersOf(plain, host)).toEqual(triggersOf(run, host).slice(0, 4));
        }
    });

    it("re-deploys only the hosts whose secrets changed", async () => {
        const changed = async (overrides: Record<string, string>) => {
            const other = await runProgram("staging", withSecrets(overrides));
            return ["web", "db"].filter((host) => JSON.stringify(triggersOf(other, host)) !== JSON.stringify(triggersOf(run, host)));
        };
        expect(await changed({})).toEqual([]);
        expect(await changed({ "secret.a": `${A}!` })).toEqual(["web"]);
        expect(await changed({ "secret.b": `${B}!` })).toEqual(["web", "db"]);
        expect(await changed({ hostSecrets: JSON.stringify({ a: ["web"], b: "all", c: ["db"] }), "secret.c": "third" })).toEqual(["db"]);
        // Removing a secret re-deploys the host that had it, so that the deploy removes it there.
        const removed = await runProgram("staging", { hosts: TWO_HOSTS, hostSecrets: JSON.stringify({ b: "all" }), "secret.b": B });
        expect(JSON.stringify(triggersOf(removed, "web"))).not.toBe(JSON.stringify(triggersOf(run, "web")));
        expect(triggersOf(removed, "db")).toEqual(triggersOf(run, "db"));
        expect(environmentOf(removed, "web").NIXOS_EC2_SECRETS).toBe(encodeSecrets({ b: B }));
    });

    it("refuses a value that Pulumi does not hold as a secret, before any resource exists", async () => {
        const { config } = loadStack("staging", withSecrets());
        await expect(runConfig("staging", config, [])).rejects.toThrow("nixos-ec2:secret.a: is set in plain text (without --secret)");
    });
});

describe("npm run preview with host secrets", () => {
    const preview = (...args: string[]) => {
        const env = { ...process.env };
        delete env.NODE_OPTIONS;
        return spawnSync(process.execPath, [...previewNodeArgs(), ...args], { cwd: PROJECT_DIR, env, encoding: "utf8", maxBuffer: 64 << 20 });
    };
    const args = Object.entries(withSecrets()).flatMap(([k, v]) => ["--config", `${k}=${v}`]);

    it("prints [secret] for the values, the payload and the trigger, and nothing of them", () => {
        const text = preview("staging", ...args);
        const json = preview("staging", ...args, "--json");
        expect(text.status).toBe(0);
        expect(json.status).toBe(0);
        for (const out of [text.stdout, text.stderr, json.stdout, json.stderr]) {
            for (const form of [...leakForms(A), ...leakForms(B), ...leakForms(encodeSecrets({ b: B }))]) expect(out.includes(form)).toBe(false);
        }
        expect(text.stdout).toMatch(/^nixos-ec2:index:HostSecrets secrets$/m);
        expect(text.stdout).toMatch(/^│ {3}values: \[secret\]$/m);
        expect(text.stdout).toMatch(/^└─ random:index\/randomBytes:RandomBytes secrets-trigger-key$/m);
        expect(text.stdout).toMatch(/^ {7}triggers: \[secret\]$/m);
        expect(text.stdout).toMatch(/^ {7}environment: \[secret\]$/m);
        expect(text.stdout).toContain(
            "  ageRecipients:\n    web: <generated at deploy: age recipient of ssh-host-web>\n    db: <generated at deploy: age recipient of ssh-host-db>\n",
        );
    });
});
