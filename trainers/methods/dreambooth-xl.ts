/**
 * @file What Dreambooth does differently on SDXL (kohya sd-scripts sdxl_train.py with prior
 * preservation): each micro-batch carries both encoders' ids and every row's size conditioning
 * (instance images: their file's size, crop and trained size; class images: the job's size), the
 * loss is sgm's on `crossattn` + `vector` (full-xl.ts), and previews sample with the pooled and
 * size vector. Everything else — class images, resume, the optimizer and its state, the
 * checkpoint in the input's own sgm key layout — is dreambooth.ts's, shared with SD1/SD2.
 */
import { join } from 'node:path';
import { tf } from '../backend/tf.ts';
import { previewPromptText, type CommonSpec, type PreparedRun } from '../train/prepare.ts';
import type { ClassSet, PriorLoss } from '../train/prior-preservation.ts';
import { renderXlPreview, xlIds } from '../train/sdxl-sampling.ts';
import { MAX_CACHED_PROMPTS, XlTextCache, releaseTextXl } from '../train/sdxl-text-cache.ts';
import { knownRows } from './lora/lora-xl.ts';
import { tokenizeWithEmbeddings } from '../text/tokenizer.ts';
import { toXlBatch, xlFullLoss, xlPriorBatch, type XlFullBatch, type XlFullModel } from './full-xl.ts';

/** What a family's Dreambooth session differs in (dreambooth.ts builds the session around it). */
export interface DbFamilyOps<B> {
  next(step: number, micro: number, textTrains: boolean): B;
  loss(batch: B): PriorLoss;
  dispose(batch: B): void;
  preview(step: number, dir: string): Promise<string>;
}

/** SDXL's batches, loss and previews for a prepared Dreambooth run. */
export function xlDreamboothOps(
  run: PreparedRun & { classes?: ClassSet; textCache?: XlTextCache }, spec: CommonSpec & { priorWeight: number; trainTextEncoder: boolean },
): DbFamilyOps<XlFullBatch> {
  const model = run.model as unknown as XlFullModel;
  const prompt = previewPromptText(run, spec);
  const previewIds = tokenizeWithEmbeddings(run.tokenizer, prompt, new Map(), 'zero').ids;
  // frozen encoders and fixed prompts (Dreambooth's always are): each prompt encoded once, the
  // encoders' 3.3 GB (SDXL, float32) released before training, as LoRA does (sdxl-text-cache.ts)
  const rows = spec.trainTextEncoder ? undefined : knownRows(run, previewIds);
  if (rows && new Set(rows.map((r) => r.join(','))).size <= MAX_CACHED_PROMPTS) {
    run.textCache = XlTextCache.build(model.textXl, rows);
    releaseTextXl(run.model);
  }
  const cache = run.textCache;
  const cached = (b: ReturnType<typeof xlPriorBatch>): XlFullBatch => ({ ...b, ...xlIds(b.ids), cond: cache!.conditioning(b.ids) });
  return {
    next: (step, micro, textTrains) => (cache ? cached(xlPriorBatch(run, spec, step, micro)) : toXlBatch(model, xlPriorBatch(run, spec, step, micro), !textTrains)),
    loss: (batch) => xlFullLoss(model, batch, spec.priorWeight),
    dispose: (b) => tf.dispose([b.latents, b.noise, ...(b.cond ? [b.cond.crossattn, b.cond.pooled] : [])]),
    preview: (step, dir) => renderXlPreview(
      { text: model.textXl, unet: model.unet, schedule: model.schedule, prediction: model.prediction, decoder: run.decoder!, tokenizer: run.tokenizer },
      spec, join(dir, `${spec.name}-${step}.png`), previewIds,
      `${prompt}\nSteps: ${spec.previewSteps}, Seed: ${spec.seed}, Size: ${spec.width}x${spec.height}, Model hash: ${run.modelHash}, Model: ${run.modelName}`,
      cache?.conditioning([previewIds]), cache?.conditioning([run.tokenizer.encode('', 'zero')]),
    ),
  };
}
