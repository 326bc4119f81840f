/**
 * A real OpenSSH server on 127.0.0.1 that plays a NixOS host for deploy/nixos-deploy.sh: its own
 * ED25519 host key, an admin key in its AuthorizedKeysFile, and on the session PATH the stand-ins
 * from test/fixtures/host-bin (nixos-rebuild, nix-env, systemd-run, systemctl, curl, and df and
 * tar, which run the real ones unless a test makes the disk full), grub-editenv, which record
 * every call in `<host>/calls.log`. `systemctl reboot` really reboots it: every process of the
 * host and every SSH connection dies, and after a delay the fake firmware boots what GRUB would
 * (a new boot ID, an empty run/, the boot guard unit) and sshd comes back with the same host key. The system profile is a real symlink chain
 * (`system -> system-N-link -> <host>/store/<hash>-nixos-system-<name>`), so generations and store
 * paths the deploy reports are real readings. Used by the integration tests and the benchmark.
 */
import { ChildProcess, execFileSync, spawn } from "node:child_process";
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { sbinTool } from "./tools";

const REPO = path.resolve(__dirname, "..", "..");
export const DEPLOY_SCRIPT = path.join(REPO, "deploy", "nixos-deploy.sh");
const HOST_BIN = path.join(REPO, "test", "fixtures", "host-bin");
const FAKE_SWITCH = path.join(REPO, "test", "fixtures", "fake-system", "switch-to-configuration");
/**
 * The two halves of a reboot (host-bin/systemctl runs power-off; this module runs firmware-boot),
 * and what starts a unit with its credentials (start-unit: systemctl restart, the switch, the boot).
 */
const HOST_FIXTURES = ["power-off", "firmware-boot", "start-unit"].map((name) => path.join(REPO, "test", "fixtures", name));
const FAKE_GRUB_EDITENV = path.join(REPO, "test", "fixtures", "fake-system", "grub-editenv");
const INITIAL_SYSTEM = "00000000000000000000000000000000-nixos-system-initial";
const READY_TIMEOUT_MS = 10_000;

/** sshd's absolute path (sshd re-executes itself and insists on one), or "sshd" when it is nowhere. */
export function sshdCommand(): string {
    return sbinTool("sshd");
}

/** A TCP port on 127.0.0.1 that nothing listens on (it was free a moment ago). */
export async function freePort(): Promise<number> {
    return new Promise((resolve, reject) => {
        const server = net.createServer();
        server.once("error", reject);
        server.listen(0, "127.0.0.1", () => {
            const address = server.address();
            server.close(() => {
                if (address && typeof address === "object") {
                    resolve(address.port);
                } else {
                    reject(new Error("could not read the port of a listening socket"));
                }
            });
        });
    });
}

