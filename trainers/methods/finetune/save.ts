/**
 * @file What a fine-tune writes: the output checkpoint(s) (EMA, raw or both, every source key kept,
 * nets/checkpoint-write.ts), snapshots for resume in `<runDir>/snapshots/` (the trained weights in TF
 * layout, the optimizer groups via optim/trainable.ts, the EMA state), resume from the newest
 * complete snapshot, and the sample images of `samplePrompts`.
 */
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { tf, type Tensor } from '../../backend/tf.ts';
import { paddingFor } from '../../nets/sd.ts';
import type { Params } from '../../nets/params.ts';
import { unetForward } from '../../nets/unet.ts';
import { encodeText } from '../../nets/clip.ts';
import { openTensorFile } from '../../io/checkpoint.ts';
import { writeCheckpoint } from '../../nets/checkpoint-write.ts';
import { openSafetensors, writeSafetensors } from '../../io/safetensors.ts';
import { sampleImage, savePreviewPng } from '../../train/sample.ts';
import { renderXlPreview } from '../../train/sdxl-sampling.ts';
import { readOptimizerState, writeOptimizerState, type TrainableOptimizer } from '../../optim/trainable.ts';
import { Ema } from '../../optim/ema.ts';
import type { JobContext } from '../../job.ts';
import type { FtRun } from './types.ts';

function emaParams(ema: Ema): Params {
  return new Map([...ema.weights()].map(([k, w]) => [k, tf.tensor(w.values, w.shape)]));
}

/** The output checkpoint(s): EMA, raw or both (both: `<name>` raw and `<name>-ema`). */
export async function saveCheckpoints(run: FtRun, step: number): Promise<string[]> {
  const { spec } = run;
  const source = await openTensorFile(spec.model);
  const metadata = { sidetrain_method: 'finetune', sidetrain_step: step, sidetrain_resolution: spec.resolution, sidetrain_images: run.train.length };
  const write = (name: string, trained: Params, weights: string) =>
    writeCheckpoint({ dir: spec.checkpointDir, name, source, trained, half: spec.half, overwrite: true, metadata: { ...metadata, sidetrain_weights: weights } });
  const outputs: string[] = [];
  try {
    const wantRaw = !run.ema || spec.save !== 'ema';
    if (wantRaw) outputs.push(await write(spec.name, new Map(run.trainable), 'raw'));
    if (run.ema && spec.save !== 'raw') {
      const ema = emaParams(run.ema);
      try {
        outputs.push(await write(spec.save === 'both' ? `${spec.name}-ema` : spec.name, ema, 'ema'));
      } finally {
        tf.dispose([...ema.values()]);
      }
    }
  } finally {
    await source.close();
  }
  return outputs;
}

/** Sample images of the current weights, one per prompt (`<runDir>/images/<name>-<step>-<i>.png`). */
export async function renderSamples(run: FtRun, step: number): Promise<string> {
  if (run.model.textXl) return renderXlSamples(run, step);
  const { spec, model, tokenizer } = run;
  const { text, unet, schedule, prediction, family } = model;
  const encode = (prompt: string) => encodeText(text.params, text.cfg, [tokenizer.encode(prompt, paddingFor(family))]);
  const denoise = (latents: Tensor, t: number, ctx: Tensor) => unetForward(unet.params, unet.cfg, latents, new Array(latents.shape[0]).fill(t), ctx);
  const paths: string[] = [];
  await mkdir(join(run.runDir, 'images'), { recursive: true });
  for (const [i, prompt] of spec.samplePrompts.entries()) {
    const [context, uncondContext] = [encode(prompt), encode('')];
    const options = { sampler: spec.sampler, steps: spec.sampleSteps, cfgScale: spec.sampleCfgScale, seed: spec.seed + i, width: spec.resolution, height: spec.resolution };
    const image = await sampleImage({ denoise, schedule, vae: run.decoder!, context, uncondContext }, { ...options, parameterization: prediction });
    tf.dispose([context, uncondContext]);
    const path = join(run.runDir, 'images', `${spec.name}-${step}-${i}.png`);
    const infotext = `${prompt}\nSteps: ${options.steps}, Sampler: ${options.sampler}, CFG scale: ${options.cfgScale}, Seed: ${options.seed}, Size: ${options.width}x${options.height}`;
    await savePreviewPng(path, image.rgb, image.width, image.height, infotext);
    paths.push(path);
  }
  return paths[0]!;
}

