/**
 * @file AdamW with 8-bit state, as bitsandbytes' `AdamW8bit` (bitsandbytes/optim/adamw.py,
 * functional.py `create_dynamic_map`, `quantize_blockwise`): both moments are kept as one byte
 * per element, blockwise — each block of `blockSize` elements stores the index of the nearest
 * value of a 256-entry code book, scaled by the block's absmax (m: signed map, v: unsigned map).
 * Every step dequantises, applies the AdamW update exactly as trainers/optim/adamw.ts (torch's
 * formula), and quantises again with the new absmax. Parameters with fewer than `minQuantSize`
 * elements keep float32 moments (bitsandbytes' `min_8bit_size` 4096).
 *
 * TF.js has no 8-bit dtype, so the byte codes are packed three to a float32 element
 * (b0 + 256·b1 + 65536·b2 < 2^24, exact in float32, unpacked with power-of-two divisions that are
 * exact on every backend): 1.33 bytes per moment element instead of 4.
 *
 * Example:
 *   const opt = new AdamW8bit(trainable, { weightDecay: 1e-2 });
 *   opt.step(grads, 5e-6);
 *   const state = await opt.exportState();   // codes (U8), absmax (F32), steps, per parameter
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { checkedUpdates } from './check.ts';
import { adamwConstants, nativeAdamw, nativeAdamw8bit, optimKernels, type OptimKernels } from './native.ts';
import type { ExportedBuffer, ExportedOptimizerState, StatefulOptimizer } from './optim-state.ts';

export type QuantMap = 'dynamic' | 'linear';

/**
 * bitsandbytes `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: per decade
 * 10^(i−6), the midpoints of a linspace(0.1, 1) with 2^i (signed) or 2^(i+1) (unsigned) bins,
 * plus 0 and 1; sorted. 256 values in [−1, 1] or [0, 1].
 */
export function dynamicMap(signed: boolean): Float32Array {
  const data: number[] = [];
  const maxExp = 7;
  for (let i = 0; i < maxExp; i++) {
    const items = signed ? 2 ** i + 1 : 2 ** (i + 1) + 1;
    const scale = 10 ** (-(maxExp - 1) + i);
    for (let j = 0; j < items - 1; j++) {
      const lo = 0.1 + (0.9 * j) / (items - 1);
      const hi = 0.1 + (0.9 * (j + 1)) / (items - 1);
      data.push(scale * ((lo + hi) / 2));
      if (signed) data.push(-scale * ((lo + hi) / 2));
    }
  }
  data.push(0, 1);
  return Float32Array.from(data.sort((a, b) => a - b));
}

/** A linear code book: linspace(−1, 1, 256) signed, linspace(0, 1, 256) unsigned. */
export function linearMap(signed: boolean): Float32Array {
  return Float32Array.from({ length: 256 }, (_, i) => (signed ? -1 + (2 * i) / 255 : i / 255));
}

/** A code book on the backend with the midpoints between neighbours (for nearest-code search). */
export class CodeBook {
  readonly code: Tensor; // [256]
  readonly mids: Tensor; // [255]
  constructor(values: Float32Array) {
    this.code = tf.tensor1d(values);
    this.mids = tf.tensor1d(midpoints(values));
  }
  dispose(): void {
    tf.dispose([this.code, this.mids]);
  }
}

/** The 255 midpoints between neighbouring codes, rounded to float32 (the nearest-code thresholds). */
export function midpoints(values: Float32Array): Float32Array {
  return values.slice(1).map((v, i) => (v + values[i]!) / 2);
}

/** A tensor quantised blockwise: packed byte codes (3 per float) and one absmax per block. */
export interface Quantized {
  packed: tf.Variable; // [ceil(blocks·blockSize / 3)]
  absmax: tf.Variable; // [blocks]
}

/** Index of the nearest code for each value in [−1, 1]: a binary search over the midpoints (8 gathers). */
function nearestCode(book: CodeBook, normed: Tensor): Tensor {
  let idx: Tensor = tf.zeros(normed.shape, 'int32');
  for (let s = 128; s >= 1; s /= 2) {
    const cand = idx.add(tf.scalar(s, 'int32'));
    const mid = tf.gather(book.mids, cand.sub(tf.scalar(1, 'int32')));
    idx = tf.where(normed.greater(mid), cand, idx);
  }
  return idx;
}