/** What the stand-ins do; each field is a file in `<host>/control`, copied into the next build. */
export interface HostBehaviour {
    /** Exit status of `nixos-rebuild build` (0 = builds). */
    buildExit?: number;
    /** Seconds `nixos-rebuild build` takes. */
    buildDelaySeconds?: number;
    /** Lines `nixos-rebuild build` prints, one per path, as a large first build does. */
    buildOutputLines?: number;
    /** Exit status of the new system's switch-to-configuration (0, 1 = failed, 4 = units failed). */
    switchExit?: number;
    /** The new system installs an empty authorized_keys: new SSH connections are refused. */
    breakSsh?: boolean;
    /** Body of the health URL on the new system; a number is answered as that HTTP error. */
    health?: string;
    /** What `systemctl is-system-running` says on the new system. */
    systemState?: string;
    /** Seconds `systemctl is-system-running --wait` takes. */
    settleDelaySeconds?: number;
    /** Seconds the new system's switch-to-configuration takes before it activates. */
    switchDelaySeconds?: number;
    /** KiB that `df -Pk` reports free (a nearly full disk); unset, the real df answers. */
    diskFreeKib?: number;
    /** The host's tar fails half way through receiving the upload, as on a full disk. */
    uploadFails?: boolean;
    /** The new system's switch-inhibitors (JSON); a change from the running one's refuses a live switch. */
    switchInhibitors?: string;
    /** The new system's init-interface-version ("systemd 2" unless set); a change needs a reboot. */
    initInterface?: string;
    /** The new system's kernel panics at boot (the image boots with panic=1). */
    bootPanics?: boolean;
    /** The new system's switch-to-configuration predates the `check` action. */
    oldSwitch?: boolean;
    /** The new system lacks nixos-ec2-boot-guard.service. */
    noBootGuard?: boolean;
    /** The build is not a NixOS system (no nixos-version file). */
    notNixos?: boolean;
    /** A pre-switch check other than the switch inhibitors fails (a site policy, say). */
    preSwitchFails?: boolean;
    /** GRUB cannot write its environment block (as on LVM or RAID), so it never clears next_entry. */
    grubenvReadonly?: boolean;
    /** The units a degraded new system lists as failed, each with its exit status and its log line (journalctl). */
    failedUnits?: Array<{ unit: string; status: number; log: string }>;
    /** The new system's kernel version: its kernel, initrd and modules differ from the image's, so a live switch leaves a reboot due. */
    kernel?: string;
    /**
     * The host secrets the new system uses, each with the units that load it as a credential and
     * restart when it changes (nix/modules/secrets.nix's restartUnits).
     */
    secretUnits?: Record<string, string[]>;
    /** Units that fail to start (their ExecStart= fails), whoever starts them. */
    unitFails?: string[];
}

/** An admin key pair; a stack has one for all its hosts (SshdOptions.adminKey). */
export interface AdminKey {
    readonly privateKey: string;
    readonly publicKey: string;
}

/** A fresh admin key pair, with no copy left on disk: the deploy gets the key from its environment only. */
export function adminKeyPair(): AdminKey {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "admin-key-"));
    try {
        keygen(path.join(dir, "admin"), "test-admin");
        return { privateKey: fs.readFileSync(path.join(dir, "admin"), "utf8"), publicKey: fs.readFileSync(path.join(dir, "admin.pub"), "utf8") };
    } finally {
        fs.rmSync(dir, { recursive: true, force: true });
    }
}

export interface SshdOptions {
    /** Start listening only this long after startSshd returns (a host that boots late). */
    startAfterMs?: number;
    /** Sets NIXOS_EC2_HEALTH_URL for sessions; unset, the deploy uses its production default. */
    healthUrl?: string;
    /** Sets NIXOS_EC2_PROGRESS_SECONDS for sessions: how often a long build says it still runs. */
    progressSeconds?: number;
    /** How long the host stays down when it reboots (default 500 ms). */
    rebootDelayMs?: number;
    /** The admin key the host accepts; a fresh one by default. */
    adminKey?: AdminKey;
}

export interface TestSshd {
    readonly port: number;
    /** `ssh-ed25519 AAAA...` of the server: the only key a deploy may trust. */
    readonly hostPublicKey: string;
    /** OpenSSH private key text of the admin user (what the component passes as a secret). */
    readonly adminPrivateKey: string;
    /** The user sshd lets in (whoever runs the tests). */
    readonly user: string;
    /** Everything of this server lives here; removed by stop(). */
    readonly dir: string;
    /** The fake host's root: bin/, store/, profiles/, run/ (credentials/ too), state/, control/, units/, boot/, acme/, calls.log. */
    readonly hostDir: string;
    /** NIXOS_EC2_STATE_DIR on the fake host. */
    readonly stateDir: string;
    /** NIXOS_EC2_SYSTEM_PROFILE on the fake host. */
    readonly profile: string;
    /** A flake directory for deploys to copy (with files the copy must leave out). */
    readonly flakeDir: string;
    /** TMPDIR for the deploy script, owned by the test, so leftovers can be checked. */
    readonly localTmp: string;
    /** Resolves once sshd listens. */
    readonly ready: Promise<void>;
    setBehaviour(behaviour: HostBehaviour): void;
    /** Recorded stand-in calls, one line each: `name arg...` (args shell-quoted). */
    calls(): string[];
    /** Generation number the system profile points at. */
    generation(): number;
    /** Store path the system profile resolves to. */
    systemPath(): string;
    /** Store path /run/current-system (the activated system) resolves to. */
    currentSystem(): string;
    /** Store path /run/booted-system resolves to. */
    bootedSystem(): string;
    /** The host's boot ID (new at every boot). */
    bootId(): string;
    /** Boots since the server started. */
    boots(): number;
    /** Successful SSH logins so far ("Accepted publickey" in sshd's log). */
    acceptedLogins(): number;
    sshdLog(): string;
    /** The listening sshd's process ID while it runs: its reaped children are the sessions it served. */
    serverPid(): number | undefined;
    stop(): Promise<void>;
}

