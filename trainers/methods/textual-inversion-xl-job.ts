/**
 * @file The Textual Inversion job on an SDXL checkpoint: the same run as SD1/SD2 (dataset,
 * cached latents, loop, snapshots, previews, resume, NaN stop) with both encoders' vectors
 * trained, sgm's loss with the per-image size conditioning, and the webui's SDXL embedding file
 * `<embeddings-dir>/<name>.safetensors` = exactly `{clip_l: [n, 768], clip_g: [n, 1280]}`
 * (modules/textual_inversion/textual_inversion.py create_embedding_from_data) plus metadata
 * (step, model hash). The AdamW state goes beside it as `<name>.safetensors.optim`.
 */
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { tf, type Tensor } from '../backend/index.ts';
import { openSafetensors, writeSafetensors, type TensorToWrite } from '../io/safetensors.ts';
import { AdamW } from '../optim/adamw.ts';
import { parseLrSchedule } from '../optim/lr.ts';
import { closeRun, datasetSession, diffusionBatch, prepareRun, previewPromptText, type CommonSpec, type PreparedRun } from '../train/prepare.ts';
import { snapshotPath, type MethodDefinition, type OutputLayout, type RunPaths, type Session } from '../train/run.ts';
import { sampleImage, savePreviewPng } from '../train/sample.ts';
import type { SdxlText, SizeCond } from '../nets/sdxl-conditioner.ts';
import { tokenizeWithEmbeddings, type TokenizedPrompt } from '../text/tokenizer.ts';
import { eosPadded, xlSampling } from '../train/sdxl-sampling.ts';
import { initVectorsFrom, xlTextualInversionLoss, xlTiConditioning, type XlTiBatch, type XlVectors } from './textual-inversion-xl.ts';
import type { JobContext } from '../job.ts';

export type XlRun = PreparedRun & { model: PreparedRun['model'] & { textXl: SdxlText } };

export { eosPadded };

/** sgm/kohya size conditioning of a dataset image: its file's size, the crop taken (top, left, in resized pixels), the size trained (its bucket). */
export function sizeCondOf(run: PreparedRun, index: number): SizeCond {
  const im = run.dataset.items[index]!.image;
  return { original: [im.sourceHeight, im.sourceWidth], crop: [im.cropTop, im.cropLeft], target: [im.height, im.width] };
}

export interface XlTiState {
  vectors: { l: tf.Variable; g: tf.Variable };
  step: number;
  optimizer: AdamW;
}

/** Read an SDXL embedding (clip_l, clip_g) and check it fits the model's encoders. */
export async function readXlEmbedding(path: string, text: SdxlText): Promise<{ l: Tensor; g: Tensor; step: number }> {
  const file = await openSafetensors(path);
  try {
    for (const [key, width] of [['clip_l', text.cfg.l.width], ['clip_g', text.cfg.g.width]] as const) {
      if (!file.has(key)) throw new Error(`${path}: not an SDXL embedding (no '${key}'; an SD1/SD2 embedding has one vector table)`);
      const shape = file.info(key).shape;
      if (shape.length !== 2 || shape[1] !== width) throw new Error(`${path}: '${key}' is [${shape}], this model's encoder needs [n, ${width}]`);
    }
    const [sl, sg] = [file.info('clip_l').shape, file.info('clip_g').shape];
    if (sl[0] !== sg[0]) throw new Error(`${path}: clip_l has ${sl[0]} vectors, clip_g ${sg[0]}`);
    const step = Number(file.metadata().step ?? 0);
    return { l: tf.tensor(await file.read('clip_l'), sl), g: tf.tensor(await file.read('clip_g'), sg), step: Number.isFinite(step) ? step : 0 };
  } finally {
    await file.close();
  }
}

