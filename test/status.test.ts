/**
 * The parts of `npm run status` that need no host: how it names a host's deploy, reads the
 * sshCommand output and a host's report, decides a verdict, and prints. The whole command, against
 * fake hosts, is test/status.integration.test.ts.
 */
import { sshCommand } from "../components/nixosHost";
import { PROJECT } from "../lib/config";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { Writable } from "node:stream";
import { deployUrn, hostsOf, parseArgs, status } from "../tools/status";
import { fingerprint, HostFacts, parseReport, parseSshCommand, Probe, REPORT_FORMAT, sshPath } from "../tools/statusProbe";
import { renderJson, renderText, StatusReport, useColour, wrap } from "../tools/statusReport";
import { exitStatusOf, verdictOf } from "../tools/statusVerdict";
import { fakePulumi } from "./support/fakePulumi";
import { resource, runProgram } from "./support/program";
import { tempDir } from "./support/tempDir";

const KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGT132e+qnONjsm9xQQfd9oWrGJWQbfv8EoOwnp7SCGC";
const SYSTEM = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web-26.05.20261124.abcdef0";
const OTHER = "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-nixos-system-web-26.05.20261124.abcdef0";

function facts(overrides: Partial<HostFacts> = {}): HostFacts {
    return {
        currentSystem: SYSTEM,
        bootedSystem: SYSTEM,
        profileSystem: SYSTEM,
        profileGeneration: 7,
        bootChanges: [],
        nixosVersion: "26.05.20261124.abcdef0 (Yarara)",
        uptimeSeconds: 90061,
        bootId: "b0",
        diskFreeKiB: 12 * 1024 * 1024,
        diskPath: "/var/lib/nixos-ec2",
        systemState: "running",
        failedUnits: [],
        pendingCertificates: [],
        health: { url: "http://127.0.0.1/healthz", ok: true, detail: "ok" },
        lastDeploy: { id: "0123456789ab", outcome: "confirmed generation=7" },
        ...overrides,
    };
}

const reached = (f: HostFacts): Probe => ({ reachable: true, facts: f });
const deployed = { systemPath: SYSTEM, generation: 7 };

describe("the deploy's URN", () => {
    it("is the URN the program gives the host's deploy Command, and the project is lib/config.ts's", async () => {
        const run = await runProgram("staging", { hosts: '{"web":{},"db":{}}' });
        expect(deployUrn("staging", "web")).toBe(resource(run, "command:local:Command", "web-switch").urn);
        expect(deployUrn("org/nixos-ec2/staging", "db")).toBe(resource(run, "command:local:Command", "db-switch").urn);
        expect(deployUrn("x", "y")).toContain(`::${PROJECT}::`);
    });
});

describe("the sshCommand output", () => {
    it("gives the user, address and port that the command connects to", () => {
        expect(parseSshCommand(sshCommand("prod", "203.0.113.9", KEY))).toEqual({ user: "root", address: "203.0.113.9", port: 22 });
        expect(parseSshCommand(sshCommand("prod", "127.0.0.1", KEY, 2222, "tester"))).toEqual({ user: "tester", address: "127.0.0.1", port: 2222 });
        expect(parseSshCommand("ssh root@-oProxyCommand=x")).toBeUndefined();
        expect(parseSshCommand(sshCommand("prod", "-oProxyCommand=evil", KEY))).toBeUndefined();
    });

    it("and the host key pin make a host of the outputs; a host without either cannot be checked", () => {
        const key = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
        const { hosts } = hostsOf("prod", {
            adminPrivateKey: key,
            hosts: {
                web: { flakeAttr: "web", hostPublicKey: KEY, sshCommand: sshCommand("prod", "203.0.113.9", KEY), systemPath: SYSTEM, generation: 7 },
                db: { flakeAttr: "db", hostPublicKey: "ssh-rsa AAAA", sshCommand: sshCommand("prod", "203.0.113.8", KEY) },
            },
        });
        expect(hosts).toEqual([
            { name: "db", flakeAttr: "db", systemPath: undefined, generation: undefined, problem: expect.stringMatching(/no ED25519 host key/) },
            { name: "web", flakeAttr: "web", systemPath: SYSTEM, generation: 7, target: { user: "root", address: "203.0.113.9", port: 22, hostPublicKey: KEY } },
        ]);
        expect(() => hostsOf("prod", { hosts: {}, adminPrivateKey: "[secret]" })).toThrow(/not a private key \(its value is not shown\)/);
    });
});

