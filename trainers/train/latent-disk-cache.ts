/**
 * @file Latents cached on disk, so a second run (or a resumed one) on the same images does not
 * re-encode them and does not even load the VAE (kohya-ss sd-scripts --cache_latents_to_disk
 * writes `<stem>.npz` beside the image; we key by content instead, so renamed or moved images
 * still hit and edited ones miss).
 * Key = sha256(image bytes) + bucket size + crop box + VAE hash. Each entry is one small
 * safetensors file `<key>.safetensors` with the scaled posterior `mean` and `std`, both
 * [1, h, w, C] float32: the trainer samples `mean + std·ε` (or uses the mean) per use.
 * The VAE hash covers every tensor's key, dtype and shape, plus the values of the small tensors
 * (biases, norms): two VAEs of the same architecture (SD's original and ft-MSE) differ there,
 * and hashing them costs kilobytes, not the 300 MB of the full weights.
 *
 * Example:
 *   const cache = new LatentDiskCache(dir, await vaeHash(vaeSource));
 *   const entries = await cache.ensure(jobs, async () => makeEncoder(await loadVae(...)));
 *   const { mean, std } = await cache.read(entries[0].key);
 */
import { createHash } from 'node:crypto';
import { mkdir, readFile, access } from 'node:fs/promises';
import { join } from 'node:path';
import type { TensorSource } from '../io/types.ts';
import { openSafetensors, writeSafetensors } from '../io/safetensors.ts';
import { tf } from '../backend/tf.ts';
import type { Params } from '../nets/params.ts';
import { vaeEncode, type VaeConfig } from '../nets/vae.ts';

/** Tensors up to this many values have their values hashed too. */
const SMALL_TENSOR = 4096;

export interface EncodedLatent {
  /** Scaled posterior mean and std, each [1, h, w, C] row-major. */
  mean: Float32Array;
  std: Float32Array;
  shape: number[];
}

/** Encodes one image [h, w, 3] in [-1, 1]. */
export type LatentEncoder = (pixels: Float32Array, width: number, height: number) => Promise<EncodedLatent>;

export interface LatentJob {
  /** The image file, hashed for the key. */
  path: string;
  /** Anything else that changes the pixels the VAE sees: bucket size, crop box. */
  variant: string;
  /** Produces the pixels when the latent is not cached yet. */
  pixels: () => Promise<{ pixels: Float32Array; width: number; height: number }>;
}

export interface CacheEntry {
  key: string;
  path: string;
  /** True when this call encoded it. */
  encoded: boolean;
  /** Why the image could not be read (its pixels threw): the entry has no latent. */
  error?: string;
}

/** The LatentEncoder of a loaded VAE: posterior mean and std, times the scale factor. */
export function vaeLatentEncoder(vae: { params: Params; cfg: VaeConfig }): LatentEncoder {
  return async (pixels, width, height) => {
    const [mean, std] = tf.tidy(() => {
      const post = vaeEncode(vae.params, vae.cfg, tf.tensor4d(pixels, [1, height, width, 3]));
      return [post.mean.mul(vae.cfg.scaleFactor), post.std.mul(vae.cfg.scaleFactor)];
    });
    const out = { mean: (await mean!.data()) as Float32Array, std: (await std!.data()) as Float32Array, shape: mean!.shape };
    tf.dispose([mean!, std!]);
    return out;
  };
}

/** A stable fingerprint of VAE weights (keys under `prefix`). */
export async function vaeHash(source: TensorSource, prefix = ''): Promise<string> {
  const h = createHash('sha256');
  for (const key of source.keys().filter((k) => k.startsWith(prefix)).sort()) {
    const info = source.info(key);
    h.update(`${key}|${info.dtype}|${info.shape.join('x')}\n`);
    const n = info.shape.reduce((a, b) => a * b, 1);
    if (n <= SMALL_TENSOR) {
      const values = await source.read(key);
      h.update(new Uint8Array(values.buffer, values.byteOffset, values.byteLength));
    }
  }
  return h.digest('hex').slice(0, 16);
}

export async function fileDigest(path: string): Promise<string> {
  return createHash('sha256').update(await readFile(path)).digest('hex');
}

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

export class LatentDiskCache {
  constructor(
    readonly dir: string,
    readonly vae: string,
  ) {}

  keyOf(imageDigest: string, variant: string): string {
    return createHash('sha256').update(`${imageDigest}|${variant}|${this.vae}`).digest('hex').slice(0, 32);
  }

  pathOf(key: string): string {
    return join(this.dir, `${key}.safetensors`);
  }

  /**
   * Make sure every job's latent is on disk. `loadEncoder` is called at most once, and only when
   * an image that decodes is missing (so a fully cached run never loads the VAE). An image whose pixels
   * cannot be read gets `error` instead of a latent; encoder failures are thrown.
   */
  async ensure(jobs: readonly LatentJob[], loadEncoder: () => Promise<LatentEncoder>, onProgress?: (done: number, total: number) => void): Promise<CacheEntry[]> {
    await mkdir(this.dir, { recursive: true });
    const entries: CacheEntry[] = [];
    for (const job of jobs) {
      const key = this.keyOf(await fileDigest(job.path), job.variant);
      entries.push({ key, path: this.pathOf(key), encoded: false });
    }
    const missing = [];
    for (let i = 0; i < entries.length; i++) if (!(await exists(entries[i]!.path))) missing.push(i);
    if (missing.length === 0) return entries;
    let encode: LatentEncoder | undefined; // loaded on the first image that decodes
    const written = new Set<string>();
    for (const [done, i] of missing.entries()) {
      const entry = entries[i]!;
      if (!written.has(entry.key)) {
        let image;
        try {
          image = await jobs[i]!.pixels();
        } catch (err) {
          entry.error = (err as Error).message;
        }
        if (image) {
          encode ??= await loadEncoder();
          await this.write(entry.key, await encode(image.pixels, image.width, image.height));
          written.add(entry.key);
          entry.encoded = true;
        }
      }
      onProgress?.(done + 1, missing.length);
    }
    return entries;
  }

  async write(key: string, latent: EncodedLatent): Promise<void> {
    await mkdir(this.dir, { recursive: true }); // also when called without ensure()
    await writeSafetensors(this.pathOf(key), [
      { name: 'mean', dtype: 'F32', shape: latent.shape, data: latent.mean },
      { name: 'std', dtype: 'F32', shape: latent.shape, data: latent.std },
    ], { vae: this.vae });
  }

  async read(key: string): Promise<EncodedLatent> {
    const file = await openSafetensors(this.pathOf(key));
    try {
      return { mean: await file.read('mean'), std: await file.read('std'), shape: file.info('mean').shape };
    } finally {
      await file.close();
    }
  }
}
