/**
 * nix/modules/web.nix and the page: what the module asks of nixpkgs' nginx and ACME modules
 * (evaluated with the stand-in lib), the certificate retry script run with a stand-in
 * systemctl, and nginx itself (this machine's) on the module's settings: which lines carry a
 * visitor's address, and when plain HTTP starts to redirect to HTTPS.
 */
import { execFileSync } from "node:child_process";
import { chmodSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import * as path from "node:path";
import { evalHost, HostEvaluation, runJobScript } from "./support/nixHost";
import { logLines, NGINX, NginxSettings, request, RunningNginx, startNginx } from "./support/nginx";
import { tempDir } from "./support/tempDir";
import { describeWithTools } from "./support/tools";

const PAGE = path.join(__dirname, "..", "nix", "www", "index.html");
const DOMAIN = "todo.example.org";
const WITH_DOMAIN = { web: { domain: DOMAIN, acmeEmail: "ops@example.org" } };
const RETRY_UNIT = "nixos-ec2-acme-retry";
const ORDER_UNIT = `acme-order-renew-${DOMAIN}.service`;
/** Let's Encrypt: 5 failed authorizations per name, account and hour. */
const ORDERS_PER_HOUR_ALLOWED = 5;
/** The README promises a certificate within about 15 minutes of DNS resolving. */
const LONGEST_GAP_MINUTES = 15;
/** A request body over the nginx module's client_max_body_size (10m): nginx logs it at "error". */
const OVERSIZED_BODY = ["-H", "Content-Length: 20000000"];

describe("the page (nix/www/index.html)", () => {
    it("declares an inline icon, so that no visit asks for /favicon.ico", () => {
        expect(readFileSync(PAGE, "utf8")).toMatch(/<head>[\s\S]*<link rel="icon" href="data:,">[\s\S]*<\/head>/);
    });
});

describeWithTools(["nix-instantiate", "bash", "shellcheck"])("the web server's module (nix/modules/web.nix)", () => {
    let prod: HostEvaluation;
    let staging: HostEvaluation;
    let prodWithDomain: HostEvaluation;
    beforeAll(async () => {
        [prod, staging, prodWithDomain] = await Promise.all([evalHost("prod"), evalHost("staging"), evalHost("prod", WITH_DOMAIN)]);
    });
    const failedAssertions = (host: HostEvaluation): string[] =>
        (host.config.assertions as Array<{ assertion: boolean; message: string }>).filter((a) => !a.assertion).map((a) => a.message);

    describe("logging", () => {
        it("keeps per-request lines, which carry the client's address, out of prod's error log", () => {
            expect(prod.options.logging).toEqual({ debug: false });
            expect(prod.config.services.nginx.logError).toBe("stderr alert");
        });

        it("leaves staging (debug logging) at the nginx module's default, level error", () => {
            expect(staging.options.logging).toEqual({ debug: true });
            expect(staging.config.services.nginx.logError).toBeUndefined();
        });

        it("logs a missing file as a 404 in the access log only, on both hosts", () => {
            for (const host of [prod, staging]) expect(host.config.services.nginx.commonHttpConfig).toMatch(/^log_not_found off;$/m);
        });

        it("writes prod's access log without addresses", () => {
            const common = prod.config.services.nginx.commonHttpConfig as string;
            expect(common).toMatch(/^access_log \/var\/log\/nginx\/access\.log without_address;$/m);
            const format = /^log_format without_address (.*);$/m.exec(common)?.[1] ?? "";
            expect(format).toContain("$request");
            expect(format).not.toMatch(/addr|forwarded|real_ip|\$remote_user/);
            expect(staging.config.services.nginx.commonHttpConfig).not.toContain("without_address");
        });
    });

    describe("without a domain", () => {
        it("serves plain HTTP only and asks for no certificate", () => {
            const todo = prod.config.services.nginx.virtualHosts.todo;
            expect(todo).toMatchObject({ serverName: "_", default: true, enableACME: false, addSSL: false, extraConfig: "" });
            expect(todo.forceSSL).toBeUndefined();
            expect(prod.config.security.acme).toBeUndefined();
            // Only the boot guard (nix/modules/boot-guard.nix), which every host has.
            expect(Object.keys(prod.config.systemd.services)).toEqual(["nixos-ec2-boot-guard"]);
            expect(failedAssertions(prod)).toEqual([]);
        });
    });

    describe("with a domain", () => {
        it("orders a certificate for it and serves both schemes, not forceSSL", () => {
            const todo = prodWithDomain.config.services.nginx.virtualHosts.todo;
            expect(todo).toMatchObject({ serverName: DOMAIN, enableACME: true, addSSL: true });
            expect(todo.forceSSL).toBeUndefined();
            expect(todo.extraConfig).toContain(`if (-f /var/lib/acme/${DOMAIN}/acme-success) {`);
            expect(prodWithDomain.config.security.acme).toEqual({ acceptTerms: true, defaults: { email: "ops@example.org" } });
            expect(prodWithDomain.config.services.nginx.virtualHosts.loopback.locations["/"].extraConfig).not.toContain("return 301");
            expect(failedAssertions(prodWithDomain)).toEqual([]);
        });

        it("retries the order on a timer: at most Let's Encrypt's 5 an hour, at most 15 minutes apart", () => {
            const unit = prodWithDomain.config.systemd.services[RETRY_UNIT];
            expect(unit.serviceConfig).toEqual({ Type: "oneshot" });
            const step = /^\*:0\/(\d+)$/.exec(unit.startAt)?.[1];
            expect(step).toBeDefined();
            expect(60 % Number(step)).toBe(0);
            expect(60 / Number(step)).toBeLessThanOrEqual(ORDERS_PER_HOUR_ALLOWED);
            expect(Number(step)).toBeLessThanOrEqual(LONGEST_GAP_MINUTES);
        });

        it("refuses a domain without a contact address", async () => {
            const host = await evalHost("prod", { web: { domain: DOMAIN } });
            expect(failedAssertions(host)).toEqual([expect.stringContaining("set nixosEc2.web.acmeEmail as well")]);
        });

        it.each(["Todo.Example.org", "todo", "todo.example.org.", "-todo.example.org", "todo.example.org;reboot", "todo example.org", "*.example.org"])(
            "refuses %j, which is no lowercase DNS name",
            async (domain) => {
                const host = await evalHost("prod", { web: { domain, acmeEmail: "ops@example.org" } });
                expect(failedAssertions(host)).toEqual([expect.stringContaining(`nixosEc2.web.domain is ${JSON.stringify(domain)}: give a lowercase DNS name`)]);
            },
        );

        it.each(["todo.example.org", "staging.todo.example.org", "a1-b.example.co.uk"])("accepts %j", async (domain) => {
            const host = await evalHost("prod", { web: { domain, acmeEmail: "ops@example.org" } });
            expect(failedAssertions(host)).toEqual([]);
        });
    });

    describe("the retry script, run", () => {
        let dir: string;
        const script = (): string => (prodWithDomain.config.systemd.services[RETRY_UNIT].script as string).split("/var/lib/acme/").join(`${dir}/acme/`);
        const run = async () => {
            const result = await runJobScript(script(), { PATH: `${path.join(dir, "bin")}:${process.env.PATH ?? ""}` });
            return { ...result, calls: logLines(path.join(dir, "systemctl-calls")) };
        };
        beforeEach(() => {
            dir = tempDir("nixos-ec2-retry-");
            mkdirSync(path.join(dir, "bin"));
            mkdirSync(path.join(dir, "acme", DOMAIN), { recursive: true });
            const systemctl = path.join(dir, "bin", "systemctl");
            writeFileSync(systemctl, `#!/usr/bin/env bash\nprintf '%s\\n' "$*" >>${JSON.stringify(path.join(dir, "systemctl-calls"))}\n`);
            chmodSync(systemctl, 0o755);
        });

        it("starts the order again, without waiting for it, while there is no certificate", async () => {
            const { status, output, calls } = await run();
            expect(status).toBe(0);
            expect(calls).toEqual([`start --no-block ${ORDER_UNIT}`]);
            expect(output).toContain(`nixos-ec2: no certificate for ${DOMAIN} yet (no ${dir}/acme/${DOMAIN}/acme-success): starting ${ORDER_UNIT} again`);
        });

        it("stops its own timer once the certificate is in place, and orders nothing", async () => {
            writeFileSync(path.join(dir, "acme", DOMAIN, "acme-success"), "");
            const { status, output, calls } = await run();
            expect(status).toBe(0);
            expect(calls).toEqual([`stop --no-block ${RETRY_UNIT}.timer`]);
            expect(output).toContain(`nixos-ec2: the certificate for ${DOMAIN} is in place; stopping ${RETRY_UNIT}.timer`);
        });

        it("is a script that shellcheck passes", () => {
            const file = path.join(dir, "retry-start");
            writeFileSync(file, `#!/usr/bin/env bash\nset -e\n${script()}`);
            expect(() => execFileSync("shellcheck", [file], { encoding: "utf8" })).not.toThrow();
        });
    });
});

describeWithTools(["nix-instantiate", NGINX, "curl", "openssl"])("nginx on the module's settings (this machine's nginx)", () => {
    let running: RunningNginx | undefined;
    afterEach(async () => {
        await running?.stop();
        running = undefined;
    });
    const nginxOf = async (host: string, overrides: Record<string, unknown> = {}): Promise<NginxSettings> =>
        (await evalHost(host, overrides)).config.services.nginx as NginxSettings;

    /** A missing file and a too large body: each is an error-log line with ", client: ..." at level error. */
    const badRequests = async (n: RunningNginx): Promise<void> => {
        expect((await request(n.httpPorts.todo, "/no-such-page")).status).toBe(404);
        expect((await request(n.httpPorts.todo, "/", { method: "POST", headers: OVERSIZED_BODY })).status).toBe(413);
        expect((await request(n.httpPorts.todo, "/")).status).toBe(200);
    };

    describe("visitors' addresses", () => {
        it("prod logs neither a missing file nor a too large body, and its access log has no address", async () => {
            running = await startNginx(await nginxOf("prod"), tempDir("nixos-ec2-nginx-"));
            await badRequests(running);
            await running.stop();
            expect(running.stderr()).not.toContain("client:");
            expect(running.stderr()).not.toContain("127.0.0.1");
            const access = logLines(path.join(running.logDir, "access.log"));
            expect(access.map((line) => / (\d{3}) /.exec(line)?.[1])).toEqual(["404", "413", "200"]);
            for (const line of access) expect(line).not.toContain("127.0.0.1");
            running = undefined;
        });

        it("staging logs the too large body with the client's address (so the check above sees such lines), but no missing file", async () => {
            running = await startNginx(await nginxOf("staging"), tempDir("nixos-ec2-nginx-"));
            await badRequests(running);
            await running.stop();
            expect(running.stderr()).toMatch(/client intended to send too large body: 20000000 bytes, client: 127\.0\.0\.1/);
            expect(running.stderr()).not.toContain("no-such-page");
            running = undefined;
        });

        it("would log a missing file with the client's address without log_not_found off (the check above can fail)", async () => {
            const settings = await nginxOf("staging");
            const without = { ...settings, commonHttpConfig: (settings.commonHttpConfig ?? "").replace("log_not_found off;", "") };
            running = await startNginx(without, tempDir("nixos-ec2-nginx-"));
            await badRequests(running);
            await running.stop();
            expect(running.stderr()).toMatch(/no-such-page" failed \(2: No such file or directory\), client: 127\.0\.0\.1/);
            running = undefined;
        });
    });

    describe("/admin behind basic auth, its users the host secret webAdmin (nginx's credential)", () => {
        const PASSWORD = "correct horse battery staple";
        const basic = (user: string, password: string) => [`Authorization: Basic ${Buffer.from(`${user}:${password}`).toString("base64")}`];

        it("answers the status page to the secret's user only, and leaves the rest of the site open", async () => {
            running = await startNginx(await nginxOf("prod", { web: { admin: { enable: true } } }), tempDir("nixos-ec2-nginx-"));
            // What LoadCredential= copies for nginx.service from /var/lib/nixos-ec2/secrets/webAdmin: an htpasswd line.
            const hash = execFileSync("openssl", ["passwd", "-6", PASSWORD], { encoding: "utf8" }).trim();
            writeFileSync(path.join(running.credentialsDir, "nginx.service", "webAdmin"), `admin:${hash}\n`);
            const n = running;
            expect((await request(n.httpPorts.todo, "/admin")).status).toBe(401);
            expect((await request(n.httpPorts.todo, "/admin", { headers: basic("admin", "wrong") })).status).toBe(401);
            const status = await request(n.httpPorts.todo, "/admin", { headers: basic("admin", PASSWORD) });
            expect(status.status).toBe(200);
            expect(status.body).toMatch(/^Active connections: \d+/);
            expect((await request(n.httpPorts.todo, "/")).status).toBe(200);
            expect((await request(n.httpPorts.loopback, "/admin")).status).toBe(404);
            // nginx reads the file on every request: a new secret (after the deploy's restart) counts at once.
            writeFileSync(path.join(running.credentialsDir, "nginx.service", "webAdmin"), "");
            expect((await request(n.httpPorts.todo, "/admin", { headers: basic("admin", PASSWORD) })).status).toBe(401);
        });

        it("is not there without admin", async () => {
            running = await startNginx(await nginxOf("prod"), tempDir("nixos-ec2-nginx-"));
            expect((await request(running.httpPorts.todo, "/admin")).status).toBe(404);
        });
    });

    describe("HTTPS while the certificate is pending, and after", () => {
        const HOST = { host: DOMAIN };
        let marker: string;
        beforeEach(async () => {
            running = await startNginx(await nginxOf("prod", WITH_DOMAIN), tempDir("nixos-ec2-nginx-"));
            marker = path.join(running.acmeDir, DOMAIN, "acme-success");
            mkdirSync(path.dirname(marker), { recursive: true });
            // lego (webroot mode) writes the answer under <acmeRoot>/.well-known/acme-challenge/.
            writeFileSync(path.join(running.acmeDir, "acme-challenge", ".well-known", "acme-challenge", "token"), "challenge answer\n");
        });

        it("serves the page on plain HTTP while no real certificate exists", async () => {
            const n = running!;
            const page = await request(n.httpPorts.todo, "/", HOST);
            expect(page.status).toBe(200);
            expect(page.body).toContain("<title>TODO</title>");
            expect(await request(n.httpPorts.todo, "/healthz", HOST)).toMatchObject({ status: 200, body: "ok\n" });
            expect((await request(n.httpsPorts.todo, "/", { ...HOST, https: true })).status).toBe(200);
        });

        it("redirects plain HTTP to HTTPS once the certificate is there, per request and without a reload", async () => {
            const n = running!;
            writeFileSync(marker, "");
            expect(await request(n.httpPorts.todo, "/", HOST)).toMatchObject({ status: 301, location: `https://${DOMAIN}/` });
            expect(await request(n.httpPorts.todo, "/index.html?x=1", HOST)).toMatchObject({ status: 301, location: `https://${DOMAIN}/index.html?x=1` });
            rmSync(marker);
            expect((await request(n.httpPorts.todo, "/", HOST)).status).toBe(200);
        });

        it("keeps answering the ACME challenge, /healthz, HTTPS and loopback without a redirect", async () => {
            const n = running!;
            writeFileSync(marker, "");
            expect(await request(n.httpPorts.todo, "/.well-known/acme-challenge/token", HOST)).toMatchObject({ status: 200, body: "challenge answer\n" });
            expect(await request(n.httpPorts.todo, "/healthz", HOST)).toMatchObject({ status: 200, body: "ok\n" });
            expect((await request(n.httpsPorts.todo, "/", { ...HOST, https: true })).status).toBe(200);
            expect((await request(n.httpPorts.loopback, "/")).status).toBe(200);
        });
    });
});