export async function initXlState(run: XlRun, spec: CommonSpec & { initText: string; vectors: number }, from: string | undefined, ctx: JobContext): Promise<XlTiState> {
  const text = run.model.textXl;
  const bpe = run.tokenizer.bpe(spec.initText);
  const init = from
    ? await readXlEmbedding(from, text)
    : { l: initVectorsFrom(text.params, text.cfg.l, bpe, spec.vectors), g: initVectorsFrom(text.params, text.cfg.g, bpe, spec.vectors), step: 0 };
  const vectors = { l: tf.variable(init.l, true, `ti/${spec.name}/clip_l`), g: tf.variable(init.g, true, `ti/${spec.name}/clip_g`) };
  tf.dispose([init.l, init.g]);
  const optimizer = new AdamW(new Map([['clip_l', vectors.l], ['clip_g', vectors.g]]), { lr: 0, weightDecay: 0 });
  if (from && existsSync(`${from}.optim`)) await loadOptim(`${from}.optim`, optimizer, init.step, (message) => ctx.emit({ type: 'log', level: 'warn', message }));
  return { vectors, step: init.step, optimizer };
}

/** AdamW moments as a safetensors (`<param>.exp_avg`, `.exp_avg_sq`; step in the metadata). */
async function saveOptim(path: string, optimizer: AdamW, step: number): Promise<void> {
  const sd = await optimizer.stateDict();
  const names = [...optimizer.params.keys()];
  const tensors: TensorToWrite[] = [];
  const steps: Record<string, number> = {};
  for (const [index, e] of sd.state) {
    tensors.push({ name: `${names[index]}.exp_avg`, dtype: 'F32', shape: e.shape, data: e.exp_avg });
    tensors.push({ name: `${names[index]}.exp_avg_sq`, dtype: 'F32', shape: e.shape, data: e.exp_avg_sq });
    steps[names[index]!] = e.step;
  }
  const { params: _p, ...hyper } = sd.param_groups[0]!;
  await writeSafetensors(path, tensors, { step: String(step), optimizer_steps: JSON.stringify(steps), hyper: JSON.stringify(hyper) }, { overwrite: true });
}

async function loadOptim(path: string, optimizer: AdamW, step: number, warn: (m: string) => void): Promise<void> {
  const file = await openSafetensors(path);
  try {
    const meta = file.metadata();
    if (Number(meta.step) !== step) return warn(`${path} is from step ${meta.step}, the embedding from step ${step}: optimizer state not loaded`);
    const names = [...optimizer.params.keys()];
    const steps = JSON.parse(meta.optimizer_steps ?? '{}') as Record<string, number>;
    const sd = await optimizer.stateDict();
    sd.param_groups[0] = { ...sd.param_groups[0]!, ...JSON.parse(meta.hyper ?? '{}') };
    for (const [index, name] of names.entries()) {
      if (!file.has(`${name}.exp_avg`)) continue;
      const shape = file.info(`${name}.exp_avg`).shape;
      sd.state.set(index, { step: steps[name] ?? 0, exp_avg: await file.read(`${name}.exp_avg`), exp_avg_sq: await file.read(`${name}.exp_avg_sq`), shape });
    }
    optimizer.loadStateDict(sd);
  } finally {
    await file.close();
  }
}

/** `.optim` first: a kill between the two leaves an embedding beside an older state, which the step check refuses. */
export async function saveXlEmbedding(run: XlRun, name: string, s: XlTiState, path: string, step: number): Promise<string[]> {
  await mkdir(dirname(path), { recursive: true });
  await saveOptim(`${path}.optim`, s.optimizer, step);
  const tensors: TensorToWrite[] = [];
  for (const [key, v] of [['clip_g', s.vectors.g], ['clip_l', s.vectors.l]] as const) {
    tensors.push({ name: key, dtype: 'F32', shape: v.shape, data: (await v.data()) as Float32Array });
  }
  await writeSafetensors(path, tensors, { name, step: String(step), sd_checkpoint: run.modelHash, sd_checkpoint_name: run.modelName }, { overwrite: true });
  return [path, `${path}.optim`];
}

