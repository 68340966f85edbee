/**
 * @file LoRA training (kohya-ss sd-scripts train_network.py with networks/lora.py): low-rank
 * adapters on the UNet (and optionally the text encoder) train while every base weight stays
 * frozen. Output `<lora-dir>/<name>.safetensors` with kohya key names that the webui's built-in
 * Lora extension applies with `<lora:NAME:1>` (names from the checkpoint's own module paths,
 * nets/lora.ts), and the `ss_*` metadata kohya writes (the file: lora-file.ts).
 * Optimizer: AdamW (torch default weight decay 0.01, as kohya's default), 8-bit AdamW or
 * Adafactor, the text encoder's adapters as their own group (own rate, optional step limit;
 * optim/trainable.ts), its state beside the LoRA as `<file>.optim`. Optional prior preservation
 * (a class prompt turns it on; prior-preservation.ts): this is also `train dreambooth --lora`.
 */
import { join, resolve } from 'node:path';
import { tf, type Tensor } from '../../backend/tf.ts';
import { createLora, disposeLora, loraTargets, mergeLora, withLora, type LoraNetwork } from '../../nets/lora.ts';
import {
  legacyModelHash, loadOptimizer, loadWeights, saveLora, targetKinds,
  type LoraRun, type LoraSpec, type LoraState,
} from './lora-file.ts';
import { shapesOf, paddingFor } from '../../nets/sd.ts';
import { overlayParams } from '../../nets/half-params.ts';
import { encodeText } from '../../nets/clip.ts';
import { encodeFrozenText } from '../../train/context-cache.ts';
import { fileSha256 } from '../../io/checkpoint.ts';
import { parseLrSchedule, type LrSchedule } from '../../optim/lr.ts';
import { makeTrainableOptimizer, textLimitedTrainable, type TrainableOptimizer } from '../../optim/trainable.ts';
import { checkTextEncoder2Lr } from '../full-xl.ts';
import {
  describePrior, flushingPriorLog, prepareClassSet, priorOn, priorPreservationLoss, PriorLossLog, withClassRows,
  type PriorLoss, type PriorSpec,
} from '../../train/prior-preservation.ts';
import { checkReadableDir } from '../../io/paths.ts';
import {
  closeRun, datasetSession, diffusionBatch, loadDataset, prepareRun, previewPromptText, renderPreview,
  type CommonSpec, type PreparedRun, type PromptTemplates,
} from '../../train/prepare.ts';
import { captionOverrideWarning, instanceTemplates } from '../../train/instance-prompts.ts';
import { datasetReport, formatDatasetReport, type Dataset } from '../../data/dataset.ts';
import { loadTemplate } from '../../text/templates.ts';
import {
  runMethod, snapshotPath, withFolders, withNativeSize, type MethodDefinition, type OutputLayout, type RunPaths, type Session, type Unsized,
} from '../../train/run.ts';
import type { LoraJob } from '../../../schemas/types.ts';
import { tokenizeWithEmbeddings } from '../../text/tokenizer.ts';
import type { DiffusionBatch } from '../../train/diffusion-loss.ts';
import type { JobContext, JobResult } from '../../job.ts';
import { cacheXlText, nextXlLoraBatch, xlBatchTensors, xlLoraLoss, xlLoraPreview, type XlLoraBatch } from './lora-xl.ts';

export type { LoraSpec } from './lora-file.ts';

type LoraBatch = DiffusionBatch & { ids: number[][]; classRows: number; context?: Tensor };

// ---------------------------------------------------------------------------------------------
// Prompts: the instance prompt, combined with each caption file as captionMode says (instance-prompts.ts)

/** The run's prompt templates: the spec's template when given, else the instance prompt and the captions. */
async function promptTemplates(spec: LoraSpec): Promise<PromptTemplates> {
  if (spec.template) return { template: await loadTemplate(spec.template) };
  return instanceTemplates(spec.instancePrompt ?? '[filewords]', spec.captionMode ?? 'caption');
}

/** Say which images a caption file keeps from the instance prompt (before anything loads). */
function warnCaptionOverride(ds: Dataset, spec: LoraSpec, ctx: JobContext): void {
  const message = !spec.template && spec.instancePrompt ? captionOverrideWarning(ds, spec.captionMode ?? 'caption', spec.instancePrompt) : undefined;
  if (message) ctx.emit({ type: 'log', level: 'warn', message });
}

