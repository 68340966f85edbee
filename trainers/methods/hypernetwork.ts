/**
 * @file Hypernetwork training (webui v1.10 modules/hypernetworks/hypernetwork.py
 * train_hypernetwork): only the (k, v) modules train; they transform the context of every
 * attention of their size. The text encoder is frozen, so each micro-batch's context is encoded
 * once, outside the gradient tape. AdamW with torch's default weight decay 0.01, as the webui's
 * `torch.optim.AdamW(params=weights, lr=…)`. Output: `<hypernetwork-dir>/<name>.pt` (+ `.optim`),
 * every metadata key written; `<hypernet:NAME:1>` in a prompt.
 */
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { tf, type Tensor } from '../backend/tf.ts';
import {
  createHypernetwork, defaultDropoutStructure, hypernetHook, hypernetLayers, hypernetSpecFromWebui,
  validateHypernetworkSpec, type HypernetworkSpec,
} from '../nets/hypernet.ts';
import type { Params } from '../nets/params.ts';
import { encodeFrozenText } from '../train/context-cache.ts';
import { UNET_PREFIX } from '../nets/unet.ts';
import { modelHash, openCheckpoint } from '../io/checkpoint.ts';
import { readHypernetwork, writeHypernetwork, writeHypernetworkOptim, type HypernetModule } from '../io/pt-hypernet.ts';
import { readOptim } from '../io/optim-file.ts';
import { AdamW } from '../optim/adamw.ts';
import { parseLrSchedule, type LrSchedule } from '../optim/lr.ts';
import { fromOptimFile, toOptimRecords } from '../optim/optim-state.ts';
import {
  closeRun, datasetSession, diffusionBatch, prepareRun, previewPromptText, renderPreview, type PreparedRun,
} from '../train/prepare.ts';
import {
  runMethod, snapshotPath, withFolders, type MethodDefinition, type OutputLayout, type RunPaths, type Session, type Sized, type WithFolders,
} from '../train/run.ts';
import type { HypernetworkJob } from '../../schemas/types.ts';
import { tokenizeWithEmbeddings } from '../text/tokenizer.ts';
import { paddingFor } from '../nets/sd.ts';
import { denoisingLoss, type Denoiser, type DiffusionBatch } from '../train/diffusion-loss.ts';
import { nextXlHnBatch, xlHnPreview, xlHypernetworkLoss, type XlHnBatch } from './hypernetwork-xl.ts';
import { Rng } from '../random.ts';
import type { JobContext, JobResult } from '../job.ts';

export interface HnModel extends Denoiser {
  hypernetwork: { params: Params; spec: HypernetworkSpec };
}

/** The hypernetwork loss: p_losses with the modules hooked into every attention (train mode, dropout seeded). */
export function hypernetworkLoss(model: HnModel, batch: DiffusionBatch, encoderHiddenStates: Tensor, dropoutSeed = 0): tf.Scalar {
  const { params, spec } = model.hypernetwork;
  return tf.tidy(() => denoisingLoss(model, batch, encoderHiddenStates, { hooks: { kv: hypernetHook(params, spec, { training: true, seed: dropoutSeed }) } }));
}

/** The job's options (schemas/hypernetwork.json), folders set. */
export type HnSpec = WithFolders<HypernetworkJob, 'logDir' | 'hypernetworkDir'> & Sized;

/** Rates above this usually wreck a hypernetwork (webui users reuse the embedding default 0.005). */
export const HN_LR_WARN = 1e-4;

/**
 * The module structure a new hypernetwork gets from the job's options (webui create_hypernetwork:
 * without dropout the structure is all zeros, whatever dropoutStructure says).
 */
export function hypernetSpecFromJob(spec: HnSpec): HypernetworkSpec {
  const dropoutStructure = spec.dropout
    ? (spec.dropoutStructure ?? defaultDropoutStructure(spec.layerStructure, true, spec.lastLayerDropout))
    : spec.layerStructure.map(() => 0);
  const hn: HypernetworkSpec = {
    sizes: spec.sizes, layerStructure: spec.layerStructure, activation: spec.activation, layerNorm: spec.layerNorm,
    dropout: spec.dropout, dropoutStructure, activateOutput: spec.activateOutput, weightInit: spec.weightInit,
    lastLayerDropout: spec.lastLayerDropout,
  };
  validateHypernetworkSpec(hn);
  return hn;
}

/** Context widths of the UNet's attentions (in-dim of every to_k): text width and transformer channels. */
export function attentionWidths(shapes: Iterable<[string, number[]]>): number[] {
  const widths = new Set<number>();
  for (const [key, shape] of shapes) if (key.endsWith('.to_k.weight') && shape.length === 2) widths.add(shape[1]!);
  return [...widths].sort((a, b) => a - b);
}