/** Preview with sidetrain's sampler: the prompt's conditioning with the vectors spliced in (train/sdxl-sampling.ts). */
async function renderXlPreview(run: XlRun, spec: CommonSpec, s: XlTiState, path: string, prompt: TokenizedPrompt): Promise<string> {
  const { textXl, unet, schedule, prediction } = run.model;
  const size: SizeCond = { original: [spec.height, spec.width], crop: [0, 0], target: [spec.height, spec.width] };
  const cond = xlTiConditioning(textXl, s.vectors, { idsL: [eosPadded(prompt.ids)], idsG: [prompt.ids], positions: [prompt.embeddings.flatMap((e) => e.positions)] });
  const inputs = xlSampling(textXl, unet, cond, run.tokenizer, size);
  try {
    const image = await sampleImage(
      { ...inputs, schedule, vae: run.decoder! },
      { sampler: spec.previewSampler, steps: spec.previewSteps, cfgScale: spec.previewCfgScale, seed: spec.seed, width: spec.width, height: spec.height, parameterization: prediction },
    );
    const infotext = `${spec.previewPrompt ?? ''}\nSteps: ${spec.previewSteps}, Sampler: ${spec.previewSampler}, CFG scale: ${spec.previewCfgScale}, Seed: ${spec.seed}, Size: ${spec.width}x${spec.height}, Model hash: ${run.modelHash}, Model: ${run.modelName}`;
    await mkdir(dirname(path), { recursive: true });
    await savePreviewPng(path, image.rgb, image.width, image.height, infotext);
    return path;
  } finally {
    inputs.dispose();
  }
}

const layout = (spec: XlTiSpec): OutputLayout => ({ dir: resolve(spec.embeddingsDir), ext: '.safetensors', snapshots: 'embeddings', snapshotSuffix: '.safetensors', outputResumes: true });

type XlTiSpec = CommonSpec & { initText: string; vectors: number; embeddingsDir: string };

export function xlTiSession(run: XlRun, spec: XlTiSpec, s: XlTiState, paths: RunPaths): Session<XlTiBatch> {
  const embeddings = new Map([[spec.name, s.vectors.l.shape[0]!]]);
  const vectors: XlVectors = s.vectors;
  const previewPrompt = tokenizeWithEmbeddings(run.tokenizer, previewPromptText(run, spec), embeddings, 'zero');
  return {
    ...datasetSession(run, spec, { family: 'sdxl' }),
    startStep: s.step,
    optimizer: s.optimizer,
    trainable: new Map([['clip_l', s.vectors.l], ['clip_g', s.vectors.g]]),
    maxAbs: 3.4028234663852886e38 / 100,
    nextBatch: (step, micro) => {
      const b = diffusionBatch(run, spec, step, micro, embeddings); // prompts padded with 0 (OpenCLIP-G)
      const items = run.dataset.batchAt(step - 1, micro).items;
      const idsG = b.prompts.map((p) => p.ids);
      return {
        ...b, idsG, idsL: idsG.map(eosPadded), sizes: items.map((i) => sizeCondOf(run, i)),
        positions: b.prompts.map((p) => p.embeddings.flatMap((e) => e.positions)),
      };
    },
    loss: (batch) => xlTextualInversionLoss({ ...run.model, textXl: run.model.textXl }, vectors, batch),
    disposeBatch: (b) => tf.dispose([b.latents, b.noise]),
    save: (step, final) => saveXlEmbedding(run, spec.name, s, final ? paths.output : snapshotPath(paths, spec.name, step, layout(spec)), step),
    preview: (step) => renderXlPreview(run, spec, s, join(paths.images, `${spec.name}-${step}.png`), previewPrompt),
  };
}

/** What both Textual Inversion definitions (SD1/SD2 and SDXL) share. */
export const embeddingJob = {
  kind: 'embedding' as const,
  usage: (spec: { name: string }) => spec.name,
  schedule: (spec: { lr: string; steps: number }, startStep: number) => parseLrSchedule(spec.lr, spec.steps, startStep),
  freshStart: () => 'starting a new embedding',
};

/** Textual Inversion on SDXL as the one run (train/run.ts) drives it; textual-inversion.ts picks it by the model's family. */
export const textualInversionXl: MethodDefinition<XlTiSpec, XlTiBatch> = {
  ...embeddingJob,
  sized: true,
  layout,
  async load({ spec, paths, from, backend, onRelease }, ctx) {
    const run = (await prepareRun(spec, ctx, 'textual_inversion', backend, { xl: true })) as XlRun;
    onRelease(() => closeRun(run));
    const s = await initXlState(run, spec, from?.path, ctx);
    onRelease(() => {
      tf.dispose([s.vectors.l, s.vectors.g]);
      s.optimizer.dispose();
    });
    return xlTiSession(run, spec, s, paths);
  },
};
