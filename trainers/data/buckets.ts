/**
 * @file Aspect-ratio buckets (NovelAI's "aspect ratio bucketing", as in kohya-ss sd-scripts
 * library/model_util.py make_bucket_resolutions and EveryDream2 data/aspects.py): training sizes
 * with close to `resolution²` pixels in steps of 64, so that each image is trained near its own
 * aspect ratio instead of being squashed or heavily cropped.
 * - bucket sizes: for every width w = minSide..maxSide in steps of `step`, the largest height
 *   (multiple of `step`, within the side limits) with w·h ≤ area; and the transpose. Never over
 *   the area budget (why: memory per step is bounded by the square resolution's);
 * - assignment: the bucket whose aspect ratio is nearest in log-ratio |ln(w/h) − ln(W/H)|
 *   (why log: 2:1 and 1:2 are equally far from 1:1);
 * - resize to cover the bucket (scale = max(bw/w, bh/h)), then a centre or seeded random crop; a
 *   random crop's offset is drawn once per image from the seed and the image's path (cropRng), so
 *   the image is cut the same way on every use of a run and its cached latent stays valid (kohya's
 *   random_crop draws anew each use, which rules out cached latents);
 * - batches: each epoch every bucket's images are shuffled and cut into batches, then the batch
 *   list is shuffled; a batch never mixes buckets (one latent shape per step).
 *
 * Example:
 *   const buckets = makeBuckets({ resolution: 512 });
 *   const assigned = sizes.map((s) => nearestBucket(buckets, s.width, s.height));
 *   console.log(formatBucketTable(bucketTable(buckets, assigned)));
 *   const batches = bucketBatches(assigned, 2, seed, epoch);
 */
import sharp from 'sharp';
import { Rng } from '../random.ts';
import { decodeRgba, toUnitRange } from './images.ts';

export interface BucketOptions {
  /** Target side: buckets hold at most resolution² pixels. */
  resolution: number;
  /** Side granularity (64: latents /8, and the UNet halves three more times). */
  step?: number;
  /** Smallest allowed side (default: resolution / 2 rounded to step, at least step). */
  minSide?: number;
  /** Largest allowed side (default: resolution * 2). */
  maxSide?: number;
}

export interface Bucket {
  index: number;
  width: number;
  height: number;
}

/** How an image is cut to its bucket after the cover resize. */
export type CropMode = 'center' | 'random';

export interface CropBox {
  /** Size after the cover resize. */
  resizeWidth: number;
  resizeHeight: number;
  left: number;
  top: number;
  width: number;
  height: number;
}

function roundDown(v: number, step: number): number {
  return Math.floor(v / step) * step;
}

/** The bucket sizes, sorted by aspect ratio (widest last). */
export function makeBuckets(opts: BucketOptions): Bucket[] {
  const step = opts.step ?? 64;
  const area = opts.resolution * opts.resolution;
  const minSide = opts.minSide ?? Math.max(step, roundDown(opts.resolution / 2, step));
  const maxSide = opts.maxSide ?? opts.resolution * 2;
  if (minSide * minSide > area) throw new Error(`minSide ${minSide} leaves no bucket within ${opts.resolution}² pixels`);
  const seen = new Set<string>();
  const sizes: [number, number][] = [];
  for (let w = minSide; w <= maxSide; w += step) {
    const h = Math.min(maxSide, roundDown(area / w, step));
    if (h < minSide) break;
    for (const [a, b] of [[w, h], [h, w]] as const) {
      const key = `${a}x${b}`;
      if (!seen.has(key)) {
        seen.add(key);
        sizes.push([a, b]);
      }
    }
  }
  sizes.sort((x, y) => x[0] / x[1] - y[0] / y[1]);
  return sizes.map(([width, height], index) => ({ index, width, height }));
}

/** The bucket nearest the image's aspect ratio (log-ratio distance; ties → larger area). */
export function nearestBucket(buckets: readonly Bucket[], width: number, height: number): Bucket {
  const target = Math.log(width / height);
  let best = buckets[0]!;
  let bestDist = Infinity;
  for (const b of buckets) {
    const d = Math.abs(Math.log(b.width / b.height) - target);
    if (d < bestDist - 1e-12 || (Math.abs(d - bestDist) <= 1e-12 && b.width * b.height > best.width * best.height)) {
      best = b;
      bestDist = d;
    }
  }
  return best;
}

