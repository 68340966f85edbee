/**
 * @file Latents encoded once per image, so the VAE can be released before training starts
 * (webui modules/textual_inversion/dataset.py PersonalizedBase). The webui's three latent
 * sampling methods: `once` samples the posterior once, `deterministic` uses its mean (std = 0),
 * `random` keeps mean and std and samples anew at every use.
 */
import { tf, type Tensor } from '../backend/tf.ts';
import type { Params } from '../nets/params.ts';
import { vaeEncode, type VaeConfig } from '../nets/vae.ts';
import type { Dataset, LatentSampling } from '../data/dataset.ts';
import { Rng, seededNormal } from '../random.ts';

interface Entry {
  /** Scaled latent [1, h, w, C] for once/deterministic; scaled mean for random. */
  latent: Tensor;
  /** Scaled std [1, h, w, C], random sampling only. */
  std?: Tensor;
}

/** Standard normal noise of `shape`, the same for the same (seed, labels). */
export function seededNoise(shape: number[], seed: number, ...labels: (string | number)[]): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  return tf.tensor(seededNormal(Rng.derive(seed, ...labels).nextUint32(), n), shape, 'float32');
}

export class LatentCache {
  private constructor(
    private readonly entries: Entry[],
    private readonly sampling: LatentSampling,
    private readonly seed: number,
  ) {}

  /** Encode every dataset image (one at a time: peak memory is one image's activations). */
  static async build(dataset: Dataset, vae: { params: Params; cfg: VaeConfig }, seed: number): Promise<LatentCache> {
    const sampling = dataset.latentSampling;
    const entries: Entry[] = [];
    for (const item of dataset.items) {
      const pixels = dataset.pixels([item.index]); // [1, H, W, 3] in [-1, 1]
      const entry = tf.tidy(() => {
        const post = vaeEncode(vae.params, vae.cfg, pixels);
        const s = vae.cfg.scaleFactor;
        if (sampling === 'deterministic') return { latent: post.mean.mul(s) };
        if (sampling === 'random') return { latent: post.mean.mul(s), std: post.std.mul(s) };
        const noise = seededNoise(post.mean.shape, seed, 'latent-once', item.index);
        return { latent: post.mean.add(post.std.mul(noise)).mul(s) };
      });
      pixels.dispose();
      entries.push(entry as Entry);
    }
    return new LatentCache(entries, sampling, seed);
  }

  /** Latents of a batch [B, h, w, C]; `random` draws fresh posterior noise per (step, micro). */
  latents(indices: number[], step: number, micro: number): Tensor {
    return tf.tidy(() =>
      tf.concat(
        indices.map((i, k) => {
          const e = this.entries[i]!;
          if (this.sampling !== 'random' || !e.std) return e.latent.clone();
          return e.latent.add(e.std.mul(seededNoise(e.latent.shape, this.seed, 'latent-random', step, micro, k)));
        }),
        0,
      ),
    );
  }

  /** Latent size (h, w) of item i. */
  shapeOf(i: number): number[] {
    return this.entries[i]!.latent.shape;
  }

  dispose(): void {
    for (const e of this.entries) tf.dispose([e.latent, ...(e.std ? [e.std] : [])]);
    this.entries.length = 0;
  }
}