function keygen(file: string, comment: string): void {
    execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", file], { stdio: "ignore" });
}

function writeControl(hostDir: string, name: string, value: string | number | boolean | undefined): void {
    const file = path.join(hostDir, "control", name);
    if (value === undefined || value === false) {
        fs.rmSync(file, { force: true });
    } else {
        fs.writeFileSync(file, value === true ? "yes" : String(value));
    }
}

function makeFlake(flakeDir: string): void {
    fs.mkdirSync(path.join(flakeDir, "modules"), { recursive: true });
    fs.writeFileSync(
        path.join(flakeDir, "flake.nix"),
        '{\n  outputs = { self }: { nixosConfigurations = { }; };\n}\n',
    );
    fs.writeFileSync(path.join(flakeDir, "modules", "web.nix"), "{ ... }: { }\n");
    // Named like build links, but a file and a directory of the flake: the copy must keep them.
    fs.writeFileSync(path.join(flakeDir, "modules", "result-codes.nix"), "{ ... }: { }\n");
    fs.mkdirSync(path.join(flakeDir, "result-docs"));
    fs.writeFileSync(path.join(flakeDir, "result-docs", "index.md"), "docs\n");
    // Build links and editor droppings: the copy must leave these out.
    fs.symlinkSync("/nonexistent-store-path", path.join(flakeDir, "result"));
    fs.symlinkSync("/nonexistent-store-path", path.join(flakeDir, "modules", "result-2"));
    fs.symlinkSync("/nonexistent-store-path", path.join(flakeDir, "result-1"));
    fs.writeFileSync(path.join(flakeDir, "flake.nix~"), "backup\n");
    fs.writeFileSync(path.join(flakeDir, "modules", ".#web.nix"), "lock\n");
    fs.writeFileSync(path.join(flakeDir, "modules", ".web.nix.swp"), "swap\n");
    fs.writeFileSync(path.join(flakeDir, ".DS_Store"), "finder\n");
}

