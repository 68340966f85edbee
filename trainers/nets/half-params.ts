/**
 * @file Frozen weights kept in float16 (the `halfFrozenWeights` job option, memory-options.ts):
 * a `Params` whose frozen entries are float16 bits in a Uint16Array outside TF.js (which has no
 * float16 dtype) and become a float32 tensor only when a layer reads them. `get(key)` makes a
 * fresh tensor in the caller's scope, so inside unetForward's tf.tidy it is freed when the
 * forward ends — or, with gradient checkpointing, when the block's scope ends, unless the tape
 * kept it for the backward pass. The frozen SD1.5 UNet then costs 1.7 GB instead of 3.4 GB.
 *
 * Numbers: a read returns exactly float32(float16(w)), what PyTorch's `.half()` then `.float()`
 * gives (round to nearest even); an F16 checkpoint's own bits are used unchanged. A tensor with
 * a value beyond ±65504 stays float32 (float16 would make it Inf); BF16 weights below 6e-5 lose
 * bits as float16 subnormals (negligible next to the weights around them).
 *
 * Training: without gradient checkpointing the tape keeps every upcast weight for the backward
 * pass (matMul/conv2d gradients need W), so a step's peak holds float16 AND float32 copies;
 * with checkpointing only the running block's float32 weights are alive.
 *
 * Iteration (`for of`, entries(), values(), forEach) yields materialised tensors one at a time,
 * lazily; they are the caller's to dispose (or to leave to an enclosing tidy). keys()/has()/size
 * never materialise anything. A tensor `set` in (e.g. a tf.Variable) is stored as is.
 *
 * Conversion: the native addon (native/src/half.cc: F16C, multi-threaded) when it is built,
 * else the pure-JS converters of io/half.ts (same bits), so the WASM and pure-CPU backends get it too.
 *
 * Under bf16 precision (backend/precision.ts) the store holds bfloat16 instead (format 'bf16'):
 * the same 2 bytes a weight, a read is float32(bf16(w)) — exactly the operand the bf16 kernels
 * round to anyway, so the store costs no accuracy beyond the precision's own — and nothing
 * overflows (bf16 has float32's range). A BF16 checkpoint's own bits are used unchanged.
 */
import { tf, type Tensor } from '../backend/tf.ts';
import type { TensorSource } from '../io/types.ts';
import { loadAddon, type NativeAddon } from '../backend/native/addon.ts';
import { paramFromTorch, type Params } from './params.ts';
import { decodeHalfInto, floatBitsToHalfBits } from '../io/half.ts';
import { checkUnetKeys, unetConfigFromKeys, type HeadOverrides, type UNetConfig } from './unet.ts';

// ---------------------------------------------------------------------------------------------
// Conversion

let addon: NativeAddon | null | undefined;
function native(): NativeAddon | null {
  if (addon === undefined) {
    try {
      addon = loadAddon();
      if (typeof addon.halfToFloat !== 'function') addon = null; // an addon built before half.cc
    } catch {
      addon = null;
    }
  }
  return addon;
}

/** Which converter runs: 'f16c' / 'portable' (native addon) or 'js'. */
export function halfConverter(): string {
  return native()?.halfIsa() ?? 'js';
}

/** float16 bits → float32, pure JS (bit-exact with the native converter). */
export function halfToFloat32Js(bits: Uint16Array, out = new Float32Array(bits.length)): Float32Array {
  return decodeHalfInto(bits, out);
}

/** float32 → float16 bits, round to nearest even, pure JS; `overflow` counts finite values that became ±Inf. */
export function float32ToHalfJs(values: Float32Array, out = new Uint16Array(values.length)): { bits: Uint16Array; overflow: number } {
  const x32 = new Uint32Array(values.buffer, values.byteOffset, values.length);
  let overflow = 0;
  for (let i = 0; i < values.length; i++) {
    const h = floatBitsToHalfBits(x32[i]!);
    if ((h & 0x7fff) === 0x7c00 && (x32[i]! & 0x7f800000) !== 0x7f800000) overflow++;
    out[i] = h;
  }
  return { bits: out, overflow };
}

