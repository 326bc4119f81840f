import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";

const made: string[] = [];

/** A fresh directory under TMPDIR, removed after the test file (test/support/cleanup.ts). */
export function tempDir(prefix: string): string {
    const dir = mkdtempSync(path.join(tmpdir(), prefix));
    made.push(dir);
    return dir;
}

export function removeTempDirs(): void {
    for (const dir of made.splice(0)) rmSync(dir, { recursive: true, force: true });
}