/** Lays out the fake host: stand-ins, generation 1 of the system profile, the admin key. */
function makeHost(hostDir: string, adminPublicKey: string): void {
    for (const sub of ["bin", "fixtures", "store", "profiles", "run", "state", "control", "units", "boot/grub", "acme"]) {
        fs.mkdirSync(path.join(hostDir, sub), { recursive: true });
    }
    for (const name of fs.readdirSync(HOST_BIN)) {
        fs.copyFileSync(path.join(HOST_BIN, name), path.join(hostDir, "bin", name));
        fs.chmodSync(path.join(hostDir, "bin", name), 0o755);
    }
    fs.copyFileSync(FAKE_SWITCH, path.join(hostDir, "fixtures", "switch-to-configuration"));
    for (const fixture of [...HOST_FIXTURES, FAKE_GRUB_EDITENV]) {
        fs.copyFileSync(fixture, path.join(hostDir, "fixtures", path.basename(fixture)));
    }
    fs.writeFileSync(path.join(hostDir, "admin.pub"), adminPublicKey);
    fs.writeFileSync(path.join(hostDir, "authorized_keys"), adminPublicKey);
    fs.writeFileSync(path.join(hostDir, "calls.log"), "");

    const initial = path.join(hostDir, "store", INITIAL_SYSTEM);
    fs.mkdirSync(path.join(initial, "bin"), { recursive: true });
    fs.copyFileSync(FAKE_SWITCH, path.join(initial, "bin", "switch-to-configuration"));
    fs.chmodSync(path.join(initial, "bin", "switch-to-configuration"), 0o755);
    fs.writeFileSync(path.join(initial, "authorized_keys"), adminPublicKey);
    fs.writeFileSync(path.join(initial, "switch-exit"), "0");
    fs.writeFileSync(path.join(initial, "health"), "ok");
    fs.writeFileSync(path.join(initial, "system-state"), "running");
    // Like the stock image: a NixOS system without the project's boot guard.
    fs.writeFileSync(path.join(initial, "nixos-version"), "26.05.20261124.0000000 (Fake)\n");
    fs.writeFileSync(path.join(initial, "init-interface-version"), "systemd 2\n");
    fs.writeFileSync(path.join(initial, "switch-inhibitors"), '{"dbus-implementation":"dbus"}\n');
    fs.writeFileSync(path.join(initial, "kernel"), "");
    fs.writeFileSync(path.join(initial, "init"), "");
    fs.symlinkSync(initial, path.join(hostDir, "profiles", "system-1-link"));
    fs.symlinkSync("system-1-link", path.join(hostDir, "profiles", "system"));
    fs.symlinkSync(initial, path.join(hostDir, "run", "current-system"));
    fs.symlinkSync(initial, path.join(hostDir, "run", "booted-system"));
    fs.writeFileSync(path.join(hostDir, "boot-id"), `${crypto.randomUUID()}\n`);
    // The image's boot loader, as its switch-to-configuration installs it.
    execFileSync(path.join(initial, "bin", "switch-to-configuration"), ["boot"], { stdio: "ignore" });
    fs.writeFileSync(path.join(hostDir, "calls.log"), "");
}

/** The environment of the fake host's sessions and units. */
function hostEnvironment(o: { hostDir: string; healthUrl?: string; progressSeconds?: number }): Record<string, string> {
    const env: Record<string, string> = {
        // NixOS puts the running system's packages on PATH through /run/current-system/sw/bin.
        PATH: `${path.join(o.hostDir, "bin")}:${path.join(o.hostDir, "run", "current-system", "sw", "bin")}:/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin`,
        NIXOS_EC2_STATE_DIR: path.join(o.hostDir, "state"),
        NIXOS_EC2_SYSTEM_PROFILE: path.join(o.hostDir, "profiles", "system"),
        NIXOS_EC2_RUN_DIR: path.join(o.hostDir, "run"),
        NIXOS_EC2_BOOT_ID_FILE: path.join(o.hostDir, "boot-id"),
        NIXOS_EC2_GRUB_DIR: path.join(o.hostDir, "boot", "grub"),
        NIXOS_EC2_ACME_DIR: path.join(o.hostDir, "acme"),
    };
    if (o.healthUrl !== undefined) {
        env.NIXOS_EC2_HEALTH_URL = o.healthUrl;
    }
    if (o.progressSeconds !== undefined) {
        env.NIXOS_EC2_PROGRESS_SECONDS = String(o.progressSeconds);
    }
    return env;
}

function sshdConfig(o: {
    port: number;
    dir: string;
    hostDir: string;
    user: string;
    healthUrl?: string;
    progressSeconds?: number;
}): string {
    const env = [
        // Debian's bash sources ~/.bashrc for ssh commands when SHLVL < 2; the test user's
        // dotfiles (PATH changes, slow init) must not shape the fake host.
        "SHLVL=1",
        ...Object.entries(hostEnvironment(o)).map(([name, value]) => `${name}=${value}`),
    ];
    return [
        "ListenAddress 127.0.0.1",
        `Port ${o.port}`,
        `HostKey ${path.join(o.dir, "ssh_host_ed25519_key")}`,
        `PidFile ${path.join(o.dir, "sshd.pid")}`,
        `AuthorizedKeysFile ${path.join(o.hostDir, "authorized_keys")}`,
        `AllowUsers ${o.user}`,
        "StrictModes no",
        "UsePAM no",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "LogLevel INFO",
        `SetEnv ${env.join(" ")}`,
        "",
    ].join("\n");
}

