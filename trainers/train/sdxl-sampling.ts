/**
 * @file What sidetrain's sampler (sample.ts) needs to run an SDXL UNet: the prompt's and the
 * empty prompt's crossattn as contexts, and a denoiser that passes each its own `vector` y
 * (pooled text + size embeddings, sgm's conditioner). The sampler batches [uncond, cond] in one
 * call when the contexts have the same shape, so a 2-row context gets both y rows in that order.
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { unetForward, type UNetConfig, type UNetHooks } from '../nets/unet.ts';
import type { Params } from '../nets/params.ts';
import type { UNetMemory } from '../memory/options.ts';
import { encodeSdxlText, vectorConditioning, type SdxlConditioning, type SdxlText, type SizeCond } from '../nets/sdxl-conditioner.ts';
import type { ClipTokenizer } from '../text/tokenizer.ts';
import { EOS_ID } from '../text/tokenizer.ts';
import { sampleImage, savePreviewPng, type Denoiser, type SampleInputs, type SampleOptions } from './sample.ts';
import { mkdir } from 'node:fs/promises';
import { dirname } from 'node:path';

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
  text: SdxlText, unet: { params: Params; cfg: UNetConfig; memory?: UNetMemory; hooks?: UNetHooks }, cond: SdxlConditioning, tokenizer: ClipTokenizer, size: SizeCond,
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
    return unetForward(unet.params, unet.cfg, latents, new Array(latents.shape[0]).fill(t), ctx, { y, memory: unet.memory, hooks: unet.hooks });
  };
  return {
    denoise, context: cond.crossattn, uncondContext: unc.crossattn,
    dispose: () => tf.dispose([cond.crossattn, cond.pooled, unc.crossattn, unc.pooled, yCond, yUncond, yBoth]),
  };
}

/** What a preview of an SDXL model reads: both encoders, the UNet, the schedule and the VAE decoder. */
export interface XlPreviewModel {
  text: SdxlText;
  /** `hooks`: e.g. a hypernetwork's modules in every attention (eval mode). */
  unet: { params: Params; cfg: UNetConfig; memory?: UNetMemory; hooks?: UNetHooks };
  schedule: SampleInputs['schedule'];
  prediction: SampleOptions['parameterization'];
  decoder: SampleInputs['vae'];
  tokenizer: ClipTokenizer;
}

/** Preview options (schemas/common.json's preview fields). */
export interface XlPreviewSpec {
  previewSampler: SampleOptions['sampler'];
  previewSteps: number;
  previewCfgScale: number;
  seed: number;
  width: number;
  height: number;
}

/**
 * One preview image of `ids` (zero-padded, OpenCLIP-G's) at the job's size, conditioned as sgm
 * samples: no crop, original = target = the image size. `cond` overrides the prompt's
 * conditioning (e.g. with TI vectors spliced in), `uncond` the empty prompt's (encoders released);
 * both taken over and disposed. Writes a PNG with `infotext`.
 */
export async function renderXlPreview(
  m: XlPreviewModel, spec: XlPreviewSpec, path: string, ids: number[], infotext: string, cond?: SdxlConditioning, uncond?: SdxlConditioning,
): Promise<string> {
  const { idsL, idsG } = xlIds([ids]);
  const size: SizeCond = { original: [spec.height, spec.width], crop: [0, 0], target: [spec.height, spec.width] };
  const inputs = xlSampling(m.text, m.unet, cond ?? encodeSdxlText(m.text, idsL, idsG), m.tokenizer, size, uncond);
  try {
    const image = await sampleImage(
      { ...inputs, schedule: m.schedule, vae: m.decoder },
      { sampler: spec.previewSampler, steps: spec.previewSteps, cfgScale: spec.previewCfgScale, seed: spec.seed, width: spec.width, height: spec.height, parameterization: m.prediction },
    );
    await mkdir(dirname(path), { recursive: true });
    await savePreviewPng(path, image.rgb, image.width, image.height, infotext);
    return path;
  } finally {
    inputs.dispose();
  }
}
