/**
 * Checks of the flake in nix/ that run without nixpkgs, a binary cache or KVM: only
 * `nix-instantiate` (Debian's nix-bin). They parse every .nix file and evaluate the flake's
 * outputs against a stand-in nixpkgs, which is enough to catch a host the stacks deploy but
 * the flake lacks, a wrong platform, or a firewall that disagrees with the security group.
 */
import { execFile } from "node:child_process";
import { readdirSync } from "node:fs";
import * as path from "node:path";

export const NIX_DIR = path.join(__dirname, "..", "..", "nix");
/** The part of nixpkgs' lib that the modules call (mkIf, mkOption, ...), in nixpkgs' shapes. */
export const STAND_IN_LIB = path.join(__dirname, "stand-in-lib.nix");

/** The tools `nix develop` must provide (nixpkgs attribute names). */
export const DEV_SHELL_TOOLS = ["age", "awscli2", "nixfmt", "nodejs_22", "openssh", "pulumi", "shellcheck", "sops", "ssh-to-age"];

/**
 * The dummy store evaluates without a Nix store or daemon: nothing is built or copied, and
 * nix-instantiate runs as any user, without /nix/var being writable. An empty NIX_PATH keeps
 * the machine's channels (if any) out of the evaluation.
 */
const STORE_ARGS = ["--store", "dummy://"];

/** Runs nix-instantiate; a failure carries its stderr, which names the file and line. */
export function nixInstantiate(args: string[]): Promise<string> {
    return new Promise((resolve, reject) => {
        execFile(
            "nix-instantiate",
            [...STORE_ARGS, ...args],
            { env: { ...process.env, NIX_PATH: "" }, maxBuffer: 16 * 1024 * 1024 },
            (error, stdout, stderr) => {
                if (error) reject(new Error(`nix-instantiate ${args.join(" ")} failed: ${stderr.trim() || error.message}`));
                else resolve(stdout);
            },
        );
    });
}

/** Evaluates a Nix function of `{ nixDir }` (an absolute path string) to JSON. */
async function evalWithNixDir<T>(expression: string, nixDir: string): Promise<T> {
    const out = await nixInstantiate(["--eval", "--strict", "--json", "--argstr", "nixDir", path.resolve(nixDir), "-E", expression]);
    return JSON.parse(out) as T;
}

/** Every .nix file under `dir`, absolute, sorted. */
export function nixFiles(dir: string = NIX_DIR): string[] {
    const found: string[] = [];
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
        const full = path.join(dir, entry.name);
        if (entry.isDirectory()) found.push(...nixFiles(full));
        else if (entry.isFile() && entry.name.endsWith(".nix")) found.push(full);
    }
    return found.sort();
}

/** Parses the files in one nix-instantiate call; rejects with the parser's message on the first error. */
export async function parseNixFiles(files: string[]): Promise<void> {
    if (files.length === 0) throw new Error("no .nix files to parse");
    await nixInstantiate(["--parse", ...files]);
}

/** What the flake gives the stand-in nixpkgs for one `nixosConfigurations.<name>`. */
export interface FlakeHost {
    /** The `system` argument of `lib.nixosSystem`. */
    readonly system: string;
    /** The host's own file, nix/hosts/<name>.nix, when it is among the modules and exists. */
    readonly hostFile: string | null;
    /** Its `system.stateVersion`, when that file sets one. */
    readonly stateVersion: string | null;
    /** What that file sets under nixosEc2. */
    readonly settings: Record<string, unknown>;
    /** Path modules that do not exist. */
    readonly missingModules: string[];
}

/** A module file's top-level attribute names, its imports, and whether it sets system.stateVersion. */
export interface ModuleShape {
    readonly keys: string[];
    /** Path imports as absolute paths; other imports as strings. */
    readonly imports: string[];
    readonly setsStateVersion: boolean;
}

