/**
 * @file What sidetrain's sampler (sample.ts) needs to run an SDXL UNet: the prompt's and the
 * empty prompt's crossattn as contexts, and a denoiser that passes each its own `vector` y
 * (pooled text + size embeddings, sgm's conditioner). The sampler batches [uncond, cond] in one
 * call when the contexts have the same shape, so a 2-row context gets both y rows in that order.
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { unetForward, type UNetConfig } from '../nets/unet.ts';
import type { Params } from '../nets/params.ts';
import type { UNetMemory } from '../memory/options.ts';
import { encodeSdxlText, vectorConditioning, type SdxlConditioning, type SdxlText, type SizeCond } from '../nets/sdxl-conditioner.ts';
import type { ClipTokenizer } from '../text/tokenizer.ts';
import { EOS_ID } from '../text/tokenizer.ts';
import type { Denoiser } from './sample.ts';

/** CLIP-L's ids from OpenCLIP-G's: the same tokens, padded with EOS instead of 0 after the (first) EOS. */
export function eosPadded(ids: number[]): number[] {
  const end = ids.indexOf(EOS_ID);
  return ids.map((id, i) => (end >= 0 && i > end ? EOS_ID : id));
}

/** Both id sequences of prompts tokenized with 0 padding (OpenCLIP-G's). */
export const xlIds = (idsG: number[][]) => ({ idsL: idsG.map(eosPadded), idsG });

export interface XlSampling {
  denoise: Denoiser;
  context: Tensor;
  uncondContext: Tensor;
  dispose(): void;
}

/** Sampler inputs for `cond` (the prompt's conditioning, e.g. with TI vectors; taken over and disposed) at `size`. */
export function xlSampling(
  text: SdxlText, unet: { params: Params; cfg: UNetConfig; memory?: UNetMemory }, cond: SdxlConditioning, tokenizer: ClipTokenizer, size: SizeCond,
  uncond?: SdxlConditioning,
): XlSampling {
  // the empty prompt's conditioning: given (encoded before the encoders were released, taken over too) or encoded now
  const empty = xlIds([tokenizer.encode('', 'zero')]);
  const unc = uncond ?? encodeSdxlText(text, empty.idsL, empty.idsG);
  const adm = unet.cfg.admInChannels;
  const yCond = vectorConditioning(cond.pooled, [size], adm);
  const yUncond = vectorConditioning(unc.pooled, [size], adm);
  const yBoth = tf.concat([yUncond, yCond]);
  const denoise: Denoiser = (latents, t, ctx) => {
    const y = ctx.shape[0] === 2 ? yBoth : ctx === unc.crossattn ? yUncond : yCond;
    return unetForward(unet.params, unet.cfg, latents, new Array(latents.shape[0]).fill(t), ctx, { y, memory: unet.memory });
  };
  return {
    denoise, context: cond.crossattn, uncondContext: unc.crossattn,
    dispose: () => tf.dispose([cond.crossattn, cond.pooled, unc.crossattn, unc.pooled, yCond, yUncond, yBoth]),
  };
}