function readOr(file: string, fallback: string): string {
    try {
        return fs.readFileSync(file, "utf8");
    } catch {
        return fallback;
    }
}

function killQuietly(pid: number, signal: NodeJS.Signals): void {
    try {
        process.kill(pid, signal);
    } catch {
        // already gone
    }
}

export async function startSshd(options: SshdOptions = {}): Promise<TestSshd> {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "sshd-"));
    const hostDir = path.join(dir, "host");
    const flakeDir = path.join(dir, "flake");
    const localTmp = path.join(dir, "local-tmp");
    const user = os.userInfo().username;
    fs.mkdirSync(localTmp);
    keygen(path.join(dir, "ssh_host_ed25519_key"), "test-host");
    const hostPublicKey = fs.readFileSync(path.join(dir, "ssh_host_ed25519_key.pub"), "utf8").trim();
    const admin = options.adminKey ?? adminKeyPair();
    const adminPrivateKey = admin.privateKey;
    makeHost(hostDir, admin.publicKey);
    makeFlake(flakeDir);

    const port = await freePort();
    const configFile = path.join(dir, "sshd_config");
    const logFile = path.join(dir, "sshd.log");
    fs.writeFileSync(configFile, sshdConfig({ port, dir, hostDir, user, healthUrl: options.healthUrl, progressSeconds: options.progressSeconds }));
    if (process.getuid?.() === 0) {
        // A root sshd needs its privilege separation directory, normally made by its service unit.
        fs.mkdirSync("/run/sshd", { recursive: true, mode: 0o755 });
    }

    let child: ChildProcess | undefined;
    let exited = false;
    let startTimer: NodeJS.Timeout | undefined;
    let rebootTimer: NodeJS.Timeout | undefined;
    let stopped = false;
    const rebootRequest = path.join(hostDir, "reboot-requested");
    // The power came back: boot what GRUB would, then sshd again (see test/fixtures/firmware-boot).
    const powerOn = (): void => {
        rebootTimer = undefined;
        if (stopped) {
            return;
        }
        execFileSync("bash", [path.join(hostDir, "fixtures", "firmware-boot"), hostDir], {
            env: hostEnvironment({ hostDir, healthUrl: options.healthUrl, progressSeconds: options.progressSeconds }),
            stdio: "ignore",
        });
        launch().catch((error: Error) => {
            // A test that ends while the host boots stops it, and removes its files.
            if (!stopped) {
                fs.appendFileSync(logFile, `\nrestart after reboot failed: ${error.message}\n`);
            }
        });
    };
    const launch = (): Promise<void> => {
        exited = false;
        // Only this run's lines count as "listening".
        const logStart = readOr(logFile, "").length;
        child = spawn(sshdCommand(), ["-D", "-f", configFile, "-E", logFile], { stdio: ["ignore", "ignore", "pipe"] });
        let stderr = "";
        child.stderr?.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
        child.once("exit", () => {
            exited = true;
            if (!stopped && fs.existsSync(rebootRequest)) {
                fs.rmSync(rebootRequest);
                rebootTimer = setTimeout(powerOn, options.rebootDelayMs ?? 500);
            }
        });
        const started = Date.now();
        return new Promise((resolve, reject) => {
            const poll = (): void => {
                if (readOr(logFile, "").slice(logStart).includes(`Server listening on 127.0.0.1 port ${port}`)) {
                    resolve();
                } else if (exited || Date.now() - started > READY_TIMEOUT_MS) {
                    reject(new Error(`sshd did not start on port ${port}: ${stderr}${readOr(logFile, "")}`));
                } else {
                    setTimeout(poll, 10);
                }
            };
            poll();
        });
    };
    const ready =
        options.startAfterMs === undefined
            ? launch()
            : new Promise<void>((resolve, reject) => {
                  startTimer = setTimeout(() => {
                      if (!stopped) {
                          launch().then(resolve, reject);
                      }
                  }, options.startAfterMs);
              });
    if (options.startAfterMs === undefined) {
        await ready;
    } else {
        ready.catch(() => undefined);
    }

    const profile = path.join(hostDir, "profiles", "system");
    return {
        port,
        hostPublicKey,
        adminPrivateKey,
        user,
        dir,
        hostDir,
        stateDir: path.join(hostDir, "state"),
        profile,
        flakeDir,
        localTmp,
        ready,
        setBehaviour(b: HostBehaviour): void {
            writeControl(hostDir, "build-exit", b.buildExit);
            writeControl(hostDir, "build-delay", b.buildDelaySeconds);
            writeControl(hostDir, "build-output-lines", b.buildOutputLines);
            writeControl(hostDir, "switch-exit", b.switchExit);
            writeControl(hostDir, "break-ssh", b.breakSsh);
            writeControl(hostDir, "health", b.health);
            writeControl(hostDir, "system-state", b.systemState);
            writeControl(hostDir, "settle-delay", b.settleDelaySeconds);
            writeControl(hostDir, "switch-delay", b.switchDelaySeconds);
            writeControl(hostDir, "disk-free-kib", b.diskFreeKib);
            writeControl(hostDir, "upload-fails", b.uploadFails);
            writeControl(hostDir, "switch-inhibitors", b.switchInhibitors);
            writeControl(hostDir, "init-interface", b.initInterface);
            writeControl(hostDir, "boot-panics", b.bootPanics);
            writeControl(hostDir, "old-switch", b.oldSwitch);
            writeControl(hostDir, "no-boot-guard", b.noBootGuard);
            writeControl(hostDir, "not-nixos", b.notNixos);
            writeControl(hostDir, "grubenv-readonly", b.grubenvReadonly);
            writeControl(hostDir, "pre-switch-fails", b.preSwitchFails);
            writeControl(hostDir, "failed-units", b.failedUnits?.map(({ unit, status, log }) => `${unit} ${status} ${log}\n`).join(""));
            writeControl(hostDir, "kernel", b.kernel);
            writeControl(
                hostDir,
                "secret-units",
                b.secretUnits && Object.entries(b.secretUnits).map(([secret, units]) => `${secret} ${units.join(" ")}\n`).join(""),
            );
            writeControl(hostDir, "unit-fails", b.unitFails?.map((u) => `${u}\n`).join(""));
        },
        calls(): string[] {
            return readOr(path.join(hostDir, "calls.log"), "")
                .split("\n")
                .filter((line) => line !== "");
        },
        generation(): number {
            const match = /-(\d+)-link$/.exec(fs.readlinkSync(profile));
            if (!match) {
                throw new Error(`${profile} does not point at a generation link`);
            }
            return Number(match[1]);
        },
        systemPath(): string {
            return fs.realpathSync(profile);
        },
        currentSystem(): string {
            return fs.realpathSync(path.join(hostDir, "run", "current-system"));
        },
        bootedSystem(): string {
            return fs.realpathSync(path.join(hostDir, "run", "booted-system"));
        },
        bootId(): string {
            return fs.readFileSync(path.join(hostDir, "boot-id"), "utf8").trim();
        },
        boots(): number {
            return readOr(path.join(hostDir, "calls.log"), "")
                .split("\n")
                .filter((line) => line.startsWith("firmware-boot: booting ")).length;
        },
        acceptedLogins(): number {
            return (readOr(logFile, "").match(/Accepted publickey for /g) ?? []).length;
        },
        sshdLog(): string {
            return readOr(logFile, "");
        },
        serverPid(): number | undefined {
            return exited ? undefined : child?.pid;
        },
        async stop(): Promise<void> {
            stopped = true;
            if (startTimer) {
                clearTimeout(startTimer);
            }
            if (rebootTimer) {
                clearTimeout(rebootTimer);
            }
            // Armed rollback timers of the systemd-run stand-in are background processes.
            const units = path.join(hostDir, "units");
            for (const name of fs.existsSync(units) ? fs.readdirSync(units) : []) {
                if (name.endsWith(".pid")) {
                    const pid = Number(readOr(path.join(units, name), "").trim());
                    if (pid > 0) {
                        killQuietly(pid, "SIGKILL");
                    }
                }
            }
            if (child && !exited) {
                const gone = new Promise((resolve) => child?.once("exit", resolve));
                child.kill("SIGTERM");
                await gone;
            }
            fs.rmSync(dir, { recursive: true, force: true });
        },
    };
}