/** `--dry-run`: every image with the prompt it trains with, the class images and the output, as the run will use them. */
export async function loraDryRun(job: LoraJob & Omit<LoraSpec, keyof LoraJob>): Promise<string> {
  const spec = await withNativeSize(loraSpec(job));
  const warnings: string[] = [];
  const ds = await loadDataset(spec, (m) => warnings.push(m), await promptTemplates(spec));
  const override = !spec.template && spec.instancePrompt ? captionOverrideWarning(ds, spec.captionMode ?? 'caption', spec.instancePrompt) : undefined;
  const report = datasetReport(ds);
  report.template = spec.template ?? `instance prompt ${JSON.stringify(spec.instancePrompt ?? '')}, captions: ${spec.captionMode ?? 'caption'}`;
  if (override) report.warnings.push(override);
  return [
    formatDatasetReport(report), describePrior(spec as PriorSpec),
    `learn rate ${spec.lr}; LoRA rank ${spec.rank}, alpha ${spec.alpha}, targets ${targetKinds(spec).join(', ')}`,
    `output: ${resolve(spec.loraDir, `${spec.name}.safetensors`)} (use it as <lora:${spec.name}:1>)`,
    `snapshots, previews, loss CSV: ${resolve(spec.logDir, spec.name)}`,
  ].join('\n');
}

// ---------------------------------------------------------------------------------------------
// State

/**
 * The optimizer: the UNet adapters at the loop's rate, the text encoder's as their own group; on
 * SDXL OpenCLIP-G's (`lora_te2_…`) a group of their own at textEncoder2Lr (kohya's te2 rate).
 */
function loraOptimizer(net: LoraNetwork, spec: LoraSpec, textLr: LrSchedule | undefined, done: number): TrainableOptimizer {
  const isText = (k: string) => /^lora_te\d?_/.test(k);
  const unet = new Map([...net.weights].filter(([k]) => !isText(k)));
  const text = new Map([...net.weights].filter(([k]) => isText(k)));
  const text2Keys = new Set([...text.keys()].filter((k) => k.startsWith('lora_te2_')));
  const optimizer = makeTrainableOptimizer(spec.optimizer, unet, text, { text2Keys, textLr, text2Lr: text2Schedule(spec), textSteps: spec.textEncoderSteps });
  optimizer.done = done;
  return optimizer;
}

async function initState(run: PreparedRun, spec: LoraSpec, from: string | undefined, textLr: LrSchedule | undefined, ctx: JobContext): Promise<LoraState> {
  const targets = loraTargets(shapesOf(run.model.source), targetKinds(spec));
  const net = createLora(targets, { rank: spec.rank, alpha: spec.alpha, seed: spec.seed });
  const step = from ? await loadWeights(from, net, run.model.family) : 0;
  const optimizer = loraOptimizer(net, spec, textLr, step);
  const s: LoraState = { net, step, optimizer, startedAt: Date.now() / 1000 };
  if (from) {
    const warn = (message: string) => ctx.emit({ type: 'log', level: 'warn', message });
    const restored = await loadOptimizer(`${from}.optim`, s, spec, step, warn);
    ctx.emit({ type: 'log', level: 'info', message: `continuing ${from} from step ${step}${restored ? ' with its optimizer state' : ' (optimizer state starts afresh)'}` });
  }
  ctx.emit({ type: 'log', level: 'info', message: `LoRA: ${targets.length} modules (${targetKinds(spec).join(', ')}), rank ${spec.rank}, alpha ${spec.alpha}` });
  return s;
}

// ---------------------------------------------------------------------------------------------
// The run

/** The LoRA loss (prior-preservation.ts; plain p_losses without class rows), the adapters read lazily inside the tape. */
export function loraLoss(run: PreparedRun, net: LoraNetwork, batch: LoraBatch, opts: { dropout: number; seed: number; priorWeight: number }): PriorLoss {
  return tf.tidy(() => {
    const { text, unet } = run.model;
    const context = batch.context ?? encodeText(withLora(text.params, net, opts), text.cfg, batch.ids); // [B, 77, W]
    const model = { ...run.model, unet: { params: withLora(unet.params, net, opts), cfg: unet.cfg, memory: unet.memory } };
    return priorPreservationLoss(model, batch, context, opts.priorWeight);
  });
}

/** The micro-batch: instance rows (+ class rows); the context precomputed while the text encoder's adapters do not train. */
function nextLoraBatch(run: LoraRun, spec: LoraSpec, net: LoraNetwork, step: number, micro: number, textTrains: boolean): LoraBatch {
  const { prompts, ...inst } = diffusionBatch(run, spec as CommonSpec, step, micro, new Map());
  const at = { step, micro, gradAccum: run.dataset.gradAccum };
  const model = { tokenizer: run.tokenizer, family: run.model.family, timesteps: run.model.schedule.timesteps };
  const batch: LoraBatch = withClassRows({ ...inst, ids: prompts.map((p) => p.ids) }, run.classes, spec, at, model);
  const { text } = run.model;
  // a frozen text encoder's output is an input: encoded once, outside the gradient tape
  // without text adapters the encoder is the base model's: each prompt encoded once for the run
  const textAdapters = net.targets.some((t) => t.name.startsWith('lora_te'));
  if (!textTrains) batch.context = textAdapters ? tf.tidy(() => encodeText(withLora(text.params, net), text.cfg, batch.ids)) : encodeFrozenText(text.params, text.cfg, batch.ids);
  return batch;
}