/** Quantise `x` (any shape, `n` elements) blockwise: [packed, absmax] tensors. */
export function quantizeBlockwise(book: CodeBook, x: Tensor, blockSize: number): [Tensor, Tensor] {
  return tf.tidy(() => {
    const n = x.size;
    const blocks = Math.ceil(n / blockSize);
    const flat = x.reshape([n]).pad([[0, blocks * blockSize - n]]).reshape([blocks, blockSize]);
    const absmax = flat.abs().max(1, true); // [blocks, 1]
    const normed = flat.div(tf.where(absmax.greater(0), absmax, tf.onesLike(absmax)));
    const idx = nearestCode(book, normed.reshape([blocks * blockSize])).toFloat();
    const len = Math.ceil((blocks * blockSize) / 3) * 3;
    const triples = idx.pad([[0, len - blocks * blockSize]]).reshape([len / 3, 3]);
    const packed = triples.mul(tf.tensor1d([1, 256, 65536])).sum(1);
    return [packed, absmax.reshape([blocks])];
  });
}

/** The byte codes of a packed tensor, float32 0…255 (exact: divisions by powers of two). */
export function unpackCodes(packed: Tensor): Tensor {
  return tf.tidy(() => {
    const b2 = packed.div(65536).floor();
    const rest = packed.sub(b2.mul(65536));
    const b1 = rest.div(256).floor();
    const b0 = rest.sub(b1.mul(256));
    return tf.stack([b0, b1, b2], 1).reshape([packed.size * 3]);
  });
}

/** Inverse of quantizeBlockwise: values in `shape`. */
export function dequantizeBlockwise(book: CodeBook, packed: Tensor, absmax: Tensor, shape: number[], blockSize: number): Tensor {
  return tf.tidy(() => {
    const n = shape.reduce((a, b) => a * b, 1);
    const blocks = absmax.size;
    const codes = unpackCodes(packed).slice(0, blocks * blockSize).toInt();
    const values = tf.gather(book.code, codes).reshape([blocks, blockSize]).mul(absmax.reshape([blocks, 1]));
    return values.reshape([blocks * blockSize]).slice(0, n).reshape(shape);
  });
}

export interface AdamW8bitOptions {
  betas?: [number, number];
  eps?: number;
  /** bitsandbytes AdamW8bit default 1e-2. */
  weightDecay?: number;
  /** Elements per absmax block; default 2048, 256 for parameters under 64 Ki elements. */
  blockSize?: number;
  /** Parameters smaller than this keep float32 moments (bitsandbytes min_8bit_size 4096). */
  minQuantSize?: number;
  /** Code book: bitsandbytes' dynamic tree map (default) or linear. */
  quantMap?: QuantMap;
}

interface Slot {
  step: number;
  blockSize: number;
  /** 8-bit moments, or float32 ones for small parameters. */
  m: Quantized | tf.Variable;
  v: Quantized | tf.Variable;
}

const isQuantized = (s: Quantized | tf.Variable): s is Quantized => (s as Quantized).packed !== undefined;

export class AdamW8bit implements StatefulOptimizer {
  readonly params: Map<string, tf.Variable>;
  betas: [number, number];
  eps: number;
  weightDecay: number;
  readonly minQuantSize: number;
  readonly quantMap: QuantMap;
  private readonly blockSize?: number;
  private readonly signed: CodeBook;
  private readonly unsigned: CodeBook;
  /** Both code books and their midpoints for the native kernel (trainers/optim/native.ts). */
  private readonly books: Float32Array;
  private readonly slots = new Map<string, Slot>();

  constructor(params: Map<string, tf.Variable>, opts: AdamW8bitOptions = {}) {
    this.params = params;
    this.betas = opts.betas ?? [0.9, 0.999];
    this.eps = opts.eps ?? 1e-8;
    this.weightDecay = opts.weightDecay ?? 1e-2;
    this.blockSize = opts.blockSize;
    this.minQuantSize = opts.minQuantSize ?? 4096;
    this.quantMap = opts.quantMap ?? 'dynamic';
    const map = this.quantMap === 'linear' ? linearMap : dynamicMap;
    const [signed, unsigned] = [map(true), map(false)];
    this.signed = new CodeBook(signed);
    this.unsigned = new CodeBook(unsigned);
    this.books = Float32Array.from([...signed, ...midpoints(signed), ...unsigned, ...midpoints(unsigned)]);
  }

