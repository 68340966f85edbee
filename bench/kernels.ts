/**
 * @file Kernel benchmark: the cases of issue 10's table (forward + both gradients, batch 1,
 * median ms) on each backend present — cpu-native vs wasm, and pure-JS cpu for the small case
 * only (it takes minutes on the convolutions). Each backend runs in its own child process
 * (TF.js picks one backend per process). `benchKernels()` returns one record per case and
 * backend; run directly: `node --import tsx bench/kernels.ts [--json]`.
 */
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { initBackend, tf, type Tensor } from '../trainers/tf.ts';
import { nativeStatus } from '../trainers/native/index.ts';

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

/** In the child: median ms of each case on this process's backend. */
async function runCases(backend: string): Promise<Record<string, unknown>[]> {
  await initBackend(backend);
  const rows: Record<string, unknown>[] = [];
  for (const c of CASES.filter((k) => k.backends.includes(backend))) {
    try {
      rows.push({ case: c.name, backend, ...(await timeCase(c, backend)), pytorchMs: c.pytorchMs });
    } catch (err) {
      // e.g. stock WASM has no Conv2DBackpropFilter kernel
      rows.push({ case: c.name, backend, skipped: String(err instanceof Error ? err.message : err).split('\n')[0] });
    }
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
