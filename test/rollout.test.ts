import { HostSettings } from "../lib/config";
import { OfflineRun, RecordedResource } from "../lib/offline";
import { rolloutPlan } from "../lib/rollout";
import { loadSettings } from "../lib/stacks";
import { resource, runProgram } from "./support/program";

const COMMAND = "command:local:Command";
const DEPLOYMENT = "nixos-ec2:index:NixosDeployment";

/** Three hosts of one flakeAttr listed out of name order, and one host of its own. */
const FLEET = JSON.stringify({ "web-b": { flakeAttr: "web" }, "web-a": { flakeAttr: "web" }, "web-c": { flakeAttr: "web" }, db: {} });

/** The names of the deploy Commands that `host`'s deploy Command depends on. */
function deploysAwaited(run: OfflineRun, host: string): string[] {
    const commands = new Map(run.resources.filter((r) => r.type === COMMAND).map((r) => [r.urn, r]));
    return resource(run, COMMAND, `${host}-switch`)
        .dependencies.map((urn) => commands.get(urn))
        .filter((r): r is RecordedResource => r !== undefined)
        .map((r) => r.name)
        .sort();
}

describe("rollout: canary (the default on prod)", () => {
    let run: OfflineRun;
    beforeAll(async () => {
        run = await runProgram("prod", { hosts: FLEET });
    });

    it("holds the other hosts of a flakeAttr back until its first host by name confirmed", () => {
        expect(deploysAwaited(run, "web-a")).toEqual([]);
        expect(deploysAwaited(run, "web-b")).toEqual(["web-a-switch"]);
        expect(deploysAwaited(run, "web-c")).toEqual(["web-a-switch"]);
    });

    it("leaves a flakeAttr of one host alone", () => {
        expect(deploysAwaited(run, "db")).toEqual([]);
        expect(resource(run, DEPLOYMENT, "db").inputs).not.toHaveProperty("canaryFor");
        expect(resource(run, DEPLOYMENT, "db").inputs).not.toHaveProperty("afterCanary");
    });

    it("names the canary and the hosts it holds back in the deploys' inputs", () => {
        expect(resource(run, DEPLOYMENT, "web-a").inputs).toMatchObject({ canaryFor: ["web-b", "web-c"] });
        expect(resource(run, DEPLOYMENT, "web-a").inputs).not.toHaveProperty("afterCanary");
        expect(resource(run, DEPLOYMENT, "web-b").inputs).toMatchObject({ afterCanary: "web-a" });
        expect(resource(run, DEPLOYMENT, "web-c").inputs).toMatchObject({ afterCanary: "web-a" });
    });

    it("changes no input of any deploy Command, so turning it on or off re-runs no deploy", async () => {
        const parallel = await runProgram("prod", { hosts: FLEET, rollout: "parallel" });
        for (const host of ["web-a", "web-b", "web-c", "db"]) {
            expect(resource(run, COMMAND, `${host}-switch`).inputs).toEqual(resource(parallel, COMMAND, `${host}-switch`).inputs);
            expect(deploysAwaited(parallel, host)).toEqual([]);
        }
    });

    it("logs on the canary's deployment which hosts wait for it, for pulumi up to print beside its error", () => {
        expect(run.notes).toEqual([
            {
                resource: "web-a",
                message:
                    "rollout canary of flakeAttr web: the deploys of web-b, web-c start only after this host's deploy confirmed; " +
                    "if it fails, they are not started and keep running the systems they run now",
            },
        ]);
    });

    it("holds back only the deploys: the other hosts' instances do not wait for the canary", () => {
        const canary = resource(run, COMMAND, "web-a-switch").urn;
        const waiting = run.resources.filter((r) => r.dependencies.includes(canary)).map((r) => `${r.type} ${r.name}`);
        expect(waiting.sort()).toEqual([`${COMMAND} web-b-switch`, `${COMMAND} web-c-switch`, `${DEPLOYMENT} web-b`, `${DEPLOYMENT} web-c`]);
    });

    it("puts the hosts that get a secret behind a canary that gets it too", async () => {
        const withSecret = await runProgram("prod", { hosts: FLEET, hostSecrets: JSON.stringify({ apiToken: ["web-b", "web-c"] }), "secret.apiToken": "token-1" });
        expect(deploysAwaited(withSecret, "web-b")).toEqual([]);
        expect(deploysAwaited(withSecret, "web-a")).toEqual(["web-b-switch"]);
        expect(deploysAwaited(withSecret, "web-c")).toEqual(["web-b-switch"]);
        expect(deploysAwaited(withSecret, "db")).toEqual([]);
    });

    it("leaves a fleet of one as it was", async () => {
        const single = await runProgram("prod");
        expect(deploysAwaited(single, "prod")).toEqual([]);
        expect(resource(single, DEPLOYMENT, "prod").inputs).not.toHaveProperty("canaryFor");
    });
});