  blockSizeFor(n: number): number {
    return this.blockSize ?? (n < 65536 ? 256 : 2048);
  }

  /** One update; grads keyed like params (missing = skipped), not disposed. */
  step(grads: Map<string, Tensor>, lr: number): void {
    for (const [name, p, g] of checkedUpdates('AdamW8bit', this.params, grads, lr)) this.update(p, g, this.slot(name, p), lr);
  }

  private slot(name: string, p: tf.Variable): Slot {
    let s = this.slots.get(name);
    if (!s) {
      const blockSize = this.blockSizeFor(p.size);
      const zeros = () => (p.size < this.minQuantSize ? tf.tidy(() => tf.variable(tf.zerosLike(p), false)) : this.emptyQuantized(p.size, blockSize));
      s = { step: 0, blockSize, m: zeros(), v: zeros() };
      this.slots.set(name, s);
    }
    return s;
  }

  private emptyQuantized(n: number, blockSize: number): Quantized {
    const blocks = Math.ceil(n / blockSize);
    // absmax 0 dequantises every code to 0, whatever the code
    const [packed, absmax] = tf.tidy(() => [tf.variable(tf.zeros([Math.ceil((blocks * blockSize) / 3)]), false), tf.variable(tf.zeros([blocks]), false)]);
    return { packed: packed as tf.Variable, absmax: absmax as tf.Variable };
  }

  private read(q: Quantized | tf.Variable, book: CodeBook, shape: number[], blockSize: number): Tensor {
    return isQuantized(q) ? dequantizeBlockwise(book, q.packed, q.absmax, shape, blockSize) : q;
  }

  private write(q: Quantized | tf.Variable, book: CodeBook, value: Tensor, blockSize: number): void {
    if (!isQuantized(q)) return void q.assign(value);
    const [packed, absmax] = quantizeBlockwise(book, value, blockSize);
    q.packed.assign(packed);
    q.absmax.assign(absmax);
  }

  private update(p: tf.Variable, g: Tensor, s: Slot, lr: number): void {
    const [beta1, beta2] = this.betas;
    s.step += 1;
    const bc1 = 1 - beta1 ** s.step;
    const bc2Sqrt = Math.sqrt(1 - beta2 ** s.step);
    const kernels = optimKernels();
    if (kernels && this.nativeUpdate(kernels, p, g, s, adamwConstants(lr, this.weightDecay, this.betas, this.eps, bc1, bc2Sqrt))) return;
    tf.tidy(() => {
      const param = this.weightDecay !== 0 ? p.mul(1 - lr * this.weightDecay) : p;
      const m = this.read(s.m, this.signed, p.shape, s.blockSize).mul(beta1).add(g.mul(1 - beta1));
      const v = this.read(s.v, this.unsigned, p.shape, s.blockSize).mul(beta2).add(g.mul(g).mul(1 - beta2));
      const denom = v.sqrt().div(bc2Sqrt).add(this.eps);
      p.assign(param.add(m.div(denom).mul(-lr / bc1)));
      this.write(s.m, this.signed, m, s.blockSize);
      this.write(s.v, this.unsigned, v, s.blockSize);
    });
  }

  /** The fused kernel: the same float32 operations and the same codes as the TF ops below. */
  private nativeUpdate(kernels: OptimKernels, p: tf.Variable, g: Tensor, s: Slot, k: Float32Array): boolean {
    if (isQuantized(s.m) && isQuantized(s.v)) return nativeAdamw8bit(kernels, p, g, s.m, s.v, this.books, k, s.blockSize);
    if (!isQuantized(s.m) && !isQuantized(s.v)) return nativeAdamw(kernels, p, g, s.m, s.v, k);
    return false;
  }

  stepCount(name: string): number {
    return this.slots.get(name)?.step ?? 0;
  }

