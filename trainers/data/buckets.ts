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
 * Default sizes: SDXL is trained around 1024² (sgm's and kohya's SDXL configs), SD1/SD2 around
 * 512² (the webui's Train tab) — io/checkpoint.ts `nativeResolution`.
 *
 * Example:
 *   const buckets = makeBuckets({ resolution: 512 });
 *   const assigned = sizes.map((s) => nearestBucket(buckets, s.width, s.height));
 *   console.log(formatBucketTable(bucketTable(buckets, assigned)));
 *   const batches = bucketBatches(assigned, 2, seed, epoch);
 */
import sharp from 'sharp';
import { Rng } from '../random.ts';
import { alphaOf, decodeRgba, stripAlpha, toUnitRange, type DecodedImage } from './images.ts';

export interface BucketOptions {
  /** Target side: buckets hold at most resolution² pixels. */
  resolution: number;
  /** Pixel budget of a bucket when it is not resolution² (a width × height training size). */
  area?: number;
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
  const area = opts.area ?? opts.resolution * opts.resolution;
  const minSide = opts.minSide ?? Math.max(step, roundDown(opts.resolution / 2, step));
  const maxSide = opts.maxSide ?? opts.resolution * 2;
  if (minSide * minSide > area) throw new Error(`minSide ${minSide} leaves no bucket within ${area} pixels`);
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

/**
 * The buckets of a training size: about width × height pixels, sides in steps of 64 from half the
 * size's side up to twice it (kohya's SDXL defaults: 1024² with sides 512…2048 in steps of 64).
 */
export function sizeBuckets(width: number, height: number): Bucket[] {
  const side = Math.sqrt(width * height);
  if (side < 64) throw new Error(`training size ${width}×${height} is under 64×64 pixels: no aspect-ratio bucket fits`);
  return makeBuckets({ resolution: side, area: width * height, step: 64, minSide: Math.max(64, roundDown(side / 2, 64)), maxSide: Math.max(64, roundDown(side * 2, 64)) });
}

/**
 * An image decoded, cover-resized (cubic, as images.ts) and cropped to a bucket: [h, w, 3] in
 * [-1, 1], with its source size and the crop's top-left (SDXL's size conditioning) and, when
 * asked and present, its alpha cut the same way.
 */
export async function loadBucketImage(path: string, bucket: Bucket, rng?: Rng, opts: { keepAlpha?: boolean } = {}): Promise<DecodedImage> {
  return cutToBucket(await decodeRgba(path), bucket, rng, opts);
}

/** An image decoded and cut to the bucket nearest its aspect ratio (centre crop). */
export async function loadNearestBucketImage(path: string, buckets: readonly Bucket[], opts: { keepAlpha?: boolean } = {}): Promise<DecodedImage> {
  const rgba = await decodeRgba(path);
  return cutToBucket(rgba, nearestBucket(buckets, rgba.width, rgba.height), undefined, opts);
}

async function cutToBucket(rgba: Awaited<ReturnType<typeof decodeRgba>>, bucket: Bucket, rng: Rng | undefined, opts: { keepAlpha?: boolean }): Promise<DecodedImage> {
  const box = cropBox(rgba.width, rgba.height, bucket, rng);
  // convert('RGB') semantics: alpha dropped, not composited (see images.ts)
  const out = await sharp(stripAlpha(rgba), { raw: { width: rgba.width, height: rgba.height, channels: 3 } })
    .resize(box.resizeWidth, box.resizeHeight, { fit: 'fill', kernel: 'cubic' })
    .extract({ left: box.left, top: box.top, width: box.width, height: box.height })
    .raw()
    .toBuffer();
  const image: DecodedImage = {
    pixels: toUnitRange(out), width: box.width, height: box.height,
    sourceWidth: rgba.width, sourceHeight: rgba.height, cropLeft: box.left, cropTop: box.top,
  };
  if (opts.keepAlpha && rgba.hasAlpha) {
    // the loss weight map must cover the pixels trained: the alpha goes through the same resize and crop
    const alpha = alphaOf(rgba);
    const data = await sharp(Buffer.from(alpha.data), { raw: { width: alpha.width, height: alpha.height, channels: 1 } })
      .resize(box.resizeWidth, box.resizeHeight, { fit: 'fill', kernel: 'cubic' })
      .extract({ left: box.left, top: box.top, width: box.width, height: box.height })
      .extractChannel(0) // libvips widens one band to sRGB on the way
      .raw()
      .toBuffer();
    image.alpha = { data: new Uint8Array(data), width: box.width, height: box.height };
  }
  return image;
}
