/**
 * What `npm run status` prints: a table for a person, readable in 80 columns (colour only on a
 * terminal, never with NO_COLOR), with the details of every host that is not in sync below it;
 * or one JSON document. Neither holds anything secret: only what the stack outputs say in plain
 * (addresses, public keys, store paths) and what the hosts reported.
 */
import type { HostFacts, Probe, Unreachable } from "./statusProbe";
import { Deployed, Verdict, VERDICT_KINDS, VerdictKind } from "./statusVerdict";

export interface HostStatus {
    readonly name: string;
    readonly flakeAttr: string;
    readonly ssh?: { readonly user: string; readonly address: string; readonly port: number };
    readonly deployed: Deployed;
    readonly probe: Probe;
    readonly verdict: Verdict;
    /** URN of the host's deploy Command, for `pulumi up --replace`. */
    readonly deployUrn: string;
    readonly next: string[];
}

export interface StatusReport {
    readonly stack: string;
    /** ISO time at which the check started. */
    readonly checkedAt: string;
    readonly deadlineSeconds: number;
    readonly exitStatus: 0 | 1 | 2;
    /** By name. */
    readonly hosts: readonly HostStatus[];
}

/** How many hosts got each verdict, in VERDICT_KINDS order, without the ones nobody got. */
export function counts(report: StatusReport): Array<[VerdictKind, number]> {
    return VERDICT_KINDS.map((k): [VerdictKind, number] => [k, report.hosts.filter((h) => h.verdict.kind === k).length]).filter(([, n]) => n > 0);
}

const LABEL: Record<VerdictKind, string> = {
    "in-sync": "in sync",
    deploying: "deploying",
    "rolled-back": "rolled back",
    drifted: "drifted",
    unhealthy: "unhealthy",
    "needs-reboot": "needs reboot",
    unreachable: "unreachable",
};

// ---- JSON ----

interface HostJson {
    verdict: string;
    kind: VerdictKind;
    why: string[];
    reachable: boolean;
    unreachable: Unreachable | null;
    flakeAttr: string;
    ssh: HostStatus["ssh"] | null;
    deployed: { systemPath: string | null; generation: number | null };
    host: HostFacts | null;
    deployUrn: string;
    next: string[];
}

export function renderJson(report: StatusReport): string {
    // Defined, not assigned: a host the outputs name "__proto__" is a host like any other.
    const hosts: Record<string, HostJson> = Object.fromEntries(
        report.hosts.map((h): [string, HostJson] => [
            h.name,
            {
                verdict: h.verdict.text,
                kind: h.verdict.kind,
                why: h.verdict.why,
                reachable: h.probe.reachable,
                unreachable: h.probe.reachable ? null : h.probe.why,
                flakeAttr: h.flakeAttr,
                ssh: h.ssh ?? null,
                deployed: { systemPath: h.deployed.systemPath ?? null, generation: h.deployed.generation ?? null },
                host: h.probe.reachable ? h.probe.facts : null,
                deployUrn: h.deployUrn,
                next: h.next,
            },
        ]),
    );
    const document = {
        stack: report.stack,
        checkedAt: report.checkedAt,
        deadlineSeconds: report.deadlineSeconds,
        exitStatus: report.exitStatus,
        summary: Object.fromEntries([["hosts", report.hosts.length], ...counts(report)]),
        hosts,
    };
    return `${JSON.stringify(document, null, 2)}\n`;
}

// ---- text ----

export const WIDTH = 80;

/** Colour on a terminal only, and never when NO_COLOR is set to a non-empty value (no-color.org) or TERM is dumb. */
export function useColour(isTty: boolean, env: NodeJS.ProcessEnv): boolean {
    return isTty && !env.NO_COLOR && env.TERM !== "dumb";
}

const COLOUR: Record<VerdictKind, number> = {
    "in-sync": 32,
    deploying: 36,
    "rolled-back": 33,
    drifted: 33,
    "needs-reboot": 33,
    unhealthy: 31,
    unreachable: 31,
};

function paint(kind: VerdictKind, text: string, colour: boolean): string {
    return colour ? `\u001b[${COLOUR[kind]}m${text}\u001b[0m` : text;
}

/**
 * What a host reported (and the names in the stack's outputs) as plain text: control characters
 * (ESC and the rest of C0 and C1, DEL) and the bidirectional overrides would let a host move the
 * cursor, recolour or clear the terminal, or overwrite lines of the table; each is shown as `?`.
 */
export function printable(text: string): string {
    return text.replace(/[\u0000-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069]/g, "?");
}

function cut(text: string, width: number): string {
    const plain = printable(text);
    return plain.length <= width ? plain : `${plain.slice(0, width - 1)}…`;
}

export function uptimeText(seconds: number | undefined): string {
    if (seconds === undefined) return "-";
    const [d, h, m] = [Math.floor(seconds / 86400), Math.floor((seconds % 86400) / 3600), Math.floor((seconds % 3600) / 60)];
    return d > 0 ? `${d}d ${h}h` : h > 0 ? `${h}h ${m}m` : `${m}m`;
}

export function diskText(kib: number | undefined): string {
    if (kib === undefined) return "-";
    const gib = kib / 1024 / 1024;
    return gib >= 100 ? `${gib.toFixed(0)}G` : gib >= 1 ? `${gib.toFixed(1)}G` : `${(kib / 1024).toFixed(0)}M`;
}