function checkSizes(sizes: number[], widths: number[], model: string): void {
  const bad = sizes.filter((s) => !widths.includes(s));
  if (bad.length) {
    throw new Error(`hypernetwork: size ${bad.join(', ')} is not a context width of ${model}: its attentions take ${widths.join(', ')} ` +
      '(the text width and the transformer channel counts)');
  }
}

/** The model's attention widths from the checkpoint's shapes, without loading weights. */
async function modelWidths(path: string): Promise<number[]> {
  const { source } = await openCheckpoint(path);
  try {
    return attentionWidths(source.keys().filter((k) => k.startsWith(UNET_PREFIX)).map((k) => [k, source.info(k).shape] as [string, number[]]));
  } finally {
    await source.close();
  }
}

// ---------------------------------------------------------------------------------------------
// State: the module weights (in the webui's `weights()` order, which numbers the .optim) + AdamW

interface HnState {
  hn: HypernetworkSpec;
  params: Params;
  /** Every module parameter as the webui's `Hypernetwork.weights()` lists them (layer.parameters()). */
  trainable: Map<string, tf.Variable>;
  step: number;
  optimizer: AdamW;
  optionalInfo: string | null;
}

/** Parameter names of one module, in the Sequential's order (weight before bias). */
function moduleParamNames(hn: HypernetworkSpec, size: number): string[] {
  return hypernetLayers(hn, size).flatMap((l) => {
    if (l.kind === 'linear' || l.kind === 'layernorm') return [`linear.${l.index}.weight`, `linear.${l.index}.bias`];
    if (l.kind === 'act' && l.name === 'prelu') return [`linear.${l.index}.weight`];
    return [];
  });
}

/** Variables from a file's modules, checked against the structure its metadata describes. */
function paramsFromFile(path: string, modules: Map<number, [HypernetModule, HypernetModule]>, hn: HypernetworkSpec): Params {
  const params: Params = new Map();
  for (const [size, pair] of modules) {
    const names = moduleParamNames(hn, size);
    pair.forEach((mod, i) => {
      const kv = i === 0 ? 'k' : 'v';
      const extra = [...mod.keys()].filter((k) => !names.includes(k));
      const missing = names.filter((k) => !mod.has(k));
      if (extra.length || missing.length) {
        throw new Error(`${path}: module ${size}.${kv} does not match its metadata's structure ` +
          `(missing ${missing.join(', ') || 'none'}; unexpected ${extra.join(', ') || 'none'})`);
      }
      for (const name of names) {
        const t = mod.get(name)!;
        params.set(`${size}.${kv}.${name}`, tf.variable(tf.tensor(t.values, t.shape), true));
      }
    });
  }
  return params;
}

/** How the file's structure differs from the job's structure options (for the log note). */
function structureDifferences(spec: HnSpec, file: HypernetworkSpec): string[] {
  let job: HypernetworkSpec;
  try {
    job = hypernetSpecFromJob(spec);
  } catch {
    return ['a structure of its own'];
  }
  const fields = ['sizes', 'layerStructure', 'activation', 'layerNorm', 'dropoutStructure', 'activateOutput', 'weightInit'] as const;
  return fields.filter((f) => JSON.stringify(job[f]) !== JSON.stringify(file[f])).map((f) => `${f} ${JSON.stringify(file[f])}`);
}

async function loadOptimizer(from: string, optimizer: AdamW, ctx: JobContext): Promise<void> {
  const warn = (message: string) => ctx.emit({ type: 'log', level: 'warn', message });
  if (!existsSync(`${from}.optim`)) return;
  const optim = await readOptim(`${from}.optim`);
  const hash = await modelHash(from);
  if (optim.hash !== hash) return warn(`${from}.optim does not match the hypernetwork (hash ${optim.hash} ≠ ${hash}): optimizer state not loaded`);
  if ((optim.optimizerName ?? 'AdamW') !== 'AdamW') return warn(`${from}.optim is for ${optim.optimizerName}; sidetrain trains with AdamW: optimizer state not loaded`);
  try {
    optimizer.loadStateDict(fromOptimFile(optim));
  } catch (err) {
    warn(`cannot resume from the saved optimizer state (${(err as Error).message}): starting it afresh`);
  }
}

