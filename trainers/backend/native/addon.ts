/**
 * @file Loads the C++ addon built from native/ (by `npm install` → scripts/build-native.mjs)
 * and describes its functions. Loading throws a one-line reason when the addon is missing,
 * e.g. the build error recorded in native/build-error.txt.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The addon's exports (native/src/addon.cc). Outputs are allocated by the caller. */
export interface NativeAddon {
  /**
   * shape: Int32Array [batch, inH, inW, inC, outH, outW, outC, fH, fW, sH, sW, dH, dW, padTop, padLeft];
   * bf16: operands rounded to bfloat16, float32 accumulation (native/src/bf16.h).
   */
  conv2d(x: Float32Array, filter: Float32Array, y: Float32Array, shape: Int32Array, bf16?: boolean): void;
  conv2dBackpropInput(dy: Float32Array, filter: Float32Array, dx: Float32Array, shape: Int32Array, bf16?: boolean): void;
  conv2dBackpropFilter(x: Float32Array, dy: Float32Array, dw: Float32Array, shape: Int32Array): void;
  /** out[i] = op(a at aOffsets[i]) · op(b at bOffsets[i]), each [M,K]·[K,N] before transposes. */
  matmul(
    a: Float32Array, b: Float32Array, out: Float32Array, aOffsets: Float64Array, bOffsets: Float64Array,
    M: number, N: number, K: number, transposeA: boolean, transposeB: boolean, bf16?: boolean,
  ): void;
  /**
   * The bf16 GEMM kernel in use: 'amx', 'avx512-bf16', 'avx512-fma' (float32 FMA on zmm on the
   * upconverted values; picked over avx512-bf16 where vdpbf16ps is the slower of the two) or
   * 'portable' (the same float32 arithmetic in plain C++); the last three give the same sums. With
   * an argument, first caps the choice at that kernel ('' = the best this CPU has; env
   * SIDETRAIN_BF16_ISA sets the cap at load).
   */
  bf16Isa?(cap?: '' | 'amx' | 'avx512-bf16' | 'avx512-fma' | 'portable'): string;
  /** One core's GFLOP/s on a register-resident loop ('fp32-fma', 'avx512-bf16', 'amx'), -1 when absent. */
  peakProbe?(kind: 'fp32-fma' | 'avx512-bf16' | 'amx', seconds: number): number;
  /** y[r,:] = softmax(x[r,:]) over rows × n. */
  softmax(x: Float32Array, y: Float32Array, rows: number, n: number): void;
  /** out = a op b (0 add, 1 sub, 2 mul, 3 div) over shape, with element strides (0 = broadcast). */
  binary(op: number, a: Float32Array, b: Float32Array, out: Float32Array, shape: Float64Array, aStrides: Float64Array, bStrides: Float64Array): void;
  /** dst[dstOffset + Σ i·dstStrides] = src[srcOffset + Σ i·srcStrides] for every index i of shape. */
  copy(src: Float32Array, dst: Float32Array, shape: Float64Array, srcStrides: Float64Array, dstStrides: Float64Array, srcOffset: number, dstOffset: number): void;
  /** out = Σ float(x / divisor) over the dim groups flagged 1 in reduced (x contiguous over sizes). */
  reduceSum(x: Float32Array, out: Float32Array, sizes: Float64Array, reduced: Float64Array, divisor: number): void;
  /** y = op(x): 0 neg, 1 exp, 2 sigmoid, 3 erf, 4 square, 5 sqrt (the stock kernels' formulas). */
  unary(op: number, x: Float32Array, y: Float32Array): void;
  /** dst = float32(src) for float16 bits (exact; native/src/half.cc). dst at least as long as src. */
  halfToFloat(src: Uint16Array, dst: Float32Array): void;
  /** dst = float16 bits of src, round to nearest even; returns how many finite values overflowed to ±Inf. */
  floatToHalf(src: Float32Array, dst: Uint16Array): number;
  /** 'f16c' when the conversions use the CPU's F16C instructions, else 'portable'. */
  halfIsa(): string;
  /**
   * GroupNorm forward on NHWC x viewed as [B, HW, C] with G groups (native/src/norm.cc): y, and
   * the per-(b, g) mean and 1/sqrt(var + eps) [B·G] saved for the backward. silu: y = silu(norm(x)).
   * dims: [B, HW, C, G].
   */
  groupNormForward?(
    x: Float32Array, weight: Float32Array, bias: Float32Array, y: Float32Array, mean: Float32Array, rstd: Float32Array,
    dims: Float64Array, eps: number, silu: boolean,
  ): void;
  /** GroupNorm (+ SiLU when silu) backward: dx, dweight [C], dbias [C] from dy and the forward's x, mean, rstd. */
  groupNormBackward?(
    dy: Float32Array, x: Float32Array, mean: Float32Array, rstd: Float32Array, weight: Float32Array, bias: Float32Array,
    dx: Float32Array, dweight: Float32Array, dbias: Float32Array, dims: Float64Array, silu: boolean,
  ): void;
  /** LayerNorm over the last axis of x [rows, n]: y, and the per-row mean and rstd [rows]. */
  layerNormForward?(
    x: Float32Array, weight: Float32Array, bias: Float32Array, y: Float32Array, mean: Float32Array, rstd: Float32Array,
    rows: number, n: number, eps: number,
  ): void;
  /** LayerNorm backward: dx, dweight [n], dbias [n]. */
  layerNormBackward?(
    dy: Float32Array, x: Float32Array, mean: Float32Array, rstd: Float32Array, weight: Float32Array,
    dx: Float32Array, dweight: Float32Array, dbias: Float32Array, rows: number, n: number,
  ): void;
  /** y = act(x) (0 SiLU x·sigmoid(x), 1 exact GELU x·Φ(x)). */
  activationForward?(op: number, x: Float32Array, y: Float32Array): void;
  /** dx = dy · act'(x) for the same ops. */
  activationBackward?(op: number, dy: Float32Array, x: Float32Array, dx: Float32Array): void;
  /**
   * AdamW step (native/src/optim.cc) with trainers/optim/adamw.ts's float32 op order, into new arrays:
   * k = Float32Array [1 − lr·wd, β1, 1 − β1, β2, 1 − β2, √bc2, eps, −lr/bc1].
   */
  adamwStep?(p: Float32Array, g: Float32Array, m: Float32Array, v: Float32Array, pOut: Float32Array, mOut: Float32Array, vOut: Float32Array, k: Float32Array): void;
  /**
   * 8-bit AdamW step on blockwise-quantised moments (codes packed 3 per float32, absmax per block),
   * as trainers/optim/adamw8bit.ts; books = [signed code 256, signed mids 255, unsigned code 256, unsigned mids 255].
   */
  adamw8bitStep?(
    p: Float32Array, g: Float32Array, mPacked: Float32Array, mAbsmax: Float32Array, vPacked: Float32Array, vAbsmax: Float32Array,
    pOut: Float32Array, mPackedOut: Float32Array, mAbsmaxOut: Float32Array, vPackedOut: Float32Array, vAbsmaxOut: Float32Array,
    books: Float32Array, k: Float32Array, blockSize: number,
  ): void;
  /** out = float32(decay·shadow + (1 − decay)·param) computed in float64, as trainers/optim/ema.ts (out may be shadow). */
  emaUpdate?(shadow: Float32Array, param: Float32Array, out: Float32Array, decay: number): void;
  /**
   * Adafactor step for one parameter (native/src/optim.cc) with trainers/optim/adafactor.ts's float32
   * op order, into new arrays. The parameter is viewed in torch layout as dims [d0, d1, R, C] with
   * the element strides of those dims in p/g; 1-D params as [1, 1, N, 1] (unfactored: row = full V,
   * col empty). k = [β2t, 1 − β2t, eps1, clipThreshold, eps2, lr, β1, 1 − β1, weightDecay];
   * flags bit 0 factored, 1 scaleParameter, 2 first moment m (torch layout, else empty), 3 weight decay.
   */
  adafactorStep?(
    p: Float32Array, g: Float32Array, row: Float32Array, col: Float32Array, m: Float32Array,
    pOut: Float32Array, rowOut: Float32Array, colOut: Float32Array, mOut: Float32Array,
    dims: Float64Array, strides: Float64Array, k: Float32Array, flags: number,
  ): void;
  /** Whether every value is finite with |x| ≤ maxAbs. */
  finiteWithin?(x: Float32Array, maxAbs: number): boolean;
  /** Σ x² in float64. */
  sumSquares?(x: Float32Array): number;
  /**
   * Fused attention (native/src/attention.cc), per head: out = softmax(q·kᵀ·scale)·v and the
   * per-row log-sum-exp. q/out [batch, tq, heads·d], k/v [batch, tk, heads·d] (heads interleaved
   * in the channels; heads = 1 for [bh, t, d]), lse [batch·heads, tq]; scale > 0. bf16: the
   * products' operands (q, k, v, probabilities; in the backward also dout and the score gradient)
   * rounded to bf16, float32 accumulation, softmax statistics in float32.
   */
  attentionForward?(q: Float32Array, k: Float32Array, v: Float32Array, out: Float32Array, lse: Float32Array, batch: number, heads: number, tq: number, tk: number, d: number, scale: number, bf16?: boolean): void;
  /** Its gradients dq, dk, dv for dout, from the forward's out and lse (scores recomputed a block at a time). */
  attentionBackward?(
    q: Float32Array, k: Float32Array, v: Float32Array, out: Float32Array, dout: Float32Array, lse: Float32Array,
    dq: Float32Array, dk: Float32Array, dv: Float32Array, batch: number, heads: number, tq: number, tk: number, d: number, scale: number, bf16?: boolean,
  ): void;
  /** Threads in the pool, the ISA variant in use and the path each kernel class runs. */
  info(): NativeInfo;
  /** The ISA variants this CPU runs (and this build has), best first (native/src/dispatch.cc). */
  isaVariants?: NativeIsa[];
  /** SIDETRAIN_CPU_ISA as read at load, when set. */
  isaCap?: NativeIsa;
  /** That variant's kernels (tests compare them); throws when the CPU does not run it. */
  variant?(isa: NativeIsa): NativeAddon;
}

