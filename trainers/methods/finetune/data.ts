/**
 * @file The fine-tune's data (trainers/methods/finetune/finetune.ts): the captioned set (data/captioned.ts) assigned
 * to aspect-ratio buckets (data/buckets.ts), the bucket table and the undecodable images logged,
 * latents from the disk cache (latent-disk-cache.ts; the VAE encoder loaded only for missing
 * ones), and the deterministic micro-batches: items, posterior samples, noise, timesteps and
 * captions are all functions of (seed, step, micro), which is what makes resume exact.
 * Crops: centre, or a random offset per image drawn from the seed (data/buckets.ts cropRng) — one
 * fixed crop per image for the whole run, so the cache key (which holds the crop) stays valid.
 */
import { join } from 'node:path';
import { tf } from '../../backend/tf.ts';
import { loadCaptionedSet, expandRepeats, formatSkipped, type CaptionedImage } from '../../data/captioned.ts';
import { makeBuckets, nearestBucket, bucketBatches, bucketTable, formatBucketTable, loadBucketImage, cropBox, cropRng, cropVariant, type Bucket, type CropMode } from '../../data/buckets.ts';
import { LatentDiskCache, vaeHash, vaeLatentEncoder, type EncodedLatent, type LatentJob } from '../../train/latent-disk-cache.ts';
import { paddingFor, type SdModel } from '../../nets/sd.ts';
import type { SizeCond } from '../../nets/sdxl-conditioner.ts';
import { loadVae } from '../../nets/vae.ts';
import { disposeParams } from '../../nets/params.ts';
import { seededNoise } from '../../train/latent-cache.ts';
import { offsetNoise } from '../../nets/noise-schedule.ts';
import { Rng } from '../../random.ts';
import type { JobContext } from '../../job.ts';
import type { FinetuneJob } from '../../../schemas/types.ts';
import type { BucketedImage, FinetuneSpec, FtBatch, FtRun, Sample } from './types.ts';

/** The buckets of a resolution: steps of 64, sides from half the resolution (at least 64). */
export function finetuneBuckets(resolution: number): Bucket[] {
  return makeBuckets({ resolution, step: 64, minSide: Math.min(resolution, Math.max(64, resolution / 2)) });
}

/** Read the data set, assign buckets, print the table, and report undecodable images. */
export async function prepareData(spec: FinetuneJob, ctx: JobContext) {
  const set = await loadCaptionedSet({ root: spec.images, manifest: spec.manifest, validationSplit: spec.validationSplit, seed: spec.seed });
  if (set.skipped.length) ctx.emit({ type: 'log', level: 'warn', message: formatSkipped(set.skipped) });
  if (set.train.length === 0) throw new Error(`${spec.images}: no training images found`);
  const buckets = finetuneBuckets(spec.resolution);
  const assign = (imgs: CaptionedImage[]): BucketedImage[] => imgs.map((image) => ({ image, bucket: nearestBucket(buckets, image.width, image.height) }));
  const train = assign(set.train);
  ctx.emit({ type: 'log', level: 'info', message: formatBucketTable(bucketTable(buckets, train.map((t) => t.bucket.index))) });
  return { train, validation: assign(set.validation), skipped: set.skipped };
}

/** The cache job of an image in its bucket: key variant = bucket, crop offsets (and mode). */
export function latentJob({ image, bucket }: BucketedImage, crop: CropMode, seed: number): LatentJob {
  const box = boxOf({ image, bucket }, crop, seed);
  return { path: image.path, variant: cropVariant(box, crop), pixels: () => loadBucketImage(image.path, bucket, cropRng(crop, seed, image.file)) };
}

const boxOf = ({ image, bucket }: BucketedImage, crop: CropMode, seed: number) => cropBox(image.width, image.height, bucket, cropRng(crop, seed, image.file));

/** SDXL's size conditioning of an image in its bucket (sgm/kohya): its size, the crop's top-left in the resized image, the bucket. */
export function bucketSizeCond(s: BucketedImage, crop: CropMode, seed: number): SizeCond {
  const box = boxOf(s, crop, seed);
  return { original: [s.image.height, s.image.width], crop: [box.top, box.left], target: [s.bucket.height, s.bucket.width] };
}

/**
 * Latents from the disk cache; the VAE encoder is loaded only for missing ones, then released.
 * An image whose pixels fail to decode (header fine, data broken) has no latent (undefined).
 */
