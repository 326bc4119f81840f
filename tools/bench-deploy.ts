/**
 * Wall time of deploy/nixos-deploy.sh against the loopback test sshd with instant stand-ins,
 * as a ratio to its floor: two bare `ssh ... true` connections made the same way (the script's
 * ssh options, one after the other), since a deploy needs exactly two connections. Median of
 * `runs` each, interleaved so that drift in machine load hits both alike. The ratio should stay
 * under 1.5.
 *
 *   npx ts-node --transpile-only tools/bench-deploy.ts [runs]
 */
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { deployEnv, runDeploy, startSshd, TestSshd } from "../test/support/sshd";

export interface DeployBench {
    scriptMedianMs: number;
    floorMedianMs: number;
    ratio: number;
}

function median(values: number[]): number {
    const sorted = [...values].sort((a, b) => a - b);
    const middle = Math.floor(sorted.length / 2);
    return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

/** The options deploy/nixos-deploy.sh passes to every ssh (set_ssh_options), plus its ConnectTimeout. */
function sshOptions(sshd: TestSshd, keyFile: string, knownHosts: string): string[] {
    const options = [
        "BatchMode=yes",
        "IdentitiesOnly=yes",
        "IdentityAgent=none",
        `IdentityFile=${keyFile}`,
        "PreferredAuthentications=publickey",
        "StrictHostKeyChecking=yes",
        `UserKnownHostsFile=${knownHosts}`,
        "GlobalKnownHostsFile=/dev/null",
        "HostKeyAlias=nixos-ec2-target",
        "HostKeyAlgorithms=ssh-ed25519",
        "CheckHostIP=no",
        "UpdateHostKeys=no",
        "ForwardAgent=no",
        "ClearAllForwardings=yes",
        "RequestTTY=no",
        "ServerAliveInterval=15",
        "ServerAliveCountMax=4",
        "LogLevel=ERROR",
        "ConnectTimeout=10",
        "ControlMaster=no",
        "ControlPath=none",
    ];
    return ["-F", "/dev/null", "-p", String(sshd.port), ...options.flatMap((option) => ["-o", option])];
}

function timeFloor(args: string[], target: string): number {
    const started = process.hrtime.bigint();
    for (let connection = 0; connection < 2; connection++) {
        const result = spawnSync("ssh", [...args, target, "true"], { stdio: ["ignore", "ignore", "pipe"] });
        if (result.status !== 0) {
            throw new Error(`floor ssh failed: ${result.stderr.toString()}`);
        }
    }
    return Number(process.hrtime.bigint() - started) / 1e6;
}

export async function benchDeploy(runs = 10): Promise<DeployBench> {
    const sshd = await startSshd();
    const keyDir = fs.mkdtempSync(path.join(sshd.localTmp, "..", "bench-key-"));
    try {
        const keyFile = path.join(keyDir, "id");
        const knownHosts = path.join(keyDir, "known_hosts");
        fs.writeFileSync(keyFile, sshd.adminPrivateKey, { mode: 0o600 });
        fs.writeFileSync(knownHosts, `nixos-ec2-target ${sshd.hostPublicKey}\n`);
        const args = sshOptions(sshd, keyFile, knownHosts);
        const target = `${sshd.user}@127.0.0.1`;
        const env = deployEnv(sshd, { NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: "120" });
        const script: number[] = [];
        const floor: number[] = [];
        for (let run = 0; run < runs; run++) {
            floor.push(timeFloor(args, target));
            const deploy = await runDeploy(env);
            if (deploy.code !== 0) {
                throw new Error(`deploy failed during the benchmark:\n${deploy.stderr}`);
            }
            script.push(deploy.elapsedMs);
        }
        const scriptMedianMs = median(script);
        const floorMedianMs = median(floor);
        return { scriptMedianMs, floorMedianMs, ratio: scriptMedianMs / floorMedianMs };
    } finally {
        fs.rmSync(keyDir, { recursive: true, force: true });
        await sshd.stop();
    }
}

if (require.main === module) {
    const runs = Number(process.argv[2] ?? "10");
    benchDeploy(runs).then(
        (result) => {
            console.log(
                `deploy script: ${result.scriptMedianMs.toFixed(0)} ms median, ` +
                    `floor (2 x ssh true): ${result.floorMedianMs.toFixed(0)} ms median, ` +
                    `ratio ${result.ratio.toFixed(2)} (target < 1.5, ${runs} runs each)`,
            );
        },
        (error: unknown) => {
            console.error(error instanceof Error ? error.message : error);
            process.exitCode = 1;
        },
    );
}