/**
 * The kernels' ISA variants (native/src/variant.h): AVX-512 (F/BW/VL/DQ/CD), AVX2 + FMA + F16C,
 * and portable (the baseline ISA: SSE2 on x86-64, plain C++ elsewhere), picked at load — the best
 * this CPU runs, capped by env SIDETRAIN_CPU_ISA.
 */
export type NativeIsa = 'avx512' | 'avx2' | 'portable';

export interface NativeInfo {
  threads: number;
  isa: NativeIsa;
  /** Path per kernel class: gemm, conv, attention, norm, elementwise, optim (the variant), half ('f16c' | 'portable'), bf16 (bf16Isa()). */
  kernels?: Record<string, string>;
}

/** One line for logs: the ISA variant, the bf16 and float16 paths, and the threads. */
export function describeNative(addon: NativeAddon): string {
  const info = addon.info();
  const k = info.kernels;
  const cap = addon.isaCap && addon.isaCap !== info.isa ? ` (SIDETRAIN_CPU_ISA=${addon.isaCap})` : '';
  const paths = k ? `, bf16 ${k.bf16}, float16 ${k.half}` : '';
  return `${info.isa} kernels${cap}${paths}, ${info.threads} threads`;
}

const builtPath = fileURLToPath(new URL('../../../native/build/Release/sidetrain_native.node', import.meta.url));
/** The addon file; SIDETRAIN_NATIVE_ADDON points the loader elsewhere (the test of a missing addon does). */
export const addonPath = process.env.SIDETRAIN_NATIVE_ADDON ? resolve(process.env.SIDETRAIN_NATIVE_ADDON) : builtPath;
const errorPath = fileURLToPath(new URL('../../../native/build-error.txt', import.meta.url));