describe("a host's report", () => {
    const report = [
        `format=${REPORT_FORMAT}`,
        `current=${SYSTEM}`,
        `booted=${OTHER}`,
        `profile=${SYSTEM}`,
        "profile-link=/nix/var/nix/profiles/system",
        "log-link=/var/lib/nixos-ec2/deploy.log",
        "version=26.05.20261124.abcdef0 (Yarara)",
        "uptime=3723.45 7000.1",
        "boot-id=b0",
        "pending-rollback=",
        "pending-boot=",
        "last-rollback=",
        "outcome.0123456789ab=confirmed generation=7",
        "outcome.ba9876543210=rolled-back generation=6 reason=x",
        "link=/nix/var/nix/profiles/system system-7-link",
        "link=/var/lib/nixos-ec2/deploy.log logs/20261201T101010-0123456789ab.log",
        `link=/run/booted-system/kernel ${OTHER.replace("nixos-system-web", "linux-6.12")}/bzImage`,
        `link=/run/current-system/kernel /nix/store/linux-6.13/bzImage`,
        `link=/run/booted-system/initrd /nix/store/initrd-a/initrd`,
        `link=/run/current-system/initrd /nix/store/initrd-a/initrd`,
        "df-path=/var/lib/nixos-ec2",
        "health-url=http://127.0.0.1/healthz",
        "state=degraded",
        "issued.old.example.org=1",
        "--- df",
        "Filesystem     1024-blocks    Used Available Capacity Mounted on",
        "/dev/nvme0n1p1    20509264 8000000  12509264      40% /",
        "--- failed",
        "acme-order-renew-todo.example.org.service loaded failed failed Order (and renew) ACME certificate",
        "acme-order-renew-old.example.org.service loaded failed failed Order (and renew) ACME certificate",
        "nginx.service loaded failed failed Nginx Web Server",
        "--- health",
        "curl: (7) Failed to connect to 127.0.0.1 port 80",
        "--- health-exit 7",
        "--- end",
        "",
    ].join("\n");

    it("is read: systems, generation, records, disk, units and health", () => {
        expect(parseReport(report)).toEqual({
            currentSystem: SYSTEM,
            bootedSystem: OTHER,
            profileSystem: SYSTEM,
            profileGeneration: 7,
            bootChanges: ["kernel"],
            nixosVersion: "26.05.20261124.abcdef0 (Yarara)",
            uptimeSeconds: 3723,
            bootId: "b0",
            diskFreeKiB: 12509264,
            diskPath: "/var/lib/nixos-ec2",
            systemState: "degraded",
            // An order of a certificate issued before is a failure; one never issued waits for DNS.
            failedUnits: ["acme-order-renew-old.example.org.service", "nginx.service"],
            pendingCertificates: ["todo.example.org"],
            health: { url: "http://127.0.0.1/healthz", ok: false, detail: "curl: (7) Failed to connect to 127.0.0.1 port 80" },
            pendingRollback: undefined,
            pendingBoot: undefined,
            lastDeploy: { id: "0123456789ab", outcome: "confirmed generation=7" },
            lastRollback: undefined,
        });
    });

    it("cut short, or of something else, is no report", () => {
        expect(parseReport(report.slice(0, report.indexOf("--- end")))).toBe("the host's report ended early");
        expect(parseReport("Welcome!\n")).toMatch(/something other than a status report: "Welcome!"/);
    });
});

