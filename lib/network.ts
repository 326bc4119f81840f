/**
 * nix/network.json: the one place the public TCP ports are written. The AWS security group
 * (components/firewall.ts) and the host firewall (nix/modules/firewall.nix) both read it,
 * so the two firewalls cannot disagree.
 */
import { readFileSync } from "node:fs";
import * as path from "node:path";

export const NETWORK_FILE = path.join(__dirname, "..", "nix", "network.json");

/** Port 22 is opened only to `sshAllowedCidrs`; listing it here would open it to the world. */
const SSH_PORT = 22;

export interface NetworkFile {
    readonly publicTcpPorts: number[];
    /** Problems found, in the same form as config errors; empty when the file is good. */
    readonly problems: string[];
}

export function readNetworkFile(file: string = NETWORK_FILE): NetworkFile {
    const where = path.relative(path.join(__dirname, ".."), file) || file;
    let text: string;
    try {
        text = readFileSync(file, "utf8");
    } catch {
        return { publicTcpPorts: [], problems: [`${where}: missing; it must hold {"publicTcpPorts": [80, 443]} (the ports open to the world)`] };
    }
    let data: unknown;
    try {
        data = JSON.parse(text);
    } catch (e) {
        return { publicTcpPorts: [], problems: [`${where}: not valid JSON (${(e as Error).message}); expected {"publicTcpPorts": [80, 443]}`] };
    }
    const ports = (data as { publicTcpPorts?: unknown } | null)?.publicTcpPorts;
    if (!Array.isArray(ports)) {
        return { publicTcpPorts: [], problems: [`${where}: publicTcpPorts is missing or not a list; expected e.g. {"publicTcpPorts": [80, 443]}`] };
    }
    const problems: string[] = [];
    const good: number[] = [];
    ports.forEach((port: unknown, i: number) => {
        if (typeof port !== "number" || !Number.isInteger(port) || port < 1 || port > 65535) {
            problems.push(`${where}: publicTcpPorts[${i}] = ${JSON.stringify(port)} is out of range; allowed: a TCP port from 1 to 65535`);
        } else if (port === SSH_PORT) {
            problems.push(`${where}: publicTcpPorts[${i}] = 22 would open SSH to the world; SSH is opened only to nixos-ec2:sshAllowedCidrs`);
        } else if (good.includes(port)) {
            problems.push(`${where}: publicTcpPorts[${i}] = ${port} is listed twice`);
        } else {
            good.push(port);
        }
    });
    return { publicTcpPorts: good, problems };
}