const layout = (spec: LoraSpec): OutputLayout => ({ dir: resolve(spec.loraDir), ext: '.safetensors', snapshots: 'lora', snapshotSuffix: '.safetensors', outputResumes: true });

/** What differs between the SD1/SD2 and the SDXL method: batches, loss, what a batch holds, previews. */
interface FamilyOps<B> {
  next(step: number, micro: number, textTrains: boolean): B;
  loss(batch: B, opts: { dropout: number; seed: number; priorWeight: number }): PriorLoss;
  tensors(batch: B): Tensor[];
  preview(step: number, path: string): Promise<string>;
}

function sdOps(run: LoraRun, spec: LoraSpec, s: LoraState): FamilyOps<LoraBatch> {
  const { text } = run.model;
  const previewPrompt = tokenizeWithEmbeddings(run.tokenizer, previewPromptText(run, spec as CommonSpec), new Map(), paddingFor(run.model.family));
  return {
    next: (step, micro, textTrains) => nextLoraBatch(run, spec, s.net, step, micro, textTrains),
    loss: (batch, opts) => loraLoss(run, s.net, batch, opts),
    tensors: (b) => [b.latents, b.noise, ...(b.context ? [b.context] : [])],
    preview: async (_step, path) => {
      const unet = run.model.unet;
      const merged = { unet: mergeLora(unet.params, s.net), text: mergeLora(text.params, s.net) }; // multiplier 1, no dropout
      // views, not copies: iterating a float16 base (halfFrozenWeights) would materialise every weight
      const params = { unet: overlayParams(unet.params, merged.unet), text: overlayParams(text.params, merged.text) };
      const adapted = { ...run, model: { ...run.model, unet: { ...unet, params: params.unet }, text: { ...text, params: params.text } } };
      try {
        return await renderPreview(adapted, spec as CommonSpec, path, previewPrompt, {});
      } finally {
        tf.dispose([...merged.unet.values(), ...merged.text.values()]);
      }
    },
  };
}

/** SDXL (lora-xl.ts): both encoders' ids and the size conditioning per row, sgm's loss, SDXL previews. */
function xlOps(run: LoraRun, spec: LoraSpec, s: LoraState): FamilyOps<XlLoraBatch> {
  const previewPrompt = tokenizeWithEmbeddings(run.tokenizer, previewPromptText(run, spec as CommonSpec), new Map(), 'zero');
  return {
    next: (step, micro, textTrains) => nextXlLoraBatch(run, spec, s.net, step, micro, textTrains),
    loss: (batch, opts) => xlLoraLoss(run, s.net, batch, opts),
    tensors: xlBatchTensors,
    preview: (_step, path) => xlLoraPreview(run, spec as CommonSpec, s.net, path, previewPrompt.ids),
  };
}

/** A family's batch with its adapter-dropout seed, a function of (seed, step, micro). */
type Seeded<B> = { batch: B; dropoutSeed: number };

function loraSession<B>(
  run: LoraRun, spec: LoraSpec, s: LoraState, paths: RunPaths, hashes: { legacy: string; full: string }, settings: object, ops: FamilyOps<B>,
): Session<Seeded<B>> {
  const textKeys = [...s.net.weights.keys()].filter((k) => /^lora_te\d?_/.test(k));
  const textTrains = (done: number) => textKeys.length > 0 && s.optimizer.textActive(done);
  // past the text encoder's step limit its adapters stop being trained (and differentiated)
  const { trainable, prune } = textLimitedTrainable(s.optimizer, s.net.weights, textKeys, s.step);
  const log = new PriorLossLog(join(paths.runDir, 'prior-loss.csv'));
  return flushingPriorLog(log, {
    ...datasetSession(run, spec as CommonSpec, settings),
    startStep: s.step,
    optimizer: s.optimizer,
    trainable,
    nextBatch: (step, micro) => ({ batch: ops.next(step, micro, textTrains(step - 1)), dropoutSeed: spec.seed * 1_000_003 + step * 1009 + micro }),
    loss: ({ batch, dropoutSeed }, step) => {
      const parts = ops.loss(batch, { dropout: spec.dropout, seed: dropoutSeed, priorWeight: spec.priorWeight });
      if (run.classes) log.record(step, parts);
      else tf.dispose(parts.instance);
      return parts.loss;
    },
    afterStep: prune,
    disposeBatch: ({ batch }) => tf.dispose(ops.tensors(batch)),
    save: (step, final) => saveLora(run, spec, s, final ? paths.output : snapshotPath(paths, spec.name, step, layout(spec)), step, hashes),
    preview: (step) => ops.preview(step, join(paths.images, `${spec.name}-${step}.png`)),
  });
}