describe("the verdict", () => {
    it.each<[string, Partial<HostFacts>, string, string]>([
        ["in sync", {}, "in-sync", "in sync"],
        ["switched by hand", { currentSystem: OTHER, profileSystem: OTHER, profileGeneration: 8 }, "drifted", "drifted: switched outside Pulumi"],
        ["a profile moved for the next boot (nixos-rebuild boot)", { profileSystem: OTHER, profileGeneration: 8 }, "drifted", "drifted: switched outside Pulumi"],
        [
            "the newest deploy rolled back",
            { lastDeploy: { id: "ba9876543210", outcome: "rolled-back generation=7 reason=the system is degraded" } },
            "rolled-back",
            "rolled back: the system is degraded",
        ],
        [
            "a rollback that failed",
            { lastDeploy: { id: "ba9876543210", outcome: "rollback-failed generation=7 reason=activation failed" } },
            "unhealthy",
            "unhealthy: the rollback of deploy ba9876543210 failed (activation failed)",
        ],
        ["a deploy awaiting its confirmation", { currentSystem: OTHER, pendingRollback: { deploy: "ba9876543210", generation: 7 } }, "deploying", "deploying: deploy ba9876543210 is not confirmed yet"],
        ["a failed unit", { systemState: "degraded", failedUnits: ["nginx.service"] }, "unhealthy", "unhealthy: unit nginx.service failed"],
        ["degraded only by a certificate that waits for DNS", { systemState: "degraded", pendingCertificates: ["todo.example.org"] }, "in-sync", "in sync"],
        [
            "a pending certificate beside a failed unit",
            { systemState: "degraded", failedUnits: ["nginx.service"], pendingCertificates: ["todo.example.org"] },
            "unhealthy",
            "unhealthy: unit nginx.service failed",
        ],
        [
            "a failed health check",
            { health: { url: "http://127.0.0.1/healthz", ok: false, detail: "curl: (22) 503" } },
            "unhealthy",
            "unhealthy: health check http://127.0.0.1/healthz failed: curl: (22) 503",
        ],
        ["systemd still starting", { systemState: "starting" }, "unhealthy", "unhealthy: systemd reports the system as starting"],
        ["a new kernel switched to live", { bootedSystem: OTHER, bootChanges: ["kernel", "kernel-modules"] }, "needs-reboot", "needs reboot"],
        ["a live switch that changed no kernel", { bootedSystem: OTHER }, "in-sync", "in sync"],
    ])("%s", (_what, overrides, kind, text) => {
        const v = verdictOf(deployed, reached(facts(overrides)));
        expect([v.kind, v.text]).toEqual([kind, text]);
    });

    it("is unreachable, with why, when no report came", () => {
        const v = verdictOf(deployed, { reachable: false, why: { kind: "refused", message: "203.0.113.9 port 22 refused the connection" } });
        expect(v).toEqual({ kind: "unreachable", text: "unreachable", why: ["203.0.113.9 port 22 refused the connection"] });
    });

    it("decides the exit status: 2 over 1 over 0", () => {
        expect(exitStatusOf(["in-sync", "in-sync"])).toBe(0);
        expect(exitStatusOf(["in-sync", "needs-reboot"])).toBe(1);
        expect(exitStatusOf(["drifted", "unreachable", "in-sync"])).toBe(2);
    });
});

