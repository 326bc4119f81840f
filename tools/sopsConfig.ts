/**
 * `npm run sops-config -- STACK... [--admin AGE_RECIPIENT]... [--print | --file PATH]`: writes `.sops.yaml` for
 * the flake's sops-nix secrets from what the stacks' deploys exported. For each nixosConfigurations
 * entry the stacks deploy, one creation rule: `nix/secrets/<flakeAttr>.yaml` is encrypted to every
 * host that deploys that entry (its age recipient, from its SSH host key) and to each admin.
 *
 * The stacks' outputs come from the Pulumi CLI (`pulumi stack output --json -s STACK`), which shows
 * secret outputs as "[secret]" without --show-secrets: this reads nothing secret.
 *
 * Exit status: 0 wrote (or printed) the file; 1 a stack's outputs are missing or wrong, or the
 * CLI failed; 2 bad arguments.
 */
import { spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import * as path from "node:path";
import { isAgeRecipient } from "../lib/age";
import { PROJECT_DIR } from "../lib/stacks";

/** Where sops-nix's files live in the flake; nix/modules/sops.nix reads the same path. */
export const SOPS_FILES_DIR = "nix/secrets";
export const SOPS_CONFIG_FILE = ".sops.yaml";

const USAGE = `usage: npm run sops-config -- STACK... [--admin AGE_RECIPIENT]... [--print | --file PATH]

  STACK                   a stack whose hosts get sops files (its outputs are read with
                          pulumi stack output --json -s STACK); several stacks may share the flake
  --admin AGE_RECIPIENT   an age1... recipient that may also decrypt every file (age-keygen -y
                          prints yours); repeatable
  --print                 print the file instead of writing it
  --file PATH             write PATH instead of ${SOPS_CONFIG_FILE} at the project's root
`;

export class SopsConfigError extends Error {
    constructor(
        message: string,
        readonly status: number,
    ) {
        super(message);
        this.name = "SopsConfigError";
    }
}

export interface SopsArgs {
    readonly stacks: string[];
    readonly admins: string[];
    readonly print: boolean;
    /** Where to write the file. */
    readonly file: string;
}

export function parseSopsArgs(argv: readonly string[]): SopsArgs {
    const stacks: string[] = [];
    const admins: string[] = [];
    let print = false;
    let file = path.join(PROJECT_DIR, SOPS_CONFIG_FILE);
    for (let i = 0; i < argv.length; i++) {
        const arg = argv[i];
        if (arg === "--print") print = true;
        else if (arg === "--file") {
            const value = argv[++i];
            if (value === undefined) throw new SopsConfigError("--file needs a PATH", 2);
            file = path.resolve(value);
        }
        else if (arg === "--admin") {
            const recipient = argv[++i];
            if (recipient === undefined) throw new SopsConfigError("--admin needs an age recipient (age1...)", 2);
            admins.push(recipient);
        } else if (arg.startsWith("-")) throw new SopsConfigError(`unknown option ${JSON.stringify(arg)}`, 2);
        else stacks.push(arg);
    }
    if (stacks.length === 0) throw new SopsConfigError("name at least one stack", 2);
    for (const admin of admins) {
        if (!isAgeRecipient(admin)) throw new SopsConfigError(`--admin ${JSON.stringify(admin.slice(0, 80))} is not an age recipient (age1 and 58 more characters, as age-keygen -y prints)`, 2);
    }
    return { stacks, admins: [...new Set(admins)], print, file };
}

/** One host of a stack: its flake attribute and its age recipient. */
export interface SopsHost {
    readonly stack: string;
    readonly host: string;
    readonly flakeAttr: string;
    readonly recipient: string;
}

/** The hosts of a stack from `pulumi stack output --json` (the `hosts` and `ageRecipients` outputs). */
export function hostsOfOutputs(stack: string, outputs: unknown): SopsHost[] {
    const o = (outputs ?? {}) as { hosts?: Record<string, { flakeAttr?: unknown }>; ageRecipients?: Record<string, unknown> };
    if (o.ageRecipients === undefined || typeof o.ageRecipients !== "object") {
        throw new SopsConfigError(`stack ${stack} has no ageRecipients output; run \`pulumi up -s ${stack}\` with this version of the program first`, 1);
    }
    return Object.entries(o.ageRecipients).map(([host, recipient]) => {
        const flakeAttr = o.hosts?.[host]?.flakeAttr;
        if (typeof recipient !== "string" || !isAgeRecipient(recipient)) {
            throw new SopsConfigError(`stack ${stack}: ageRecipients.${host} is not an age recipient (got ${JSON.stringify(String(recipient).slice(0, 80))})`, 1);
        }
        if (typeof flakeAttr !== "string") throw new SopsConfigError(`stack ${stack}: hosts.${host}.flakeAttr is missing from the outputs`, 1);
        return { stack, host, flakeAttr, recipient };
    });
}

/** `pulumi stack output --json -s STACK`, parsed; the CLI's own message when it fails. */
export function readStackOutputs(stack: string): unknown {
    const result = spawnSync("pulumi", ["stack", "output", "--json", "-s", stack], { cwd: PROJECT_DIR, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
    if (result.error) throw new SopsConfigError(`could not run the Pulumi CLI (pulumi): ${result.error.message}`, 1);
    if (result.status !== 0) throw new SopsConfigError(`pulumi stack output --json -s ${stack} failed (exit status ${result.status}): ${result.stderr.trim()}`, 1);
    try {
        return JSON.parse(result.stdout);
    } catch {
        throw new SopsConfigError(`pulumi stack output --json -s ${stack} printed no JSON`, 1);
    }
}

const escapeRegex = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/**
 * The `.sops.yaml` text. sops matches `path_regex` against the file's path relative to the
 * directory of `.sops.yaml` (getsops/sops config/config.go, parseCreationRuleForFile), here the
 * project's root; the first rule that matches wins. The file has no rule for any other path, so
 * sops refuses to encrypt a file this project would not deploy.
 */
export function renderSopsConfig(stacks: readonly string[], hosts: readonly SopsHost[], admins: readonly string[]): string {
    const byAttr = new Map<string, SopsHost[]>();
    for (const h of hosts) byAttr.set(h.flakeAttr, [...(byAttr.get(h.flakeAttr) ?? []), h]);
    const lines = [
        `# Made by \`npm run sops-config -- ${stacks.join(" ")}\` from the stacks' ageRecipients outputs. Run it again`,
        "# after adding a host or an admin, then `sops updatekeys` each file. Each host's recipient is its",
        "# SSH host key's (sops-nix decrypts with /etc/ssh/ssh_host_ed25519_key on the host).",
        "creation_rules:",
    ];
    for (const attr of [...byAttr.keys()].sort()) {
        lines.push(`  - path_regex: '(^|/)${escapeRegex(`${SOPS_FILES_DIR}/${attr}.yaml`)}$'`, "    key_groups:", "      - age:");
        for (const h of [...(byAttr.get(attr) ?? [])].sort((a, b) => `${a.stack}/${a.host}`.localeCompare(`${b.stack}/${b.host}`))) {
            lines.push(`          - ${h.recipient} # host ${h.host} of stack ${h.stack}`);
        }
        for (const admin of admins) lines.push(`          - ${admin} # admin`);
    }
    return `${lines.join("\n")}\n`;
}

export function sopsConfig(args: SopsArgs, readOutputs: (stack: string) => unknown = readStackOutputs): string {
    const hosts = args.stacks.flatMap((stack) => hostsOfOutputs(stack, readOutputs(stack)));
    return renderSopsConfig(args.stacks, hosts, args.admins);
}

function main(argv: readonly string[]): number {
    if (argv.includes("-h") || argv.includes("--help")) {
        process.stdout.write(USAGE);
        return 0;
    }
    try {
        const args = parseSopsArgs(argv);
        const text = sopsConfig(args);
        if (args.print) process.stdout.write(text);
        else {
            writeFileSync(args.file, text);
            const rules = text.split("\n").filter((l) => l.includes("path_regex")).length;
            process.stderr.write(`sops-config: wrote ${path.relative(process.cwd(), args.file) || args.file} (${rules} creation rule${rules === 1 ? "" : "s"})\n`);
        }
        return 0;
    } catch (e) {
        if (!(e instanceof SopsConfigError)) throw e;
        process.stderr.write(`sops-config: ${e.message}\n${e.status === 2 ? `\n${USAGE}` : ""}`);
        return e.status;
    }
}

if (require.main === module) process.exitCode = main(process.argv.slice(2));
