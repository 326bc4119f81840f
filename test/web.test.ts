/**
 * nix/modules/web.nix and the page: what the module asks of nixpkgs' nginx module (evaluated
 * with the stand-in lib), and nginx itself (this machine's) on the module's settings: which
 * lines carry a visitor's address.
 */
import { readFileSync } from "node:fs";
import * as path from "node:path";
import { evalHost, HostEvaluation } from "./support/nixHost";
import { logLines, NGINX, NginxSettings, request, RunningNginx, startNginx } from "./support/nginx";
import { tempDir } from "./support/tempDir";
import { describeWithTools } from "./support/tools";

const PAGE = path.join(__dirname, "..", "nix", "www", "index.html");
/** A request body over the nginx module's client_max_body_size (10m): nginx logs it at "error". */
const OVERSIZED_BODY = ["-H", "Content-Length: 20000000"];

describe("the page (nix/www/index.html)", () => {
    it("declares an inline icon, so that no visit asks for /favicon.ico", () => {
        expect(readFileSync(PAGE, "utf8")).toMatch(/<head>[\s\S]*<link rel="icon" href="data:,">[\s\S]*<\/head>/);
    });
});

describeWithTools(["nix-instantiate"])("the web server's module (nix/modules/web.nix)", () => {
    let prod: HostEvaluation;
    let staging: HostEvaluation;
    beforeAll(async () => {
        [prod, staging] = await Promise.all([evalHost("prod"), evalHost("staging")]);
    });

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
});