describe("rollout: parallel (the default elsewhere)", () => {
    it("logs no canary", async () => {
        expect((await runProgram("staging", { hosts: FLEET })).notes).toEqual([]);
    });

    it("lets every deploy of staging's fleet start at once", async () => {
        const run = await runProgram("staging", { hosts: FLEET });
        for (const host of ["web-a", "web-b", "web-c", "db"]) expect(deploysAwaited(run, host)).toEqual([]);
    });

    it("is staging's default and canary is prod's", () => {
        expect(loadSettings("staging").rollout).toBe("parallel");
        expect(loadSettings("prod").rollout).toBe("canary");
    });

    it("can be canary on staging too", async () => {
        const run = await runProgram("staging", { hosts: FLEET, rollout: "canary" });
        expect(deploysAwaited(run, "web-c")).toEqual(["web-a-switch"]);
    });

    it("is refused when it is neither, naming the key and the values allowed", () => {
        expect(() => loadSettings("staging", { rollout: "blue-green" })).toThrow(/nixos-ec2:rollout: "blue-green" is not a rollout; allowed: parallel, canary/);
    });
});

describe("rolloutPlan", () => {
    const host = (name: string, flakeAttr = name): HostSettings =>
        ({ name, flakeAttr, instanceType: "t3.small", rootVolumeGiB: 20, rebootPolicy: "when-required", architecture: "x86_64", nixSystem: "x86_64-linux", imageGeneration: 0 }) as HostSettings;

    it("lists every canary before the hosts that wait for it, and each host once", () => {
        const hosts = [host("z", "web"), host("b", "api"), host("y", "web"), host("a", "api"), host("solo")];
        const plan = rolloutPlan(hosts, "canary");
        expect(plan.map((s) => [s.host.name, s.afterCanary ?? "", (s.canaryFor ?? []).join(" ")])).toEqual([
            ["y", "", "z"],
            ["a", "", "b"],
            ["solo", "", ""],
            ["z", "y", ""],
            ["b", "a", ""],
        ]);
        const position = (name: string) => plan.findIndex((s) => s.host.name === name);
        expect(position("a")).toBeLessThan(position("b"));
        expect(position("y")).toBeLessThan(position("z"));
        expect(plan.map((s) => s.host.name).sort()).toEqual(["a", "b", "solo", "y", "z"]);
    });

    it("makes the canary a host that every change reaches: one that gets every secret of its flakeAttr", () => {
        // A new apiToken re-runs only the deploys of web-b and web-c: web-a cannot be their canary.
        const secrets: Record<string, string[]> = { "web-b": ["apiToken"], "web-c": ["apiToken"] };
        const plan = rolloutPlan([host("web-a", "web"), host("web-b", "web"), host("web-c", "web")], "canary", (h) => secrets[h] ?? []);
        expect(plan.map((s) => [s.host.name, s.afterCanary ?? "", (s.canaryFor ?? []).join(" ")])).toEqual([
            ["web-b", "", "web-a web-c"],
            ["web-a", "web-b", ""],
            ["web-c", "web-b", ""],
        ]);
    });

    it("groups a flakeAttr's hosts by the secrets they get when no host gets them all", () => {
        const secrets: Record<string, string[]> = { a: ["s1"], b: ["s2"], c: ["s1"], d: ["s2"], e: [] };
        const plan = rolloutPlan(["a", "b", "c", "d", "e"].map((n) => host(n, "web")), "canary", (h) => secrets[h]);
        expect(Object.fromEntries(plan.map((s) => [s.host.name, s.afterCanary ?? (s.canaryFor ?? []).join(" ")]))).toEqual({
            a: "c",
            b: "d",
            c: "a",
            d: "b",
            e: "",
        });
        expect(plan.filter((s) => s.canaryFor !== undefined).map((s) => s.host.name)).toEqual(["a", "b"]);
    });

    it("makes no host wait with parallel", () => {
        const plan = rolloutPlan([host("a", "web"), host("b", "web")], "parallel");
        expect(plan.map((s) => [s.host.name, s.afterCanary, s.canaryFor])).toEqual([
            ["a", undefined, undefined],
            ["b", undefined, undefined],
        ]);
    });
});