/** "26.05" of "26.05.20261124.abcdef0 (Warbler)". */
function releaseOf(version: string): string {
    return /^(\d+\.\d+)/.exec(version)?.[1] ?? (version || "-");
}

function generationText(h: HostStatus): string {
    const deployed = h.deployed.generation === undefined ? "?" : String(h.deployed.generation);
    const profile = h.probe.reachable ? h.probe.facts.profileGeneration : undefined;
    return profile === undefined || String(profile) === deployed ? deployed : `${deployed}→${profile}`;
}

function lastDeployText(h: HostStatus): string {
    if (!h.probe.reachable) return "-";
    const outcome = h.probe.facts.lastDeploy?.outcome;
    return outcome ? outcome.split(" ")[0] : "none";
}

const COLUMNS = [
    { title: "HOST", width: 16 },
    { title: "VERDICT", width: 12 },
    { title: "GEN", width: 7 },
    { title: "NIXOS", width: 5 },
    { title: "UP", width: 7 },
    { title: "FREE", width: 6 },
    { title: "LAST DEPLOY", width: 11 },
];

/** What the columns after HOST take of a line, their separators included. */
const AFTER_HOST = COLUMNS.slice(1).reduce((sum, c) => sum + 2 + c.width, 0);

/**
 * The HOST column: as wide as the longest name, within what leaves the other columns their room.
 * A name is never cut (two names that differ only at their end would look the same); one longer
 * than the column gets a line of its own, and its row follows under it.
 */
function hostWidth(names: readonly string[]): number {
    return Math.min(WIDTH - AFTER_HOST, Math.max(COLUMNS[0].title.length, ...names.map((n) => printable(n).length)));
}

/**
 * Words filled into lines of at most `width`, the first after `indent`, the others after `hanging`;
 * a word longer than a line (a store path in a host's reason) is cut across lines.
 */
export function wrap(text: string, width: number, indent: string, hanging = indent): string[] {
    const lines: string[] = [];
    let line = "";
    const prefix = () => (lines.length === 0 ? indent : hanging);
    for (let word of printable(text.replace(/[\t\n\r]/g, " ")).split(/\s+/).filter((w) => w !== "")) {
        if (line !== "" && prefix().length + line.length + 1 + word.length > width) {
            lines.push(prefix() + line);
            line = "";
        }
        if (line !== "") {
            line = `${line} ${word}`;
            continue;
        }
        // At least one character a line, whatever the indent.
        for (let room = Math.max(1, width - prefix().length); word.length > room; room = Math.max(1, width - prefix().length)) {
            lines.push(prefix() + word.slice(0, room));
            word = word.slice(room);
        }
        line = word;
    }
    if (line !== "") lines.push(prefix() + line);
    return lines;
}

/** A line that is a command to copy: printed whole, however long. */
function isCommand(step: string): boolean {
    return /^pulumi /.test(step);
}

export function renderText(report: StatusReport, colour: boolean): string {
    const lines = [
        ...wrap(`nixos-ec2 status of stack ${report.stack}: ${report.hosts.length} host${report.hosts.length === 1 ? "" : "s"}, each checked over one SSH session (deadline ${report.deadlineSeconds} s)`, WIDTH, ""),
        "",
    ];
    const widths = [hostWidth(report.hosts.map((h) => h.name)), ...COLUMNS.slice(1).map((c) => c.width)];
    const row = (cells: string[], kind?: VerdictKind) =>
        cells
            .map((cell, i) => {
                const text = cut(cell, widths[i]).padEnd(i === cells.length - 1 ? 0 : widths[i]);
                return i === 1 && kind !== undefined ? paint(kind, text, colour) : text;
            })
            .join("  ")
            .trimEnd();
    lines.push(row(COLUMNS.map((c) => c.title)));
    for (const h of report.hosts) {
        const f = h.probe.reachable ? h.probe.facts : undefined;
        const name = printable(h.name);
        if (name.length > widths[0]) lines.push(name);
        lines.push(
            row(
                [name.length > widths[0] ? "" : name, LABEL[h.verdict.kind], generationText(h), f ? releaseOf(f.nixosVersion) : "-", uptimeText(f?.uptimeSeconds), diskText(f?.diskFreeKiB), lastDeployText(h)],
                h.verdict.kind,
            ),
        );
    }
    for (const h of report.hosts.filter((x) => x.verdict.kind !== "in-sync")) {
        lines.push("", ...wrap(`${h.name}: ${h.verdict.text}`, WIDTH, "", "  ").map((l, i) => (i === 0 ? paint(h.verdict.kind, l, colour) : l)));
        for (const why of h.verdict.why) lines.push(...wrap(`- ${why}`, WIDTH, "  ", "    "));
        for (const step of h.next) lines.push(...(isCommand(step) ? [`    ${printable(step)}`] : wrap(`next: ${step}`, WIDTH, "  ", "    ")));
    }
    const summary = counts(report)
        .map(([k, n]) => `${n} ${LABEL[k]}`)
        .join(", ");
    lines.push("", ...wrap(`${summary}; exit status ${report.exitStatus}.`, WIDTH, "", "  "));
    return `${lines.join("\n")}\n`;
}