let loaded: NativeAddon | undefined;
let loadError: string | undefined;

/** The addon, or throws why it is not available. */
export function loadAddon(): NativeAddon {
  if (loaded) return loaded;
  if (loadError === undefined) {
    try {
      loaded = createRequire(import.meta.url)(addonPath) as NativeAddon;
      return loaded;
    } catch (err) {
      loadError = reason(err);
    }
  }
  throw new Error(loadError);
}

/**
 * SIDETRAIN_REQUIRE_NATIVE=1 (CI sets it): a missing addon is an error naming it, instead of the
 * quiet fall-through to WASM / pure-JS CPU that a user's install gets — so a broken C++ build
 * cannot leave the suite green by skipping the native tests.
 */
export function nativeRequired(): boolean {
  return process.env.SIDETRAIN_REQUIRE_NATIVE === '1';
}

/** Throws, naming the addon file and why, when the addon is required and does not load. */
export function checkRequiredAddon(): void {
  if (!nativeRequired()) return;
  try {
    loadAddon();
  } catch (err) {
    throw new Error(`SIDETRAIN_REQUIRE_NATIVE=1 but the native addon ${addonPath} did not load: ${(err as Error).message}`);
  }
}

function reason(err: unknown): string {
  if (addonPath === builtPath && existsSync(errorPath)) {
    const first = readFileSync(errorPath, 'utf8').split('\n')[0]!;
    return `native kernels not built: ${first} (details in native/build-error.txt; rebuild with \`node scripts/build-native.mjs\`)`;
  }
  if (!existsSync(addonPath)) return `native kernels not built: no ${addonPath}; run \`npm install\` (or \`node scripts/build-native.mjs\`)`;
  return `native kernels failed to load: ${String(err instanceof Error ? err.message : err).split('\n')[0]}`;
}
