/**
 * nix/modules/web.nix and the page: what the module asks of nixpkgs' nginx and ACME modules
 * (evaluated with the stand-in lib), the certificate retry script run with a stand-in
 * systemctl (and, for its month-long schedule, a stand-in clock), and nginx itself (this
 * machine's) on the module's settings: which lines carry a visitor's address, and when and
 * where plain HTTP starts to redirect to HTTPS.
 */
import { execFileSync } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
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
/**
 * letsencrypt/website content/en/docs/rate-limits.md (2024-12 on): "Authorization Failures per
 * Hostname per Account", 5 an hour; one of them goes to the ACME module's own order (at boot, at a
 * deploy), the rest may go to the retry.
 */
const ORDERS_PER_HOUR_ALLOWED = 5;
/** The same page: "Consecutive Authorization Failures per Hostname per Account", refilling 1 a day. */
const CONSECUTIVE_FAILURES_ALLOWED = 3600;
/** The README promises a certificate within about 15 minutes of DNS resolving, for the first 6 hours. */
const LONGEST_GAP_MINUTES = 15;
const MINUTE = 60;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;
/** Where the retry keeps its state: its StateDirectory. */
const RETRY_STATE_DIR = `/var/lib/${RETRY_UNIT}`;
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

        it("ticks the retry often enough for the promise, and leaves an hour's fifth order to the ACME module", () => {
            const unit = prodWithDomain.config.systemd.services[RETRY_UNIT];
            expect(unit.serviceConfig).toEqual({ Type: "oneshot", StateDirectory: RETRY_UNIT });
            const step = /^\*:0\/(\d+)$/.exec(unit.startAt)?.[1];
            expect(step).toBeDefined();
            expect(60 % Number(step)).toBe(0);
            // The module's own order at boot comes on top of the retry's in the first hour.
            expect(60 / Number(step) + 1).toBeLessThanOrEqual(ORDERS_PER_HOUR_ALLOWED);
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
        const script = (): string =>
            (prodWithDomain.config.systemd.services[RETRY_UNIT].script as string)
                .split("/var/lib/acme/")
                .join(`${dir}/acme/`)
                .split(`${RETRY_STATE_DIR}/`)
                .join(`${dir}/state/`);
        const certificate = () => path.join(dir, "acme", DOMAIN, "acme-success");
        const firstFailure = () => path.join(dir, "state", `${DOMAIN}.first-failure`);
        const lastOrder = () => path.join(dir, "state", `${DOMAIN}.last-order`);
        const run = async () => {
            const result = await runJobScript(script(), { PATH: `${path.join(dir, "bin")}:${process.env.PATH ?? ""}` });
            return { ...result, calls: logLines(path.join(dir, "systemctl-calls")) };
        };
        const now = () => Math.floor(Date.now() / 1000);
        beforeEach(() => {
            dir = tempDir("nixos-ec2-retry-");
            mkdirSync(path.join(dir, "bin"));
            mkdirSync(path.join(dir, "state"));
            mkdirSync(path.join(dir, "acme", DOMAIN), { recursive: true });
            const systemctl = path.join(dir, "bin", "systemctl");
            writeFileSync(systemctl, `#!/usr/bin/env bash\nprintf '%s\\n' "$*" >>${JSON.stringify(path.join(dir, "systemctl-calls"))}\n`);
            chmodSync(systemctl, 0o755);
        });

        it("starts the order again, without waiting for it, while there is no certificate, and notes when", async () => {
            const before = now();
            const { status, output, calls } = await run();
            expect(status).toBe(0);
            expect(calls).toEqual([`start --no-block ${ORDER_UNIT}`]);
            expect(output).toContain(`nixos-ec2: no certificate for ${DOMAIN} yet (no ${dir}/acme/${DOMAIN}/acme-success): starting ${ORDER_UNIT} again`);
            for (const file of [firstFailure(), lastOrder()]) {
                expect(Number(readFileSync(file, "utf8"))).toBeGreaterThanOrEqual(before);
                expect(Number(readFileSync(file, "utf8"))).toBeLessThanOrEqual(now());
            }
        });

        it("stops its own timer once the certificate is in place, orders nothing, and forgets the first failure", async () => {
            writeFileSync(firstFailure(), `${now() - 40 * DAY}\n`);
            writeFileSync(lastOrder(), `${now() - 40 * DAY}\n`);
            writeFileSync(certificate(), "");
            const { status, output, calls } = await run();
            expect(status).toBe(0);
            expect(calls).toEqual([`stop --no-block ${RETRY_UNIT}.timer`]);
            expect(output).toContain(`nixos-ec2: the certificate for ${DOMAIN} is in place; stopping ${RETRY_UNIT}.timer`);
            expect(existsSync(firstFailure())).toBe(false);
            expect(existsSync(lastOrder())).toBe(false);
            // Without the certificate again (it was removed by hand), the schedule starts afresh.
            rmSync(certificate());
            expect((await run()).calls).toEqual([`stop --no-block ${RETRY_UNIT}.timer`, `start --no-block ${ORDER_UNIT}`]);
        });

        it("waits for the next order of a later phase, exiting 0, and says when it is due", async () => {
            writeFileSync(firstFailure(), `${now() - 2 * DAY}\n`);
            writeFileSync(lastOrder(), `${now() - 2 * HOUR}\n`);
            const { status, output, calls } = await run();
            expect(status).toBe(0);
            expect(calls).toEqual([]);
            expect(output).toMatch(
                new RegExp(`nixos-ec2: no certificate for ${DOMAIN} yet, 2880 min after the first failed order; ordering every 360 min now, the next order in about 23[34] min`),
            );
        });

        it("gives up after 30 days, stopping its timer, and says what still orders and what to do", async () => {
            writeFileSync(firstFailure(), `${now() - 30 * DAY}\n`);
            writeFileSync(lastOrder(), `${now() - 7 * HOUR}\n`);
            const { status, output, calls } = await run();
            expect(status).toBe(0);
            expect(calls).toEqual([`stop --no-block ${RETRY_UNIT}.timer`]);
            expect(output).toContain(`nixos-ec2: no certificate for ${DOMAIN} 30 days after the first failed order (${firstFailure()}): no more retries`);
            expect(output).toContain(`acme-renew-${DOMAIN}.timer still orders once a day`);
            expect(output).toContain(`systemctl start ${ORDER_UNIT}`);
        });

        it.each([
            ["garbage", "not a time\n"],
            ["an empty file", ""],
            ["a time ahead of the clock", `${now() + DAY}\n`],
        ])("starts afresh from a first-failure file holding %s", async (_what, content) => {
            writeFileSync(firstFailure(), content);
            writeFileSync(lastOrder(), "");
            const { status, calls } = await run();
            expect(status).toBe(0);
            expect(calls).toEqual([`start --no-block ${ORDER_UNIT}`]);
            expect(Number(readFileSync(firstFailure(), "utf8"))).toBeGreaterThan(now() - MINUTE);
        });

        describe("31 days without DNS, the timer ticking, on a stand-in clock", () => {
            const START = 1_767_225_600; // 2026-01-01T00:00:00Z
            /** The timer's step, from the unit (`*:0/<minutes>`). */
            const tick = (): number => Number(/^\*:0\/(\d+)$/.exec(prodWithDomain.config.systemd.services[RETRY_UNIT].startAt)?.[1]) * MINUTE;
            let orders: number[];
            let stops: number[];
            beforeAll(async () => {
                dir = tempDir("nixos-ec2-retry-");
                mkdirSync(path.join(dir, "state"));
                mkdirSync(path.join(dir, "acme", DOMAIN), { recursive: true });
                const calls = path.join(dir, "systemctl-calls");
                // date and systemctl as functions: one bash for the whole month, each tick a subshell
                // (as each timer run is a new process). The timer keeps ticking after a stop, as it
                // would after every reboot.
                const month = [
                    `systemctl() { printf '%s %s\\n' "$fake_now" "$*" >>${JSON.stringify(calls)}; }`,
                    `date() { printf '%s\\n' "$fake_now"; }`,
                    `fake_now=${START}`,
                    `while [ "$fake_now" -lt ${START + 31 * DAY} ]; do`,
                    `(\n${script()}\n) >/dev/null`,
                    `fake_now=$((fake_now + ${tick()}))`,
                    "done",
                ].join("\n");
                const { status, output } = await runJobScript(month, {}, 60_000);
                expect({ status, output }).toEqual({ status: 0, output: "" });
                const lines = logLines(calls).map((l) => l.split(" "));
                orders = lines.filter((l) => l.slice(1).join(" ") === `start --no-block ${ORDER_UNIT}`).map((l) => Number(l[0]) - START);
                stops = lines.filter((l) => l.slice(1).join(" ") === `stop --no-block ${RETRY_UNIT}.timer`).map((l) => Number(l[0]) - START);
                expect(orders.length + stops.length).toBeLessThanOrEqual((31 * DAY) / tick());
            }, 90_000);
            const gaps = (from: number, to: number): number[] => {
                const within = orders.filter((t) => t >= from && t < to);
                return within.slice(1).map((t, i) => t - within[i]);
            };

            it("orders at the first tick, then every 15 minutes for 6 hours: the certificate comes within about 15 minutes of DNS", () => {
                expect(orders[0]).toBe(0);
                expect(new Set(gaps(0, 6 * HOUR))).toEqual(new Set([15 * MINUTE]));
                expect(orders.filter((t) => t < 6 * HOUR)).toHaveLength(24);
            });

            it("then hourly until a day, then every 6 hours until 30 days (the README's 24 + 18 + 116)", () => {
                expect(new Set(gaps(6 * HOUR, DAY))).toEqual(new Set([HOUR]));
                expect(orders.filter((t) => t >= 6 * HOUR && t < DAY)).toHaveLength(18);
                expect(new Set(gaps(DAY, 30 * DAY))).toEqual(new Set([6 * HOUR]));
                expect(orders.filter((t) => t >= DAY && t < 30 * DAY)).toHaveLength(116);
            });

            it("never orders more than 4 in an hour, leaving the fifth to the ACME module's own order", () => {
                const most = Math.max(...orders.map((t) => orders.filter((u) => u >= t && u < t + HOUR).length));
                expect(most + 1).toBeLessThanOrEqual(ORDERS_PER_HOUR_ALLOWED);
            });

            it("stops after 30 days, at every tick from then on, and orders nothing more", () => {
                expect(orders.filter((t) => t >= 30 * DAY)).toEqual([]);
                expect(stops[0]).toBe(30 * DAY);
                expect(stops).toHaveLength(DAY / tick());
            });

            it("stays far below the consecutive-failure limit, counting a daily renewal and a boot order", () => {
                const failures = orders.length + 30 + 1;
                expect(failures).toBeLessThan(CONSECUTIVE_FAILURES_ALLOWED / 10);
            });
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

        it("redirects a visitor who came by the address to the domain, which the certificate names", async () => {
            const n = running!;
            writeFileSync(marker, "");
            // The stack's `url` output is http://<address>/; curl's own Host is 127.0.0.1:<port>.
            expect(await request(n.httpPorts.todo, "/index.html?x=1", { host: "203.0.113.7" })).toMatchObject({
                status: 301,
                location: `https://${DOMAIN}/index.html?x=1`,
            });
            expect(await request(n.httpPorts.todo, "/")).toMatchObject({ status: 301, location: `https://${DOMAIN}/` });
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