describe("printing", () => {
    it("uses colour on a terminal only, never with NO_COLOR or a dumb terminal", () => {
        expect(useColour(true, {})).toBe(true);
        expect(useColour(false, {})).toBe(false);
        expect(useColour(true, { NO_COLOR: "1" })).toBe(false);
        expect(useColour(true, { NO_COLOR: "" })).toBe(true);
        expect(useColour(true, { TERM: "dumb" })).toBe(false);
    });

    it("keeps a table of long names and reasons within 80 columns", () => {
        const long = "a-host-name-of-thirty-one-chars";
        const f = facts({ systemState: "degraded", failedUnits: Array.from({ length: 9 }, (_, i) => `a-unit-with-a-long-name-${i}.service`) });
        const verdict = verdictOf(deployed, reached(f));
        const report: StatusReport = {
            stack: "prod",
            checkedAt: "2026-12-01T00:00:00.000Z",
            deadlineSeconds: 20,
            exitStatus: 1,
            hosts: [{ name: long, flakeAttr: "web", deployed, probe: reached(f), verdict, deployUrn: deployUrn("prod", long), next: ["pulumi up -s prod --replace 'urn'"] }],
        };
        for (const colour of [false, true]) {
            const text = renderText(report, colour);
            const visible = text.replace(/\u001b\[[0-9;]*m/g, "");
            expect(visible.split("\n").filter((l) => l.length > 80 && !l.startsWith("    pulumi "))).toEqual([]);
            expect(text.includes("\u001b[")).toBe(colour);
        }
        // Longer than the column: the whole name on a line of its own, its row under it.
        expect(renderText(report, false)).toMatch(/^a-host-name-of-thirty-one-chars\n {22}unhealthy     7        26\.05  1d 1h    12\.0G   confirmed$/m);
    });

    it("never cuts a host name, so two that differ only at their end stay apart", () => {
        const deployed = { systemPath: "/nix/store/s", generation: 7 };
        const f = facts({ currentSystem: "/nix/store/s", bootedSystem: "/nix/store/s", profileSystem: "/nix/store/s", profileGeneration: 7 });
        const names = ["web-frontend-eu-1", "web-frontend-eu-2", "web-frontend-eu-north-1-primary"];
        const report: StatusReport = {
            stack: "prod",
            checkedAt: "2026-12-01T00:00:00.000Z",
            deadlineSeconds: 20,
            exitStatus: 0,
            hosts: names.map((name) => ({ name, flakeAttr: "web", deployed, probe: reached(f), verdict: verdictOf(deployed, reached(f)), deployUrn: deployUrn("prod", name), next: [] })),
        };
        const lines = renderText(report, false).split("\n");
        expect(lines.filter((l) => l.length > 80)).toEqual([]);
        expect(lines).toContainEqual(expect.stringMatching(/^web-frontend-eu-1 {5}in sync/));
        expect(lines).toContainEqual(expect.stringMatching(/^web-frontend-eu-2 {5}in sync/));
        const own = lines.indexOf("web-frontend-eu-north-1-primary");
        expect(lines[own + 1]).toMatch(/^ {22}in sync/);
    });

    it("prints no control character a host or the outputs sent: no escape sequence reaches the terminal", () => {
        const ESC = "\u001b";
        const f = facts({
            nixosVersion: `${ESC}[2J${ESC}]0;owned${ESC}\\`,
            currentSystem: `/nix/store/${ESC}[8m`,
            lastDeploy: { id: "0123456789ab", outcome: `rolled-back${ESC}[1A generation=7 reason=x${ESC}[2K\rweb  in sync\u202e` },
            lastRollback: `${ESC}[31mfake\u009b2J`,
            health: { url: `http://127.0.0.1/${ESC}[5m`, ok: false, detail: `${ESC}[1Acurl: (22) 503` },
        });
        const verdict = verdictOf(deployed, reached(f));
        const name = `web${ESC}[2J`;
        const report: StatusReport = {
            stack: "prod",
            checkedAt: "2026-12-01T00:00:00.000Z",
            deadlineSeconds: 20,
            exitStatus: 1,
            hosts: [{ name, flakeAttr: "web", deployed, probe: reached(f), verdict, deployUrn: deployUrn("prod", "web"), next: ["a step\u001b[2J"] }],
        };
        for (const colour of [false, true]) {
            // Only the colours the report sets itself.
            const text = renderText(report, colour).replace(/\u001b\[(3[0-9]|0)m/g, "");
            expect(text).not.toMatch(/[\u0000-\u0009\u000b-\u001f\u007f-\u009f\u202a-\u202e]/);
        }
        expect(renderText(report, false)).toMatch(/^web\?\[2J +drifted/m);
    });

    it("lists every host in the JSON document, whatever the outputs name it", () => {
        const probe: Probe = { reachable: false, why: { kind: "no-address", message: "not a host name of this program" } };
        const verdict = verdictOf(deployed, probe);
        const hosts = ["__proto__", "web"].map((name) => ({ name, flakeAttr: name, deployed, probe, verdict, deployUrn: deployUrn("prod", name), next: [] }));
        const document = JSON.parse(renderJson({ stack: "prod", checkedAt: "2026-12-01T00:00:00.000Z", deadlineSeconds: 20, exitStatus: 2, hosts }));
        expect(Object.keys(document.hosts)).toEqual(["__proto__", "web"]);
        expect(document.summary).toEqual({ hosts: 2, unreachable: 2 });
    });

    it("wraps words with a hanging indent", () => {
        expect(wrap("one two three four", 11, "- ", "  ")).toEqual(["- one two", "  three", "  four"]);
    });

    it("cuts a word longer than a line, as the store path in the reason of a failed trial boot", () => {
        expect(wrap("a abcdefghijklmnop b", 10, "- ", "  ")).toEqual(["- a", "  abcdefgh", "  ijklmnop", "  b"]);
        const store = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web-frontend-eu-1-26.05.20261124.abcdef0";
        const outcome = `rolled-back generation=7 reason=the host did not come up on generation 8 and booted ${store} (GRUB's default) instead`;
        const f = facts({ lastDeploy: { id: "0123456789ab", outcome }, lastRollback: `2026-12-01T00:00:00+0000 deploy 0123456789ab rolled back to generation 7: ${outcome}` });
        const verdict = verdictOf(deployed, reached(f));
        expect(verdict.kind).toBe("rolled-back");
        const text = renderText({ stack: "prod", checkedAt: "", deadlineSeconds: 20, exitStatus: 1, hosts: [{ name: "web", flakeAttr: "web", deployed, probe: reached(f), verdict, deployUrn: "u", next: [] }] }, false);
        expect(text.split("\n").filter((l) => l.length > 80)).toEqual([]);
        expect(text.replace(/\n +/g, "")).toContain(store);
    });
});

describe("arguments and paths", () => {
    it("take a stack, --json and --timeout", () => {
        expect(parseArgs(["prod"])).toEqual({ stack: "prod", json: false, deadlineSeconds: 20 });
        expect(parseArgs(["--json", "prod", "--timeout=2.5"])).toEqual({ stack: "prod", json: true, deadlineSeconds: 2.5 });
        expect(() => parseArgs(["prod;rm"])).toThrow(/is not a stack name/);
    });

    it("quote paths for ssh options and print fingerprints as ssh-keygen does", () => {
        expect(sshPath('/tmp/a b/%h"x')).toBe('"/tmp/a b/%%h\\"x"');
        expect(fingerprint(KEY)).toMatch(/^SHA256:[A-Za-z0-9+/]{43}$/);
    });
});

describe("the key file", () => {
    /** A stream that keeps what is written to it. */
    function sink(): Writable & { text: () => string } {
        let text = "";
        const w = new Writable({ write: (chunk, _enc, done) => ((text += chunk.toString()), done()) });
        return Object.assign(w, { text: () => text });
    }

    it("is removed when writing the key files fails half way (a full disk), and the command says what to do", async () => {
        const work = tempDir("status-keyfail-");
        // os.tmpdir() reads the real environment, not the test's process.env: the run's TMPDIR (test/support/globalTmp.ts).
        const keyDirs = () => fs.readdirSync(os.tmpdir()).filter((n) => n.startsWith("nixos-ec2-status-"));
        const pulumi = fakePulumi(path.join(work, "pulumi"));
        const privateKey = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
        pulumi.setOutputs("prod", {
            adminPrivateKey: privateKey,
            hosts: { web: { flakeAttr: "web", hostPublicKey: KEY, sshCommand: sshCommand("prod", "203.0.113.9", KEY), systemPath: SYSTEM, generation: 7 } },
        });
        // The module object itself (an `import * as` is a copy of its bindings), which tools/status.ts reads too.
        const nodeFs = jest.requireActual<typeof fs>("node:fs");
        const real = nodeFs.writeFileSync;
        const spy = jest.spyOn(nodeFs, "writeFileSync").mockImplementation((file, ...rest) => {
            if (String(file).endsWith("known_hosts")) throw Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" });
            return real(file, ...rest);
        });
        const [stdout, stderr] = [sink(), sink()];
        try {
            const code = await status(["prod"], { stdout, stderr, env: { PATH: `${pulumi.binDir}:${process.env.PATH}`, HOME: process.env.HOME } });
            expect(code).toBe(3);
            expect(spy).toHaveBeenCalledWith(expect.stringMatching(/known_hosts$/), expect.anything(), expect.anything());
        } finally {
            spy.mockRestore();
        }
        expect(keyDirs()).toEqual([]);
        expect(stderr.text()).toMatch(/could not write the key files into .*ENOSPC.*set TMPDIR/);
        expect(stdout.text() + stderr.text()).not.toContain("PRIVATE KEY");
    });
});
