/**
 * @file The training-step table of issue 10: TI and hypernetwork steps (every registered method
 * with a `train` runner among them) on the tiny fixture model and on an SD1.5-shaped model
 * (random F16 weights from keys-sd15.json, written to os.tmpdir() and removed after) at 256 and
 * 512 px, batch 1. Each row is a REAL job (the method's runner on a one-image dataset: load,
 * cache latents, release the VAE, train N steps, save) in its own child process, so peak RSS
 * (VmHWM from /proc/self/status, reset after preparation through /proc/self/clear_refs) is that
 * row's alone. s/step is the median of the steps after the first (the first pays page faults).
 * Beside each row: `estimateJob`'s prediction (trainers/memory/estimate.ts) and, for SD1.5 TI, the
 * PyTorch yardstick (bench/pytorch/ti_step.py) with the our/PyTorch ratio.
 * Dreambooth (whole model, prior preservation with one generated class image: each step is a
 * batch of 2) and LoRA (attention adapters) have 256 px rows on both models in four variants
 * (`variant` column): AdamW or 8-bit AdamW, gradient checkpointing off or on (issue 11).
 * On cpu-native, SD1.5 TI at 256/512 px and LoRA at 512 px also run with `--precision bf16`
 * (variants `bf16`, and `fp32` for the LoRA row it compares with); bench/precision.ts has the
 * peak probes those rows' GFLOP/s compare with.
 *
 * SDXL (issue 18): an SDXL-shaped model (random F16 weights from keys-sdxl.json) for TI and LoRA
 * at 512 and 1024 px, batch 1, with the memory levers (float16 frozen weights, checkpointing), and
 * Dreambooth at 1024 px in each memory combination (bench/sdxl-db.ts).
 *
 * Each row is handed to `onRow` as soon as it is measured (a run cut off still shows its rows).
 *
 * Run alone: `node --import tsx --expose-gc bench/steps.ts [--json] [--quick] [--methods dreambooth,lora] [--variants adamw8bit+ckpt,…] [--models sdxl-shaped] [--px 512] [--first sdxl-shaped] [--row-minutes 30]`.
 * Env: SIDETRAIN_BENCH_SD15=0 skips the SD1.5 rows, SIDETRAIN_BENCH_SDXL=0 the SDXL ones,
 * SIDETRAIN_BENCH_PYTORCH=0 the PyTorch yardstick (installed with apt-get when missing).
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { SDXL_KEYS, writeRandomCheckpoint, writeRandomSd15 } from './sd15-checkpoint.ts';
import { pytorchTiStep } from './pytorch.ts';
import { sdxlDreamboothRows } from './sdxl-db.ts';
import { estimateJob, type JobEstimate } from '../trainers/memory/estimate.ts';
import { RSS_LIMIT_BYTES, runBenchChild, statusKb, type Row } from './child.ts';

const TINY = 'test/fixtures/sd-tiny/model.safetensors';
const SELF = fileURLToPath(import.meta.url);

export interface StepRowSpec {
  model: 'sd-tiny' | 'sd15-shaped' | 'sdxl-shaped';
  method: string;
  px: number;
  steps: number;
  backend: string;
  /** Job options of this variant (optimizer, gradientCheckpointing, …), over the row's spec. */
  options?: Record<string, unknown>;
  /** The variant as the table shows it ('adamw8bit+ckpt'); absent = the method's defaults. */
  label?: string;
}

/** Methods measured in the memory variants below rather than at two sizes. */
const VARIANT_METHODS = new Set(['dreambooth', 'lora']);

/**
 * Optimizer state and gradient checkpointing, each without and with (checkpointing off, not auto);
 * for the full-weight Dreambooth also the fused backward (no whole gradient buffer), Adafactor and
 * bf16 weights with stochastic rounding on top of checkpointing (issue 19).
 */
export const MEMORY_VARIANTS: { label: string; options: Record<string, unknown>; methods?: string[] }[] = [
  { label: 'adamw', options: { optimizer: 'adamw', gradientCheckpointing: 'off' } },
  { label: 'adamw8bit', options: { optimizer: 'adamw8bit', gradientCheckpointing: 'off' } },
  { label: 'adamw+ckpt', options: { optimizer: 'adamw', gradientCheckpointing: 'on' } },
  { label: 'adamw8bit+ckpt', options: { optimizer: 'adamw8bit', gradientCheckpointing: 'on' } },
  { label: 'adamw+ckpt+fused', options: { optimizer: 'adamw', gradientCheckpointing: 'on', fusedBackward: true }, methods: ['dreambooth'] },
  { label: 'adafactor+ckpt', options: { optimizer: 'adafactor', gradientCheckpointing: 'on' }, methods: ['dreambooth'] },
  { label: 'adafactor+ckpt+fused', options: { optimizer: 'adafactor', gradientCheckpointing: 'on', fusedBackward: true }, methods: ['dreambooth'] },
  { label: 'adamw+ckpt+fused+bf16', options: { optimizer: 'adamw', gradientCheckpointing: 'on', fusedBackward: true, bf16Weights: true }, methods: ['dreambooth'] },
];


