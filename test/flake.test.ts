import { execFileSync } from "node:child_process";
import { cpSync, readFileSync, writeFileSync } from "node:fs";
import * as path from "node:path";
import { readNetworkFile } from "../lib/network";
import { listStacks, loadSettings } from "../lib/stacks";
import {
    DEV_SHELL_TOOLS,
    evalBootGuard,
    evalFirewallPorts,
    evalFlakeStructure,
    evalFlakeSystems,
    FlakeStructure,
    flakeLockProblems,
    hostProblems,
    NIX_DIR,
    nixFiles,
    parseNixFiles,
    publicPortsOfSecurityGroup,
    sopsNixLockProblems,
} from "./support/nix";
import { runProgram } from "./support/program";
import { tempDir } from "./support/tempDir";
import { describeWithTools } from "./support/tools";

const SG = "aws:ec2/securityGroup:SecurityGroup";
const DEV_SYSTEMS = ["aarch64-darwin", "aarch64-linux", "x86_64-darwin", "x86_64-linux"];
const LINUX_SYSTEMS = ["aarch64-linux", "x86_64-linux"];
/** Attributes a NixOS module may have besides option definitions, once it uses `options` or `config`. */
const MODULE_STRUCTURE_KEYS = ["_file", "config", "disabledModules", "imports", "key", "meta", "options"];

function readLock(): unknown {
    return JSON.parse(readFileSync(path.join(NIX_DIR, "flake.lock"), "utf8"));
}

/** A copy of nix/ to break on purpose. */
function copyOfNixDir(): string {
    const dir = path.join(tempDir("nixos-ec2-flake-"), "nix");
    cpSync(NIX_DIR, dir, { recursive: true });
    return dir;
}

function editFile(file: string, from: string | RegExp, to: string): void {
    const before = readFileSync(file, "utf8");
    const after = before.replace(from, to);
    if (after === before) throw new Error(`${file}: found nothing to replace for ${String(from)}`);
    writeFileSync(file, after);
}

describe("flake.lock", () => {
    const lock = readLock() as { nodes: { nixpkgs: { locked: Record<string, unknown>; original: Record<string, unknown> } } };
    const withNixpkgs = (locked: Record<string, unknown>, original: Record<string, unknown> = {}) => {
        const copy = JSON.parse(JSON.stringify(lock)) as typeof lock;
        Object.assign(copy.nodes.nixpkgs.locked, locked);
        Object.assign(copy.nodes.nixpkgs.original, original);
        return copy;
    };

    it("pins nixpkgs to a stable NixOS branch at an exact revision and NAR hash", () => {
        expect(flakeLockProblems(lock)).toEqual([]);
        expect(lock.nodes.nixpkgs.original.ref).toMatch(/^nixos-\d\d\.\d\d$/);
    });

    it("rejects a NAR hash that is not SRI (base32 from nix-prefetch-url)", () => {
        expect(flakeLockProblems(withNixpkgs({ narHash: "0dcslr2lwfaclfl4pmbwb3yw27bnvwlqiif394d3d66vyd163dvy" }))).toEqual([
            expect.stringContaining("is not an SRI sha256 hash"),
        ]);
    });

    it("rejects a short or missing revision, a branch instead of a lock, and another lock version", () => {
        expect(flakeLockProblems(withNixpkgs({ rev: "7fc6f2c" }))).toEqual([expect.stringContaining("is not a 40-digit hex commit")]);
        expect(flakeLockProblems(withNixpkgs({ rev: undefined }))).toEqual([expect.stringContaining("is not a 40-digit hex commit")]);
        expect(flakeLockProblems(withNixpkgs({}, { ref: "nixos-unstable" }))).toEqual([expect.stringContaining("is not a stable NixOS branch")]);
        expect(flakeLockProblems({ ...(lock as object), version: 6 })).toEqual(["version is 6, expected 7"]);
        expect(flakeLockProblems({ version: 7, root: "root", nodes: { root: { inputs: {} } } })).toEqual(["the root node has no nixpkgs input"]);
    });

    it("rejects a lock made for another input URL than flake.nix's", () => {
        expect(flakeLockProblems(lock, "github:NixOS/nixpkgs/nixos-25.11")).toEqual([
            "flake.nix asks for github:NixOS/nixpkgs/nixos-25.11, but flake.lock was locked for github:NixOS/nixpkgs/nixos-26.05",
        ]);
    });
});

