/**
 * nix/network.json: the one place the public TCP ports are written. The AWS security group
 * (components/firewall.ts) and the host firewall (nix/modules/firewall.nix) both read it,
 * so the two firewalls cannot disagree. Nix reads it too, so numbers must be whole-number
 * literals: builtins.fromJSON reads `80.0` or `1e2` as a float, which a port option refuses.
 */
import { readFileSync } from "node:fs";
import * as path from "node:path";
import { z } from "zod";
import { readJson } from "./strictJson";

export const NETWORK_FILE = path.join(__dirname, "..", "nix", "network.json");

/** Port 22 is opened only to `sshAllowedCidrs`; listing it here would open it to the world. */
const SSH_PORT = 22;

const EXPECTED = 'expected {"publicTcpPorts": [80, 443]}';

export interface NetworkFile {
    readonly publicTcpPorts: number[];
    /** Problems found, in the same form as config errors; empty when the file is good. */
    readonly problems: string[];
}

const port = z
    .int({ error: "is out of range; allowed: a TCP port from 1 to 65535" })
    .min(1, { error: "is out of range; allowed: a TCP port from 1 to 65535" })
    .max(65535, { error: "is out of range; allowed: a TCP port from 1 to 65535" })
    .refine((p) => p !== SSH_PORT, { error: "would open SSH to the world; SSH is opened only to nixos-ec2:sshAllowedCidrs" });

const schema = z.object(
    {
        publicTcpPorts: z
            .array(port, { error: `publicTcpPorts is missing or not a list; ${EXPECTED}` })
            .superRefine((ports, ctx) =>
                ports.forEach((p, i) => {
                    if (ports.indexOf(p) < i) ctx.addIssue({ code: "custom", path: [i], input: p, message: "is listed twice" });
                }),
            ),
    },
    { error: `is not an object; ${EXPECTED}` },
);

export function readNetworkFile(file: string = NETWORK_FILE): NetworkFile {
    const where = path.relative(path.join(__dirname, ".."), file) || file;
    const none = (problem: string): NetworkFile => ({ publicTcpPorts: [], problems: [`${where}: ${problem}`] });
    let text: string;
    try {
        text = readFileSync(file, "utf8");
    } catch {
        return none(`missing; it must hold {"publicTcpPorts": [80, 443]} (the ports open to the world)`);
    }
    const read = readJson(text, { wholeNumbersOnly: true });
    if (!read.ok) return none(`${read.problem}; ${EXPECTED}`);
    const result = schema.safeParse(read.value, { reportInput: true });
    if (result.success) return { publicTcpPorts: result.data.publicTcpPorts, problems: [] };
    return {
        publicTcpPorts: [],
        problems: result.error.issues.map((issue) =>
            issue.path.length === 2 ? `${where}: publicTcpPorts[${String(issue.path[1])}] = ${JSON.stringify(issue.input)} ${issue.message}` : `${where}: ${issue.message}`,
        ),
    };
}
