/**
 * @file Textual Inversion (webui modules/textual_inversion/textual_inversion.py create_embedding,
 * train_embedding): only the name's vectors train; they replace the name's tokens in the text
 * encoder's input, which runs every step. Output: `<embeddings-dir>/<name>.pt` (+ `.optim`).
 */
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { tf, type Tensor } from '../backend/tf.ts';
import { encodeText, splicesFor, textKeyNames, type ClipTextConfig } from '../nets/clip.ts';
import { param, type Params } from '../nets/params.ts';
import { denoisingLoss, type Denoiser, type DiffusionBatch } from '../train/diffusion-loss.ts';
import { readEmbedding, writeEmbedding, writeEmbeddingOptim, embeddingChecksum } from '../io/pt-embedding.ts';
import { readOptim } from '../io/optim-file.ts';
import { AdamW } from '../optim/adamw.ts';
import { fromOptimFile, toOptimRecords } from '../optim/optim-state.ts';
import {
  closeRun, datasetSession, diffusionBatch, prepareRun, previewPromptText, renderPreview, type PreparedRun,
} from '../train/prepare.ts';
import {
  runMethod, snapshotPath, withFolders, type MethodDefinition, type OutputLayout, type RunPaths, type Session, type Sized, type WithFolders,
} from '../train/run.ts';
import type { TextualInversionJob } from '../../schemas/types.ts';
import { tokenizeWithEmbeddings, type TokenizedPrompt } from '../text/tokenizer.ts';
import { paddingFor } from '../nets/sd.ts';
import type { JobContext, JobResult } from '../job.ts';
import { peekFamily } from '../io/checkpoint.ts';
import { checkReadableFile } from '../io/paths.ts';
import { embeddingJob, textualInversionXl } from './textual-inversion-xl-job.ts';

export type { TokenizedPrompt };

export interface TiBatch extends DiffusionBatch {
  prompts: TokenizedPrompt[];
}

export interface TiModel extends Denoiser {
  text: { params: Params; cfg: ClipTextConfig };
}

/** The TI loss: the text encoder runs every step (the vectors change), then p_losses. */
export function textualInversionLoss(model: TiModel, vectors: Map<string, Tensor>, batch: TiBatch): tf.Scalar {
  return tf.tidy(() => {
    const encoderHiddenStates = encodeText(model.text.params, model.text.cfg, batch.prompts.map((p) => p.ids), {
      splices: splicesFor(batch.prompts, vectors),
    }); // [B, 77, W]
    return denoisingLoss(model, batch, encoderHiddenStates);
  });
}

/** Embedding.checksum multiplies the vectors by 100 in float32: larger vectors cannot be saved. */
const MAX_VECTOR_ABS = 3.4028234663852886e38 / 100;

/** The job's options (schemas/textual-inversion.json), folders set. */
export type TiSpec = WithFolders<TextualInversionJob, 'logDir' | 'embeddingsDir'> & Sized;

/**
 * create_embedding: the init text's token embeddings spread over the vectors
 * (`vec[i] = embedded[i * n // numVectors]`); an empty init text gives zeros. SD1's
 * encode_embedding_init_text (modules/sd_hijack_clip.py) calls the HF tokenizer with
 * `max_length=nvpt`, which truncates to the vector count; SD2's (sd_hijack_open_clip.py) does not.
 */
export function initialVectors(run: PreparedRun, initText: string, numVectors: number): Tensor {
  const { params, cfg } = run.model.text;
  const bpe = run.tokenizer.bpe(initText);
  const ids = cfg.family === 'sd1' ? bpe.slice(0, numVectors) : bpe;
  if (ids.length === 0) return tf.zeros([numVectors, cfg.width]);
  const rows = Array.from({ length: numVectors }, (_, i) => ids[Math.floor((i * ids.length) / numVectors)]!);
  return tf.gather(param(params, textKeyNames(cfg.family, cfg.prefix).tokenEmbedding), rows);
}

interface TiState {
  vectors: tf.Variable;
  step: number;
  optimizer: AdamW;
}

