/**
 * The project's policy pack, for the real CLI: `pulumi preview --policy-pack policy` and
 * `pulumi up --policy-pack policy` run it against every resource. The rules are in rules.ts
 * (constructing a PolicyPack starts a gRPC server, so nothing but the CLI imports this file).
 */
import { PolicyPack } from "@pulumi/policy";
import { RULES } from "./rules";

new PolicyPack("nixos-ec2", { policies: RULES.map((r) => r.policy) });
