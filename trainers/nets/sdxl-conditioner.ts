/**
 * @file SDXL's conditioner (sgm `GeneralConditioner` of configs/inference/sd_xl_base.yaml): two
 * text encoders and three size embedders, giving the UNet its `crossattn` context and its
 * `vector` y.
 *
 * - CLIP-L (`conditioner.embedders.0.transformer.text_model.*`, HF names, QuickGELU): context
 *   part = `hidden_states[layer_idx = L-1]`, the output of block L-2 without `final_layer_norm`.
 * - OpenCLIP-G (`conditioner.embedders.1.model.*`, open_clip names, GELU): context part = the
 *   input of the last block without `ln_final` (layer 'penultimate', legacy=False); the pooled
 *   vector from all blocks (open-clip.ts).
 * - `crossattn` = cat(L, G) on channels; `vector` = cat(pooled, e(orig h), e(orig w), e(crop
 *   top), e(crop left), e(target h), e(target w)), e(n) the 256-wide sinusoid of n
 *   (ConcatTimestepEmbedderND, `[cos | sin]`, float32).
 */
import { tf, type Tensor } from '../backend/tf.ts';
import type { Params } from './params.ts';
import { encodeText, textConfigFromKeys, textKeys, type ClipTextConfig, type ShapeLookup, type TextSplice } from './clip.ts';
import { encodeOpenClip, textProjectionKey } from './open-clip.ts';
import { timestepEmbedding } from './unet.ts';

export const SDXL_CLIP_L_PREFIX = 'conditioner.embedders.0.transformer.text_model.';
export const SDXL_CLIP_G_PREFIX = 'conditioner.embedders.1.model.';

export interface SdxlTextConfig {
  l: ClipTextConfig;
  g: ClipTextConfig;
  /** Width of the pooled vector (text_projection columns; 1280 in SDXL). */
  pooledDim: number;
}

/** Both encoders' configs from the keys; heads default to width/64 (ViT-L 12, ViT-bigG 20) unless given. */
export function sdxlTextConfigs(lookup: ShapeLookup, heads: { l?: number; g?: number } = {}): SdxlTextConfig {
  const hidden = { contextLayer: 'penultimate', contextNorm: false } as const;
  const l = { ...textConfigFromKeys(lookup, { family: 'sd1', prefix: SDXL_CLIP_L_PREFIX, heads: heads.l }), ...hidden };
  const g = { ...textConfigFromKeys(lookup, { family: 'sd2', prefix: SDXL_CLIP_G_PREFIX, heads: heads.g }), ...hidden };
  const proj = typeof lookup === 'function' ? lookup(textProjectionKey(g)) : lookup.get(textProjectionKey(g));
  if (!proj || proj[0] !== g.width) throw new Error(`SDXL text encoder: '${textProjectionKey(g)}' missing or not [${g.width}, P]`);
  return { l, g, pooledDim: proj[1]! };
}

/** Every key the conditioner reads, and the ones SDXL files carry that it ignores. */
export function sdxlTextKeys(cfg: SdxlTextConfig): { used: string[]; unused: string[] } {
  const l = textKeys(cfg.l);
  const g = textKeys(cfg.g);
  const projection = textProjectionKey(cfg.g);
  return { used: [...l.used, ...g.used, projection], unused: [...l.unused, ...g.unused.filter((k) => k !== projection)] };
}

/** One image's size conditioning, each [height, width] (crop: [top, left]) in pixels. */
export interface SizeCond {
  original: [number, number];
  crop: [number, number];
  target: [number, number];
}

/** The weight-free part of `vector`: [B, 6·dim]. */
export function sizeEmbeddings(sizes: SizeCond[], dim = 256): Tensor {
  return tf.tidy(() => {
    const numbers = sizes.flatMap((s) => [...s.original, ...s.crop, ...s.target]); // [B·6]
    return timestepEmbedding(numbers, dim).reshape([sizes.length, 6 * dim]);
  });
}

/** TI vectors of each encoder (splice rows, clip.ts). */
export interface SdxlSplices {
  l?: TextSplice[];
  g?: TextSplice[];
}

export interface SdxlText {
  params: Params;
  cfg: SdxlTextConfig;
}

export interface SdxlConditioning {
  /** [B, T, W_L + W_G] */
  crossattn: Tensor;
  /** [B, pooledDim] */
  pooled: Tensor;
}

/** Both encoders on their own id sequences (L padded with EOS, G with 0). */
export function encodeSdxlText(text: SdxlText, idsL: number[][], idsG: number[][], splices: SdxlSplices = {}): SdxlConditioning {
  return tf.tidy(() => {
    const l = encodeText(text.params, text.cfg.l, idsL, { splices: splices.l });
    const g = encodeOpenClip(text.params, text.cfg.g, idsG, splices.g);
    return { crossattn: tf.concat([l, g.penultimate], 2), pooled: g.pooled };
  });
}

/** `vector` = cat(pooled, size embeddings): [B, admInChannels]. `dim` = (admInChannels − pooledDim) / 6. */
export function vectorConditioning(pooled: Tensor, sizes: SizeCond[], admInChannels: number): Tensor {
  const dim = (admInChannels - pooled.shape[1]!) / 6;
  if (!Number.isInteger(dim) || dim < 2) throw new Error(`SDXL: label_emb takes ${admInChannels} inputs, which is not pooled ${pooled.shape[1]} + 6 size embeddings`);
  if (sizes.length !== pooled.shape[0]) throw new Error(`SDXL: ${sizes.length} size conditionings for a batch of ${pooled.shape[0]}`);
  return tf.tidy(() => tf.concat([pooled, sizeEmbeddings(sizes, dim)], 1));
}
