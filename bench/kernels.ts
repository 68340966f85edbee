/**
 * @file Kernel benchmark: the cases of issue 10's table (forward + both gradients, batch 1,
 * median ms) on each backend present — cpu-native vs wasm, and pure-JS cpu for the small case
 * only (it takes minutes on the convolutions). Each backend runs in its own child process
 * (TF.js picks one backend per process). `benchKernels()` returns one record per case and
 * backend; run directly: `node --import tsx bench/kernels.ts [--json]`.
 */
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { initBackend, tf, type Tensor } from '../trainers/backend/index.ts';
import { nativeStatus } from '../trainers/backend/native/index.ts';
import { hasNativeAttention, nativeAttentionCore, slicedAttentionOps } from '../trainers/nets/sliced-attention.ts';
import { groupNormFused, setFusedKernels } from '../trainers/nets/fused.ts';

interface KernelCase {
  name: string;
  /** PyTorch 1.13 with OpenBLAS + jemalloc, 2 threads, on the reference machine (issue 10). */
  pytorchMs: number;
  /** Backends that run it (pure-JS cpu only where it takes seconds, not minutes). */
  backends: string[];
  /** Inputs, then the loss whose gradients w.r.t. all inputs are taken. */
  inputs: number[][];
  f: (...xs: Tensor[]) => Tensor;
}

const conv = (x: Tensor, w: Tensor) => tf.conv2d(x as tf.Tensor4D, w as tf.Tensor4D, 1, 'same');

/** Attention over 4096 tokens, 320 wide, one head of 40 at a time (sliced: one 4096² score matrix live per head). */
function attentionByHead(q: Tensor, k: Tensor, v: Tensor, heads = 8): Tensor {
  const [t, c] = q.shape as [number, number];
  const d = c / heads;
  const outs: Tensor[] = [];
  for (let h = 0; h < heads; h++) {
    const qh = q.slice([0, h * d], [t, d]), kh = k.slice([0, h * d], [t, d]), vh = v.slice([0, h * d], [t, d]); // [T, d]
    const scores = tf.matMul(qh, kh, false, true).mul(d ** -0.5); // [T, T]
    outs.push(tf.matMul(tf.softmax(scores), vh)); // [T, d]
  }
  return tf.concat(outs, 1); // [T, C]
}

const CASES: KernelCase[] = [
  { name: 'conv 3×3 320→320 at 64×64', pytorchMs: 70, backends: ['cpu-native', 'wasm'], inputs: [[1, 64, 64, 320], [3, 3, 320, 320]], f: conv },
  { name: 'conv 3×3 640→640 at 32×32', pytorchMs: 71, backends: ['cpu-native', 'wasm'], inputs: [[1, 32, 32, 640], [3, 3, 640, 640]], f: conv },
  { name: 'matmul [4096,320]×[320,320]', pytorchMs: 16, backends: ['cpu-native', 'wasm', 'cpu'], inputs: [[4096, 320], [320, 320]], f: (a, b) => tf.matMul(a, b) },
  { name: 'attention 4096 tokens, 320 wide, one head at a time', pytorchMs: 886, backends: ['cpu-native', 'wasm'], inputs: [[4096, 320], [4096, 320], [4096, 320]], f: (q, k, v) => attentionByHead(q, k, v) },
];

/**
 * GroupNorm(32 groups) + SiLU, forward and the gradients of x, weight and bias, as in every SD1.5
 * ResBlock: the native fused kernel vs the TF-ops chain it replaced (elementwise kernels, native
 * where they exist), timed alternately in one process so a shared machine's load hits both alike.
 */
const NORM_CASES = [
  { name: 'GroupNorm+SiLU [1,32,32,320] (SD1.5 level 0, 256 px)', shape: [1, 32, 32, 320] },
  { name: 'GroupNorm+SiLU [1,64,64,320] (SD1.5 level 0, 512 px)', shape: [1, 64, 64, 320] },
];

function gnSilu(fused: boolean): (...xs: Tensor[]) => Tensor {
  return (x, w, b) => {
    const was = setFusedKernels(fused);
    try {
      return groupNormFused(x!, w!, b!, 32, 1e-5, true);
    } finally {
      setFusedKernels(was);
    }
  };
}