/** The environment NixosDeployment gives the script, pointed at this server. */
export function deployEnv(sshd: TestSshd, overrides: Record<string, string> = {}): NodeJS.ProcessEnv {
    return {
        PATH: process.env.PATH,
        HOME: process.env.HOME ?? os.homedir(),
        TMPDIR: sshd.localTmp,
        NIXOS_EC2_HOST: "127.0.0.1",
        NIXOS_EC2_PORT: String(sshd.port),
        NIXOS_EC2_USER: sshd.user,
        NIXOS_EC2_SSH_PRIVATE_KEY: sshd.adminPrivateKey,
        NIXOS_EC2_HOST_PUBLIC_KEY: sshd.hostPublicKey,
        NIXOS_EC2_FLAKE_DIR: sshd.flakeDir,
        NIXOS_EC2_FLAKE_ATTR: "web",
        NIXOS_EC2_CONNECT_TIMEOUT_SECONDS: "10",
        NIXOS_EC2_BUILD_TIMEOUT_SECONDS: "60",
        NIXOS_EC2_ACTIVATION_TIMEOUT_SECONDS: "4",
        NIXOS_EC2_ROLLBACK_TIMEOUT_SECONDS: "5",
        NIXOS_EC2_ALLOW_FAILED_UNITS: "false",
        NIXOS_EC2_REBOOT_POLICY: "when-required",
        ...overrides,
    };
}