/** float16 bits → float32 (native when built). */
export function halfToFloat32(bits: Uint16Array, out = new Float32Array(bits.length)): Float32Array {
  const a = native();
  if (!a) return halfToFloat32Js(bits, out);
  a.halfToFloat(bits, out);
  return out;
}

/** float32 → float16 bits (native when built), and how many finite values overflowed to ±Inf. */
export function float32ToHalf(values: Float32Array, out = new Uint16Array(values.length)): { bits: Uint16Array; overflow: number } {
  const a = native();
  if (!a) return float32ToHalfJs(values, out);
  return { bits: out, overflow: a.floatToHalf(values, out) };
}

// ---------------------------------------------------------------------------------------------
// The store

/** The store's 16-bit format: IEEE float16 or bfloat16. */
export type HalfFormat = 'f16' | 'bf16';

/** bfloat16 bits → float32 (exact: the top half of a float32). */
export function bf16ToFloat32(bits: Uint16Array, out = new Float32Array(bits.length)): Float32Array {
  const o = new Uint32Array(out.buffer, out.byteOffset, bits.length);
  for (let i = 0; i < bits.length; i++) o[i] = bits[i]! << 16;
  return out;
}

/** float32 → bfloat16 bits, round to nearest even (io/half.ts floatToBf16Bits, on a whole array). */
export function float32ToBf16(values: Float32Array, out = new Uint16Array(values.length)): Uint16Array {
  const x = new Uint32Array(values.buffer, values.byteOffset, values.length);
  for (let i = 0; i < x.length; i++) {
    const u = x[i]!;
    out[i] = (u & 0x7fffffff) > 0x7f800000 ? (u >>> 16) | 0x40 : (u + 0x7fff + ((u >>> 16) & 1)) >>> 16;
  }
  return out;
}

/** One frozen weight as float16 (or bfloat16) bits, already in the params.ts layout (conv filters TF-style). */
export class HalfTensor {
  constructor(
    readonly bits: Uint16Array,
    readonly shape: number[],
    readonly format: HalfFormat = 'f16',
  ) {}
  /** A new float32 tensor in the current tf scope. */
  materialise(): Tensor {
    return tf.tensor(this.format === 'bf16' ? bf16ToFloat32(this.bits) : halfToFloat32(this.bits), this.shape, 'float32');
  }
}

/** What a HalfParams holds, for logs and benches. */
export interface HalfReport {
  halfTensors: number;
  halfBytes: number;
  floatTensors: number;
  floatBytes: number;
}

/**
 * Params with some entries held as float16. Key order is the order entries were added.
 * NOT for weights that train: a read is a new tensor each time, so nothing could update it.
 */
export class HalfParams extends Map<string, Tensor> {
  private readonly store = new Map<string, Tensor | HalfTensor>();