/**
 * What the bench runs: tiny at 256 and 512 px on the first backend and at 256 px on the others;
 * SD1.5 on the first only (WASM's 4 GB heap cannot hold it). SD1.5 steps take tens of seconds,
 * so those rows time one step after the warm-up one; a row whose estimate does not fit is skipped.
 */
export function stepRows(methods: string[], backends: string[], sd15: boolean, sdxl = false): StepRowSpec[] {
  const rows: StepRowSpec[] = [];
  const sized = methods.filter((m) => !VARIANT_METHODS.has(m));
  const varied = methods.filter((m) => VARIANT_METHODS.has(m));
  backends.forEach((backend, i) => {
    for (const method of sized) for (const px of i === 0 ? [256, 512] : [256]) rows.push({ model: 'sd-tiny', method, px, steps: 3, backend });
  });
  if (sd15) {
    for (const method of sized) for (const px of [256, 512]) rows.push({ model: 'sd15-shaped', method, px, steps: 2, backend: backends[0]! });
  }
  // SDXL: TI and LoRA at 512 and 1024 px with the levers a 24 GB machine needs; before the
  // variant rows, both methods at 512 px first (a 1024 px step takes minutes on a loaded machine)
  if (sdxl) {
    for (const px of [512, 1024]) {
      for (const method of methods.filter((m) => m === 'textual_inversion' || m === 'lora')) rows.push({ model: 'sdxl-shaped', method, px, steps: 2, backend: backends[0]!, options: XL_LEVERS, label: 'half+ckpt' });
    }
    // Dreambooth at 1024 px in each memory combination (bench/sdxl-db.ts); those whose estimate
    // does not fit the machine are listed with their estimate, not run
    if (varied.includes('dreambooth')) rows.push(...sdxlDreamboothRows(backends[0]!));
    // and TI and LoRA at 512 px in bf16 mixed precision (issue 20), beside the float32 rows above
    if (backends[0] === 'cpu-native') {
      for (const method of methods.filter((m) => m === 'textual_inversion' || m === 'lora')) rows.push({ model: 'sdxl-shaped', method, px: 512, steps: 2, backend: backends[0], options: { ...XL_LEVERS, precision: 'bf16' }, label: 'half+ckpt+bf16' });
    }
  }
  // bf16 mixed precision beside them (issue 20): SD1.5 TI at 256 and 512 px, LoRA at 512 px in
  // fp32 and bf16, on cpu-native only (the other backends have no bf16 kernels)
  if (sd15 && backends[0] === 'cpu-native') {
    const bf16 = { precision: 'bf16' };
    if (sized.includes('textual_inversion')) for (const px of [256, 512]) rows.push({ model: 'sd15-shaped', method: 'textual_inversion', px, steps: 2, backend: backends[0], options: bf16, label: 'bf16' });
    if (varied.includes('lora')) {
      rows.push({ model: 'sd15-shaped', method: 'lora', px: 512, steps: 2, backend: backends[0], options: { precision: 'fp32' }, label: 'fp32' });
      rows.push({ model: 'sd15-shaped', method: 'lora', px: 512, steps: 2, backend: backends[0], options: bf16, label: 'bf16' });
    }
  }
  // Dreambooth / LoRA: 256 px, batch 1, first backend, every memory variant
  for (const model of sd15 ? (['sd-tiny', 'sd15-shaped'] as const) : (['sd-tiny'] as const)) {
    for (const method of varied) {
      for (const v of MEMORY_VARIANTS.filter((x) => !x.methods || x.methods.includes(method))) rows.push({ model, method, px: 256, steps: model === 'sd-tiny' ? 3 : 2, backend: backends[0]!, options: v.options, label: v.label });
    }
  }
  return rows;
}

const XL_LEVERS = { halfFrozenWeights: true, gradientCheckpointing: 'on' };