  /** bitsandbytes' state layout per parameter: state1/state2 (U8 codes) + absmax1/absmax2, or F32 moments. */
  async exportState(lazy = false): Promise<ExportedOptimizerState> {
    const params: ExportedOptimizerState['params'] = new Map();
    for (const [name, s] of this.slots) {
      const buffers = new Map<string, ExportedBuffer>();
      for (const [key, q] of [['1', s.m], ['2', s.v]] as const) {
        if (isQuantized(q)) {
          const read = async () => {
            const codes = unpackCodes(q.packed);
            try {
              return Uint8Array.from((await codes.data()) as Float32Array);
            } finally {
              codes.dispose();
            }
          };
          buffers.set(`state${key}`, { dtype: 'U8', shape: [q.packed.size * 3], data: lazy ? read : await read() });
          buffers.set(`absmax${key}`, { dtype: 'F32', shape: [q.absmax.size], data: (await q.absmax.data()) as Float32Array });
        } else {
          buffers.set(`state${key}`, { dtype: 'F32', shape: [...q.shape], data: (await q.data()) as Float32Array });
        }
      }
      params.set(name, { step: s.step, buffers });
    }
    const hyper = { betas: this.betas, eps: this.eps, weightDecay: this.weightDecay, minQuantSize: this.minQuantSize, quantMap: this.quantMap, blockSize: this.blockSize ?? null };
    return { optimizer: 'adamw8bit', hyper, params };
  }

  /** Restore an exported state (checked against these parameters before anything is replaced). */
  importState(state: ExportedOptimizerState): void {
    if (state.optimizer !== 'adamw8bit') throw new Error(`AdamW8bit: the saved state is for ${state.optimizer}`);
    const loaded = new Map<string, Slot>();
    try {
      for (const [name, entry] of state.params) {
        const p = this.params.get(name);
        if (!p) throw new Error(`AdamW8bit state: '${name}' is not a trained parameter`);
        const blockSize = this.blockSizeFor(p.size);
        const slot: Slot = { step: entry.step, blockSize, m: undefined as never, v: undefined as never };
        loaded.set(name, slot);
        slot.m = this.importMoment(name, p, entry.buffers, '1', blockSize);
        slot.v = this.importMoment(name, p, entry.buffers, '2', blockSize);
      }
    } catch (err) {
      for (const s of loaded.values()) disposeSlot(s);
      throw err;
    }
    for (const s of this.slots.values()) disposeSlot(s);
    this.slots.clear();
    for (const [k, s] of loaded) this.slots.set(k, s);
  }

  private importMoment(name: string, p: tf.Variable, buffers: Map<string, ExportedBuffer>, key: '1' | '2', blockSize: number): Quantized | tf.Variable {
    const state = buffers.get(`state${key}`);
    if (!state) throw new Error(`AdamW8bit state: '${name}' has no state${key}`);
    if (state.dtype === 'F32') {
      if (state.data.length !== p.size) throw new Error(`AdamW8bit state: '${name}' state${key} has ${state.data.length} values, expected ${p.size}`);
      return tf.tidy(() => tf.variable(tf.tensor(state.data as Float32Array, p.shape), false));
    }
    const blocks = Math.ceil(p.size / blockSize);
    const absmax = buffers.get(`absmax${key}`);
    if (!absmax || absmax.data.length !== blocks) throw new Error(`AdamW8bit state: '${name}' absmax${key} does not have ${blocks} blocks`);
    const len = Math.ceil((blocks * blockSize) / 3) * 3;
    const codes = state.data as Uint8Array;
    if (codes.length !== len) throw new Error(`AdamW8bit state: '${name}' state${key} has ${codes.length} codes, expected ${len}`);
    const [packed, scales] = tf.tidy(() => {
      const triples = tf.tensor2d(Float32Array.from(codes), [len / 3, 3]);
      return [tf.variable(triples.mul(tf.tensor1d([1, 256, 65536])).sum(1), false), tf.variable(tf.tensor1d(absmax.data as Float32Array), false)];
    });
    return { packed: packed as tf.Variable, absmax: scales as tf.Variable };
  }

  dispose(): void {
    for (const s of this.slots.values()) disposeSlot(s);
    this.slots.clear();
    this.signed.dispose();
    this.unsigned.dispose();
  }
}

function disposeSlot(s: Slot): void {
  for (const q of [s.m, s.v]) {
    if (!q) continue;
    if (isQuantized(q)) tf.dispose([q.packed, q.absmax]);
    else q.dispose();
  }
}
