/**
 * @file bf16 against fp32 in training: a Textual Inversion and a LoRA run on the sd-tiny fixture
 * (64 px, the demo images) from one seed, once per precision, in this process (cpu-native). It
 * reports how far the smoothed loss curves part (max |bf16 − fp32| / fp32 of the 20-step moving
 * average, after the first window) and the cosine similarity of the trained weights (TI vectors;
 * LoRA: every up/down matrix flattened). The bar: curves within 2%.
 *
 *   node --import tsx bench/precision-train.ts [--steps 300] [--json]
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { validate } from '../schemas/index.ts';
import { initBackend } from '../trainers/backend/index.ts';
import { runTextualInversion, type TiSpec } from '../trainers/methods/textual-inversion.ts';
import { runLora, type LoraSpec } from '../trainers/methods/lora/lora.ts';
import { readEmbedding } from '../trainers/io/pt-embedding.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import type { JobContext } from '../trainers/job.ts';

const MODEL = 'test/fixtures/sd-tiny/model.safetensors';
const IMAGES = 'assets/demo-images';
const WINDOW = 20;

type Method = 'ti' | 'lora';

function spec(method: Method, precision: string, steps: number, dir: string): Record<string, unknown> {
  const common = { model: MODEL, images: IMAGES, width: 64, height: 64, steps, seed: 7, previewEvery: 0, saveEvery: 0, logDir: join(dir, 'log'), precision };
  const s = method === 'ti'
    ? { ...common, name: 'bf16_ti', initText: 'cat', vectors: 2, embeddingsDir: join(dir, 'emb') }
    : { ...common, name: 'bf16_lora', instancePrompt: 'a photo of sks cat', lr: '0.001', rank: 4, alpha: 4, loraDir: join(dir, 'Lora') };
  const errors = validate(method === 'ti' ? 'textual-inversion' : 'lora', s);
  if (errors.length) throw new Error(errors.map((e) => e.text).join('; '));
  return s;
}

/** Losses per step and the trained weights, flattened. */
async function train(method: Method, precision: string, steps: number): Promise<{ losses: number[]; weights: Float32Array; sec: number }> {
  const dir = await mkdtemp(join(tmpdir(), 'sidetrain-bf16-'));
  const losses: number[] = [];
  const ctx: JobContext = { emit: (e) => e.type === 'step' && losses.push(e.loss), signal: new AbortController().signal };
  const t0 = performance.now();
  try {
    const s = spec(method, precision, steps, dir);
    const result = method === 'ti' ? await runTextualInversion(s as unknown as TiSpec, ctx) : await runLora(s as unknown as LoraSpec, ctx);
    const sec = (performance.now() - t0) / 1000;
    if (method === 'ti') return { losses, weights: Object.values((await readEmbedding(result.output)).vectors)[0]!.values, sec };
    const file = await openSafetensors(result.output);
    try {
      const parts = await Promise.all(file.keys().filter((k) => /lora_(up|down)/.test(k)).sort().map((k) => file.read(k)));
      const all = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
      let o = 0;
      for (const p of parts) all.set(p, (o += p.length) - p.length);
      return { losses, weights: all, sec };
    } finally {
      await file.close();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

const smooth = (xs: number[]) => xs.map((_, i) => (i + 1 < WINDOW ? NaN : xs.slice(i + 1 - WINDOW, i + 1).reduce((a, b) => a + b, 0) / WINDOW));

function cosine(a: Float32Array, b: Float32Array): number {
  let ab = 0, aa = 0, bb = 0;
  for (let i = 0; i < a.length; i++) (ab += a[i]! * b[i]!), (aa += a[i]! * a[i]!), (bb += b[i]! * b[i]!);
  return ab / Math.sqrt(aa * bb);
}

export async function benchPrecisionTrain(steps = 300): Promise<Record<string, unknown>[]> {
  await initBackend('cpu-native');
  const rows: Record<string, unknown>[] = [];
  for (const method of ['ti', 'lora'] as const) {
    const fp32 = await train(method, 'fp32', steps);
    const bf16 = await train(method, 'bf16', steps);
    const a = smooth(fp32.losses), b = smooth(bf16.losses);
    let maxRel = 0;
    for (let i = WINDOW - 1; i < Math.min(a.length, b.length); i++) maxRel = Math.max(maxRel, Math.abs(b[i]! - a[i]!) / Math.abs(a[i]!));
    rows.push({
      bench: 'precision-train', case: `${method} sd-tiny 64px ${steps} steps`,
      smoothedLossMaxRelDiff: Number(maxRel.toFixed(4)), within2pct: maxRel <= 0.02,
      finalSmoothedLoss: `${a.at(-1)!.toFixed(5)} fp32 / ${b.at(-1)!.toFixed(5)} bf16`,
      weightCosine: Number(cosine(fp32.weights, bf16.weights).toFixed(5)),
      sec: `${fp32.sec.toFixed(1)} fp32 / ${bf16.sec.toFixed(1)} bf16`,
    });
  }
  return rows;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const at = process.argv.indexOf('--steps');
  const rows = await benchPrecisionTrain(at >= 0 ? Number(process.argv[at + 1]) : 300);
  if (process.argv.includes('--json')) console.log(JSON.stringify(rows, null, 2));
  else console.table(rows);
}
