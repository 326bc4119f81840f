/**
 * `npm run preview -- [STACK] [--config KEY=VALUE]... [--json]`: what `pulumi up` would create
 * for a stack, without cloud credentials, the Pulumi CLI or a network. It runs the real program
 * (index.ts) in this process under Pulumi's mock runtime with the stack's real configuration and
 * prints the resource tree, the stack outputs and a count by type. Same input, same bytes, so
 * two previews can be diffed.
 *
 * It then checks the resources against the policy pack's rules (policy/rules.ts) and prints a
 * policy section.
 *
 * Exit status: 0 printed a preview; 1 the configuration is wrong (only its errors are printed,
 * on stderr); 2 bad arguments or an unknown stack; 3 the program failed some other way; 4 printed
 * a preview in which a mandatory policy is violated (`pulumi up --policy-pack policy` would stop).
 */
import * as path from "node:path";
import { ConfigError, qualifyKey } from "../lib/config";
import { runOffline } from "../lib/offline";
import { loadStack, PROJECT_DIR, StackFileError, UnknownStackError } from "../lib/stacks";
import { blocks, checkPolicies } from "./policyCheck";
import { buildReport, renderJson, renderText } from "./previewReport";

export const EXIT = { ok: 0, config: 1, usage: 2, failure: 3, policy: 4 } as const;

const DEFAULT_STACK = "staging";

const USAGE = `usage: npm run preview -- [STACK] [--config KEY=VALUE]... [--json]

  STACK                 a stack with a Pulumi.<STACK>.yaml (default: ${DEFAULT_STACK})
  -c, --config KEY=VALUE
                        override a config value, after Pulumi.yaml and Pulumi.<STACK>.yaml;
                        repeatable. A bare KEY is in the project namespace (nixos-ec2:KEY);
                        aws:region=... works too. VALUE is taken as written: JSON for lists and
                        maps, e.g. --config 'hosts={"web":{},"db":{}}'. A secret.<name>
                        value is taken as a secret, as pulumi config set --secret sets it
  --json                print the preview as one JSON document
  --program FILE        preview another Pulumi program with the stack's configuration
                        (default: index.ts); for trying a change or a fork against the policy pack
  -h, --help            print this help
`;

export interface PreviewArgs {
    readonly stack: string;
    /** Config keys as given (bare or namespaced) to values. */
    readonly overrides: Record<string, string>;
    readonly json: boolean;
    readonly help: boolean;
    /** The program to run; the project's index.ts when absent. */
    readonly program?: string;
}

export class UsageError extends Error {
    constructor(message: string) {
        super(message);
        this.name = "UsageError";
    }
}

const CONFIG_KEY = /^([A-Za-z][A-Za-z0-9_.-]*:)?[A-Za-z][A-Za-z0-9_.-]*$/;

export function parseArgs(argv: readonly string[]): PreviewArgs {
    let stack: string | undefined;
    const overrides: Record<string, string> = {};
    let json = false;
    let help = false;
    let program: string | undefined;

    const override = (pair: string | undefined) => {
        if (pair === undefined) throw new UsageError("--config needs KEY=VALUE");
        const eq = pair.indexOf("=");
        const key = eq < 0 ? pair : pair.slice(0, eq);
        if (eq < 0 || !CONFIG_KEY.test(key)) {
            throw new UsageError(`--config ${JSON.stringify(pair)}: expected KEY=VALUE with KEY like instanceType or aws:region`);
        }
        overrides[key] = pair.slice(eq + 1);
    };

    for (let i = 0; i < argv.length; i++) {
        const arg = argv[i];
        if (arg === "--json") json = true;
        else if (arg === "-h" || arg === "--help") help = true;
        else if (arg === "-c" || arg === "--config") override(argv[++i]);
        else if (arg.startsWith("--config=")) override(arg.slice("--config=".length));
        else if (arg === "--program") {
            program = argv[++i];
            if (program === undefined) throw new UsageError("--program needs a FILE");
        }
        else if (arg.startsWith("-")) throw new UsageError(`unknown option ${JSON.stringify(arg)}`);
        else if (stack !== undefined) throw new UsageError(`one stack at a time: got ${JSON.stringify(stack)} and ${JSON.stringify(arg)}`);
        else stack = arg;
    }
    return { stack: stack ?? DEFAULT_STACK, overrides, json, help, program };
}

