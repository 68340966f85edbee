/**
 * @file float16 / bfloat16 ↔ float32. Decoding is exact (every half is a float32); encoding
 * rounds to nearest, ties to even — what PyTorch's `tensor.half()` / `.bfloat16()` do, so
 * `decode(encode(x))` equals `float16(x)` bit for bit.
 */

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

let halfTable: Uint32Array | undefined;

/**
 * The float32 bit patterns of all 65536 float16 values (built once, 256 KB); a NaN keeps its
 * payload and is made quiet, as F16C and PyTorch do.
 */
function table(): Uint32Array {
  if (halfTable) return halfTable;
  halfTable = new Uint32Array(65536);
  const values = new Float32Array(halfTable.buffer);
  for (let h = 0; h < 65536; h++) {
    const frac = h & 0x3ff;
    if ((h & 0x7c00) === 0x7c00 && frac) halfTable[h] = (((h & 0x8000) << 16) | 0x7fc00000 | (frac << 13)) >>> 0;
    else values[h] = halfBitsToFloat(h);
  }
  return halfTable;
}

/** One float16 bit pattern → its exact float32 value. */
export function halfBitsToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24; // zero and subnormals
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1024 + frac) * 2 ** (exp - 25);
}

/** float32 → float16 bits, round to nearest even (overflow → ±Inf, NaN stays NaN). */
export function floatToHalfBits(value: number): number {
  f32[0] = value;
  return floatBitsToHalfBits(u32[0]!);
}

/** floatToHalfBits on a float32's bit pattern (keeps a NaN's payload bits, which a JS number may not). */
export function floatBitsToHalfBits(x: number): number {
  const sign = (x >>> 16) & 0x8000;
  const e32 = (x >>> 23) & 0xff;
  const mant = x & 0x7fffff;
  if (e32 === 255) return sign | 0x7c00 | (mant ? 0x200 | (mant >>> 13) : 0);
  const e = e32 - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign; // below half the smallest subnormal: ±0
    const m = mant | 0x800000;
    const shift = 14 - e; // 14..24
    let h = m >>> shift;
    const rem = m & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rem > halfway || (rem === halfway && h & 1)) h++;
    return sign | h;
  }
  let h = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h++; // a carry into the exponent is correct (→ Inf at the top)
  return sign | h;
}

/** bfloat16 bits → float32 (exact: bf16 is the top half of a float32). */
export function bf16BitsToFloat(h: number): number {
  u32[0] = h << 16;
  return f32[0]!;
}

/** float32 → bfloat16 bits, round to nearest even; NaN stays a quiet NaN. */
export function floatToBf16Bits(value: number): number {
  f32[0] = value;
  const x = u32[0]!;
  if ((x & 0x7f800000) === 0x7f800000 && x & 0x7fffff) return (x >>> 16) | 0x40;
  return ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
}

export function decodeHalf(bits: Uint16Array): Float32Array {
  return decodeHalfInto(bits, new Float32Array(bits.length));
}

/** float16 bits → float32 into `out` (bit patterns copied, so NaN payloads survive). */
export function decodeHalfInto(bits: Uint16Array, out: Float32Array): Float32Array {
  const lut = table();
  const o = new Uint32Array(out.buffer, out.byteOffset, out.length);
  for (let i = 0; i < bits.length; i++) o[i] = lut[bits[i]!]!;
  return out;
}

export function decodeBf16(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  const outBits = new Uint32Array(out.buffer);
  for (let i = 0; i < bits.length; i++) outBits[i] = bits[i]! << 16;
  return out;
}

export function encodeHalf(values: ArrayLike<number>): Uint16Array {
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = floatToHalfBits(values[i]!);
  return out;
}

export function encodeBf16(values: ArrayLike<number>): Uint16Array {
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = floatToBf16Bits(values[i]!);
  return out;
}

/** `Math.fround` for float16: the float32 value of float16(x). */
export function roundToHalf(value: number): number {
  u32[0] = table()[floatToHalfBits(value)]!;
  return f32[0]!;
}
