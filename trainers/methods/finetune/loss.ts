/**
 * @file The fine-tune's loss (diffusers train_text_to_image.py): p_losses on the bucket's latents,
 * optionally min-SNR-γ weighted (train/diffusion-loss.ts), the text encoder run inside (it may
 * be training); and the validation loss on held-out images at fixed seeded noise and timesteps
 * (so the numbers compare across steps), with the EMA update that shares its timing.
 */
import { existsSync } from 'node:fs';
import { appendFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { tf } from '../../backend/tf.ts';
import { encodeText } from '../../nets/clip.ts';
import { denoisingLoss } from '../../train/diffusion-loss.ts';
import { makeBatch } from './data.ts';
import { xlIds } from '../../train/sdxl-sampling.ts';
import { xlFullLoss, type XlFullModel } from '../full-xl.ts';
import type { JobContext } from '../../job.ts';
import type { FtBatch, FtRun } from './types.ts';

/** p_losses (train/diffusion-loss.ts) with optional min-SNR-γ weights; the text encoder runs inside (it may be training). */
export function finetuneLoss(run: Pick<FtRun, 'model' | 'spec'>, batch: FtBatch): tf.Scalar {
  const { text } = run.model;
  if (run.model.textXl) return xlFinetuneLoss(run, batch);
  return tf.tidy(() => {
    const encoderHiddenStates = encodeText(text.params, text.cfg, batch.ids); // [B, 77, W]
    return denoisingLoss(run.model, batch, encoderHiddenStates, { minSnrGamma: run.spec.minSnrGamma });
  });
}

/** SDXL: sgm's loss with both encoders inside the tape and each image's size conditioning (full-xl.ts). */
function xlFinetuneLoss(run: Pick<FtRun, 'model' | 'spec'>, batch: FtBatch): tf.Scalar {
  const { schedule, prediction } = run.model;
  const gamma = run.spec.minSnrGamma;
  const weights = gamma > 0 ? schedule.minSnrWeights(batch.timesteps, gamma, prediction) : undefined;
  const xl = { ...batch, ...xlIds(batch.ids), sizes: batch.sizes!, classRows: 0 };
  const { loss, instance } = xlFullLoss(run.model as unknown as XlFullModel, xl, 1, weights);
  instance.dispose();
  return loss;
}

/** Mean loss over the validation images at fixed noise/timesteps (one image at a time). */
export async function validationLoss(run: FtRun): Promise<number | undefined> {
  if (run.validation.length === 0) return undefined;
  let sum = 0;
  for (const [i, s] of run.validation.entries()) {
    const batch = makeBatch(run, [s], ['validation', i], (v) => v.image.caption);
    const loss = finetuneLoss(run, batch);
    sum += (await loss.data())[0]!;
    tf.dispose([loss, batch.latents, batch.noise]);
  }
  return sum / run.validation.length;
}

/** The validation loss into `<runDir>/validation.csv` and the log. */
export async function logValidation(run: FtRun, step: number, ctx: JobContext): Promise<void> {
  const loss = await validationLoss(run);
  if (loss === undefined) return;
  const csv = join(run.runDir, 'validation.csv');
  if (!existsSync(csv)) await writeFile(csv, 'step,validation_loss\n');
  await appendFile(csv, `${step},${loss}\n`);
  run.validatedAt = step;
  ctx.emit({ type: 'log', level: 'info', message: `step ${step}: validation loss ${loss.toFixed(6)}` });
}

/** After optimizer step `done` (train/run.ts afterStep): the EMA update and the validation loss, when due. */
export async function afterStep(run: FtRun, done: number, ctx: JobContext): Promise<void> {
  if (run.ema && run.ema.due(done)) await run.ema.update(run.trainable);
  if (run.spec.validateEvery > 0 && done % run.spec.validateEvery === 0) await logValidation(run, done, ctx);
}

/** The validation loss of the final weights, unless `afterStep` logged it at this step already. */
export async function finalValidation(run: FtRun, step: number, ctx: JobContext): Promise<void> {
  if (step > 0 && run.validatedAt !== step) await logValidation(run, step, ctx);
}