  constructor() {
    super();
  }
  setHalf(key: string, value: HalfTensor): this {
    this.store.set(key, value);
    return this;
  }
  override set(key: string, value: Tensor): this {
    this.store.set(key, value);
    return this;
  }
  /** The tensor for `key`: a float16 entry is materialised (a new float32 tensor each call). */
  override get(key: string): Tensor | undefined {
    const e = this.store.get(key);
    return e instanceof HalfTensor ? e.materialise() : e;
  }
  /** The stored entry without materialising it. */
  raw(key: string): Tensor | HalfTensor | undefined {
    return this.store.get(key);
  }
  isHalf(key: string): boolean {
    return this.store.get(key) instanceof HalfTensor;
  }
  override has(key: string): boolean {
    return this.store.has(key);
  }
  override get size(): number {
    return this.store.size;
  }
  /** Drops the entry (a Map never disposes what it drops; neither does this). */
  override delete(key: string): boolean {
    return this.store.delete(key);
  }
  override clear(): void {
    this.store.clear();
  }
  override keys(): MapIterator<string> {
    return this.store.keys();
  }
  override *values(): MapIterator<Tensor> {
    for (const k of this.store.keys()) yield this.get(k)!;
  }
  override *entries(): MapIterator<[string, Tensor]> {
    for (const k of this.store.keys()) yield [k, this.get(k)!];
  }
  override [Symbol.iterator](): MapIterator<[string, Tensor]> {
    return this.entries();
  }
  override forEach(fn: (value: Tensor, key: string, map: Map<string, Tensor>) => void, thisArg?: unknown): void {
    for (const [k, v] of this.entries()) fn.call(thisArg, v, k, this);
  }
  /** Disposes the float32 tensors held and drops everything (disposeParams would materialise each half entry first). */
  dispose(): void {
    for (const e of this.store.values()) if (!(e instanceof HalfTensor)) e.dispose();
    this.store.clear();
  }
  report(): HalfReport {
    const r: HalfReport = { halfTensors: 0, halfBytes: 0, floatTensors: 0, floatBytes: 0 };
    for (const e of this.store.values()) {
      if (e instanceof HalfTensor) (r.halfTensors++, (r.halfBytes += e.bits.byteLength));
      else (r.floatTensors++, (r.floatBytes += e.size * 4));
    }
    return r;
  }
}

// ---------------------------------------------------------------------------------------------
// Making one

/**
 * Convert the frozen float32 entries of `params` to float16 (the originals are disposed and
 * `params` is emptied); entries with `keep(key)`, tf.Variables, non-float32 tensors and
 * tensors with values beyond float16's range (±65504, which would become Inf) stay as they are.
 */
export async function halfFrozen(params: Params, keep: (key: string) => boolean = () => false, format: HalfFormat = 'f16'): Promise<HalfParams> {
  const out = params instanceof HalfParams ? params : new HalfParams();
  for (const key of [...params.keys()]) {
    const t = params instanceof HalfParams ? params.raw(key)! : params.get(key)!;
    if (t instanceof HalfTensor) continue;
    const frozen = !keep(key) && !(t instanceof tf.Variable) && t.dtype === 'float32';
    const values = frozen ? ((await t.data()) as Float32Array) : undefined;
    const half = values && (format === 'bf16' ? { bits: float32ToBf16(values), overflow: 0 } : float32ToHalf(values));
    if (!half || half.overflow > 0) {
      out.set(key, t); // same position when `out` is `params` (Map.set keeps an existing key's place)
      continue;
    }
    out.setHalf(key, new HalfTensor(half.bits, [...t.shape], format));
    t.dispose();
  }
  if (out !== params) params.clear();
  return out;
}

/** A source that can hand over stored bytes (safetensors and torch-zip files; not the normaliseKeys wrapper). */
type RawSource = TensorSource & { readRaw?(key: string): Promise<Uint8Array> };

/** PyTorch [out, in, kh, kw] → TF [kh, kw, in, out] on float16 bits (params.ts layout rule). */
function torchToTfConvBits(src: Uint16Array, [o, i, kh, kw]: number[]): Uint16Array {
  const dst = new Uint16Array(src.length);
  const inner = i! * kh! * kw!;
  for (let a = 0; a < o!; a++) {
    for (let b = 0; b < i!; b++) {
      for (let y = 0; y < kh!; y++) {
        for (let x = 0; x < kw!; x++) dst[((y * kw! + x) * i! + b) * o! + a] = src[a * inner + (b * kh! + y) * kw! + x]!;
      }
    }
  }
  return dst;
}

/** One tensor of `source` as float16 (bfloat16) bits in params.ts layout, or float32 values when it does not fit float16. */
async function readHalf(source: RawSource, key: string, format: HalfFormat): Promise<HalfTensor | Float32Array> {
  const { dtype, shape } = source.info(key);
  let bits: Uint16Array;
  if (dtype === (format === 'bf16' ? 'BF16' : 'F16') && source.readRaw) {
    const bytes = await source.readRaw(key); // the file's own bits, no conversion
    bits = bytes.byteOffset % 2 === 0 ? new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2) : new Uint16Array(bytes.slice().buffer);
  } else {
    const values = await source.read(key);
    const half = format === 'bf16' ? { bits: float32ToBf16(values), overflow: 0 } : float32ToHalf(values);
    if (half.overflow > 0) return values;
    bits = half.bits;
  }
  return new HalfTensor(shape.length === 4 ? torchToTfConvBits(bits, shape) : bits, shape.length === 4 ? [shape[2]!, shape[3]!, shape[1]!, shape[0]!] : shape, format);
}