export interface FlakeStructure {
    /** `inputs.nixpkgs.url` of flake.nix. */
    readonly nixpkgsUrl: string;
    /** `inputs.sops-nix.url`, and the input its nixpkgs follows. */
    readonly sopsNixUrl: string;
    readonly sopsNixFollows: string | null;
    /** Whether each host's module list has sops-nix's module. */
    readonly hostsImportSopsNix: Record<string, boolean>;
    /** Top-level output names. */
    readonly outputs: string[];
    /** nixosConfigurations, evaluated with a nixpkgs whose packages throw when touched. */
    readonly hosts: Record<string, FlakeHost>;
    /** devShells.<system>.default's packages, as nixpkgs attribute names. */
    readonly devShells: Record<string, string[]>;
    /** formatter.<system>, as a nixpkgs attribute name. */
    readonly formatters: Record<string, string>;
    /** checks.<system>.<name>: the NixOS test's name, nodes, the files its nodes import or disable that do not exist, what each node sets under nixosEc2, and the test script (Python; packages are their attribute names). */
    readonly checks: Record<string, Record<string, { name: string; nodes: string[]; missingImports: string[]; settings: Record<string, Record<string, unknown>>; testScript: string }>>;
    /** networking.firewall.allowedTCPPorts of modules/firewall.nix. */
    readonly firewallPorts: number[];
    /** modules/*.nix by file name. */
    readonly modules: Record<string, ModuleShape>;
}

/**
 * One evaluation of everything the checks need. The flake's `outputs` function gets a stand-in
 * nixpkgs: `lib.nixosSystem` returns its arguments; packages are attribute-name strings.
 * nixosConfigurations is evaluated a second time with `legacyPackages` that throws, which proves
 * the host list does not depend on real nixpkgs packages.
 */
const STRUCTURE_EXPRESSION = `
{ nixDir, devShellTools, standInLibFile }:
let
  dir = /. + nixDir;
  flake = import (dir + "/flake.nix");
  tools = builtins.fromJSON devShellTools;

  # A package set whose members are their own names, plus the functions the flake calls.
  fakePkgs = system:
    builtins.listToAttrs (map (name: { inherit name; value = name; }) (tools ++ [ "nixfmt-tree" "util-linux" ]))
    // {
      inherit system;
      mkShellNoCC = args: args;
      testers.runNixOSTest = test: test;
    };
  standInLib = {
    nixosSystem = args: args;
    genAttrs = names: f: builtins.listToAttrs (map (name: { inherit name; value = f name; }) names);
  };
  # sops-nix's module, a stand-in that is not a path, so that no check reads it as a file of nix/.
  sopsNix = { nixosModules.sops = { _sopsNixStandIn = true; }; };
  callOutputs = nixpkgs:
    let outputs = flake.outputs { self = outputs // { outPath = nixDir; }; inherit nixpkgs; sops-nix = sopsNix; };
    in outputs;

  outputs = callOutputs {
    lib = standInLib;
    legacyPackages = builtins.listToAttrs (map (name: { inherit name; value = fakePkgs name; })
      [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ]);
  };
  lazyOutputs = callOutputs {
    lib.nixosSystem = standInLib.nixosSystem;
    legacyPackages = throw "nixosConfigurations evaluated nixpkgs.legacyPackages";
  };

  # Modules get no configuration and no packages: only their shape is read here.
  callModule = m: if builtins.isFunction m
    then m { config = { }; lib = import standInLibFile; pkgs = { }; options = { }; modulesPath = "/modules-path"; }
    else m;
  hostOf = name: args:
    let
      paths = builtins.filter builtins.isPath args.modules;
      own = builtins.filter (p: baseNameOf p == name + ".nix" && baseNameOf (dirOf p) == "hosts") paths;
      hostFile = if own != [ ] && builtins.pathExists (builtins.head own) then builtins.head own else null;
      hostModule = if hostFile == null then { } else callModule (import hostFile);
    in {
      system = args.system;
      hostFile = if hostFile == null then null else toString hostFile;
      stateVersion = hostModule.system.stateVersion or null;
      settings = hostModule.nixosEc2 or { };
      missingModules = map toString (builtins.filter (p: !builtins.pathExists p) paths);
    };

  moduleDir = dir + "/modules";
  moduleFiles = builtins.filter (f: builtins.match ".*[.]nix" f != null)
    (builtins.attrNames (builtins.readDir moduleDir));
  shapeOf = file:
    let m = callModule (import (moduleDir + "/\${file}"));
    in {
      keys = builtins.attrNames m;
      imports = map toString (m.imports or [ ]);
      setsStateVersion = (m.system or { }) ? stateVersion || ((m.config or { }).system or { }) ? stateVersion;
    };

  firewall = callModule (import (moduleDir + "/firewall.nix"));
in {
  nixpkgsUrl = flake.inputs.nixpkgs.url;
  sopsNixUrl = flake.inputs.sops-nix.url;
  sopsNixFollows = flake.inputs.sops-nix.inputs.nixpkgs.follows or null;
  hostsImportSopsNix = builtins.mapAttrs (name: args: builtins.elem sopsNix.nixosModules.sops args.modules) lazyOutputs.nixosConfigurations;
  outputs = builtins.attrNames outputs;
  hosts = builtins.mapAttrs hostOf lazyOutputs.nixosConfigurations;
  devShells = builtins.mapAttrs (system: shells: shells.default.packages) outputs.devShells;
  formatters = outputs.formatter;
  checks = builtins.mapAttrs (system: builtins.mapAttrs (check: test: {
    inherit (test) name;
    nodes = builtins.attrNames test.nodes;
    missingImports = builtins.concatLists (builtins.attrValues (builtins.mapAttrs (node: module:
      let m = callModule module;
      in map toString (builtins.filter (p: builtins.isPath p && !builtins.pathExists p)
        ((m.imports or [ ]) ++ (m.disabledModules or [ ])))) test.nodes));
    settings = builtins.mapAttrs (node: module: (callModule module).nixosEc2 or { }) test.nodes;
    inherit (test) testScript;
  })) outputs.checks;
  firewallPorts = firewall.networking.firewall.allowedTCPPorts;
  modules = builtins.listToAttrs (map (file: { name = file; value = shapeOf file; }) moduleFiles);
}
`;

