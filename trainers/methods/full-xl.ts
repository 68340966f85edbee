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
import { textBlockKeys, textKeyNames } from '../nets/clip.ts';
import { encodeSdxlText, vectorConditioning, type SdxlConditioning, type SdxlText, type SizeCond } from '../nets/sdxl-conditioner.ts';
import { sgmLoss } from '../train/sgm-loss.ts';
import { splitPriorLoss, type PriorLoss } from '../train/prior-preservation.ts';
import { makeTrainable } from '../optim/trainable.ts';
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

/** The trained weights as variables, in place in the model: the UNet always, each encoder in `encoders`. */
export function makeXlVariables(model: XlFullModel, encoders: Iterable<XlEncoder>): { unet: Map<string, tf.Variable>; text: Map<string, tf.Variable> } {
  const unet = makeTrainable(model.unet.params);
  const text = new Map<string, tf.Variable>();
  for (const which of new Set(encoders)) makeTrainable(model.textXl.params, text, xlEncoderTrainedKeys(model.textXl, which));
  return { unet, text };
}

/** Both encoders' conditioning of the batch's prompts (outside the tape when called outside a loss). */
export function xlConditioning(model: XlFullModel, batch: Pick<XlFullBatch, 'idsL' | 'idsG'>): SdxlConditioning {
  return encodeSdxlText(model.textXl, batch.idsL, batch.idsG);
}

/** sgm loss of the batch; with class rows, instance mean + priorWeight × class mean. */
export function xlFullLoss(model: XlFullModel, batch: XlFullBatch, priorWeight = 1): PriorLoss {
  return tf.tidy(() => {
    const cond = batch.cond ?? xlConditioning(model, batch);
    const vector = vectorConditioning(cond.pooled, batch.sizes, model.unet.cfg.admInChannels); // [B, adm]
    const { perSample } = sgmLoss(model, batch, { crossattn: cond.crossattn, vector });
    return splitPriorLoss(perSample, batch.classRows, priorWeight);
  });
}
