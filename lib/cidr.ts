/**
 * CIDRs as networks, not as text: parsed with ipaddr.js, so that every spelling of a network
 * (`0::/0`, `::0/0`, `2001:0db8::/32`) is the same network, and the prod guard compares ranges.
 */
import * as ipaddr from "ipaddr.js";
import { z } from "zod";
import { Bad, show } from "./configSchema";

export interface Network {
    readonly family: 4 | 6;
    /** As written. */
    readonly text: string;
    /** Canonical text (RFC 5952 for IPv6), as AWS stores it. */
    readonly cidr: string;
    readonly first: bigint;
    readonly last: bigint;
}

const BITS = { 4: 32, 6: 128 } as const;

/** A network, or the problem with the text (a phrase that follows the quoted value). */
export function parseNetwork(text: string): Network | string {
    const m = /^([^/]*)\/([0-9]{1,3})$/.exec(text);
    if (!m) return "is not a CIDR (address/prefix)";
    const [, address, prefixText] = m;
    if (address.includes("%")) return "has a zone ID (%...), which security group rules do not take";
    if (!/^(0|[1-9][0-9]*)$/.test(prefixText)) return "has a prefix with a leading zero";
    const prefix = Number(prefixText);
    let family: 4 | 6;
    if (ipaddr.IPv4.isValidFourPartDecimal(address)) family = 4;
    else if (ipaddr.IPv6.isValid(address)) family = 6;
    else if (ipaddr.IPv4.isValid(address)) return "is not written as four decimal numbers (a.b.c.d, no leading zeros)";
    else return "is not an IPv4 or IPv6 CIDR";
    if (prefix > BITS[family]) return `has an IPv${family} prefix above ${BITS[family]}`;

    const parsed = ipaddr.parse(address);
    if (parsed.kind() === "ipv6") {
        const v6 = parsed as ipaddr.IPv6;
        if (address.includes(".")) return "embeds an IPv4 address, which security group rules do not take; write the IPv4 CIDR instead";
        if (v6.range() === "ipv4Mapped" && prefix >= 96) {
            return `is an IPv4-mapped network, which never matches IPv6 traffic; write the IPv4 CIDR ${v6.toIPv4Address().toString()}/${prefix - 96} instead`;
        }
    }
    const network = ipaddr.parseCIDR(`${address}/${prefix}`);
    const base = (family === 4 ? ipaddr.IPv4 : ipaddr.IPv6).networkAddressFromCIDR(`${address}/${prefix}`);
    const first = toBigInt(base.toByteArray());
    if (first !== toBigInt(network[0].toByteArray())) return `has host bits set (the network is ${base.toString()}/${prefix})`;
    const size = 1n << BigInt(BITS[family] - prefix);
    return { family, text, cidr: `${base.toString()}/${prefix}`, first, last: first + size - 1n };
}

function toBigInt(bytes: number[]): bigint {
    return bytes.reduce((n, b) => (n << 8n) | BigInt(b), 0n);
}

/**
 * The ranges reserved for documentation and examples (RFC 5737 for IPv4, RFC 3849 and RFC 9637
 * for IPv6), which no host is ever given: an admin cannot connect from them.
 */
export const DOCUMENTATION_RANGES: ReadonlyArray<{ readonly cidr: string; readonly rfc: string }> = [
    { cidr: "192.0.2.0/24", rfc: "RFC 5737" },
    { cidr: "198.51.100.0/24", rfc: "RFC 5737" },
    { cidr: "203.0.113.0/24", rfc: "RFC 5737" },
    { cidr: "2001:db8::/32", rfc: "RFC 3849" },
    { cidr: "3fff::/20", rfc: "RFC 9637" },
];

/**
 * Address space that no host on the internet connects from (RFC 6890 special-purpose ranges:
 * "this network", private, shared, loopback, link-local, documentation, benchmarking, multicast,
 * reserved). A set of entries that covers everything else opens SSH to the whole internet as
 * surely as 0.0.0.0/0 does. For IPv6, the internet is the global unicast space, 2000::/3.
 */
const NOT_INTERNET_V4 = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/3",
    ...DOCUMENTATION_RANGES.map((r) => r.cidr).filter((c) => !c.includes(":")),
];
const INTERNET_V6 = ["2000::/3"];

type Range = readonly [bigint, bigint];

function rangeOf(cidr: string): Range {
    const n = parseNetwork(cidr) as Network;
    return [n.first, n.last];
}

/** The ranges of [0, 2^bits) that `holes` leave, in order. */
function complement(holes: readonly Range[], bits: number): Range[] {
    const out: Range[] = [];
    let next = 0n;
    for (const [first, last] of [...holes].sort((a, b) => (a[0] < b[0] ? -1 : 1))) {
        if (first > next) out.push([next, first - 1n]);
        if (last + 1n > next) next = last + 1n;
    }
    if (next < 1n << BigInt(bits)) out.push([next, (1n << BigInt(bits)) - 1n]);
    return out;
}

const INTERNET: Record<4 | 6, Range[]> = {
    4: complement(NOT_INTERNET_V4.map(rangeOf), 32),
    6: INTERNET_V6.map(rangeOf),
};

/** Whether the union of `ranges` contains all of `target`. */
function covers(ranges: readonly Range[], [from, to]: Range): boolean {
    let next = from; // the lowest address of the target not yet covered
    for (const [first, last] of [...ranges].sort((a, b) => (a[0] < b[0] ? -1 : 1))) {
        if (first > next) break;
        if (last + 1n > next) next = last + 1n;
        if (next > to) return true;
    }
    return next > to;
}

/** The documentation range that holds all of `network`, if one does. */
export function documentationRangeOf(network: Network): { readonly cidr: string; readonly rfc: string } | undefined {
    return DOCUMENTATION_RANGES.find((range) => {
        const { family, first, last } = parseNetwork(range.cidr) as Network;
        return family === network.family && network.first >= first && network.last <= last;
    });
}

/** The families (4, 6) whose whole internet (every public address) the networks cover together. */
export function wholeInternetCovered(networks: readonly Network[]): Array<4 | 6> {
    return ([4, 6] as const).filter((family) => {
        const ranges = networks.filter((n) => n.family === family).map((n): Range => [n.first, n.last]);
        return INTERNET[family].every((part) => covers(ranges, part));
    });
}

/** Parsed networks; each problem is reported at its entry, and the list's own rules after. */
export function networkList(bad: Bad) {
    const problem = "is not a non-empty list of CIDR strings";
    return z
        .array(z.string(bad("is not a CIDR string")), bad(problem))
        .min(1, bad(problem))
        .transform((list, ctx) => {
            const networks: Network[] = [];
            list.forEach((text, i) => {
                const parsed = parseNetwork(text);
                const twin = typeof parsed === "string" ? undefined : networks.find((n) => n.cidr === parsed.cidr);
                const why = typeof parsed === "string" ? parsed : twin ? `is the same network as ${show(twin.text)}, listed before it` : undefined;
                if (why) ctx.addIssue({ code: "custom", path: [i], input: text, message: bad(why).error });
                else networks.push(parsed as Network);
            });
            return networks;
        });
}
