/**
 * @file Textual Inversion on SDXL: one embedding has vectors for BOTH text encoders, `clip_l`
 * [n, W_L] and `clip_g` [n, W_G] (the webui's SDXL embedding file; modules/sd_hijack.py
 * EmbeddingsWithFixes with `textual_inversion_key` 'clip_l' for embedders.0, 'clip_g' for
 * embedders.1). The name's tokens become n placeholder ids in both token sequences, and each
 * encoder's token-embedding rows there are replaced by its own vectors before the position
 * embedding. The loss is sgm's (train/sgm-loss.ts) with the pooled + size `vector`.
 */
import { tf, type Tensor } from '../backend/tf.ts';
import type { Params } from '../nets/params.ts';
import { param } from '../nets/params.ts';
import { textKeyNames, type ClipTextConfig } from '../nets/clip.ts';
import { encodeSdxlText, vectorConditioning, type SdxlText, type SizeCond } from '../nets/sdxl-conditioner.ts';
import { sgmLoss } from '../train/sgm-loss.ts';
import type { Denoiser, DiffusionBatch } from '../train/diffusion-loss.ts';

/** The two vector tables of one SDXL embedding. */
export interface XlVectors {
  l: Tensor; // [n, W_L]
  g: Tensor; // [n, W_G]
}

/** A batch: latents/noise/timesteps plus, per row, both id sequences, the vectors' positions and the size conditioning. */
export interface XlTiBatch extends DiffusionBatch {
  idsL: number[][];
  idsG: number[][];
  /** Per row: positions (same in both sequences) that get vectors 0..n-1, then 0..n-1 again for a second occurrence, …. */
  positions: number[][];
  sizes: SizeCond[];
}

export type XlTiModel = Denoiser & { textXl: SdxlText };

/** Context and pooled vector with the embedding spliced into both encoders. */
export function xlTiConditioning(text: SdxlText, vectors: XlVectors, batch: Pick<XlTiBatch, 'idsL' | 'idsG' | 'positions'>) {
  const splice = (v: Tensor) => batch.positions.flatMap((positions, row) => {
    const n = v.shape[0]!;
    return Array.from({ length: Math.ceil(positions.length / n) }, (_, k) => ({ batch: row, positions: positions.slice(k * n, k * n + n), vectors: v }));
  });
  return encodeSdxlText(text, batch.idsL, batch.idsG, { l: splice(vectors.l), g: splice(vectors.g) });
}

/** sgm loss of the batch with the embedding's vectors (the trained variables). */
export function xlTextualInversionLoss(model: XlTiModel, vectors: XlVectors, batch: XlTiBatch): tf.Scalar {
  return tf.tidy(() => {
    const { crossattn, pooled } = xlTiConditioning(model.textXl, vectors, batch);
    const vector = vectorConditioning(pooled, batch.sizes, model.unet.cfg.admInChannels);
    return sgmLoss(model, batch, { crossattn, vector }).loss;
  });
}

/**
 * Initial vectors of one encoder from the init text, as webui create_embedding does with
 * sd_models_xl.py `encode_embedding_init_text` (each encoder its own table; CLIP-L's tokenizer
 * call truncates to n tokens, OpenCLIP-G's does not): vec[i] = embedded[i·len // n], zeros
 * for an empty init text.
 */
export function initVectorsFrom(params: Params, cfg: ClipTextConfig, bpe: number[], numVectors: number): Tensor {
  return tf.tidy(() => {
    const ids = cfg.family === 'sd1' ? bpe.slice(0, numVectors) : bpe;
    if (ids.length === 0) return tf.zeros([numVectors, cfg.width]);
    const rows = Array.from({ length: numVectors }, (_, i) => ids[Math.floor((i * ids.length) / numVectors)]!);
    return tf.gather(param(params, textKeyNames(cfg.family, cfg.prefix).tokenEmbedding), rows);
  });
}
