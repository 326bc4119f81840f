/**
 * Runs this machine's nginx on what nix/modules/web.nix asks of the NixOS nginx module, to see
 * what nginx logs and answers. The configuration is laid out as that module writes it
 * (nixos/modules/services/web-servers/nginx/default.nix: `error_log ${logError}` at the top,
 * commonHttpConfig in the http block, per vhost a server with its listen lines, server_name,
 * root, the ACME challenge location, the locations (return, then extraConfig) and the vhost's
 * extraConfig), reduced to the directives web.nix's settings produce. The host's paths under
 * /var/log/nginx, /var/lib/acme and /run/credentials (systemd's credentials of the unit) are moved
 * into a test directory; TLS uses a certificate made here, standing in for the ACME module's
 * placeholder.
 */
import { ChildProcess, execFile, execFileSync, spawn } from "node:child_process";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import * as path from "node:path";
import { freePort } from "./sshd";
import { sbinTool } from "./tools";

export const NGINX = sbinTool("nginx");

interface Location {
    readonly return?: string;
    readonly extraConfig?: string;
}

interface Vhost {
    readonly serverName?: string;
    readonly default?: boolean;
    readonly root?: string;
    readonly enableACME?: boolean;
    readonly addSSL?: boolean;
    readonly forceSSL?: boolean;
    readonly locations?: Record<string, Location>;
    readonly extraConfig?: string;
}

/** config.services.nginx as web.nix defines it (see test/support/nixHost.ts). */
export interface NginxSettings {
    readonly logError?: string;
    readonly commonHttpConfig?: string;
    readonly virtualHosts: Record<string, Vhost>;
}

/** The nginx module's defaults for what web.nix leaves unset. */
const MODULE_DEFAULTS = { logError: "stderr", clientMaxBodySize: "10m", acmeRoot: "/var/lib/acme/acme-challenge" };

export interface RunningNginx {
    /** The plain-HTTP port of each vhost, by name. */
    readonly httpPorts: Record<string, number>;
    /** The TLS port of each vhost that has one (addSSL or forceSSL). */
    readonly httpsPorts: Record<string, number>;
    /** Where /var/lib/acme went. */
    readonly acmeDir: string;
    /** Where /var/log/nginx went. */
    readonly logDir: string;
    /** Where /run/credentials went (nginx's are in nginx.service/). */
    readonly credentialsDir: string;
    /** What nginx wrote to stderr so far: with logError "stderr...", its error log. */
    stderr(): string;
    stop(): Promise<void>;
}

/** Moves the host's paths into the test directory. */
function relocate(text: string, dir: string): string {
    return text
        .split("/var/log/nginx/")
        .join(`${dir}/log/`)
        .split("/var/lib/acme/")
        .join(`${dir}/acme/`)
        .split("/run/credentials/")
        .join(`${dir}/credentials/`);
}

function serverBlock(vhost: Vhost, listen: string[], dir: string, tls: { cert: string; key: string }): string {
    const hasSSL = vhost.addSSL === true || vhost.forceSSL === true;
    if (vhost.forceSSL) throw new Error("the test renderer does not lay out forceSSL's redirect server");
    const locations = Object.entries(vhost.locations ?? {}).map(
        ([where, l]) => `location ${where} {\n${l.return !== undefined ? `return ${l.return};\n` : ""}${relocate(l.extraConfig ?? "", dir)}\n}`,
    );
    return [
        "server {",
        ...listen,
        `server_name ${vhost.serverName ?? "localhost"};`,
        ...(hasSSL ? [`ssl_certificate ${tls.cert};`, `ssl_certificate_key ${tls.key};`] : []),
        ...(vhost.root !== undefined ? [`root ${vhost.root};`] : []),
        ...(vhost.enableACME
            ? [`location ^~ /.well-known/acme-challenge/ {\nroot ${relocate(MODULE_DEFAULTS.acmeRoot, dir)};\nauth_basic off;\n}`]
            : []),
        ...locations,
        relocate(vhost.extraConfig ?? "", dir),
        "}",
    ].join("\n");
}

async function waitForPort(port: number, deadlineMs: number, log: () => string): Promise<void> {
    const until = Date.now() + deadlineMs;
    for (;;) {
        const answered = await new Promise<boolean>((resolve) =>
            execFile("curl", ["-s", "-o", "/dev/null", "--max-time", "1", `http://127.0.0.1:${port}/healthz`], (error) => resolve(error === null)),
        );
        if (answered) return;
        if (Date.now() > until) throw new Error(`nginx did not answer on port ${port}; it said:\n${log()}`);
        await new Promise((r) => setTimeout(r, 50));
    }
}