async function initState(spec: HnSpec, from: string | undefined, widths: number[], ctx: JobContext): Promise<HnState> {
  let hn: HypernetworkSpec;
  let params: Params;
  let step = 0;
  let optionalInfo: string | null = null;
  if (from) {
    const file = await readHypernetwork(from);
    hn = hypernetSpecFromWebui(file.meta as unknown as Record<string, unknown>, [...file.modules.keys()]);
    validateHypernetworkSpec(hn);
    checkSizes(hn.sizes, widths, spec.model);
    params = paramsFromFile(from, file.modules, hn);
    step = file.meta.step ?? 0;
    optionalInfo = file.meta.optional_info ?? null;
    const diff = structureDifferences(spec, hn);
    ctx.emit({ type: 'log', level: 'info', message: `continuing ${from} from step ${step}` +
      (diff.length ? `; its structure is kept and these options are ignored (the file has: ${diff.join(', ')})` : '') });
  } else {
    hn = hypernetSpecFromJob(spec);
    params = createHypernetwork(hn, spec.seed);
  }
  const trainable = new Map<string, tf.Variable>();
  for (const [key, t] of params) {
    const v = t as tf.Variable;
    v.trainable = true; // webui weights() = layer.parameters(): PReLU's weight trains too
    trainable.set(key, v);
  }
  const optimizer = new AdamW(trainable, { lr: 0, weightDecay: 0.01 });
  if (from) await loadOptimizer(from, optimizer, ctx);
  return { hn, params, trainable, step, optimizer, optionalInfo };
}

// ---------------------------------------------------------------------------------------------
// Save (webui Hypernetwork.save via save_hypernetwork: sd_checkpoint = the model's short hash)

async function saveHypernetwork(run: PreparedRun, spec: HnSpec, s: HnState, path: string, step: number): Promise<string[]> {
  const modules = new Map<number, [HypernetModule, HypernetModule]>();
  for (const size of s.hn.sizes) {
    const pair = await Promise.all((['k', 'v'] as const).map(async (kv) => {
      const mod: HypernetModule = new Map();
      for (const name of moduleParamNames(s.hn, size)) {
        const t = s.params.get(`${size}.${kv}.${name}`)!;
        mod.set(name, { values: (await t.data()) as Float32Array, shape: [...t.shape] });
      }
      return mod;
    }));
    modules.set(size, pair as [HypernetModule, HypernetModule]);
  }
  const ds = s.hn.dropoutStructure ?? defaultDropoutStructure(s.hn.layerStructure, s.hn.dropout, s.hn.lastLayerDropout);
  const meta = {
    step, name: spec.name, layer_structure: s.hn.layerStructure, activation_func: s.hn.activation, is_layer_norm: s.hn.layerNorm,
    weight_initialization: s.hn.weightInit, sd_checkpoint: run.modelHash, sd_checkpoint_name: run.modelName,
    activate_output: s.hn.activateOutput, use_dropout: ds.some((p) => p > 0), dropout_structure: ds,
    last_layer_dropout: (ds[ds.length - 2] ?? 0) !== 0, // webui save(): dropout_structure[-2] != 0
    optional_info: s.optionalInfo,
  };
  await mkdir(dirname(path), { recursive: true });
  await writeHypernetwork(path, { modules, meta }, { overwrite: true });
  const { states, group } = toOptimRecords(await s.optimizer.stateDict());
  if (!states.length) return [path];
  await writeHypernetworkOptim(`${path}.optim`, path, states, group, 'AdamW', { overwrite: true });
  return [path, `${path}.optim`];
}

// ---------------------------------------------------------------------------------------------
// The run

/** The frozen text encoder's output rides in the batch; dropout is seeded by (seed, step, micro). */
type HnBatch = DiffusionBatch & { context: Tensor; dropoutSeed: number };

const layout = (spec: HnSpec): OutputLayout => ({ dir: resolve(spec.hypernetworkDir), ext: '.pt', snapshots: 'hypernetworks', snapshotSuffix: '.pt', outputResumes: true });

