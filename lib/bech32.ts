/**
 * Bech32 (BIP 173), the encoding of age's keys: `age1...` recipients and `AGE-SECRET-KEY-1...`
 * identities. It follows the package ssh-to-age encodes with (Mic92/ssh-to-age bech32/bech32.go,
 * the btcutil one that age also uses): 8-bit data in 5-bit groups, at most 90 characters, one case.
 * A checksum, not cryptography; the curve arithmetic is Node's (lib/age.ts).
 */

const CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l";
const GENERATOR = [0x3b6a57b2, 0x26508e6d, 0x1ea119fa, 0x3d4233dd, 0x2a1462b3];
const MAX_LENGTH = 90;

function polymod(values: readonly number[]): number {
    let chk = 1;
    for (const v of values) {
        const top = chk >>> 25;
        chk = (((chk & 0x1ffffff) << 5) ^ v) >>> 0;
        for (let i = 0; i < 5; i++) if ((top >>> i) & 1) chk = (chk ^ GENERATOR[i]) >>> 0;
    }
    return chk;
}

function hrpExpand(hrp: string): number[] {
    const codes = [...hrp.toLowerCase()].map((c) => c.charCodeAt(0));
    return [...codes.map((c) => c >> 5), 0, ...codes.map((c) => c & 31)];
}

function convertBits(data: readonly number[], from: number, to: number, pad: boolean): number[] {
    const out: number[] = [];
    const max = (1 << to) - 1;
    let acc = 0;
    let bits = 0;
    for (const value of data) {
        if (value >> from !== 0) throw new Error(`bech32: value ${value} does not fit ${from} bits`);
        acc = ((acc << from) | value) & 0xffffff;
        bits += from;
        while (bits >= to) {
            bits -= to;
            out.push((acc >> bits) & max);
        }
    }
    if (pad) {
        if (bits > 0) out.push((acc << (to - bits)) & max);
    } else if (bits >= from) {
        throw new Error("bech32: illegal zero padding");
    } else if (((acc << (to - bits)) & max) !== 0) {
        throw new Error("bech32: non-zero padding");
    }
    return out;
}

/** `hrp` + "1" + `data` in 5-bit groups + checksum; upper case when `hrp` is. */
export function bech32Encode(hrp: string, data: Uint8Array): string {
    const words = convertBits([...data], 8, 5, true);
    if (hrp.length < 1 || [...hrp].some((c) => c.charCodeAt(0) < 33 || c.charCodeAt(0) > 126)) throw new Error(`bech32: invalid prefix ${JSON.stringify(hrp)}`);
    if (hrp !== hrp.toLowerCase() && hrp !== hrp.toUpperCase()) throw new Error(`bech32: mixed-case prefix ${JSON.stringify(hrp)}`);
    if (hrp.length + words.length + 7 > MAX_LENGTH) throw new Error(`bech32: too long (prefix ${hrp.length}, data ${words.length} characters)`);
    const lower = hrp.toLowerCase();
    const mod = polymod([...hrpExpand(lower), ...words, 0, 0, 0, 0, 0, 0]) ^ 1;
    const checksum = [0, 1, 2, 3, 4, 5].map((p) => (mod >>> (5 * (5 - p))) & 31);
    const text = `${lower}1${[...words, ...checksum].map((w) => CHARSET[w]).join("")}`;
    return hrp === lower ? text : text.toUpperCase();
}

/** The prefix (lower case) and the 8-bit data of a Bech32 string; throws on any fault. */
export function bech32Decode(text: string): { hrp: string; data: Uint8Array } {
    if (text.length > MAX_LENGTH) throw new Error(`bech32: too long (${text.length} characters)`);
    if (text !== text.toLowerCase() && text !== text.toUpperCase()) throw new Error("bech32: mixed case");
    const s = text.toLowerCase();
    const at = s.lastIndexOf("1");
    if (at < 1 || at + 7 > s.length) throw new Error("bech32: no separator before a 6-character checksum");
    const hrp = s.slice(0, at);
    if ([...hrp].some((c) => c.charCodeAt(0) < 33 || c.charCodeAt(0) > 126)) throw new Error("bech32: invalid character in the prefix");
    const words = [...s.slice(at + 1)].map((c) => {
        const w = CHARSET.indexOf(c);
        if (w < 0) throw new Error(`bech32: invalid character ${JSON.stringify(c)}`);
        return w;
    });
    if (polymod([...hrpExpand(hrp), ...words]) !== 1) throw new Error("bech32: invalid checksum");
    return { hrp, data: Uint8Array.from(convertBits(words.slice(0, -6), 5, 8, false)) };
}
