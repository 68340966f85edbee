/**
 * @file Precision bench: the peak probes of this machine's cores (float32 FMA; AVX512-BF16 and AMX
 * when present), then each GEMM kernel class of an SD1.5 step — a linear layer, the two attention
 * products at head width 40, a 3×3 conv and its input gradient — in fp32 and in bf16 on every
 * bf16 kernel this CPU reaches (the default one marked), each as GFLOP/s per core and % of its
 * unit's peak (float32 FMA for the kernels that widen bf16 to float32).
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

const CASES = (): GemmCase[] => [
  matmulCase('linear [4096,320]×[320,320] (512 px level 0)', 1, 4096, 320, 320),
  matmulCase('linear [1024,640]×[640,2560] (feed-forward, 256 px level 1)', 1, 1024, 2560, 640),
  matmulCase('scores 2×[4096,40]×[40,4096]ᵀ (head width 40)', 2, 4096, 4096, 40, true),
  matmulCase('probs·V 2×[4096,4096]×[4096,40] (head width 40)', 2, 4096, 40, 4096),
  convCase('conv 3×3 320→320 at 64×64', 64, 320, 320, false),
  convCase('conv 3×3 320→320 at 64×64, input gradient', 64, 320, 320, true),
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
  for (const c of CASES()) {
    for (const v of variants) {
      addon.bf16Isa(v.isa);
      const t = time(c, addon, v.bf16, reps);
      rows.push({ bench: 'gemm', case: c.name, variant: v.variant, ...t, pctOfPeak: Math.round((100 * t.gflopsPerCore) / peak[v.peakOf]!) });
    }
  }
  addon.bf16Isa('');
  return rows;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const rows = await benchPrecision();
  if (process.argv.includes('--json')) console.log(JSON.stringify(rows, null, 2));
  else console.table(rows);
}