function hnSession(run: PreparedRun, spec: HnSpec, s: HnState, paths: RunPaths): Session<HnBatch> {
  const model: HnModel = { ...run.model, hypernetwork: { params: s.params, spec: s.hn } };
  if (run.model.textXl) return xlHnSession(run, spec, s, paths, model) as unknown as Session<HnBatch>;
  const { text } = run.model;
  const previewPrompt = tokenizeWithEmbeddings(run.tokenizer, previewPromptText(run, spec), new Map(), paddingFor(run.model.family));
  return {
    ...datasetSession(run, spec, { hypernetwork: s.hn }),
    startStep: s.step,
    optimizer: s.optimizer,
    trainable: s.trainable,
    nextBatch: (step, micro) => {
      const { prompts, ...batch } = diffusionBatch(run, spec, step, micro, new Map());
      // the text encoder is frozen: its output is an input here, computed outside the gradient tape
      const context = encodeFrozenText(text.params, text.cfg, prompts.map((p) => p.ids)); // [B, 77, W]
      return { ...batch, context, dropoutSeed: Rng.derive(spec.seed, 'dropout', step, micro).int(2 ** 31) };
    },
    loss: (batch) => hypernetworkLoss(model, batch, batch.context, batch.dropoutSeed),
    disposeBatch: (b) => tf.dispose([b.latents, b.noise, b.context]),
    save: (step, final) => saveHypernetwork(run, spec, s, final ? paths.output : snapshotPath(paths, spec.name, step, layout(spec)), step),
    preview: (step) => renderPreview(run, spec, join(paths.images, `${spec.name}-${step}.png`), previewPrompt, {
      hooks: { kv: hypernetHook(s.params, s.hn) }, // eval mode: no dropout, multiplier 1
    }),
  };
}

/** SDXL (hypernetwork-xl.ts): both frozen encoders per batch, each image's size conditioning, sgm's loss, SDXL previews. */
function xlHnSession(run: PreparedRun, spec: HnSpec, s: HnState, paths: RunPaths, model: HnModel): Session<XlHnBatch> {
  return {
    ...datasetSession(run, spec, { hypernetwork: s.hn }),
    startStep: s.step,
    optimizer: s.optimizer,
    trainable: s.trainable,
    nextBatch: (step, micro) => nextXlHnBatch(run, spec, step, micro),
    loss: (batch) => xlHypernetworkLoss(model, model.hypernetwork, batch, batch.dropoutSeed),
    disposeBatch: (b) => tf.dispose([b.latents, b.noise, b.cond.crossattn, b.cond.pooled]),
    save: (step, final) => saveHypernetwork(run, spec, s, final ? paths.output : snapshotPath(paths, spec.name, step, layout(spec)), step),
    preview: (step) => xlHnPreview(run, spec, model.hypernetwork, step, paths.images),
  };
}

/** The schema's default sizes are SD1's; on another model a job that kept them gets the model's own widths. */
const DEFAULT_SIZES = [768, 320, 640, 1280];

/** Warn about rates that destroy hypernetworks (any piece of the schedule above HN_LR_WARN). */
function warnHighLr(lr: LrSchedule, ctx: JobContext): void {
  const high = Math.max(...lr.segments.map((s) => s.rate));
  if (high > HN_LR_WARN) {
    ctx.emit({ type: 'log', level: 'warn', message: `learn rate ${high} is above ${HN_LR_WARN}: hypernetworks usually break at such rates (webui default 0.00001)` });
  }
}

/** The hypernetwork as the one run (train/run.ts) drives it. */
export const hypernetwork: MethodDefinition<HnSpec, HnBatch> = {
  kind: 'hypernetwork',
  sized: true,
  usage: (spec) => `<hypernet:${spec.name}:1>`,
  layout,
  schedule: (spec, startStep) => parseLrSchedule(spec.lr, spec.steps, startStep),
  freshStart: () => 'starting a new hypernetwork',
  async preflight(spec, _paths, from, ctx) {
    warnHighLr(parseLrSchedule(spec.lr, spec.steps), ctx);
    // a resumed file keeps its own structure; a new one must fit the model's attentions
    if (from) return;
    const widths = await modelWidths(spec.model);
    if (spec.sizes.join() === DEFAULT_SIZES.join() && !DEFAULT_SIZES.every((w) => widths.includes(w))) {
      ctx.emit({ type: 'log', level: 'info', message: `sizes: this model's attentions take ${widths.join(', ')} (SDXL: 2048 cross-attention, 640/1280 self-attention), so the modules get those` });
      return { ...spec, sizes: widths };
    }
    checkSizes(hypernetSpecFromJob(spec).sizes, widths, spec.model);
  },
  async load({ spec, paths, from, backend, onRelease }, ctx) {
    const s = await initState(spec, from?.path, await modelWidths(spec.model), ctx);
    onRelease(() => {
      tf.dispose([...s.params.values()]);
      s.optimizer.dispose();
    });
    const run = await prepareRun(spec, ctx, 'hypernetwork', backend, { xl: true });
    onRelease(() => closeRun(run));
    return hnSession(run, spec, s, paths);
  },
};

/** The hypernetwork job: check, prepare, train, save. Cancel saves the current step; NaN keeps the last snapshot. */
export function runHypernetwork(job: HypernetworkJob, ctx: JobContext): Promise<JobResult> {
  return runMethod(hypernetwork, withFolders(job, ['logDir', 'hypernetworkDir']), ctx);
}