/** Median ms of the fused and the TF-ops GroupNorm+SiLU, interleaved, and their ratio. */
async function timeNormCase(shape: number[]) {
  const c = shape[3]!;
  const xs = [tf.randomUniform(shape, -1, 1), tf.randomUniform([c], 0.5, 1.5), tf.randomUniform([c], -1, 1)];
  const dy = tf.randomUniform(shape, -1, 1);
  const cases = [true, false].map((fused) => ({ name: '', pytorchMs: 1, backends: [], inputs: [], f: gnSilu(fused) }));
  try {
    const times: number[][] = [[], []];
    for (const k of cases) await step(k, xs, dy); // warm-up
    for (let i = 0; i < 5; i++) for (const [j, k] of cases.entries()) times[j]!.push(await step(k, xs, dy));
    const [fusedMs, opsMs] = times.map((t) => t.sort((a, b) => a - b)[2]!) as [number, number];
    return { ms: Math.round(fusedMs * 10) / 10, runs: 5, tfOpsMs: Math.round(opsMs * 10) / 10, speedup: Math.round((opsMs / fusedMs) * 10) / 10 };
  } finally {
    tf.dispose([...xs, dy]);
  }
}

/** One forward + backward, synchronised by reading every gradient back. */
async function step(c: KernelCase, xs: Tensor[], dy: Tensor): Promise<number> {
  const t0 = performance.now();
  const grads = tf.tidy(() => tf.grads((...args: Tensor[]) => c.f(...args))(xs, dy));
  await Promise.all(grads.map((g) => g.data()));
  tf.dispose(grads);
  return performance.now() - t0;
}

/** Median ms of a few forward + backward steps after a warm-up. */
async function timeCase(c: KernelCase, backend: string) {
  const xs = c.inputs.map((s) => tf.randomUniform(s, -1, 1));
  const dy = tf.tidy(() => tf.onesLike(c.f(...xs)));
  try {
    const runs = backend === 'cpu' ? 1 : 3;
    await step(c, xs, dy); // warm-up: first-call allocation and page faults
    const times: number[] = [];
    for (let i = 0; i < runs; i++) times.push(await step(c, xs, dy));
    times.sort((a, b) => a - b);
    const ms = times[Math.floor(times.length / 2)]!;
    return { ms: Math.round(ms * 10) / 10, runs, ratio: Math.round((ms / c.pytorchMs) * 100) / 100 };
  } finally {
    tf.dispose([...xs, dy]);
  }
}

/**
 * SD1.5 level-0 self-attention cores (8 heads of 40, heads already split), forward + backward:
 * the native core (native/src/attention.cc) A/B against the composed TF-ops path the UNet takes
 * without it — whole at 256 px, 512-row slices at 512 px (memory-options' 64 MB slices) — in the
 * same process, interleaved so that load from other processes hits both alike. pytorchMs: the
 * issue's attention row (the same 8×4096²×40 scores, plus the head split).
 */
const ATTENTION_AB = [
  { name: 'attention core 8×4096²×40 (SD1.5 level 0, 512 px)', bh: 8, t: 4096, d: 40, rows: 512, pytorchMs: 886 },
  { name: 'attention core 8×1024²×40 (SD1.5 level 0, 256 px)', bh: 8, t: 1024, d: 40, rows: 1024, pytorchMs: undefined },
];