/** SDXL: each prompt sampled with the pooled + size vector (train/sdxl-sampling.ts), at the resolution, uncropped. */
async function renderXlSamples(run: FtRun, step: number): Promise<string> {
  const { spec, model } = run;
  const m = { text: model.textXl!, unet: model.unet, schedule: model.schedule, prediction: model.prediction, decoder: run.decoder!, tokenizer: run.tokenizer };
  const paths: string[] = [];
  for (const [i, prompt] of spec.samplePrompts.entries()) {
    const options = { previewSampler: spec.sampler, previewSteps: spec.sampleSteps, previewCfgScale: spec.sampleCfgScale, seed: spec.seed + i, width: spec.resolution, height: spec.resolution };
    const infotext = `${prompt}\nSteps: ${spec.sampleSteps}, Sampler: ${spec.sampler}, CFG scale: ${spec.sampleCfgScale}, Seed: ${options.seed}, Size: ${spec.resolution}x${spec.resolution}`;
    paths.push(await renderXlPreview(m, options, join(run.runDir, 'images', `${spec.name}-${step}-${i}.png`), run.tokenizer.encode(prompt, 'zero'), infotext));
  }
  return paths[0]!;
}

function snapshotPaths(run: FtRun, step: number) {
  const base = join(run.runDir, 'snapshots', `${run.spec.name}-${step}`);
  return { weights: `${base}.weights.safetensors`, optim: `${base}.optim.safetensors`, ema: `${base}.ema.safetensors` };
}

/** Optimizer and EMA state first, the weights last: a snapshot with weights is complete. */
export async function saveSnapshot(run: FtRun, optimizer: TrainableOptimizer, step: number): Promise<string[]> {
  const paths = snapshotPaths(run, step);
  await mkdir(join(run.runDir, 'snapshots'), { recursive: true });
  await writeOptimizerState(paths.optim, await optimizer.exportGroups(), { step: String(step) });
  if (run.ema) await run.ema.save(paths.ema);
  const tensors = [...run.trainable].map(([name, v]) => ({ name, dtype: 'F32' as const, shape: v.shape, data: async () => (await v.data()) as Float32Array }));
  await writeSafetensors(paths.weights, tensors, { step: String(step) }, { overwrite: true });
  return [paths.weights, paths.optim, ...(run.ema ? [paths.ema] : [])];
}

/** Load a complete snapshot (train/run.ts found the newest with a weights file) into the variables, optimizer and EMA; its step. */
export async function resume(run: FtRun, optimizer: TrainableOptimizer, step: number, ctx: JobContext): Promise<number> {
  const paths = snapshotPaths(run, step);
  const file = await openSafetensors(paths.weights);
  try {
    for (const [key, v] of run.trainable) {
      if (!file.has(key)) throw new Error(`${paths.weights}: no '${key}' (was the snapshot made with other options, e.g. trainTextEncoder?)`);
      const values = tf.tensor(await file.read(key), file.info(key).shape);
      v.assign(values);
      values.dispose();
    }
  } finally {
    await file.close();
  }
  optimizer.importGroups(await readOptimizerState(paths.optim));
  optimizer.done = step;
  if (run.ema) run.ema = existsSync(paths.ema) ? await Ema.load(paths.ema) : await Ema.fromParams(run.trainable, { decay: run.spec.emaDecay, every: run.spec.emaEvery });
  ctx.emit({ type: 'log', level: 'info', message: `continuing ${paths.weights} from step ${step}` });
  return step;
}