/**
 * loadParams (params.ts) straight to float16: keys under `prefixes` (and not skipped) are read
 * one at a time, so the float32 model never exists whole; `keep(key)` ones load as float32.
 */
export async function loadHalfParams(
  source: TensorSource,
  prefixes: string[],
  keep: (key: string) => boolean = () => false,
  skip: (key: string) => boolean = () => false,
  format: HalfFormat = 'f16',
): Promise<HalfParams> {
  const params = new HalfParams();
  for (const key of source.keys()) {
    if (!prefixes.some((p) => key.startsWith(p)) || skip(key)) continue;
    if (keep(key)) {
      params.set(key, paramFromTorch(await source.read(key), source.info(key).shape));
      continue;
    }
    const h = await readHalf(source, key, format);
    if (h instanceof HalfTensor) params.setHalf(key, h);
    else params.set(key, paramFromTorch(h, source.info(key).shape));
  }
  return params;
}

/** loadUnet (unet.ts) with the frozen weights in float16. */
export async function loadUnetHalf(
  source: TensorSource,
  overrides: HeadOverrides = {},
  keep: (key: string) => boolean = () => false,
  format: HalfFormat = 'f16',
): Promise<{ params: HalfParams; cfg: UNetConfig }> {
  const shapes = new Map(source.keys().map((k) => [k, source.info(k).shape] as [string, number[]]));
  const cfg = unetConfigFromKeys(shapes, overrides);
  checkUnetKeys(shapes, cfg);
  return { params: await loadHalfParams(source, [cfg.prefix], keep, undefined, format), cfg };
}

/**
 * A view of `base` with `over`'s entries in front (neither is copied or iterated), e.g. a UNet
 * with merged LoRA weights for a preview: `new Map([...base, ...over])` would materialise every
 * float16 weight of a HalfParams base at once. `set` writes to the view only.
 */
export function overlayParams(base: Params, over: Params = new Map()): Params {
  return new OverlayParams(base, new Map(over));
}

class OverlayParams extends Map<string, Tensor> {
  constructor(
    private readonly base: Params,
    private readonly over: Map<string, Tensor>,
  ) {
    super();
  }
  override get(key: string): Tensor | undefined {
    return this.over.has(key) ? this.over.get(key) : this.base.get(key);
  }
  override has(key: string): boolean {
    return this.over.has(key) || this.base.has(key);
  }
  override set(key: string, value: Tensor): this {
    this.over.set(key, value);
    return this;
  }
  override delete(): boolean {
    throw new Error('overlayParams: read-only view (delete)');
  }
  override clear(): void {
    throw new Error('overlayParams: read-only view (clear)');
  }
  override get size(): number {
    let extra = 0;
    for (const k of this.over.keys()) if (!this.base.has(k)) extra++;
    return this.base.size + extra;
  }
  override *keys(): MapIterator<string> {
    yield* this.base.keys();
    for (const k of this.over.keys()) if (!this.base.has(k)) yield k;
  }
  override *values(): MapIterator<Tensor> {
    for (const k of this.keys()) yield this.get(k)!;
  }
  override *entries(): MapIterator<[string, Tensor]> {
    for (const k of this.keys()) yield [k, this.get(k)!];
  }
  override [Symbol.iterator](): MapIterator<[string, Tensor]> {
    return this.entries();
  }
  override forEach(fn: (value: Tensor, key: string, map: Map<string, Tensor>) => void, thisArg?: unknown): void {
    for (const [k, v] of this.entries()) fn.call(thisArg, v, k, this);
  }
}