/** Resize-to-cover then crop: centred, or at a seeded random offset when `rng` is given. */
export function cropBox(width: number, height: number, bucket: Bucket, rng?: Rng): CropBox {
  const scale = Math.max(bucket.width / width, bucket.height / height);
  const resizeWidth = Math.max(bucket.width, Math.round(width * scale));
  const resizeHeight = Math.max(bucket.height, Math.round(height * scale));
  const spareX = resizeWidth - bucket.width;
  const spareY = resizeHeight - bucket.height;
  const left = rng ? rng.int(spareX + 1) : Math.floor(spareX / 2);
  const top = rng ? rng.int(spareY + 1) : Math.floor(spareY / 2);
  return { resizeWidth, resizeHeight, left, top, width: bucket.width, height: bucket.height };
}

/** The random stream of an image's crop: none for centre crops, one per (seed, image path) for random ones. */
export function cropRng(mode: CropMode, seed: number, file: string): Rng | undefined {
  return mode === 'random' ? Rng.derive(seed, 'crop', file) : undefined;
}

/**
 * What a crop adds to a latent-cache key: the bucket size and offsets, and for random crops the
 * mode too (so the two modes never share an entry; centre keys are those of earlier versions).
 */
export function cropVariant(box: CropBox, mode: CropMode): string {
  return `${box.width}x${box.height}@${box.left},${box.top}${mode === 'random' ? '/random' : ''}`;
}

/**
 * One epoch's batches: lists of item indices, each from a single bucket. `assigned[i]` is item
 * i's bucket index. Partial batches at a bucket's end are kept (smaller batch, same shape).
 */
export function bucketBatches(assigned: readonly number[], batchSize: number, seed: number, epoch: number): number[][] {
  const rng = Rng.derive(seed, 'buckets', epoch);
  const byBucket = new Map<number, number[]>();
  assigned.forEach((b, i) => {
    const list = byBucket.get(b) ?? [];
    list.push(i);
    byBucket.set(b, list);
  });
  const batches: number[][] = [];
  for (const b of [...byBucket.keys()].sort((x, y) => x - y)) {
    const items = rng.shuffle([...byBucket.get(b)!]);
    for (let i = 0; i < items.length; i += batchSize) batches.push(items.slice(i, i + batchSize));
  }
  return rng.shuffle(batches);
}

export interface BucketRow {
  bucket: Bucket;
  images: number;
}

/** Image counts per bucket (only buckets with images). */
export function bucketTable(buckets: readonly Bucket[], assigned: readonly number[]): BucketRow[] {
  const counts = new Map<number, number>();
  for (const b of assigned) counts.set(b, (counts.get(b) ?? 0) + 1);
  return buckets.filter((b) => counts.has(b.index)).map((bucket) => ({ bucket, images: counts.get(bucket.index)! }));
}

/** The table printed at the start of a run. */
export function formatBucketTable(rows: readonly BucketRow[]): string {
  const lines = ['bucket      aspect  images'];
  for (const { bucket, images } of rows) {
    const size = `${bucket.width}×${bucket.height}`.padEnd(11);
    const aspect = (bucket.width / bucket.height).toFixed(2).padStart(6);
    lines.push(`${size} ${aspect}  ${String(images).padStart(6)}`);
  }
  const total = rows.reduce((a, r) => a + r.images, 0);
  lines.push(`${rows.length} bucket(s), ${total} image(s)`);
  return lines.join('\n');
}

/** An image decoded, cover-resized (cubic, as images.ts) and cropped to its bucket: [h, w, 3] in [-1, 1]. */
export async function loadBucketImage(path: string, bucket: Bucket, rng?: Rng): Promise<{ pixels: Float32Array; width: number; height: number }> {
  const rgba = await decodeRgba(path);
  const box = cropBox(rgba.width, rgba.height, bucket, rng);
  // convert('RGB') semantics: alpha dropped, not composited (see images.ts)
  const n = rgba.width * rgba.height;
  const rgb = Buffer.alloc(n * 3);
  for (let i = 0; i < n; i++) for (let c = 0; c < 3; c++) rgb[i * 3 + c] = rgba.data[i * 4 + c]!;
  const out = await sharp(rgb, { raw: { width: rgba.width, height: rgba.height, channels: 3 } })
    .resize(box.resizeWidth, box.resizeHeight, { fit: 'fill', kernel: 'cubic' })
    .extract({ left: box.left, top: box.top, width: box.width, height: box.height })
    .raw()
    .toBuffer();
  return { pixels: toUnitRange(out), width: box.width, height: box.height };
}