/** The job spec of a row (the schema fills every other default). */
export function jobSpec(r: StepRowSpec, modelPath: string, images: string, out: string): Record<string, unknown> {
  const spec: Record<string, unknown> = {
    model: modelPath, images, name: `bench_${r.method}`, steps: r.steps, width: r.px, height: r.px,
    previewEvery: 0, saveEvery: 0, logDir: join(out, 'logs'), overwrite: true, seed: 1,
  };
  if (r.method === 'textual_inversion') spec.embeddingsDir = join(out, 'embeddings');
  if (r.method === 'hypernetwork') {
    spec.hypernetworkDir = join(out, 'hypernetworks');
    if (r.model === 'sd-tiny') spec.sizes = [32]; // the tiny model's context width / level-0 channels
  }
  if (r.method === 'dreambooth') {
    // prior preservation as users run it, with one cheap class image (generated once per model, before timing starts)
    Object.assign(spec, { checkpointDir: join(out, 'checkpoints'), instancePrompt: 'a picture of sks cat', classPrompt: 'a picture of a cat', classImages: 1, classSteps: 2 });
  }
  if (r.method === 'lora') Object.assign(spec, { loraDir: join(out, 'Lora'), instancePrompt: 'a picture of sks cat' });
  return { ...spec, ...r.options };
}

