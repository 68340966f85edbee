/**
 * @file What the whole-model methods (Dreambooth, fine-tune) do differently on SDXL (sgm
 * DiffusionEngine.forward with trainable embedders; kohya sd-scripts sdxl_train.py): the loss is
 * sgm's (train/sgm-loss.ts) on the conditioner's `crossattn` and `vector` (pooled OpenCLIP-G +
 * each image's size/crop embeddings), both encoders run inside the tape when they train, and
 * prior preservation splits the per-sample losses into instance and class means.
 *
 * Which weights train: every UNet weight (label_emb included); per encoder, with its own rate,
 * the weights that reach the loss. CLIP-L's context is `hidden_states[L-1]` (sgm
 * FrozenCLIPEmbedder layer "hidden", layer_idx 11), so its last block and `final_layer_norm`
 * never do: their gradient is exactly zero (sdxl-tiny ft.grad.*), and an optimizer step would
 * still move them by weight decay, so they are left out and the writer copies them unchanged.
 * OpenCLIP-G's last block, `ln_final` and `text_projection` reach the loss only through the
 * pooled vector, and train (kohya trains them the same way).
 */
import { tf } from '../backend/tf.ts';
import { peekFamily } from '../io/checkpoint.ts';
import { makeTrainable } from '../optim/trainable.ts';
import { diffusionBatch, type CommonSpec, type PreparedRun } from '../train/prepare.ts';
import { textBlockKeys, textKeyNames } from '../nets/clip.ts';
import { encodeSdxlText, vectorConditioning, type SdxlConditioning, type SdxlText, type SizeCond } from '../nets/sdxl-conditioner.ts';
import { sgmLoss } from '../train/sgm-loss.ts';
import { splitPriorLoss, withClassRows, type ClassSet, type PriorBatch, type PriorLoss } from '../train/prior-preservation.ts';
import { sizeCondOf } from './textual-inversion-xl-job.ts';
import { xlIds } from '../train/sdxl-sampling.ts';
import type { Denoiser, DiffusionBatch } from '../train/diffusion-loss.ts';

/** SDXL's two text encoders: `l` = CLIP-L (embedders.0, kohya te1), `g` = OpenCLIP-G (embedders.1, te2). */
export type XlEncoder = 'l' | 'g';

export type XlFullModel = Denoiser & { textXl: SdxlText };

/** A micro-batch: instance rows, then `classRows` class rows, each with both id sequences and its size conditioning. */
export interface XlFullBatch extends DiffusionBatch {
  idsL: number[][];
  idsG: number[][];
  sizes: SizeCond[];
  classRows: number;
  /** Both encoders' outputs, computed outside the tape when neither trains. */
  cond?: SdxlConditioning;
}

/** The keys of one encoder that reach the loss (see the file header): the ones that may train. */
export function xlEncoderTrainedKeys(text: SdxlText, which: XlEncoder): string[] {
  const cfg = text.cfg[which];
  const keys = [...text.params.keys()].filter((k) => k.startsWith(cfg.prefix));
  if (which === 'g') return keys;
  const finalLn = textKeyNames(cfg.family, cfg.prefix).finalLn;
  const unreached = new Set([...textBlockKeys(cfg, cfg.layers - 1), `${finalLn}.weight`, `${finalLn}.bias`]);
  return keys.filter((k) => !unreached.has(k));
}

/** The encoders' weights that train (each in `encoders`), as variables in place in the model. */
export function makeXlTextVariables(text: SdxlText, encoders: Iterable<XlEncoder>): Map<string, tf.Variable> {
  return makeTrainable(text.params, new Map(), [...new Set(encoders)].flatMap((which) => xlEncoderTrainedKeys(text, which)));
}

/** `textEncoders` of a job (schemas: both | clip-l | clip-g) as the encoders it names. */
export function encodersOf(spec: { textEncoders?: 'both' | 'clip-l' | 'clip-g' }): XlEncoder[] {
  return spec.textEncoders === 'clip-l' ? ['l'] : spec.textEncoders === 'clip-g' ? ['g'] : ['l', 'g'];
}

/** OpenCLIP-G's weights (embedders.1, kohya te2): the group that trains at `textEncoder2Lr`. */
export function xlText2Keys(text: SdxlText): Set<string> {
  return new Set([...text.params.keys()].filter((k) => k.startsWith(text.cfg.g.prefix)));
}

