/**
 * @file Precision bench: the peak probes of this machine's cores (float32 FMA; AVX512-BF16 and AMX
 * when present), then each GEMM kernel class of an SD1.5 step — a linear layer, the two attention
 * products at head width 40, a 3×3 conv and its input gradient — in fp32 and in bf16 on every
 * bf16 kernel this CPU reaches (the default one marked), each as GFLOP/s per core and % of its
 * unit's peak (float32 FMA for the kernels that widen bf16 to float32); then the fused attention
 * core at SD1.5's 512 px level-0 shapes (self and cross), fp32 and bf16. The fp32 rows name the
 * ISA variant of the kernels (avx512, avx2, portable: native/src/variant.h), the default one and
 * every lower one this CPU also runs.
 * GFLOP/s per core divides by the process's CPU seconds (not wall time), so a shared machine's
 * other load costs little accuracy; wall ms are shown too. Run: `node --import tsx bench/precision.ts`.
 */
import { fileURLToPath } from 'node:url';
import { loadAddon, type NativeAddon } from '../trainers/backend/native/addon.ts';

type Row = Record<string, unknown>;

interface GemmCase {
  name: string;
  flops: number;
  /** One call in fp32 or bf16. */
  run: (addon: NativeAddon, bf16: boolean) => void;
}

const fill = (n: number) => {
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) v[i] = ((i * 2654435761) % 1000) / 500 - 1;
  return v;
};

function matmulCase(name: string, count: number, M: number, N: number, K: number, transB = false): GemmCase {
  const a = fill(count * M * K), b = fill(count * K * N), out = new Float32Array(count * M * N);
  const aOff = Float64Array.from({ length: count }, (_, i) => i * M * K), bOff = Float64Array.from({ length: count }, (_, i) => i * K * N);
  return { name, flops: 2 * count * M * N * K, run: (addon, bf16) => addon.matmul(a, b, out, aOff, bOff, M, N, K, false, transB, bf16) };
}

function convCase(name: string, hw: number, cin: number, cout: number, backward: boolean): GemmCase {
  const x = fill(hw * hw * (backward ? cout : cin)), w = fill(9 * cin * cout), y = new Float32Array(hw * hw * (backward ? cin : cout));
  const shape = Int32Array.from([1, hw, hw, cin, hw, hw, cout, 3, 3, 1, 1, 1, 1, 1, 1]);
  return {
    name, flops: 2 * hw * hw * 9 * cin * cout,
    run: (addon, bf16) => (backward ? addon.conv2dBackpropInput(x, w, y, shape, bf16) : addon.conv2d(x, w, y, shape, bf16)),
  };
}

/** The fused attention core (native/src/attention.cc), forward or backward; flops: the products only (4·tq·tk·d per head forward, 10 backward with the recompute). */
function attentionCase(name: string, heads: number, tq: number, tk: number, d: number, backward: boolean): GemmCase {
  const q = fill(tq * heads * d), k = fill(tk * heads * d), v = fill(tk * heads * d), out = new Float32Array(q.length), lse = new Float32Array(heads * tq);
  const dout = fill(q.length), dq = new Float32Array(q.length), dk = new Float32Array(k.length), dv = new Float32Array(k.length);
  const scale = 1 / Math.sqrt(d);
  return {
    name, flops: (backward ? 10 : 4) * heads * tq * tk * d,
    run: (addon, bf16) => {
      if (!backward) addon.attentionForward!(q, k, v, out, lse, 1, heads, tq, tk, d, scale, bf16);
      else addon.attentionBackward!(q, k, v, out, dout, lse, dq, dk, dv, 1, heads, tq, tk, d, scale, bf16);
    },
  };
}

const CASES = (): GemmCase[] => [
  matmulCase('linear [4096,320]×[320,320] (512 px level 0)', 1, 4096, 320, 320),
  matmulCase('linear [1024,640]×[640,2560] (feed-forward, 256 px level 1)', 1, 1024, 2560, 640),
  matmulCase('scores 2×[4096,40]×[40,4096]ᵀ (head width 40)', 2, 4096, 4096, 40, true),
  matmulCase('probs·V 2×[4096,4096]×[4096,40] (head width 40)', 2, 4096, 40, 4096),
  convCase('conv 3×3 320→320 at 64×64', 64, 320, 320, false),
  convCase('conv 3×3 320→320 at 64×64, input gradient', 64, 320, 320, true),
];
const ATTENTION = (): GemmCase[] => [
  attentionCase('attention core 8×[4096,4096] d 40 (512 px self)', 8, 4096, 4096, 40, false),
  attentionCase('attention core 8×[4096,4096] d 40, backward', 8, 4096, 4096, 40, true),
  attentionCase('attention core 8×[4096,77] d 40 (512 px cross)', 8, 4096, 77, 40, false),
];