export interface DeployRun {
    code: number | null;
    signal: NodeJS.Signals | null;
    stdout: string;
    stderr: string;
    elapsedMs: number;
}

export interface RunDeployOptions {
    timeoutMs?: number;
    /** Called on each chunk of stderr; true kills the script's whole process group (SIGKILL). */
    killWhen?: (stderr: string) => boolean;
    /** Called on each chunk of stderr; a signal is sent once to the script alone (as a parent would). */
    signalWhen?: (stderr: string) => NodeJS.Signals | undefined;
}

/** Runs deploy/nixos-deploy.sh with `env`, collecting its output. */
export function runDeploy(env: NodeJS.ProcessEnv, options: RunDeployOptions = {}): Promise<DeployRun> {
    const started = process.hrtime.bigint();
    // Its own process group, so a kill takes its ssh children along (like a dropped connection).
    const child = spawn(DEPLOY_SCRIPT, [], { env, stdio: ["ignore", "pipe", "pipe"], detached: true });
    let stdout = "";
    let stderr = "";
    let killed = false;
    let signalled = false;
    const killGroup = (): void => {
        if (!killed && child.pid !== undefined) {
            killed = true;
            killQuietly(-child.pid, "SIGKILL");
        }
    };
    child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on("data", (chunk: Buffer) => {
        stderr += chunk.toString();
        // Asked until it says kill, never after: later chunks (ssh's own farewell) do not count.
        if (!killed && options.killWhen?.(stderr)) {
            killGroup();
        }
        const signal = signalled ? undefined : options.signalWhen?.(stderr);
        if (signal !== undefined && child.pid !== undefined) {
            signalled = true;
            killQuietly(child.pid, signal);
        }
    });
    const timer = setTimeout(killGroup, options.timeoutMs ?? 55_000);
    return new Promise((resolve, reject) => {
        child.once("error", reject);
        child.once("close", (code, signal) => {
            clearTimeout(timer);
            resolve({
                code,
                signal,
                stdout,
                stderr,
                elapsedMs: Number(process.hrtime.bigint() - started) / 1e6,
            });
        });
    });
}
