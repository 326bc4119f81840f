/**
 * Bech32 (BIP 173), the encoding of age's keys: `age1...` recipients and `AGE-SECRET-KEY-1...`
 * identities, through @scure/base's bech32 (the package ssh-to-age encodes with, Mic92/ssh-to-age
 * bech32/bech32.go, follows the same BIP: 8-bit data in 5-bit groups, at most 90 characters, one
 * case). Here only what age needs on top: the case of the prefix kept, and errors that say bech32.
 */
import { bech32 } from "@scure/base";

/** `hrp` + "1" + `data` in 5-bit groups + checksum; upper case when `hrp` is. */
export function bech32Encode(hrp: string, data: Uint8Array): string {
    if (hrp !== hrp.toLowerCase() && hrp !== hrp.toUpperCase()) throw new Error(`bech32: mixed-case prefix ${JSON.stringify(hrp)}`);
    let text: string;
    try {
        text = bech32.encode(hrp.toLowerCase(), bech32.toWords(data));
    } catch (e) {
        throw new Error(`bech32: ${e instanceof Error ? e.message : String(e)}`);
    }
    return hrp === hrp.toLowerCase() ? text : text.toUpperCase();
}

/** The prefix (lower case) and the 8-bit data of a Bech32 string; throws on any fault. */
export function bech32Decode(text: string): { hrp: string; data: Uint8Array } {
    try {
        // @scure/base refuses mixed case and accepts one case either way, as BIP 173 says.
        const { prefix, words } = bech32.decode(text as `${string}1${string}`);
        return { hrp: prefix.toLowerCase(), data: Uint8Array.from(bech32.fromWords(words)) };
    } catch (e) {
        throw new Error(`bech32: ${e instanceof Error ? e.message : String(e)}`);
    }
}
