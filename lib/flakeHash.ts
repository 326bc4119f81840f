/**
 * The content hash of the flake directory that decides whether a host is re-deployed.
 * It covers what `nixos-rebuild` would see (relative paths, contents, the executable bit and
 * symlink targets), and nothing that a checkout elsewhere or a touched mtime would change.
 */
import { createHash } from "node:crypto";
import { lstatSync, readdirSync, readFileSync, readlinkSync } from "node:fs";
import * as path from "node:path";

/**
 * Editor droppings and VCS data: present in a working tree, never part of the flake. Shell globs
 * matched against each file or directory name.
 */
export const IGNORED_NAMES = ["*~", ".#*", "#*#", "*.swp", "*.swo", ".DS_Store", ".git", ".direnv"];

/** Build links (`nix build`'s ./result, result-1, ...): these names only when they are symbolic links. */
export const BUILD_LINK_NAMES = ["result", "result-*"];

// deploy/nixos-deploy.sh (flake_files) leaves out the same from what it copies to the host;
// test/deploy.integration.test.ts compares the two on one tree.
const asRegExp = (glob: string) => new RegExp(`^${glob.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*")}$`);
const IGNORED = IGNORED_NAMES.map(asRegExp);
const BUILD_LINKS = BUILD_LINK_NAMES.map(asRegExp);

export function isIgnored(name: string, isSymbolicLink: boolean): boolean {
    return IGNORED.some((re) => re.test(name)) || (isSymbolicLink && BUILD_LINKS.some((re) => re.test(name)));
}

/** Relative POSIX paths of the files and links under `dir` that belong to the flake, sorted. */
export function flakeFiles(dir: string): string[] {
    const found: string[] = [];
    const walk = (rel: string) => {
        for (const name of readdirSync(path.join(dir, rel))) {
            const relPath = rel === "" ? name : `${rel}/${name}`;
            const stat = lstatSync(path.join(dir, relPath));
            if (isIgnored(name, stat.isSymbolicLink())) continue;
            if (stat.isDirectory()) walk(relPath);
            else if (stat.isFile() || stat.isSymbolicLink()) found.push(relPath);
        }
    };
    walk("");
    // Byte order, not locale order: the same on every machine.
    return found.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
}

/** SHA-256 (hex) over every flake file's kind, relative path and content, in sorted order. */
export function flakeHash(dir: string): string {
    const hash = createHash("sha256");
    for (const rel of flakeFiles(dir)) {
        const full = path.join(dir, rel);
        const stat = lstatSync(full);
        let kind: string;
        let content: Buffer;
        if (stat.isSymbolicLink()) {
            kind = "link";
            content = Buffer.from(readlinkSync(full));
        } else {
            kind = stat.mode & 0o111 ? "exec" : "file";
            content = readFileSync(full);
        }
        // Length-prefixed fields: no two different trees can produce the same byte stream.
        hash.update(`${kind}\0${Buffer.byteLength(rel)}\0${rel}\0${content.length}\0`);
        hash.update(content);
    }
    return hash.digest("hex");
}