/** Evaluates the flake in `nixDir` (default nix/) against the stand-in nixpkgs. */
export async function evalFlakeStructure(nixDir: string = NIX_DIR): Promise<FlakeStructure> {
    const out = await nixInstantiate([
        "--eval",
        "--strict",
        "--json",
        "--argstr",
        "nixDir",
        path.resolve(nixDir),
        "--argstr",
        "devShellTools",
        JSON.stringify(DEV_SHELL_TOOLS),
        "--argstr",
        "standInLibFile",
        STAND_IN_LIB,
        "-E",
        STRUCTURE_EXPRESSION,
    ]);
    return JSON.parse(out) as FlakeStructure;
}

/** flakeAttr → `system` of every nixosConfigurations entry. */
export async function evalFlakeSystems(nixDir: string = NIX_DIR): Promise<Record<string, string>> {
    const { hosts } = await evalFlakeStructure(nixDir);
    return Object.fromEntries(Object.entries(hosts).map(([name, host]) => [name, host.system]));
}

/** What nix/modules/boot-guard.nix defines, evaluated on its own for one platform. */
export interface BootGuard {
    readonly systemPackages: string[];
    readonly services: Record<string, { wantedBy: string[]; before: string[]; path: string[]; condition: string[]; execStart: string; type: string }>;
}

export async function evalBootGuard(aarch64: boolean, nixDir: string = NIX_DIR): Promise<BootGuard> {
    return evalWithNixDir<BootGuard>(
        `{ nixDir }:
        let
          module = import (/. + nixDir + "/modules/boot-guard.nix");
          pkgs = {
            stdenv.hostPlatform.isAarch64 = ${aarch64 ? "true" : "false"};
            grub2 = "grub2"; grub2_efi = "grub2_efi"; coreutils = "coreutils"; util-linux = "util-linux"; bash = "/bash";
          };
          config = { nix.package = "nix"; systemd.package = "systemd"; };
          result = module { inherit config pkgs; lib = { }; };
        in {
          systemPackages = result.environment.systemPackages;
          services = builtins.mapAttrs (name: s: {
            inherit (s) wantedBy before path;
            condition = s.unitConfig.ConditionFileNotEmpty;
            execStart = s.serviceConfig.ExecStart;
            type = s.serviceConfig.Type;
          }) result.systemd.services;
        }`,
        nixDir,
    );
}