/**
 * `textEncoder2Lr` is OpenCLIP-G's rate (kohya `learning_rate_te2`): on a model with one text
 * encoder (SD1/SD2) a set value is a mistake, said before anything loads.
 */
export async function checkTextEncoder2Lr(spec: { textEncoder2Lr?: unknown; model: string }): Promise<void> {
  if (spec.textEncoder2Lr === undefined) return;
  const family = await peekFamily(spec.model);
  if (family !== 'sdxl') {
    throw new Error(`/textEncoder2Lr: the learn rate of SDXL's second text encoder (OpenCLIP-G); ${spec.model} is ${family} with one text encoder: leave it out and use textEncoderLr`);
  }
}

/** The trained weights as variables, in place in the model: the UNet always, each encoder in `encoders`. */
export function makeXlVariables(model: XlFullModel, encoders: Iterable<XlEncoder>): { unet: Map<string, tf.Variable>; text: Map<string, tf.Variable> } {
  return { unet: makeTrainable(model.unet.params), text: makeXlTextVariables(model.textXl, encoders) };
}

/** Both encoders' conditioning of the batch's prompts (outside the tape when called outside a loss). */
export function xlConditioning(model: XlFullModel, batch: Pick<XlFullBatch, 'idsL' | 'idsG'>): SdxlConditioning {
  return encodeSdxlText(model.textXl, batch.idsL, batch.idsG);
}

/**
 * A micro-batch of zero-padded ids (OpenCLIP-G's tokenizer; CLIP-L's EOS padding derived) with
 * each row's size conditioning; with `encodeNow` (no encoder trains) the conditioning is computed
 * here, outside the tape, once per batch.
 */
export function toXlBatch(model: XlFullModel, batch: PriorBatch & { sizes: SizeCond[] }, encodeNow: boolean): XlFullBatch {
  if (batch.sizes.length !== batch.timesteps.length) throw new Error(`SDXL batch: ${batch.sizes.length} size conditionings for ${batch.timesteps.length} rows`);
  const xl: XlFullBatch = { ...batch, ...xlIds(batch.ids) };
  if (encodeNow) xl.cond = xlConditioning(model, xl);
  return xl;
}

/** The class rows' size conditioning: generated at the job's size, nothing cropped. */
export const generatedSize = (width: number, height: number): SizeCond => ({ original: [height, width], crop: [0, 0], target: [height, width] });

/**
 * The instance rows of (step, micro) with their images' size conditioning, then the class rows
 * (prior-preservation.ts) at the job's size: what Dreambooth and LoRA train on SDXL.
 */
export function xlPriorBatch(
  run: PreparedRun & { classes?: ClassSet }, spec: CommonSpec, step: number, micro: number,
): PriorBatch & { sizes: SizeCond[] } {
  const { prompts, ...inst } = diffusionBatch(run, spec, step, micro, new Map());
  const items = run.dataset.batchAt(step - 1, micro).items;
  const at = { step, micro, gradAccum: run.dataset.gradAccum };
  const model = { tokenizer: run.tokenizer, family: run.model.family, timesteps: run.model.schedule.timesteps };
  const batch = withClassRows({ ...inst, ids: prompts.map((p) => p.ids) }, run.classes, spec, at, model);
  const sizes = [...items.map((i) => sizeCondOf(run, i)), ...new Array<SizeCond>(batch.classRows).fill(generatedSize(spec.width, spec.height))];
  return { ...batch, sizes };
}

/** sgm loss of the batch; with class rows, instance mean + priorWeight × class mean; `rowWeights` scale each row's loss. */
export function xlFullLoss(model: XlFullModel, batch: XlFullBatch, priorWeight = 1, rowWeights?: number[]): PriorLoss {
  return tf.tidy(() => {
    const cond = batch.cond ?? xlConditioning(model, batch);
    const vector = vectorConditioning(cond.pooled, batch.sizes, model.unet.cfg.admInChannels); // [B, adm]
    const { perSample } = sgmLoss(model, batch, { crossattn: cond.crossattn, vector });
    // min-SNR-γ (fine-tune): sgm's per-sample loss is the DDPM one, so the same per-row weights apply
    const weighted = rowWeights ? perSample.mul(tf.tensor1d(rowWeights, 'float32')) : perSample;
    return splitPriorLoss(weighted, batch.classRows, priorWeight);
  });
}