/** Starts nginx in the foreground with the settings, each vhost on its own 127.0.0.1 ports. */
export async function startNginx(settings: NginxSettings, dir: string): Promise<RunningNginx> {
    for (const sub of ["log", "acme/acme-challenge/.well-known/acme-challenge", "tmp", "credentials/nginx.service"]) mkdirSync(path.join(dir, sub), { recursive: true });
    const cert = path.join(dir, "cert.pem");
    const key = path.join(dir, "key.pem");
    execFileSync("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-subj", "/CN=placeholder", "-days", "1"], {
        stdio: "ignore",
    });

    const httpPorts: Record<string, number> = {};
    const httpsPorts: Record<string, number> = {};
    const servers: string[] = [];
    for (const [name, vhost] of Object.entries(settings.virtualHosts)) {
        httpPorts[name] = await freePort();
        const listen = [`listen 127.0.0.1:${httpPorts[name]}${vhost.default ? " default_server" : ""};`];
        if (vhost.addSSL || vhost.forceSSL) {
            httpsPorts[name] = await freePort();
            listen.push(`listen 127.0.0.1:${httpsPorts[name]} ssl${vhost.default ? " default_server" : ""};`);
        }
        servers.push(serverBlock(vhost, listen, dir, { cert, key }));
    }

    const tmp = path.join(dir, "tmp");
    const config = [
        "daemon off;",
        "master_process off;",
        `pid ${dir}/nginx.pid;`,
        `error_log ${settings.logError ?? MODULE_DEFAULTS.logError};`,
        "events {}",
        "http {",
        ...["client_body", "proxy", "fastcgi", "uwsgi", "scgi"].map((t) => `${t}_temp_path ${tmp}/${t};`),
        `access_log ${dir}/log/default-access.log;`,
        `client_max_body_size ${MODULE_DEFAULTS.clientMaxBodySize};`,
        relocate(settings.commonHttpConfig ?? "", dir),
        ...servers,
        "}",
    ].join("\n");
    const configFile = path.join(dir, "nginx.conf");
    writeFileSync(configFile, config);

    let stderr = "";
    const child: ChildProcess = spawn(NGINX, ["-p", dir, "-c", configFile, "-e", "stderr"], { stdio: ["ignore", "ignore", "pipe"] });
    child.stderr?.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    await waitForPort(Object.values(httpPorts)[0], 10_000, () => stderr + "\n" + config);
    return {
        httpPorts,
        httpsPorts,
        acmeDir: path.join(dir, "acme"),
        logDir: path.join(dir, "log"),
        credentialsDir: path.join(dir, "credentials"),
        stderr: () => stderr,
        stop: async () => {
            child.kill("SIGQUIT");
            await exited;
        },
    };
}

export interface Answer {
    readonly status: number;
    readonly location: string;
    readonly body: string;
}

/** One request with curl; `https` talks TLS and accepts the test's self-signed certificate. */
export function request(
    port: number,
    urlPath: string,
    o: { host?: string; https?: boolean; headers?: string[]; method?: string } = {},
): Promise<Answer> {
    const args = ["-s", "-k", "--max-time", "5", "-o", "-", "-w", "\n%{http_code} %{redirect_url}", "-X", o.method ?? "GET"];
    if (o.host !== undefined) args.push("-H", `Host: ${o.host}`);
    for (const header of o.headers ?? []) args.push("-H", header);
    args.push(`${o.https ? "https" : "http"}://127.0.0.1:${port}${urlPath}`);
    return new Promise((resolve, reject) =>
        execFile("curl", args, { encoding: "utf8" }, (error, stdout) => {
            const cut = stdout.lastIndexOf("\n");
            const [status, location = ""] = stdout.slice(cut + 1).split(" ");
            if (!/^\d{3}$/.test(status) || status === "000") reject(new Error(`curl ${args.join(" ")} got no answer: ${error?.message ?? stdout}`));
            else resolve({ status: Number(status), location, body: stdout.slice(0, cut) });
        }),
    );
}

/** Lines of a log file, or none when it was not written. */
export function logLines(file: string): string[] {
    try {
        return readFileSync(file, "utf8").split("\n").filter(Boolean);
    } catch {
        return [];
    }
}
