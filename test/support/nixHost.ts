/**
 * One host of the flake in nix/, evaluated with nix-instantiate against a stand-in nixpkgs lib
 * (test/support/eval-host.nix): the option values its modules see and the configuration they
 * define, with mkIf and mkMerge applied. Enough to read what a module asks nixpkgs for, and to
 * run the shell scripts and nginx snippets it writes; not a check of nixpkgs' own modules.
 */
import { execFileSync, spawn } from "node:child_process";
import * as path from "node:path";
import { NIX_DIR, nixInstantiate } from "./nix";

const EVAL_HOST = path.join(__dirname, "eval-host.nix");

/** A definition made with mkBefore/mkAfter/mkOrder (nixpkgs lib/modules.nix). */
export interface Ordered<T> {
    readonly _type: "order";
    readonly priority: number;
    readonly content: T;
}

/** The result of evaluating one host. */
export interface HostEvaluation {
    /** Every module file the host's module list reaches, in import order. */
    readonly modules: string[];
    /** config.nixosEc2 as the modules see it. */
    readonly options: Record<string, unknown>;
    /** The merged definitions; shaped like the NixOS configuration. */
    readonly config: any;
}

/**
 * The packages the modules interpolate, as store-path stand-ins. util-linux is this machine's,
 * so that a script calling `${pkgs.util-linux}/bin/flock` runs here.
 */
export function standInPackages(): Record<string, unknown> {
    const flock = execFileSync("sh", ["-c", "command -v flock"], { encoding: "utf8" }).trim();
    return {
        "util-linux": path.dirname(path.dirname(flock)),
        stdenv: { hostPlatform: { isAarch64: false } },
        bash: "/bash",
        coreutils: "/coreutils",
        grub2: "/grub2",
        grub2_efi: "/grub2-efi",
    };
}

/** Evaluates nixosConfigurations.<host>; `overrides` replace option values under config.nixosEc2. */
export async function evalHost(host: string, overrides: Record<string, unknown> = {}, nixDir: string = NIX_DIR): Promise<HostEvaluation> {
    const out = await nixInstantiate([
        "--eval",
        "--strict",
        "--json",
        EVAL_HOST,
        "--argstr",
        "nixDir",
        path.resolve(nixDir),
        "--argstr",
        "host",
        host,
        "--argstr",
        "overrides",
        JSON.stringify(overrides),
        "--argstr",
        "pkgs",
        JSON.stringify(standInPackages()),
    ]);
    return JSON.parse(out) as HostEvaluation;
}

export interface ScriptRun {
    readonly status: number | null;
    readonly output: string;
}

/**
 * Runs a unit's `script` as NixOS does (nixos/lib/systemd-lib.nix makeJobScript: bash with
 * `set -e`), stdout and stderr together, with the given environment on top of this one.
 */
export function runJobScript(script: string, env: Record<string, string> = {}, timeoutMs = 20_000): Promise<ScriptRun> {
    return new Promise((resolve, reject) => {
        const child = spawn("bash", ["-c", `set -e\n${script}`], { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
        let output = "";
        child.stdout.on("data", (chunk: Buffer) => (output += chunk.toString()));
        child.stderr.on("data", (chunk: Buffer) => (output += chunk.toString()));
        const timer = setTimeout(() => {
            child.kill("SIGKILL");
            reject(new Error(`script did not end within ${timeoutMs} ms; output so far:\n${output}`));
        }, timeoutMs);
        child.on("error", reject);
        child.on("close", (status) => {
            clearTimeout(timer);
            resolve({ status, output });
        });
    });
}