async function attentionAB(backend: string): Promise<Record<string, unknown>[]> {
  if (!hasNativeAttention()) return [{ case: 'attention core', backend, skipped: 'no native attention kernels' }];
  const rows: Record<string, unknown>[] = [];
  for (const c of ATTENTION_AB) {
    const xs = [0, 1, 2].map(() => tf.randomUniform([c.bh, c.t, c.d], -1, 1)), dy = tf.randomUniform([c.bh, c.t, c.d], -1, 1);
    const variant = (f: KernelCase['f']): KernelCase => ({ name: c.name, pytorchMs: 0, backends: [], inputs: [], f });
    const native = variant((q, k, v) => nativeAttentionCore(q!, k!, v!));
    const composed = variant((q, k, v) =>
      c.rows < c.t ? slicedAttentionOps(q!, k!, v!, c.rows) : tf.matMul(tf.softmax(tf.matMul(q!, k!, false, true).mul(c.d ** -0.5)), v!));
    const times: [number[], number[]] = [[], []];
    await step(native, xs, dy); // warm-up
    await step(composed, xs, dy);
    for (let i = 0; i < 3; i++) {
      times[0].push(await step(native, xs, dy));
      times[1].push(await step(composed, xs, dy));
    }
    tf.dispose([...xs, dy]);
    const [ms, composedMs] = times.map((t) => t.sort((a, b) => a - b)[1]!) as [number, number];
    const round = (x: number) => Math.round(x * 100) / 100;
    rows.push({ case: c.name, backend, ms: Math.round(ms), runs: 3, composedMs: Math.round(composedMs), nativeVsComposed: round(ms / composedMs), ...(c.pytorchMs ? { pytorchMs: c.pytorchMs, ratio: round(ms / c.pytorchMs) } : {}) });
  }
  return rows;
}

/** In the child: median ms of each case on this process's backend. */
async function runCases(backend: string): Promise<Record<string, unknown>[]> {
  await initBackend(backend);
  const rows: Record<string, unknown>[] = [];
  // SIDETRAIN_BENCH_NORM_ONLY=1: just the GroupNorm rows (a quick A/B after a norm-kernel change)
  // SIDETRAIN_BENCH_ATTENTION_ONLY=1: just the attention-core A/B rows
  const attentionOnly = process.env.SIDETRAIN_BENCH_ATTENTION_ONLY === '1';
  const cases = process.env.SIDETRAIN_BENCH_NORM_ONLY === '1' || attentionOnly ? [] : CASES;
  for (const c of cases.filter((k) => k.backends.includes(backend))) {
    try {
      rows.push({ case: c.name, backend, ...(await timeCase(c, backend)), pytorchMs: c.pytorchMs });
    } catch (err) {
      // e.g. stock WASM has no Conv2DBackpropFilter kernel
      rows.push({ case: c.name, backend, skipped: String(err instanceof Error ? err.message : err).split('\n')[0] });
    }
  }
  if (backend === 'cpu-native') {
    for (const c of attentionOnly ? [] : NORM_CASES) rows.push({ case: `${c.name} fused vs TF ops`, backend, ...(await timeNormCase(c.shape)) });
    if (process.env.SIDETRAIN_BENCH_NORM_ONLY !== '1') rows.push(...(await attentionAB(backend)));
  }
  return rows;
}

/** Runs every case on every backend present, each backend in a child process. */
export async function benchKernels(backends = ['cpu-native', 'wasm', 'cpu']): Promise<Record<string, unknown>[]> {
  const rows: Record<string, unknown>[] = [];
  for (const backend of backends) {
    if (backend === 'cpu-native' && !nativeStatus().available) {
      rows.push({ case: '*', backend, skipped: (nativeStatus() as { reason: string }).reason });
      continue;
    }
    const child = spawnSync(process.execPath, ['--import', 'tsx', fileURLToPath(import.meta.url), '--child', backend], {
      encoding: 'utf8',
      maxBuffer: 16 << 20,
      env: { ...process.env, SIDETRAIN_BACKEND: backend },
    });
    const line = child.stdout.split('\n').find((l) => l.startsWith('['));
    if (child.status !== 0 || !line) rows.push({ case: '*', backend, skipped: `child failed: ${child.stderr.split('\n').find((l) => /^\w*Error\b|Aborted/.test(l)) ?? `exit ${child.status}`}` });
    else rows.push(...(JSON.parse(line) as Record<string, unknown>[]));
  }
  return rows;
}

async function main(argv: string[]) {
  const childAt = argv.indexOf('--child');
  if (childAt >= 0) {
    console.log(JSON.stringify(await runCases(argv[childAt + 1]!)));
    return;
  }
  const rows = await benchKernels();
  if (argv.includes('--json')) console.log(JSON.stringify(rows, null, 2));
  else console.table(rows);
}

if (process.argv[1] === fileURLToPath(import.meta.url)) await main(process.argv.slice(2));