async function initState(run: PreparedRun, spec: TiSpec, from: string | undefined, ctx: JobContext): Promise<TiState> {
  let step = 0;
  let init: Tensor;
  if (from) {
    const e = await readEmbedding(from);
    const v = Object.values(e.vectors)[0]!;
    if (v.shape[1] !== run.model.text.cfg.width) throw new Error(`${from}: vectors are ${v.shape[1]} wide, the model's text encoder is ${run.model.text.cfg.width}`);
    init = tf.tensor(v.values, v.shape);
    step = e.step ?? 0;
  } else init = tf.tidy(() => initialVectors(run, spec.initText, spec.vectors));
  const vectors = tf.variable(init, true, `ti/${spec.name}`);
  init.dispose();
  const optimizer = new AdamW(new Map([[spec.name, vectors]]), { lr: 0, weightDecay: 0 });
  if (from && existsSync(`${from}.optim`)) {
    const optim = await readOptim(`${from}.optim`);
    const hash = embeddingChecksum(await vectors.data() as Float32Array);
    if (optim.hash === hash) optimizer.loadStateDict(fromOptimFile(optim));
    else ctx.emit({ type: 'log', level: 'warn', message: `${from}.optim does not match the embedding (hash ${optim.hash} ≠ ${hash}): optimizer state not loaded` });
  }
  return { vectors, step, optimizer };
}

async function saveEmbedding(run: PreparedRun, spec: TiSpec, s: TiState, path: string, step: number): Promise<string[]> {
  const values = (await s.vectors.data()) as Float32Array;
  const shape = s.vectors.shape as [number, number];
  await mkdir(dirname(path), { recursive: true });
  // .optim first: a kill between the two leaves a .pt only beside the .optim of its own step
  // (a snapshot) or a hash mismatch the resume detects (the output), never a silent mix
  const { states, group } = toOptimRecords(await s.optimizer.stateDict());
  if (states[0]) await writeEmbeddingOptim(`${path}.optim`, values, states[0], group, { overwrite: true });
  await writeEmbedding(path, { name: spec.name, values, shape, step, sdCheckpoint: run.modelHash, sdCheckpointName: run.modelName }, { overwrite: true });
  return [path, ...(states[0] ? [`${path}.optim`] : [])];
}

const layout = (spec: TiSpec): OutputLayout => ({ dir: resolve(spec.embeddingsDir), ext: '.pt', snapshots: 'embeddings', snapshotSuffix: '.pt', outputResumes: true });

function tiSession(run: PreparedRun, spec: TiSpec, s: TiState, paths: RunPaths): Session<TiBatch> {
  const vectorMap = new Map<string, Tensor>([[spec.name, s.vectors]]);
  const embeddings = new Map([[spec.name, s.vectors.shape[0]!]]);
  const previewPrompt = tokenizeWithEmbeddings(run.tokenizer, previewPromptText(run, spec), embeddings, paddingFor(run.model.family));
  return {
    ...datasetSession(run, spec),
    startStep: s.step,
    optimizer: s.optimizer,
    trainable: new Map([[spec.name, s.vectors]]),
    maxAbs: MAX_VECTOR_ABS,
    nextBatch: (step, micro) => diffusionBatch(run, spec, step, micro, embeddings),
    loss: (batch) => textualInversionLoss(run.model, vectorMap, batch),
    disposeBatch: (b) => tf.dispose([b.latents, b.noise]),
    save: (step, final) => saveEmbedding(run, spec, s, final ? paths.output : snapshotPath(paths, spec.name, step, layout(spec)), step),
    preview: (step) => renderPreview(run, spec, join(paths.images, `${spec.name}-${step}.png`), previewPrompt, {
      splices: () => splicesFor([previewPrompt], vectorMap),
    }),
  };
}

/** Textual Inversion as the one run (train/run.ts) drives it. */
export const textualInversion: MethodDefinition<TiSpec, TiBatch> = {
  ...embeddingJob,
  sized: true,
  layout,
  async load({ spec, paths, from, backend, onRelease }, ctx) {
    const run = await prepareRun(spec, ctx, 'textual_inversion', backend);
    onRelease(() => closeRun(run));
    const s = await initState(run, spec, from?.path, ctx);
    onRelease(() => {
      s.vectors.dispose();
      s.optimizer.dispose();
    });
    return tiSession(run, spec, s, paths);
  },
};

/** The TI job: check, prepare, train, save. Cancel saves the current step; NaN keeps the last snapshot. */
export async function runTextualInversion(job: TextualInversionJob, ctx: JobContext): Promise<JobResult> {
  const spec = withFolders(job, ['logDir', 'embeddingsDir']);
  // SDXL: both encoders' vectors, `<name>.safetensors` {clip_l, clip_g} (textual-inversion-xl-job.ts)
  if ((await peekFamily(await checkReadableFile(spec.model, '/model'))) === 'sdxl') return runMethod(textualInversionXl, spec, ctx);
  return runMethod(textualInversion, spec, ctx);
}