/** A one-image dataset (random RGB PNG of px × px, with a caption). */
export async function makeImages(dir: string, px: number): Promise<string> {
  const sharp = (await import('sharp')).default;
  const pixels = Buffer.alloc(px * px * 3);
  let s = 12345;
  for (let i = 0; i < pixels.length; i++) pixels[i] = (s = (s * 1103515245 + 12345) >>> 0) >>> 24;
  const images = join(dir, `images-${px}`);
  (await import('node:fs')).mkdirSync(images, { recursive: true });
  await sharp(pixels, { raw: { width: px, height: px, channels: 3 } }).png().toFile(join(images, 'picture.png'));
  writeFileSync(join(images, 'picture.txt'), 'a picture of a cat');
  return images;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/** Spawn one row's child (this script's --child/--profile modes). */
const runChild = (args: string[], backend: string, timeoutMs: number) => runBenchChild(SELF, args, backend, timeoutMs);

export interface StepsOptions {
  backends?: string[];
  /** Methods to run (registry names); default: TI, hypernetwork, Dreambooth, LoRA. */
  methods?: string[];
  /** Variant labels to keep ('adamw', 'half+ckpt', …); rows without a variant always run. */
  variants?: string[];
  /** Models to keep ('sd-tiny', 'sd15-shaped', 'sdxl-shaped'); default all. */
  models?: string[];
  /** Sizes to keep (px); default all. */
  px?: number[];
  /** Rows that run first, in this order: a model ('sdxl-shaped') or a model at a size ('sdxl-shaped@512') — those a long run must not be cut off before. */
  first?: string[];
  sd15?: boolean;
  sdxl?: boolean;
  quick?: boolean;
  /** Called with each row as soon as it is measured. */
  onRow?: (r: Row) => void;
  /** Time limit of one row in minutes (default 20, SDXL rows 45); a stopped row keeps what it measured. */
  rowMinutes?: number;
}

/** The options of the command line: --methods a,b  --variants x,y  --models m  --px 512,1024  --first m  --quick  --row-minutes n. */
export function stepsArgs(argv: string[]): StepsOptions {
  const list = (flag: string) => {
    const at = argv.indexOf(flag);
    if (at < 0) return undefined;
    const items = (argv[at + 1] ?? '').split(',').map((m) => m.trim()).filter(Boolean);
    if (!items.length) throw new Error(`${flag} needs a comma-separated list`);
    return items;
  };
  const at = argv.indexOf('--row-minutes');
  const rowMinutes = at >= 0 ? Number(argv[at + 1]) : undefined;
  if (rowMinutes !== undefined && !(rowMinutes > 0)) throw new Error('--row-minutes needs a positive number of minutes');
  const px = list('--px')?.map(Number);
  if (px?.some((p) => !Number.isInteger(p) || p <= 0)) throw new Error('--px needs sizes in pixels, e.g. 512,1024');
  return { methods: list('--methods'), variants: list('--variants'), models: list('--models'), px, first: list('--first'), quick: argv.includes('--quick'), rowMinutes };
}

/** Every step row plus the PyTorch yardstick; `variants` filters rows by their label. */
export async function benchSteps(opts: StepsOptions = {}): Promise<Row[]> {
  const { methods } = await import('../trainers/methods/index.ts');
  const { nativeStatus } = await import('../trainers/backend/native/index.ts');
  const backends = opts.backends ?? (nativeStatus().available ? ['cpu-native', 'wasm'] : ['wasm']);
  const names = opts.methods ?? Object.keys(methods).filter((m) => ['textual_inversion', 'hypernetwork', 'dreambooth', 'lora'].includes(m));
  const unknown = names.filter((m) => !methods[m]);
  if (unknown.length) throw new Error(`--methods: unknown method(s) ${unknown.join(', ')}; known: ${Object.keys(methods).join(', ')}`);
  const sd15 = opts.sd15 ?? process.env.SIDETRAIN_BENCH_SD15 !== '0';
  const sdxl = opts.sdxl ?? process.env.SIDETRAIN_BENCH_SDXL !== '0';
  const dir = mkdtempSync(join(tmpdir(), 'sidetrain-bench-steps-'));
  const checkpoint = sd15 ? await writeRandomSd15() : undefined;
  const checkpointXl = sdxl ? await writeRandomCheckpoint(SDXL_KEYS) : undefined;
  const rows: Row[] = [];
  const push = (r: Row) => {
    rows.push(r);
    opts.onRow?.(r);
  };
  try {
    const images = { 256: await makeImages(dir, 256), 512: await makeImages(dir, 512), ...(sdxl ? { 1024: await makeImages(dir, 1024) } : {}) } as Record<number, string>;
    const keep = (row: StepRowSpec) => (!row.label || !opts.variants || opts.variants.includes(row.label)) && (!opts.models || opts.models.includes(row.model)) && (!opts.px || opts.px.includes(row.px));
    const kept = stepRows(names, backends, sd15, sdxl).filter(keep);
    const rank = (row: StepRowSpec) => {
      const i = opts.first?.findIndex((f) => f === row.model || f === `${row.model}@${row.px}`) ?? -1;
      return i < 0 ? Infinity : i;
    };
    for (const r of kept.map((row, i) => ({ row, i })).sort((a, b) => rank(a.row) - rank(b.row) || a.i - b.i).map((x) => x.row)) {
      const modelPath = r.model === 'sd-tiny' ? TINY : r.model === 'sdxl-shaped' ? checkpointXl!.path : checkpoint!.path;
      const spec = jobSpec(opts.quick ? { ...r, steps: 2 } : r, modelPath, images[r.px]!, join(dir, 'out'));
      const est = await estimateJob(r.method, spec, { backend: r.backend }).catch((err: Error) => err);
      // a row the estimate says cannot fit is not run: the estimate is what a user would see
      const tooBig = !(est instanceof Error) && est.peakBytes > RSS_LIMIT_BYTES;
      const measured = tooBig
        ? { skipped: `estimated ${(est.peakBytes / 2 ** 30).toFixed(1)} GB > ${(RSS_LIMIT_BYTES / 2 ** 30).toFixed(1)} GB allowed on this machine` }
        : await runChild(['--child', JSON.stringify({ method: r.method, spec })], r.backend, (opts.rowMinutes ?? (r.model === 'sdxl-shaped' ? 45 : 20)) * 60_000);
      push(withEstimate(r, est, measured));
    }
    // the PyTorch yardstick and the profile are TI's
    if (sd15 && names.includes('textual_inversion') && process.env.SIDETRAIN_BENCH_PYTORCH !== '0') for (const r of pytorchRows(rows)) push(r);
    if (sd15 && checkpoint && names.includes('textual_inversion')) push(await runChild(['--profile', checkpoint.path, images[256]!, join(dir, 'out')], backends[0]!, 20 * 60_000));
  } finally {
    await checkpoint?.remove();
    await checkpointXl?.remove();
    rmSync(dir, { recursive: true, force: true });
  }
  return rows;
}

function withEstimate(r: StepRowSpec, est: JobEstimate | Error, measured: Row): Row {
  const row: Row = { bench: `step.${r.method}`, model: r.model, variant: r.label ?? 'default', px: r.px, batch: 1, backend: r.backend, ...measured };
  if (est instanceof Error) return { ...row, estError: est.message.split('\n')[0] };
  row.estPeakRssMB = Math.round(est.peakBytes / 2 ** 20);
  row.estSecPerStep = +est.secondsPerStep.toPrecision(3);
  // a row stopped before its first step ended has not seen a step's peak: no ratio
  const sawStep = !measured.error || Number(measured.steps) >= 1;
  if (typeof measured.peakRssMB === 'number' && sawStep) row.estVsMeasured = +(est.peakBytes / 2 ** 20 / measured.peakRssMB).toFixed(2);
  return row;
}

/**
 * The yardstick at each SD1.5 TI size, with our s/step and our/PyTorch on its row (our rows were
 * already printed when it runs).
 */
function* pytorchRows(rows: Row[]): Generator<Row> {
  for (const px of [256, 512]) {
    const ours = rows.find((r) => r.bench === 'step.textual_inversion' && r.model === 'sd15-shaped' && r.px === px && r.variant === 'default');
    const torch = pytorchTiStep(px, px === 512 ? 0 : 1); // 512 px: the one (warm-up) step only, ~3 min
    const row: Row = { bench: 'step.textual_inversion', model: 'sd15-shaped', px, batch: 1, backend: 'pytorch', ...torch };
    if (typeof ours?.secPerStep === 'number' && typeof torch.secPerStep === 'number') {
      row.oursSecPerStep = ours.secPerStep;
      row.oursOverPytorch = +(ours.secPerStep / torch.secPerStep).toFixed(2);
    }
    yield row;
  }
}

// ---------------------------------------------------------------------------------------------
// In the child


/**
 * Run one job; s/step from the step events, peak RSS before and after training starts. The row so
 * far is printed after preparation and after every step: a row stopped at its time limit still
 * reports what it measured (runBenchChild takes the last line).
 */
async function childRow(method: string, spec: Record<string, unknown>): Promise<Row> {
  const { methods } = await import('../trainers/methods/index.ts');
  const { validate } = await import('../schemas/index.ts');
  const entry = methods[method];
  if (!entry) throw new Error(`no method '${method}'`);
  const errors = validate(entry.schema, spec);
  if (errors.length) throw new Error(errors.map((e) => e.text).join('; '));
  const t0 = performance.now();
  const marks: number[] = [];
  let prepPeakKb = 0;
  let backend = '';
  const soFar = (): Row => {
    const trainPeakKb = marks.length ? statusKb('VmHWM') : 0;
    const stepMs = marks.slice(1).map((m, i) => m - marks[i]!);
    const later = stepMs.length > 1 ? stepMs.slice(1) : stepMs;
    return {
      tfBackend: backend, steps: stepMs.length, ...(stepMs.length ? { secPerStep: +(median(later) / 1000).toPrecision(3), firstStepSec: +(stepMs[0]! / 1000).toPrecision(3) } : {}),
      prepSec: +(((marks[0] ?? performance.now()) - t0) / 1000).toFixed(1), peakRssMB: Math.round(Math.max(prepPeakKb, trainPeakKb, marks.length ? 0 : statusKb('VmHWM')) / 1024),
      prepPeakMB: Math.round((prepPeakKb || statusKb('VmHWM')) / 1024), trainPeakMB: Math.round(trainPeakKb / 1024),
    };
  };
  const ctx = {
    signal: new AbortController().signal,
    emit: (e: { type: string; backend?: string }) => {
      if (e.type === 'started') {
        backend = e.backend ?? '';
        prepPeakKb = statusKb('VmHWM');
        writeFileSync('/proc/self/clear_refs', '5'); // reset VmHWM: the training phase's own peak from here
        marks.push(performance.now());
        console.log(JSON.stringify(soFar()));
      }
      if (e.type === 'step') {
        marks.push(performance.now());
        console.log(JSON.stringify(soFar()));
      }
    },
  };
  await (await entry.load())(spec, ctx as never);
  return soFar();
}

async function main(argv: string[]): Promise<void> {
  const at = argv.indexOf('--child');
  if (at >= 0) {
    const { method, spec } = JSON.parse(argv[at + 1]!) as { method: string; spec: Record<string, unknown> };
    console.log(JSON.stringify(await childRow(method, spec)));
    return;
  }
  const pAt = argv.indexOf('--profile');
  if (pAt >= 0) {
    const { profileTiStep } = await import('./profile.ts');
    console.log(JSON.stringify(await profileTiStep(argv[pAt + 1]!, argv[pAt + 2]!, argv[pAt + 3]!)));
    return;
  }
  const json = argv.includes('--json');
  const rows = await benchSteps({ ...stepsArgs(argv), onRow: json ? (r) => console.log(JSON.stringify(r)) : undefined });
  if (!json) console.table(rows);
}

if (process.argv[1] === SELF) await main(process.argv.slice(2));