describe("publicPortsOfSecurityGroup", () => {
    it("takes every TCP port but SSH, sorted", () => {
        const rule = (port: number) => ({ protocol: "tcp", fromPort: port, toPort: port });
        expect(publicPortsOfSecurityGroup([rule(22), rule(443), rule(80)])).toEqual([80, 443]);
    });

    it("refuses a port range, which the host firewall list cannot express", () => {
        expect(() => publicPortsOfSecurityGroup([{ protocol: "tcp", fromPort: 8000, toPort: 8100 }])).toThrow("is not a single TCP port");
    });
});

describeWithTools(["nix-instantiate"])("the flake in nix/ (nix-instantiate, stand-in nixpkgs)", () => {
    let flake: FlakeStructure;
    beforeAll(async () => {
        flake = await evalFlakeStructure();
    });

    describe("parsing", () => {
        it("parses every .nix file of the flake", async () => {
            const files = nixFiles().map((f) => path.relative(NIX_DIR, f));
            expect(files).toEqual(expect.arrayContaining(["flake.nix", "modules/default.nix", "hosts/staging.nix", "hosts/prod.nix", "tests/web.nix"]));
            await expect(parseNixFiles(nixFiles())).resolves.toBeUndefined();
        });

        it("rejects a syntax error and an undefined variable, naming the file", async () => {
            const dir = tempDir("nix-parse-");
            const syntax = path.join(dir, "syntax.nix");
            const undefinedVariable = path.join(dir, "undefined.nix");
            writeFileSync(syntax, "{ services.nginx.enable = ; }\n");
            writeFileSync(undefinedVariable, "{ lib, ... }: { networking.firewall.enable = enable; }\n");
            await expect(parseNixFiles([syntax])).rejects.toThrow(/syntax error[\s\S]*syntax\.nix/);
            await expect(parseNixFiles([undefinedVariable])).rejects.toThrow(/undefined variable 'enable'[\s\S]*undefined\.nix/);
        });
    });

    describe("flake.lock against flake.nix", () => {
        it("was locked for the nixpkgs URL that flake.nix asks for", () => {
            expect(flakeLockProblems(readLock(), flake.nixpkgsUrl)).toEqual([]);
        });

        it("pins sops-nix to an exact revision and NAR hash, its nixpkgs following the flake's", () => {
            expect(flake.sopsNixUrl).toBe("github:Mic92/sops-nix");
            expect(flake.sopsNixFollows).toBe("nixpkgs");
            expect(sopsNixLockProblems(readLock(), flake.sopsNixUrl, flake.sopsNixFollows)).toEqual([]);
            // The lock's sops-nix node has no nixpkgs of its own.
            expect(Object.keys((readLock() as { nodes: object }).nodes).sort()).toEqual(["nixpkgs", "root", "sops-nix"]);
        });

        it("notices a sops-nix lock that is not exact, not for flake.nix's URL, or with its own nixpkgs", () => {
            const lock = readLock() as { nodes: Record<string, { inputs?: unknown; locked: Record<string, unknown>; original: Record<string, unknown> }> };
            const edited = (f: (l: typeof lock) => void) => {
                const copy = JSON.parse(JSON.stringify(lock)) as typeof lock;
                f(copy);
                return sopsNixLockProblems(copy, flake.sopsNixUrl, flake.sopsNixFollows);
            };
            expect(edited((l) => (l.nodes["sops-nix"].locked.rev = "d8be5ea"))).toEqual([expect.stringContaining("is not a 40-digit hex commit")]);
            expect(edited((l) => delete l.nodes["sops-nix"].locked.narHash)).toEqual([expect.stringContaining("is not an SRI sha256 hash")]);
            expect(edited((l) => (l.nodes["sops-nix"].original.ref = "master"))).toEqual([
                "flake.nix asks for github:Mic92/sops-nix, but flake.lock was locked for github:Mic92/sops-nix/master",
            ]);
            expect(edited((l) => (l.nodes["sops-nix"].inputs = { nixpkgs: "nixpkgs_2" }))).toEqual([expect.stringContaining("should follow nixpkgs")]);
        });

        it("imports sops-nix's module into every host, beside the project's modules", () => {
            expect(Object.keys(flake.hostsImportSopsNix).length).toBeGreaterThan(0);
            for (const [host, imports] of Object.entries(flake.hostsImportSopsNix)) expect({ host, imports }).toEqual({ host, imports: true });
        });

        it("tracks the NixOS release whose AMI new hosts boot (nixosRelease of every stack)", () => {
            const release = flake.nixpkgsUrl.replace(/^.*\/nixos-/, "");
            for (const stack of listStacks()) expect({ stack, release: loadSettings(stack).nixosRelease }).toEqual({ stack, release });
        });
    });

    describe("hosts", () => {
        it("has a configuration of the right platform for every host of every stack", () => {
            const systems = Object.fromEntries(Object.entries(flake.hosts).map(([name, host]) => [name, host.system]));
            const stacks = listStacks();
            expect(stacks.length).toBeGreaterThan(0);
            for (const stack of stacks) {
                const { hosts } = loadSettings(stack);
                expect(hosts.length).toBeGreaterThan(0);
                expect(hostProblems(stack, hosts, systems)).toEqual([]);
            }
        });

        it("evaluates nixosConfigurations without touching nixpkgs packages (the outputs are lazy)", async () => {
            // evalFlakeStructure already read every host with a throwing legacyPackages; a flake
            // whose host list needs real packages must fail it.
            const dir = copyOfNixDir();
            editFile(path.join(dir, "flake.nix"), "inherit system;", "system = nixpkgs.legacyPackages.${system}.stdenv.hostPlatform.system;");
            await expect(evalFlakeStructure(dir)).rejects.toThrow("nixosConfigurations evaluated nixpkgs.legacyPackages");
        });

        it("reports a host a stack deploys but the flake does not define", () => {
            const systems = Object.fromEntries(Object.entries(flake.hosts).map(([name, host]) => [name, host.system]));
            const settings = loadSettings("staging", { hosts: JSON.stringify({ builder: { instanceType: "c7g.large" } }) });
            expect(hostProblems("staging", settings.hosts, systems)).toEqual([
                'stack staging, host builder: nix/flake.nix has no nixosConfigurations.builder; add `builder = "aarch64-linux";` to its hosts and a nix/hosts/builder.nix',
            ]);
        });

        it("reports hosts missing from, or on the wrong platform in, an edited flake", async () => {
            const dir = copyOfNixDir();
            editFile(path.join(dir, "flake.nix"), /staging = "x86_64-linux";\s*prod = "x86_64-linux";/, 'staging = "aarch64-linux";');
            const systems = await evalFlakeSystems(dir);
            expect(systems).toEqual({ staging: "aarch64-linux" });
            const problems = listStacks().flatMap((stack) => hostProblems(stack, loadSettings(stack).hosts, systems));
            expect(problems).toEqual([
                "stack prod, host prod: nix/flake.nix has no nixosConfigurations.prod; add `prod = \"x86_64-linux\";` to its hosts and a nix/hosts/prod.nix",
                "stack staging, host staging: nixosConfigurations.staging is built for aarch64-linux, but its instance type runs x86_64-linux",
            ]);
        });

        it("gives every host its own file under hosts/ that sets system.stateVersion, and nothing else sets it", () => {
            expect(Object.keys(flake.hosts).length).toBeGreaterThan(0);
            for (const [name, host] of Object.entries(flake.hosts)) {
                expect({ name, hostFile: host.hostFile, missing: host.missingModules }).toEqual({
                    name,
                    hostFile: path.join(NIX_DIR, "hosts", `${name}.nix`),
                    missing: [],
                });
                expect({ name, stateVersion: host.stateVersion }).toEqual({ name, stateVersion: expect.stringMatching(/^\d\d\.\d\d$/) });
            }
            for (const [file, shape] of Object.entries(flake.modules)) expect({ file, sets: shape.setsStateVersion }).toEqual({ file, sets: false });
        });

        it("notices a host file that is missing", async () => {
            const dir = copyOfNixDir();
            editFile(path.join(dir, "flake.nix"), 'prod = "x86_64-linux";', 'prod = "x86_64-linux";\n        web = "x86_64-linux";');
            const { hosts } = await evalFlakeStructure(dir);
            expect(hosts.web).toEqual({
                system: "x86_64-linux",
                hostFile: null,
                stateVersion: null,
                settings: {},
                missingModules: [path.join(dir, "hosts", "web.nix")],
            });
        });
    });

    describe("modules", () => {
        it("are NixOS modules: option definitions only, or options/config/imports only", () => {
            expect(Object.keys(flake.modules)).toEqual(expect.arrayContaining(["default.nix", "ec2.nix", "firewall.nix", "ssh.nix", "web.nix"]));
            for (const [file, { keys }] of Object.entries(flake.modules)) {
                expect(keys.length).toBeGreaterThan(0);
                if (keys.includes("options") || keys.includes("config")) {
                    expect({ file, unexpected: keys.filter((k) => !MODULE_STRUCTURE_KEYS.includes(k)) }).toEqual({ file, unexpected: [] });
                }
            }
        });

        it("imports every module file from modules/default.nix", () => {
            const others = Object.keys(flake.modules)
                .filter((f) => f !== "default.nix")
                .map((f) => path.join(NIX_DIR, "modules", f))
                .sort();
            expect([...flake.modules["default.nix"].imports].sort()).toEqual(others);
        });

        it("builds on the official EC2 image module", () => {
            expect(flake.modules["ec2.nix"].imports).toEqual(["/modules-path/virtualisation/amazon-image.nix"]);
        });
    });

    describe("developer outputs", () => {
        it("offers a dev shell with the repo's tools on Linux and macOS, x86_64 and aarch64", () => {
            expect(Object.keys(flake.devShells).sort()).toEqual(DEV_SYSTEMS);
            for (const packages of Object.values(flake.devShells)) expect([...packages].sort()).toEqual([...DEV_SHELL_TOOLS].sort());
        });

        it("formats with nixfmt (RFC style) on every developer system", () => {
            expect(flake.formatters).toEqual(Object.fromEntries(DEV_SYSTEMS.map((s) => [s, "nixfmt-tree"])));
        });

        it("checks the web server in a NixOS VM test on Linux, with a client node", () => {
            expect(Object.keys(flake.checks).sort()).toEqual(LINUX_SYSTEMS);
            for (const checks of Object.values(flake.checks)) {
                expect(checks.web).toMatchObject({ name: "nixos-ec2-web", nodes: ["client", "server", "staging"], missingImports: [] });
            }
        });

        it("boots prod's settings as `server` and staging's, plus a pending domain and /admin, as `staging` in the VM test", () => {
            for (const { web } of Object.values(flake.checks)) {
                expect(web.settings.server).toEqual(flake.hosts.prod.settings);
                const { web: domain, flake: _flake, ...staging } = web.settings.staging;
                expect(staging).toEqual(flake.hosts.staging.settings);
                expect(flake.hosts.staging.settings).toEqual({ autoUpgrade: { enable: true }, logging: { debug: true } });
                expect(domain).toEqual({ domain: expect.stringMatching(/\.example\.org$/), acmeEmail: expect.any(String), admin: { enable: true } });
            }
        });

        it("keeps output names to what `nix flake check` knows", () => {
            expect(flake.outputs).toEqual(["checks", "devShells", "formatter", "nixosConfigurations"]);
        });
    });

    describe("boot guard", () => {
        const remoteSwitch = readFileSync(path.join(NIX_DIR, "..", "deploy", "remote-switch.sh"), "utf8");
        const deployScript = readFileSync(path.join(NIX_DIR, "..", "deploy", "nixos-deploy.sh"), "utf8");

        it.each([
            ["x86_64 (BIOS GRUB)", false, "grub2"],
            ["aarch64 (EFI GRUB, which the grub module leaves off PATH)", true, "grub2_efi"],
        ])("runs the installed remote-switch.sh boot-guard before sshd on %s, with grub-editenv on PATH", async (_what, aarch64, grub) => {
            const guard = await evalBootGuard(aarch64);
            const unit = /^readonly BOOT_GUARD_UNIT=(\S+)\.service$/m.exec(remoteSwitch)?.[1];
            const stateDir = /^readonly DEFAULT_STATE_DIR=(\S+)$/m.exec(deployScript)?.[1];
            expect(unit).toBe("nixos-ec2-boot-guard");
            expect(stateDir).toBe("/var/lib/nixos-ec2");
            expect(Object.keys(guard.services)).toEqual([unit]);
            expect(guard.services[unit as string]).toEqual({
                wantedBy: ["multi-user.target"],
                before: ["sshd.service"],
                path: ["nix", "systemd", grub, "coreutils", "util-linux"],
                condition: [`|${stateDir}/pending-boot`, `|${stateDir}/pending-rollback`],
                execStart: `/bash/bin/bash ${stateDir}/bin/remote-switch.sh boot-guard`,
                type: "oneshot",
            });
            expect(guard.systemPackages).toEqual([grub]);
            // The command the unit runs exists in the script, and needs no arguments.
            expect(remoteSwitch).toMatch(/^ {4}boot-guard\)\n {8}need_args 0 "\$@"$/m);
        });
    });

    describe("firewall", () => {
        it("opens SSH and exactly the security group's public ports, both from nix/network.json", async () => {
            const ports = await evalFirewallPorts();
            expect(ports).toEqual(flake.firewallPorts);
            expect(ports.filter((p) => p === 22)).toEqual([22]);
            const hostPublic = ports.filter((p) => p !== 22).sort((a, b) => a - b);
            expect(hostPublic).toEqual([...readNetworkFile().publicTcpPorts].sort((a, b) => a - b));
            for (const stack of listStacks()) {
                const run = await runProgram(stack);
                const groups = run.resources.filter((r) => r.type === SG);
                expect(groups).toHaveLength(1);
                const sgPublic = publicPortsOfSecurityGroup(groups[0].inputs.ingress as Array<Record<string, unknown>>);
                expect({ stack, ports: hostPublic }).toEqual({ stack, ports: sgPublic });
            }
        });

        it("follows an edit of nix/network.json, so a host and group built from different files would differ", async () => {
            const dir = copyOfNixDir();
            writeFileSync(path.join(dir, "network.json"), JSON.stringify({ publicTcpPorts: [8443] }));
            const ports = await evalFirewallPorts(dir);
            expect(ports).toEqual([22, 8443]);
            const run = await runProgram("staging");
            const [group] = run.resources.filter((r) => r.type === SG);
            expect(ports.filter((p) => p !== 22)).not.toEqual(publicPortsOfSecurityGroup(group.inputs.ingress as Array<Record<string, unknown>>));
        });
    });
});

/** Parses a Python file with python3's own parser; throws with its SyntaxError. */
function parsePython(file: string): void {
    execFileSync("python3", ["-c", "import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])", file], { encoding: "utf8", stdio: "pipe" });
}

describeWithTools(["nix-instantiate", "python3"])("the VM test's script (python3)", () => {
    it("is Python that parses, on every test system", async () => {
        const { checks } = await evalFlakeStructure();
        const dir = tempDir("nixos-ec2-vm-test-");
        for (const [system, { web }] of Object.entries(checks)) {
            const file = path.join(dir, `${system}.py`);
            writeFileSync(file, web.testScript);
            expect(web.testScript).toContain("start_all()");
            expect(() => parsePython(file)).not.toThrow();
        }
    });

    it("notices a script that does not parse", () => {
        const file = path.join(tempDir("nixos-ec2-vm-test-"), "broken.py");
        writeFileSync(file, 'with subtest("x"):\nassert True\n');
        expect(() => parsePython(file)).toThrow(/IndentationError/);
    });
});