/** Median wall ms and CPU-seconds-based GFLOP/s per core over `reps` calls (after a warm-up). */
function time(c: GemmCase, addon: NativeAddon, bf16: boolean, reps: number) {
  c.run(addon, bf16);
  const wall: number[] = [];
  const cpu0 = process.cpuUsage();
  for (let i = 0; i < reps; i++) {
    const t = performance.now();
    c.run(addon, bf16);
    wall.push(performance.now() - t);
  }
  const cpu = process.cpuUsage(cpu0);
  const cpuSec = (cpu.user + cpu.system) / 1e6 / reps;
  return { ms: Math.round(wall.sort((a, b) => a - b)[reps >> 1]! * 10) / 10, gflopsPerCore: Math.round(c.flops / cpuSec / 1e8) / 10 };
}

export async function benchPrecision(reps = 3): Promise<Row[]> {
  const addon = loadAddon();
  if (!addon.bf16Isa || !addon.peakProbe) return [{ bench: 'precision', skipped: 'addon built before the bf16 kernels: rebuild it' }];
  const rows: Row[] = [];
  const peak: Record<string, number> = {};
  for (const kind of ['fp32-fma', 'avx512-bf16', 'amx'] as const) {
    peak[kind] = addon.peakProbe(kind, 0.3);
    rows.push({ bench: 'peak probe', case: kind, gflopsPerCore: peak[kind]! < 0 ? 'absent' : Math.round(peak[kind]!) });
  }
  // every distinct bf16 kernel this CPU reaches, the default one first; each against its unit's peak
  const best = addon.bf16Isa('');
  const caps = ['', 'avx512-bf16', 'avx512-fma', 'portable'] as const;
  const kernels = new Map<string, (typeof caps)[number]>();
  for (const cap of caps) {
    const k = addon.bf16Isa(cap);
    if (!kernels.has(k)) kernels.set(k, cap);
  }
  addon.bf16Isa('');
  const variants = [
    { variant: 'fp32', bf16: false, isa: '' as (typeof caps)[number], peakOf: 'fp32-fma' },
    ...[...kernels].map(([k, cap]) => ({
      variant: `bf16 ${k}${k === best ? ' (default)' : ''}`, bf16: true, isa: cap,
      peakOf: k === 'amx' || k === 'avx512-bf16' ? k : 'fp32-fma',
    })),
  ];
  // the lower ISA variants of the fp32 kernels this CPU also runs (native/src/variant.h), against
  // the same float32 FMA peak (the default variant's vector width)
  const isa = addon.info().isa;
  const lower = (addon.isaVariants ?? []).filter((v) => v !== isa).map((v) => ({ name: v, kernels: addon.variant!(v) }));
  for (const c of CASES()) {
    for (const v of variants) {
      addon.bf16Isa(v.isa);
      const t = time(c, addon, v.bf16, reps);
      rows.push({ bench: 'gemm', case: c.name, variant: v.variant === 'fp32' && isa ? `fp32 ${isa}` : v.variant, ...t, pctOfPeak: Math.round((100 * t.gflopsPerCore) / peak[v.peakOf]!) });
    }
    for (const v of lower) {
      const t = time(c, v.kernels, false, reps);
      rows.push({ bench: 'gemm', case: c.name, variant: `fp32 ${v.name}`, ...t, pctOfPeak: Math.round((100 * t.gflopsPerCore) / peak['fp32-fma']!) });
    }
  }
  addon.bf16Isa('');
  // the attention core's products run on float32 FMA in both modes (bf16: rounded operands)
  if (addon.attentionForward && addon.attentionBackward) {
    for (const c of ATTENTION()) {
      for (const bf16 of [false, true]) {
        const t = time(c, addon, bf16, reps);
        rows.push({ bench: 'attention', case: c.name, variant: bf16 ? 'bf16' : 'fp32', ...t, pctOfPeak: Math.round((100 * t.gflopsPerCore) / peak['fp32-fma']!) });
      }
    }
  }
  return rows;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const rows = await benchPrecision();
  if (process.argv.includes('--json')) console.log(JSON.stringify(rows, null, 2));
  else console.table(rows);
}