/** networking.firewall.allowedTCPPorts of nix/modules/firewall.nix, evaluated on its own. */
export async function evalFirewallPorts(nixDir: string = NIX_DIR): Promise<number[]> {
    return evalWithNixDir<number[]>(
        `{ nixDir }:
        let module = import (/. + nixDir + "/modules/firewall.nix");
        in (module { config = { }; lib = { }; pkgs = { }; }).networking.firewall.allowedTCPPorts`,
        nixDir,
    );
}

/** A host as the stacks deploy it (lib/config.ts HostSettings). */
export interface DeployedHost {
    readonly name: string;
    readonly flakeAttr: string;
    readonly nixSystem: string;
}

/** Why the flake cannot serve these hosts; empty when every host has a configuration of its platform. */
export function hostProblems(stack: string, hosts: readonly DeployedHost[], flakeSystems: Record<string, string>): string[] {
    const problems: string[] = [];
    for (const host of hosts) {
        const system = flakeSystems[host.flakeAttr];
        if (system === undefined) {
            problems.push(
                `stack ${stack}, host ${host.name}: nix/flake.nix has no nixosConfigurations.${host.flakeAttr}; ` +
                    `add \`${host.flakeAttr} = "${host.nixSystem}";\` to its hosts and a nix/hosts/${host.flakeAttr}.nix`,
            );
        } else if (system !== host.nixSystem) {
            problems.push(
                `stack ${stack}, host ${host.name}: nixosConfigurations.${host.flakeAttr} is built for ${system}, ` +
                    `but its instance type runs ${host.nixSystem}`,
            );
        }
    }
    return problems;
}

const FORTY_HEX = /^[0-9a-f]{40}$/;
/** SRI SHA-256: "sha256-" and 32 bytes in base64 (43 characters and one "="). */
const SRI_SHA256 = /^sha256-[A-Za-z0-9+/]{43}=$/;
const NIXOS_BRANCH = /^nixos-\d{2}\.\d{2}$/;

/**
 * Why `lock` (a parsed flake.lock) does not pin nixpkgs to a stable NixOS branch at an exact,
 * verifiable revision; empty when it does. `nixpkgsUrl` is flake.nix's input URL, which the
 * lock's `original` must match, or Nix would try to re-lock on the host.
 */
export function flakeLockProblems(lock: unknown, nixpkgsUrl?: string): string[] {
    const problems: string[] = [];
    const l = lock as {
        version?: unknown;
        root?: unknown;
        nodes?: Record<string, { inputs?: Record<string, unknown>; locked?: Record<string, unknown>; original?: Record<string, unknown> }>;
    } | null;
    if (l === null || typeof l !== "object") return ["flake.lock is not a JSON object"];
    if (l.version !== 7) problems.push(`version is ${JSON.stringify(l.version)}, expected 7`);
    const rootName = typeof l.root === "string" ? l.root : undefined;
    const root = rootName !== undefined ? l.nodes?.[rootName] : undefined;
    const nodeName = root?.inputs?.nixpkgs;
    if (typeof nodeName !== "string") return [...problems, "the root node has no nixpkgs input"];
    const node = l.nodes?.[nodeName];
    const locked = node?.locked;
    const original = node?.original;
    if (locked === undefined || original === undefined) return [...problems, `node ${nodeName} has no locked and original sections`];

    if (locked.type !== "github" || locked.owner?.toString().toLowerCase() !== "nixos" || locked.repo !== "nixpkgs") {
        problems.push(`nixpkgs is locked to ${JSON.stringify(locked.type)}:${String(locked.owner)}/${String(locked.repo)}, expected github:NixOS/nixpkgs`);
    }
    if (typeof locked.rev !== "string" || !FORTY_HEX.test(locked.rev)) {
        problems.push(`locked.rev ${JSON.stringify(locked.rev)} is not a 40-digit hex commit`);
    }
    if (typeof locked.narHash !== "string" || !SRI_SHA256.test(locked.narHash)) {
        problems.push(`locked.narHash ${JSON.stringify(locked.narHash)} is not an SRI sha256 hash (sha256-<44 base64 characters>)`);
    }
    if (typeof locked.lastModified !== "number" || !Number.isInteger(locked.lastModified) || locked.lastModified <= 0) {
        problems.push(`locked.lastModified ${JSON.stringify(locked.lastModified)} is not a positive Unix time`);
    }
    if (typeof original.ref !== "string" || !NIXOS_BRANCH.test(original.ref)) {
        problems.push(`original.ref ${JSON.stringify(original.ref)} is not a stable NixOS branch (nixos-YY.MM)`);
    }
    if (nixpkgsUrl !== undefined) {
        const fromLock = `github:${String(original.owner)}/${String(original.repo)}/${String(original.ref)}`;
        if (fromLock !== nixpkgsUrl) problems.push(`flake.nix asks for ${nixpkgsUrl}, but flake.lock was locked for ${fromLock}`);
    }
    return problems;
}

