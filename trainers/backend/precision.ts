/**
 * @file Compute precision of the heavy products (the job option `precision`, schemas/common.json):
 * 'fp32', or 'bf16' mixed precision — conv2d, its input gradient and (batched) matmul round their
 * operands to bfloat16 and accumulate in float32 (native/src/bf16.h), as torch.autocast(bfloat16)
 * does for matmul/conv; norms, softmax statistics, losses, the filter gradient, trained parameters
 * and optimizer states stay float32. Only the cpu-native backend has bf16 kernels.
 *
 * 'auto' picks bf16 only where it is faster: with AMX tiles, or where the AVX512-BF16 dot product
 * outruns float32 FMA on this core (measured once by the addon's peak probes). On Sapphire Rapids
 * without AMX (e.g. a VM that hides it) vdpbf16ps issues at half the FMA rate; there the addon's
 * bf16 kernel is 'avx512-fma' (float32 FMA on the widened values, about the fp32 speed, the
 * memory of bf16 weights) and 'auto' keeps fp32.
 */
import { currentBackend } from './tf.ts';
import { loadAddon, type NativeAddon } from './native/addon.ts';

export type Precision = 'fp32' | 'bf16';
export type PrecisionOption = Precision | 'auto';

let active: Precision = 'fp32';

/** The precision the native kernels compute in now. */
export function computePrecision(): Precision {
  return active;
}

/** Sets it directly (tests, benches); jobs go through choosePrecision. */
export function setComputePrecision(p: Precision): void {
  active = p;
}

/** f() with the kernels in precision p, restoring the previous one after (f is synchronous: the CPU backends run each op when it is called). */
export function withPrecision<T>(p: Precision, f: () => T): T {
  const before = active;
  active = p;
  try {
    return f();
  } finally {
    active = before;
  }
}

function addonWithBf16(): NativeAddon | undefined {
  try {
    const a = loadAddon();
    return typeof a.bf16Isa === 'function' ? a : undefined;
  } catch {
    return undefined;
  }
}

let autoVerdict: { bf16: boolean; why: string } | undefined;

/** Whether bf16 is the faster choice on this CPU, and why (probes run once, ~0.1 s). */
export function bf16Faster(): { bf16: boolean; why: string } {
  if (autoVerdict) return autoVerdict;
  const a = addonWithBf16();
  const isa = a?.bf16Isa!() ?? 'none';
  if (!a) autoVerdict = { bf16: false, why: 'no native bf16 kernels' };
  else if (isa === 'amx') autoVerdict = { bf16: true, why: 'AMX tiles' };
  else if (isa === 'avx512-bf16' && a.peakProbe) {
    const fma = a.peakProbe('fp32-fma', 0.05), dot = a.peakProbe('avx512-bf16', 0.05);
    const bf16 = dot > 1.2 * fma;
    autoVerdict = { bf16, why: `AVX512-BF16 ${dot.toFixed(0)} vs fp32 FMA ${fma.toFixed(0)} GFLOP/s per core` };
  } else autoVerdict = { bf16: false, why: `bf16 kernel '${isa}' is not faster than fp32` };
  return autoVerdict;
}

let speedup: number | undefined;

/**
 * How much faster the bf16 kernels run the dense products than fp32 on this CPU, for estimates:
 * the measured peak ratio of the unit (AVX512-BF16 dot product or AMX tile GEMM over float32 FMA,
 * the addon's probes; AMX capped at 4×, since packing and memory bound it well before its 7×
 * peak — not measured: no AMX machine was at hand); the avx512-fma kernel runs on the float32
 * FMA unit itself, at 0.8–1.1× the fp32 GEMM (bench/precision.ts), so 1; the portable kernel at
 * about half the fp32 rate.
 */
export function bf16DenseSpeedup(): number {
  if (speedup !== undefined) return speedup;
  const a = addonWithBf16();
  const isa = a?.bf16Isa!() ?? 'none';
  if (isa === 'avx512-fma') return (speedup = 1);
  if (!a?.peakProbe || isa === 'portable' || isa === 'none') return (speedup = 0.5);
  const fma = a.peakProbe('fp32-fma', 0.05);
  const unit = a.peakProbe(isa === 'amx' ? 'amx' : 'avx512-bf16', 0.05);
  speedup = fma > 0 && unit > 0 ? Math.min(isa === 'amx' ? 4 : Infinity, unit / fma) : 1;
  return speedup;
}

/** What `option` would resolve to on `backend` (no change to the active precision), for estimates. */
export function resolvePrecisionFor(option: unknown, backend: string): Precision {
  if (backend !== 'cpu-native' || !addonWithBf16()) return 'fp32';
  if (option === 'bf16') return 'bf16';
  return option === 'auto' && bf16Faster().bf16 ? 'bf16' : 'fp32';
}

/**
 * Resolves a job's `precision` for the backend in use and makes it the active one. bf16 on a
 * backend without bf16 kernels is an error naming the option; 'auto' falls back to fp32.
 */
export function choosePrecision(option: PrecisionOption = 'fp32'): { precision: Precision; kernel?: string; why: string } {
  const backend = currentBackend()?.name;
  const native = backend === 'cpu-native' ? addonWithBf16() : undefined;
  let precision: Precision = 'fp32';
  let why = 'precision fp32';
  if (option === 'bf16') {
    if (!native) throw new Error(`precision: bf16 needs the cpu-native backend's bf16 kernels (backend in use: ${backend ?? 'none'}); use --precision fp32 or auto`);
    precision = 'bf16';
    why = 'precision bf16 (asked for)';
  } else if (option === 'auto') {
    const v = native ? bf16Faster() : { bf16: false, why: `backend ${backend ?? 'none'} has no bf16 kernels` };
    precision = v.bf16 ? 'bf16' : 'fp32';
    why = `precision auto → ${precision}: ${v.why}`;
  } else if (option !== 'fp32') {
    throw new Error(`precision: unknown '${String(option)}', expected fp32, bf16 or auto`);
  }
  active = precision;
  return { precision, kernel: precision === 'bf16' ? native!.bf16Isa!() : undefined, why };
}
