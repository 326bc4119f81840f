/**
 * jest's globalSetup and globalTeardown: the whole run gets a TMPDIR of its own (workers inherit
 * it), and a test that leaves anything there (a key file, a fake host, a clone of nix/) fails the
 * run, naming what it left.
 */
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";

const KEY = "NIXOS_EC2_TEST_TMPDIR";

export async function setup(): Promise<void> {
    const dir = mkdtempSync(path.join(tmpdir(), "nxt-"));
    process.env[KEY] = dir;
    process.env.TMPDIR = dir;
}

export async function teardown(): Promise<void> {
    const dir = process.env[KEY];
    if (dir === undefined) return;
    const left = readdirSync(dir);
    rmSync(dir, { recursive: true, force: true });
    if (left.length > 0) throw new Error(`tests left ${left.length} entries in TMPDIR: ${left.sort().join(", ")}`);
}