/**
 * The SDK records a stack trace on every promise it makes (runtime/debuggable.js), a few hundred
 * a host, for a report of promises still pending at exit; formatting them took over a third of a
 * 50-host preview (2.4 s, 1.5 s without). The preview never shows them, so it captures none while
 * the program runs, unless asked with node's --stack-trace-limit (which also brings back the
 * stack of a failure).
 */
function stackTracesAsked(): boolean {
    return [...process.execArgv, ...(process.env.NODE_OPTIONS ?? "").split(/\s+/)].some((a) => a.startsWith("--stack-trace-limit"));
}

/** Write, and exit once it is written (a pipe may take it in pieces). */
function finish(stream: NodeJS.WriteStream, text: string, code: number): void {
    stream.write(text, () => process.exit(code));
}

async function main(argv: readonly string[]): Promise<void> {
    let args: PreviewArgs;
    try {
        args = parseArgs(argv);
    } catch (e) {
        if (e instanceof UsageError) return finish(process.stderr, `preview: ${e.message}\n\n${USAGE}`, EXIT.usage);
        throw e;
    }
    if (args.help) return finish(process.stdout, USAGE, EXIT.ok);

    // The program names files relative to the project (the deploy hashes "nix"), as under `pulumi up`.
    const invokedFrom = process.cwd();
    process.chdir(PROJECT_DIR);

    let loaded;
    try {
        loaded = loadStack(args.stack, args.overrides);
    } catch (e) {
        if (e instanceof UnknownStackError) return finish(process.stderr, `preview: ${e.message}\n`, EXIT.usage);
        if (e instanceof StackFileError) return finish(process.stderr, `preview: ${e.message}\n`, EXIT.config);
        throw e;
    }

    let run;
    const stackTraceLimit = Error.stackTraceLimit;
    if (!stackTracesAsked()) Error.stackTraceLimit = 0;
    try {
        run = await runOffline({ stack: args.stack, ...loaded, program: args.program && path.resolve(invokedFrom, args.program) });
    } catch (e) {
        if (e instanceof ConfigError) return finish(process.stderr, `${e.message}\n`, EXIT.config);
        throw e;
    } finally {
        Error.stackTraceLimit = stackTraceLimit;
    }
    if (run.unmockedInvokes.length > 0) {
        const tokens = [...new Set(run.unmockedInvokes)].sort().join(", ");
        return finish(
            process.stderr,
            `preview: the program looks up data sources the offline mocks cannot answer: ${tokens}; add them to lib/offline.ts\n`,
            EXIT.failure,
        );
    }

    const policy = await checkPolicies(run);
    const report = buildReport(run, Object.keys(args.overrides).map(qualifyKey), policy);
    // The whole preview prints either way; a mandatory violation gets its own status, as it stops `pulumi up`.
    finish(process.stdout, args.json ? renderJson(report) : renderText(report), policy.violations.some(blocks) ? EXIT.policy : EXIT.ok);
}

if (require.main === module) {
    main(process.argv.slice(2)).catch((e: unknown) => {
        const detail = e instanceof Error ? (e.stack ?? e.message) : String(e);
        const hint = stackTracesAsked() ? "" : "\n(for the stack trace: NODE_OPTIONS=--stack-trace-limit=50 npm run preview -- ...)";
        finish(process.stderr, `preview: the program failed: ${detail}${hint}\n`, EXIT.failure);
    });
}