export async function cachedLatents(spec: FinetuneSpec, model: SdModel, samples: BucketedImage[], ctx: JobContext): Promise<(EncodedLatent | undefined)[]> {
  const cache = new LatentDiskCache(join(spec.latentCacheDir ?? spec.logDir, 'latent-cache'), await vaeHash(model.source, 'first_stage_model.'));
  let vae: Awaited<ReturnType<typeof loadVae>> | undefined;
  const jobs = samples.map((s) => latentJob(s, spec.crop, spec.seed));
  const entries = await cache.ensure(jobs, async () => {
    ctx.emit({ type: 'log', level: 'info', message: 'encoding latents (VAE loaded)' });
    vae = await loadVae(model.source, { parts: ['encoder'], scaleFactor: model.overrides.scaleFactor });
    return vaeLatentEncoder(vae);
  });
  if (vae) disposeParams(vae.params);
  const failed = entries.flatMap((e, i) => (e.error ? [{ file: samples[i]!.image.file, reason: e.error }] : []));
  if (failed.length) ctx.emit({ type: 'log', level: 'warn', message: formatSkipped(failed) });
  return Promise.all(entries.map((e) => (e.error ? undefined : cache.read(e.key))));
}

/** The micro-batch of item indices for (step, micro): epochs of single-bucket batches. */
export function batchItems(run: FtRun, step: number, micro: number): number[] {
  const assigned = run.items.map((i) => run.train[i]!.bucket.index);
  const k = (step - 1) * run.spec.gradAccum + micro;
  const perEpoch = bucketBatches(assigned, run.spec.batchSize, run.spec.seed, 0).length;
  const batch = bucketBatches(assigned, run.spec.batchSize, run.spec.seed, Math.floor(k / perEpoch))[k % perEpoch]!;
  return batch.map((i) => run.items[i]!);
}

/** Posterior sample, seeded noise (+ offset), seeded timesteps, captions → ids. */
export function makeBatch(run: FtRun, samples: Sample[], labels: (string | number)[], caption: (s: Sample, k: number) => string): FtBatch {
  const { seed, noiseOffset } = run.spec;
  return tf.tidy(() => {
    const latents = tf.concat(samples.map((s, k) => {
      const mean = tf.tensor(s.latent.mean, s.latent.shape);
      return mean.add(tf.tensor(s.latent.std, s.latent.shape).mul(seededNoise(s.latent.shape, seed, 'posterior', ...labels, k)));
    }), 0); // [B, h, w, C]
    let noise = seededNoise(latents.shape, seed, 'noise', ...labels);
    if (noiseOffset > 0) noise = offsetNoise(noise, noiseOffset, seededNoise([samples.length, 1, 1, latents.shape[3]!], seed, 'offset', ...labels));
    const rng = Rng.derive(seed, 'timesteps', ...labels);
    const timesteps = samples.map(() => rng.int(run.model.schedule.timesteps));
    const padding = paddingFor(run.model.family);
    const ids = samples.map((s, k) => run.tokenizer.encode(caption(s, k), padding));
    const sizes = run.model.textXl ? samples.map((s) => bucketSizeCond(s, run.spec.crop, seed)) : undefined;
    return { latents, noise, timesteps, ids, sizes } as unknown as tf.TensorContainer;
  }) as unknown as FtBatch;
}

/**
 * `--dry-run` of a fine-tune: the bucket table, the images held out and skipped, steps per epoch;
 * loads no model. Only the image headers are read, so a file whose pixel data is broken shows up
 * when its latent is encoded (listed in the job's log then), not here.
 */
export async function finetuneDryRun(spec: FinetuneJob): Promise<string> {
  const logs: string[] = [];
  const data = await prepareData(spec, { signal: new AbortController().signal, emit: (e) => void (e.type === 'log' && logs.push(e.message)) });
  const items = expandRepeats(data.train.map((t) => t.image));
  const assigned = items.map((i) => data.train[i]!.bucket.index);
  const batches = bucketBatches(assigned, spec.batchSize, spec.seed, 0).length;
  return [
    `Data set ${spec.images}: ${data.train.length} training image(s) (${items.length} with repeats), ${data.validation.length} held out for validation, ${data.skipped.length} skipped`,
    ...logs,
    `${spec.crop ?? 'center'} crops; batch ${spec.batchSize} × gradient accumulation ${spec.gradAccum}: ${Math.max(1, Math.ceil(batches / spec.gradAccum))} step(s) per epoch`,
  ].join('\n');
}
