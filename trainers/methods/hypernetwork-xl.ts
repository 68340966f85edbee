/**
 * @file Hypernetworks on SDXL. A1111 hijacks sgm's CrossAttention as it does ldm's
 * (modules/sd_hijack_optimizations.py: `context_k, context_v = hypernetwork.apply_hypernetworks(
 * shared.loaded_hypernetworks, context)` in every attention forward), so a module pair applies
 * wherever the context width equals its size: 2048 (cat(CLIP-L 768, OpenCLIP-G 1280)) in the
 * cross-attentions, 640 and 1280 (the transformer channels) in the self-attentions — SDXL has no
 * attention at 320. The text encoders stay frozen: each batch's `crossattn` and pooled vector are
 * encoded once outside the tape; the loss is sgm's (train/sgm-loss.ts) with the size/crop
 * `vector` and the modules hooked in (train mode). Forge and SD.Next do not apply them (the
 * webui client says so, bridge/webui-flavours.ts).
 */
import { join } from 'node:path';
import { tf } from '../backend/tf.ts';
import { hypernetHook, type HypernetworkSpec } from '../nets/hypernet.ts';
import type { Params } from '../nets/params.ts';
import { encodeSdxlText, vectorConditioning, type SdxlConditioning, type SizeCond } from '../nets/sdxl-conditioner.ts';
import { sgmLoss } from '../train/sgm-loss.ts';
import type { Denoiser, DiffusionBatch } from '../train/diffusion-loss.ts';
import { diffusionBatch, previewPromptText, type CommonSpec, type PreparedRun } from '../train/prepare.ts';
import { renderXlPreview, xlIds } from '../train/sdxl-sampling.ts';
import { Rng } from '../random.ts';
import { sizeCondOf } from './textual-inversion-xl-job.ts';

export interface XlHnBatch extends DiffusionBatch {
  sizes: SizeCond[];
  /** The frozen encoders' outputs for the batch's prompts. */
  cond: SdxlConditioning;
  /** Dropout seed, a function of (seed, step, micro). */
  dropoutSeed: number;
}

/** The batch of (step, micro): both encoders run now, outside the tape (they are frozen). */
export function nextXlHnBatch(run: PreparedRun, spec: CommonSpec, step: number, micro: number): XlHnBatch {
  const { prompts, ...batch } = diffusionBatch(run, spec, step, micro, new Map());
  const { idsL, idsG } = xlIds(prompts.map((p) => p.ids));
  const sizes = run.dataset.batchAt(step - 1, micro).items.map((i) => sizeCondOf(run, i));
  const cond = encodeSdxlText(run.model.textXl!, idsL, idsG);
  return { ...batch, sizes, cond, dropoutSeed: Rng.derive(spec.seed, 'dropout', step, micro).int(2 ** 31) };
}

/** A preview with the modules in eval mode (no dropout, multiplier 1). */
export function xlHnPreview(run: PreparedRun, spec: CommonSpec, hn: { params: Params; spec: HypernetworkSpec }, step: number, dir: string): Promise<string> {
  const prompt = previewPromptText(run, spec);
  const { unet, schedule, prediction } = run.model;
  const m = { text: run.model.textXl!, unet: { ...unet, hooks: { kv: hypernetHook(hn.params, hn.spec) } }, schedule, prediction, decoder: run.decoder!, tokenizer: run.tokenizer };
  const info = `${prompt}\nSteps: ${spec.previewSteps}, Seed: ${spec.seed}, Size: ${spec.width}x${spec.height}, Model hash: ${run.modelHash}`;
  return renderXlPreview(m, spec, join(dir, `${spec.name}-${step}.png`), run.tokenizer.encode(prompt, 'zero'), info);
}

/** sgm loss with the hypernetwork's (k, v) modules in every attention whose context width is one of its sizes. */
export function xlHypernetworkLoss(model: Denoiser, hn: { params: Params; spec: HypernetworkSpec }, batch: Omit<XlHnBatch, 'dropoutSeed'>, seed: number): tf.Scalar {
  return tf.tidy(() => {
    const vector = vectorConditioning(batch.cond.pooled, batch.sizes, model.unet.cfg.admInChannels); // [B, adm]
    const kv = hypernetHook(hn.params, hn.spec, { training: true, seed });
    return sgmLoss(model, batch, { crossattn: batch.cond.crossattn, vector }, { kv }).loss;
  });
}