const textSchedule = (spec: LoraSpec): LrSchedule | undefined =>
  spec.textEncoderLr && targetKinds(spec).includes('text') ? parseLrSchedule(spec.textEncoderLr, spec.steps, 0, 'text encoder learn rate') : undefined;

/** OpenCLIP-G's adapters (SDXL): textEncoder2Lr; unset, the text encoder's rate. */
const text2Schedule = (spec: LoraSpec): LrSchedule | undefined =>
  spec.textEncoder2Lr && targetKinds(spec).includes('text') ? parseLrSchedule(spec.textEncoder2Lr, spec.steps, 0, 'OpenCLIP-G (textEncoder2Lr) learn rate') : textSchedule(spec);

/** LoRA (and `train dreambooth --lora`) as the one run (train/run.ts) drives it. */
export const lora: MethodDefinition<LoraSpec, Seeded<unknown>> = {
  kind: 'lora',
  sized: true,
  usage: (spec) => `<lora:${spec.name}:1>`,
  layout,
  schedule: (spec, startStep) => parseLrSchedule(spec.lr, spec.steps, startStep),
  freshStart: () => 'starting a new LoRA',
  async preflight(spec, _paths, _from, ctx) {
    if (spec.rank < 1 || !Number.isInteger(spec.rank)) throw new Error(`rank must be an integer ≥ 1, got ${spec.rank}`);
    textSchedule(spec); // a bad schedule fails before anything loads
    text2Schedule(spec);
    await checkTextEncoder2Lr(spec);
    if (spec.classImagesDir) await checkReadableDir(spec.classImagesDir, '/classImagesDir');
    if (spec.classPrompt && !priorOn(spec as PriorSpec)) ctx.emit({ type: 'log', level: 'warn', message: 'classPrompt given but classImages is 0: training without prior preservation' });
    if (spec.template && spec.instancePrompt) ctx.emit({ type: 'log', level: 'warn', message: `template ${spec.template} gives every prompt: the instance prompt is not used` });
  },
  async load({ spec, paths, from, backend, onRelease }, ctx) {
    const run: LoraRun = await prepareRun(spec as CommonSpec, ctx, 'lora', backend, { xl: true, templates: await promptTemplates(spec) });
    onRelease(() => closeRun(run));
    warnCaptionOverride(run.dataset, spec, ctx);
    onRelease(() => run.classes?.latents.dispose());
    run.classes = await prepareClassSet(spec as PriorSpec, run.model, run.tokenizer, run.modelHash, run.dataset.batchSize, ctx);
    const s = await initState(run, spec, from?.path, textSchedule(spec), ctx);
    onRelease(() => {
      disposeLora(s.net);
      s.optimizer.dispose();
    });
    if (run.model.textXl) {
      run.textCache = cacheXlText(run, s.net, tokenizeWithEmbeddings(run.tokenizer, previewPromptText(run, spec as CommonSpec), new Map(), 'zero').ids);
      onRelease(() => run.textCache?.dispose());
      if (run.textCache) ctx.emit({ type: 'log', level: 'info', message: `SDXL text encoders: ${run.textCache.size} prompt(s) encoded once; the encoders are released for training (they do not train)` });
    }
    await new PriorLossLog(join(paths.runDir, 'prior-loss.csv')).truncate(s.step);
    const hashes = { legacy: await legacyModelHash(spec.model), full: await fileSha256(spec.model) };
    const prior = run.classes && { classImagesDir: run.classes.dir, classImagesUsed: run.classes.dataset.items.length };
    const settings = { lora: { rank: spec.rank, alpha: spec.alpha, targets: s.net.targets.length }, optimizer: spec.optimizer, ...prior };
    return run.model.textXl
      ? (loraSession(run, spec, s, paths, hashes, settings, xlOps(run, spec, s)) as Session<Seeded<unknown>>)
      : (loraSession(run, spec, s, paths, hashes, settings, sdOps(run, spec, s)) as Session<Seeded<unknown>>);
  },
};

/** The spec with its folders set (a spec built in code may leave them to the webui's defaults). */
export function loraSpec(job: LoraJob & Omit<LoraSpec, keyof LoraJob>): Unsized<LoraSpec> {
  return withFolders(job, ['logDir', 'loraDir']);
}

/** The LoRA job: check, prepare, train, save. Cancel saves the current step. */
export function runLora(job: LoraJob, ctx: JobContext): Promise<JobResult> {
  return runMethod(lora, loraSpec(job), ctx);
}