/** A security group ingress rule as the program registers it. */
interface IngressRule {
    readonly fromPort?: unknown;
    readonly toPort?: unknown;
    readonly protocol?: unknown;
}

/** The security group's TCP ports other than SSH, sorted; a port range or another protocol is an error. */
export function publicPortsOfSecurityGroup(ingress: readonly IngressRule[]): number[] {
    const ports = new Set<number>();
    for (const rule of ingress) {
        if (rule.protocol !== "tcp" || typeof rule.fromPort !== "number" || rule.fromPort !== rule.toPort) {
            throw new Error(`ingress rule ${JSON.stringify(rule)} is not a single TCP port; the host firewall opens single ports only`);
        }
        if (rule.fromPort !== 22) ports.add(rule.fromPort);
    }
    return [...ports].sort((a, b) => a - b);
}

/**
 * Why `lock` does not pin flake.nix's sops-nix input to an exact, verifiable revision of
 * github:Mic92/sops-nix whose nixpkgs follows the root's; empty when it does.
 */
export function sopsNixLockProblems(lock: unknown, sopsNixUrl: string, follows: string | null): string[] {
    const l = lock as { root?: string; nodes?: Record<string, { inputs?: Record<string, unknown>; locked?: Record<string, unknown>; original?: Record<string, unknown> }> };
    const nodeName = l.nodes?.[l.root ?? ""]?.inputs?.["sops-nix"];
    if (typeof nodeName !== "string") return ["the root node has no sops-nix input"];
    const node = l.nodes?.[nodeName];
    const locked = node?.locked ?? {};
    const original = node?.original ?? {};
    const problems: string[] = [];
    if (locked.type !== "github" || locked.owner !== "Mic92" || locked.repo !== "sops-nix") {
        problems.push(`sops-nix is locked to ${JSON.stringify(locked.type)}:${String(locked.owner)}/${String(locked.repo)}, expected github:Mic92/sops-nix`);
    }
    if (typeof locked.rev !== "string" || !FORTY_HEX.test(locked.rev)) problems.push(`sops-nix locked.rev ${JSON.stringify(locked.rev)} is not a 40-digit hex commit`);
    if (typeof locked.narHash !== "string" || !SRI_SHA256.test(locked.narHash)) problems.push(`sops-nix locked.narHash ${JSON.stringify(locked.narHash)} is not an SRI sha256 hash`);
    if (typeof locked.lastModified !== "number" || !Number.isInteger(locked.lastModified) || locked.lastModified <= 0) {
        problems.push(`sops-nix locked.lastModified ${JSON.stringify(locked.lastModified)} is not a positive Unix time`);
    }
    const fromLock = `github:${String(original.owner)}/${String(original.repo)}${original.ref ? `/${String(original.ref)}` : ""}`;
    if (fromLock !== sopsNixUrl) problems.push(`flake.nix asks for ${sopsNixUrl}, but flake.lock was locked for ${fromLock}`);
    if (follows !== null && JSON.stringify(node?.inputs?.nixpkgs) !== JSON.stringify([follows])) {
        problems.push(`sops-nix's nixpkgs should follow ${follows} (flake.nix says so), but the lock has ${JSON.stringify(node?.inputs?.nixpkgs)}`);
    }
    return problems;
}
