/**
 * @file Hypernetworks on SDXL. A1111 hijacks sgm's CrossAttention as it does ldm's
 * (modules/sd_hijack_optimizations.py: `context_k, context_v = hypernetwork.apply_hypernetworks(
 * shared.loaded_hypernetworks, context)` in every attention forward), so a module pair applies
 * wherever the context width equals its size: 2048 (cat(CLIP-L 768, OpenCLIP-G 1280)) in the
 * cross-attentions, 640 and 1280 (the transformer channels) in the self-attentions — SDXL has no
 * attention at 320. The text encoders stay frozen: each batch's `crossattn` and pooled vector are
 * encoded once outside the tape; the loss is sgm's (train/sgm-loss.ts) with the size/crop
 * `vector` and the modules hooked in (train mode). Forge does not apply hypernetworks at all.
 */
import { tf } from '../backend/tf.ts';
import { hypernetHook, type HypernetworkSpec } from '../nets/hypernet.ts';
import type { Params } from '../nets/params.ts';
import { vectorConditioning, type SdxlConditioning, type SizeCond } from '../nets/sdxl-conditioner.ts';
import { sgmLoss } from '../train/sgm-loss.ts';
import type { Denoiser, DiffusionBatch } from '../train/diffusion-loss.ts';

export interface XlHnBatch extends DiffusionBatch {
  sizes: SizeCond[];
  /** The frozen encoders' outputs for the batch's prompts. */
  cond: SdxlConditioning;
}

/** sgm loss with the hypernetwork's (k, v) modules in every attention whose context width is one of its sizes. */
export function xlHypernetworkLoss(model: Denoiser, hn: { params: Params; spec: HypernetworkSpec }, batch: XlHnBatch, seed: number): tf.Scalar {
  return tf.tidy(() => {
    const vector = vectorConditioning(batch.cond.pooled, batch.sizes, model.unet.cfg.admInChannels); // [B, adm]
    const kv = hypernetHook(hn.params, hn.spec, { training: true, seed });
    return sgmLoss(model, batch, { crossattn: batch.cond.crossattn, vector }, { kv }).loss;
  });
}

/**
 * What to tell a user whose webui will not apply the hypernetwork (undefined: it does). Forge
 * never applies hypernetworks; SD.Next runs SDXL through diffusers, not the webui's hijacked
 * attention, so an SDXL hypernetwork may do nothing there.
 */
export function hypernetworkWebuiWarning(flavour: string | undefined, family: string): string | undefined {
  if (flavour === 'forge') return 'the webui is Forge, which ignores hypernetworks: the file is written, but Forge will not apply it (A1111 does)';
  if (flavour === 'sdnext' && family === 'sdxl') return 'the webui is SD.Next, which runs SDXL through diffusers and may not apply this hypernetwork (A1111 does)';
  return undefined;
}
