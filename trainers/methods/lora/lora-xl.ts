/**
 * @file The SDXL half of the LoRA method (kohya sd-scripts sdxl_train_network.py): batches carry
 * both id sequences and each image's size conditioning (sgm/kohya: original size, crop
 * top-left, target size), the loss is sgm's with the `vector` y, and the adapters sit on the
 * sgm UNet and, with `text`, on both encoders (`lora_te1_*`, `lora_te2_*`, nets/lora.ts).
 * While the encoders do not train their outputs are computed outside the tape, once per batch, or
 * — prompts known before training — once per prompt, and the encoders released (cacheXlText).
 */
import { tf } from '../../backend/index.ts';
import { mergeLora, withLora, type LoraNetwork } from '../../nets/lora.ts';
import { overlayParams } from '../../nets/half-params.ts';
import { encodeSdxlText, vectorConditioning, type SdxlConditioning, type SdxlText, type SizeCond } from '../../nets/sdxl-conditioner.ts';
import { sgmLoss } from '../../train/sgm-loss.ts';
import { renderXlPreview, xlIds } from '../../train/sdxl-sampling.ts';
import type { CommonSpec, PreparedRun } from '../../train/prepare.ts';
import { splitPriorLoss, type ClassSet, type PriorBatch, type PriorLoss } from '../../train/prior-preservation.ts';
import { xlPriorBatch } from '../full-xl.ts';
import { MAX_CACHED_PROMPTS, XlTextCache, releaseTextXl } from '../../train/sdxl-text-cache.ts';
import { paddingFor } from '../../nets/sd.ts';
import { tokenizeWithEmbeddings } from '../../text/tokenizer.ts';
import type { LoraRun, LoraSpec } from './lora-file.ts';

export type XlLoraBatch = PriorBatch & { sizes: SizeCond[]; cond?: SdxlConditioning };

const textOf = (run: PreparedRun): SdxlText => {
  if (!run.model.textXl) throw new Error('LoRA: not an SDXL model');
  return run.model.textXl;
};

/** The conditioning of the batch's prompts with the adapters read lazily (inside the tape when they train). */
function conditioning(run: PreparedRun, net: LoraNetwork, ids: number[][], opts: { dropout?: number; seed?: number } = {}): SdxlConditioning {
  const text = textOf(run);
  const { idsL, idsG } = xlIds(ids);
  return encodeSdxlText({ params: withLora(text.params, net, opts), cfg: text.cfg }, idsL, idsG);
}

/** Instance rows (+ class rows, generated at the job's size: nothing cropped), with sizes; text encoded now when it does not train. */
export function nextXlLoraBatch(run: LoraRun, spec: LoraSpec, net: LoraNetwork, step: number, micro: number, textTrains: boolean): XlLoraBatch {
  const xl: XlLoraBatch = xlPriorBatch(run, spec as CommonSpec, step, micro);
  if (!textTrains) xl.cond = run.textCache ? run.textCache.conditioning(xl.ids) : conditioning(run, net, xl.ids); // encodeSdxlText tidies its intermediates
  return xl;
}

/**
 * Every id row the run will encode — the instance and class images' fixed prompts, the preview
 * prompt and the empty one — or undefined when prompts change per use (tag shuffling / drop-out).
 */
export function knownRows(run: PreparedRun & { classes?: ClassSet }, previewIds: number[]): number[][] | undefined {
  const sets = [run.dataset, ...(run.classes ? [run.classes.dataset] : [])];
  if (sets.some((ds) => ds.items.some((it) => it.fixedPrompt === undefined))) return undefined;
  const padding = paddingFor(run.model.family);
  return [
    ...run.dataset.items.map((it) => tokenizeWithEmbeddings(run.tokenizer, it.fixedPrompt!, new Map(), padding).ids), // as diffusionBatch
    ...(run.classes?.dataset.items.map((it) => run.tokenizer.encode(it.fixedPrompt!, padding)) ?? []), // as withClassRows
    previewIds, run.tokenizer.encode('', 'zero'), // as xlSampling
  ];
}

/**
 * While no adapter sits on either encoder: every prompt encoded once and both encoders' weights
 * released (train/sdxl-text-cache.ts); undefined (encoders kept) when the prompts are not known
 * before training or too many.
 */
export function cacheXlText(run: LoraRun, net: LoraNetwork, previewIds: number[]): XlTextCache | undefined {
  if ([...net.weights.keys()].some((k) => /^lora_te\d?_/.test(k))) return undefined;
  const rows = knownRows(run, previewIds);
  if (!rows || new Set(rows.map((r) => r.join(','))).size > MAX_CACHED_PROMPTS) return undefined;
  const cache = XlTextCache.build(textOf(run), rows);
  releaseTextXl(run.model);
  return cache;
}

/** sgm loss of the adapted model; with class rows, instance mean + priorWeight × class mean. */
export function xlLoraLoss(run: PreparedRun, net: LoraNetwork, batch: XlLoraBatch, opts: { dropout: number; seed: number; priorWeight: number }): PriorLoss {
  return tf.tidy(() => {
    const { unet } = run.model;
    const cond = batch.cond ?? conditioning(run, net, batch.ids, opts);
    const vector = vectorConditioning(cond.pooled, batch.sizes, unet.cfg.admInChannels);
    const model = { ...run.model, unet: { params: withLora(unet.params, net, opts), cfg: unet.cfg, memory: unet.memory } };
    const { perSample } = sgmLoss(model, batch, { crossattn: cond.crossattn, vector });
    return splitPriorLoss(perSample, batch.classRows, opts.priorWeight);
  });
}

/** Tensors of a batch to release after its step. */
export const xlBatchTensors = (b: XlLoraBatch) => [b.latents, b.noise, ...(b.cond ? [b.cond.crossattn, b.cond.pooled] : [])];

/** A preview of the adapted model (multiplier 1, no dropout): merged views of the UNet and both encoders. */
export async function xlLoraPreview(run: LoraRun, spec: CommonSpec, net: LoraNetwork, path: string, ids: number[]): Promise<string> {
  const text = textOf(run);
  const { unet, schedule, prediction } = run.model;
  const merged = { unet: mergeLora(unet.params, net), text: mergeLora(text.params, net) };
  const params = { unet: overlayParams(unet.params, merged.unet), text: overlayParams(text.params, merged.text) };
  const model = { text: { params: params.text, cfg: text.cfg }, unet: { ...unet, params: params.unet }, schedule, prediction, decoder: run.decoder!, tokenizer: run.tokenizer };
  // with the encoders released, the prompt's and the empty prompt's conditioning come from the cache
  const cache = run.textCache;
  const conds = cache ? { cond: cache.conditioning([ids]), uncond: cache.conditioning([run.tokenizer.encode('', 'zero')]) } : {};
  try {
    return await renderXlPreview(model, spec, path, ids, `${spec.previewPrompt ?? ''}\nSteps: ${spec.previewSteps}, Seed: ${spec.seed}, Size: ${spec.width}x${spec.height}, Model hash: ${run.modelHash}`, conds.cond, conds.uncond);
  } finally {
    tf.dispose([...merged.unet.values(), ...merged.text.values()]);
  }
}
