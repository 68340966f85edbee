/**
 * @file The training set: every image in a folder with its caption, the prompts made from a
 * template, and a deterministic batch order per epoch — the webui's PersonalizedBase +
 * GroupedBatchSampler (modules/textual_inversion/dataset.py, v1.10.1) and the loop bounds of
 * textual_inversion.py train_embedding:
 * - caption ("filewords"): `<stem>.txt` next to the image, else the file name without its
 *   extension and without a leading number prefix (`^[-\d]+\s*`); with a word regex, its
 *   matches joined by the join string (webui options dataset_filename_word_regex / _join_string);
 * - prompt: without tag shuffling/drop-out the prompt of each image is chosen ONCE when the set
 *   is loaded and kept for the whole run (the webui does this); with either, a new prompt is made
 *   every time the image is used;
 * - batches: images are grouped by size (one group unless "do not resize"); each epoch every
 *   group is shuffled and cut into full batches, the remainder is filled by random batches drawn
 *   from the groups in proportion, and the batch list is shuffled (GroupedBatchSampler);
 * - batch = min(batch, images); grad-accum = min(grad-accum, images // batch); steps per epoch =
 *   images // batch // grad-accum, and each epoch uses its first steps·grad-accum batches.
 * Randomness is seeded: epoch e's order and prompts come from streams derived from (seed, e), so
 * `batchAt(step, micro)` is a pure function and a resumed run sees the batches it would have seen.
 *
 * Example:
 *   const ds = await Dataset.load({ dir, width: 512, height: 512, name: 'pallas_cat',
 *     template: await loadTemplate('subject_filewords'), seed: 1234, batchSize: 2, gradAccum: 1,
 *     shuffleTags: false, tagDropOut: 0, doNotResize: false, useWeight: false, latentSampling: 'once',
 *     filenameWordRegex: '', filenameJoinString: ' ' });
 *   console.log(formatDatasetReport(datasetReport(ds)));
 *   const { items, prompts } = ds.batchAt(step, 0);
 */
import { readdir, stat } from 'node:fs/promises';
import { extname, join } from 'node:path';
import { tf } from '../backend/tf.ts';
import { Rng } from '../random.ts';
import { createPrompt, type Template } from '../text/templates.ts';
import { isImageFile, loadImage, lossWeightMap, type DecodedImage } from './images.ts';
import { readCaption } from './dataset-preview.ts';
import { loadNearestBucketImage, sizeBuckets, type Bucket } from './buckets.ts';

export type LatentSampling = 'once' | 'deterministic' | 'random';

export interface DatasetOptions {
  /** The images folder. */
  dir: string;
  width: number;
  height: number;
  /** Keep each image's size (cropped to a multiple of `sizeMultiple`); batches are size-bucketed. */
  doNotResize: boolean;
  /**
   * How an image becomes width × height (not under doNotResize): `stretch` (the default) as the
   * webui; `buckets` cuts it to the aspect-ratio bucket nearest its shape, of about width × height
   * pixels (buckets.ts sizeBuckets: cover resize, centre crop), as sgm and kohya train SDXL, and
   * batches never mix buckets; `crop` cuts it to width × height itself (one bucket: for batches
   * that must share one size with other rows, e.g. class images).
   */
  fit?: ImageFit;
  sizeMultiple?: number;
  /** Keep alpha for loss weighting (webui use_weight). */
  useWeight: boolean;
  /** What [name] becomes: the embedding's (or hypernetwork's) name. */
  name: string;
  template: Template;
  /**
   * The template of images that have a `<stem>.txt` caption (default: `template`): how LoRA and
   * Dreambooth combine a caption with the instance prompt (train/instance-prompts.ts).
   */
  captionedTemplate?: Template;
  // Required, not defaulted: an option a trainer forgets to pass would otherwise be silently off.
  shuffleTags: boolean;
  tagDropOut: number;
  /** Stored for the trainer, which does the VAE encode. */
  latentSampling: LatentSampling;
  batchSize: number;
  gradAccum: number;
  seed: number;
  /** webui option dataset_filename_word_regex ('' = off). */
  filenameWordRegex: string;
  /** webui option dataset_filename_join_string (default ' '). */
  filenameJoinString: string;
  /** Called for each skipped file and each adjusted setting (default: console.warn). */
  onWarning?: (message: string) => void;
}

export type ImageFit = 'stretch' | 'crop' | 'buckets';

/** The buckets an image fit cuts to (none: stretched). */
function bucketsFor(fit: ImageFit, width: number, height: number): Bucket[] | undefined {
  if (fit === 'buckets') return sizeBuckets(width, height);
  return fit === 'crop' ? [{ index: 0, width, height }] : undefined;
}

export interface DatasetItem {
  index: number;
  path: string;
  file: string;
  /** The [filewords] text. */
  caption: string;
  captionSource: 'txt' | 'filename';
  image: DecodedImage;
  /** The prompt chosen at load time, when prompts do not change per use. */
  fixedPrompt?: string;
}

export interface SkippedFile {
  file: string;
  reason: string;
}

export interface Batch {
  /** Item indices, all of one size. */
  items: number[];
  prompts: string[];
}

// the caption rules live with the page's preview (no TF.js there); re-exported for the trainers' callers
export { filewordsFromFilename } from './dataset-preview.ts';

async function listFolder(dir: string): Promise<{ images: string[]; skipped: SkippedFile[] }> {
  let st;
  try {
    st = await stat(dir);
  } catch {
    throw new Error(`images folder ${dir} does not exist`);
  }
  if (!st.isDirectory()) throw new Error(`images folder ${dir} is not a folder`);
  const entries = (await readdir(dir, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const images: string[] = [];
  const skipped: SkippedFile[] = [];
  for (const e of entries) {
    if (e.name.startsWith('.')) continue;
    if (e.isDirectory()) skipped.push({ file: e.name, reason: 'a folder (sub-folders are not read)' });
    else if (isImageFile(e.name)) images.push(e.name);
    else if (extname(e.name).toLowerCase() !== '.txt') skipped.push({ file: e.name, reason: `not an image file (${extname(e.name) || 'no extension'})` });
  }
  if (images.length === 0) {
    const what = entries.length === 0 ? 'is empty' : 'has no images (png, jpg, jpeg, webp, bmp, gif, tiff, avif)';
    throw new Error(`images folder ${dir} ${what}: put the training images there`);
  }
  return { images, skipped };
}

/** Run `fn` over `items` with at most `limit` at once, results in order. */
async function mapLimit<T, R>(items: T[], limit: number, fn: (item: T, i: number) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]!, i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

export class Dataset {
  readonly items: DatasetItem[];
  readonly skipped: SkippedFile[];
  readonly options: DatasetOptions;
  /** Effective batch size and accumulation (clamped to the set, as the webui does). */
  readonly batchSize: number;
  readonly gradAccum: number;
  readonly stepsPerEpoch: number;
  readonly latentSampling: LatentSampling;
  /** Item indices by size `WxH`, sorted by size. */
  readonly buckets: Map<string, number[]>;
  /** Settings that were adjusted, files that were skipped. */
  readonly warnings: string[];
  private cachedEpoch: { epoch: number; batches: Batch[] } | undefined;

  private constructor(options: DatasetOptions, items: DatasetItem[], skipped: SkippedFile[], warnings: string[]) {
    this.options = options;
    this.items = items;
    this.skipped = skipped;
    this.warnings = warnings;
    this.latentSampling = options.latentSampling;
    const n = items.length;
    const wantBatch = options.batchSize;
    const wantAccum = options.gradAccum;
    this.batchSize = Math.min(wantBatch, n);
    this.gradAccum = Math.max(1, Math.min(wantAccum, Math.floor(n / this.batchSize)));
    if (this.batchSize < wantBatch) warnings.push(`batch size ${wantBatch} is more than the ${n} images: using ${this.batchSize}`);
    if (this.gradAccum < wantAccum) warnings.push(`gradient accumulation ${wantAccum} needs more images: using ${this.gradAccum}`);
    this.stepsPerEpoch = Math.floor(Math.floor(n / this.batchSize) / this.gradAccum);
    this.buckets = new Map();
    for (const item of [...items].sort((a, b) => a.image.width - b.image.width || a.image.height - b.image.height)) {
      const key = `${item.image.width}x${item.image.height}`;
      this.buckets.set(key, [...(this.buckets.get(key) ?? []), item.index]);
    }
  }

  /** Read the folder. Unreadable images are skipped with a warning; no usable image is an error. */
  static async load(options: DatasetOptions): Promise<Dataset> {
    const warn = options.onWarning ?? ((m: string) => console.warn(m));
    const { images, skipped } = await listFolder(options.dir);
    const buckets = options.doNotResize ? undefined : bucketsFor(options.fit ?? 'stretch', options.width, options.height);
    const loaded = await mapLimit(images, 4, async (file) => {
      const path = join(options.dir, file);
      try {
        const image = buckets
          ? await loadNearestBucketImage(path, buckets, { keepAlpha: options.useWeight })
          : await loadImage(path, { ...options, keepAlpha: options.useWeight });
        return { path, file, image, ...(await readCaption(path, options)) };
      } catch (err) {
        skipped.push({ file, reason: firstLine(err) });
        return undefined;
      }
    });
    const usable = loaded.filter((x) => x !== undefined);
    const warnings = skipped.filter((s) => isImageFile(s.file)).map((s) => `skipping ${join(options.dir, s.file)}: ${s.reason}`);
    warnings.forEach(warn);
    if (usable.length === 0) {
      throw new Error(`images folder ${options.dir} has no usable images: ${skipped.map((s) => `${s.file} (${s.reason})`).join('; ')}`);
    }
    const dynamic = Dataset.promptsChange(options);
    const items: DatasetItem[] = usable.map((x, index) => {
      const item: DatasetItem = { index, ...x };
      if (!dynamic) item.fixedPrompt = makePrompt(options, item, Rng.derive(options.seed, 'prompt', index));
      return item;
    });
    const before = warnings.length;
    const ds = new Dataset(options, items, skipped, warnings);
    ds.warnings.slice(before).forEach(warn); // batch / accumulation adjusted to the set
    return ds;
  }

  private static promptsChange(o: DatasetOptions): boolean {
    return o.tagDropOut !== 0 || o.shuffleTags;
  }

  /** The prompt for `item` at its `position`-th use in `epoch` (fixed when prompts do not change). */
  prompt(item: DatasetItem, epoch: number, position: number): string {
    return item.fixedPrompt ?? makePrompt(this.options, item, Rng.derive(this.options.seed, 'prompt', epoch, position));
  }

  /** All batches of one epoch, in order (GroupedBatchSampler, cut to stepsPerEpoch · gradAccum). */
  epochBatches(epoch: number): Batch[] {
    if (this.cachedEpoch?.epoch === epoch) return this.cachedEpoch.batches;
    const rng = Rng.derive(this.options.seed, 'order', epoch);
    const order = groupedBatches([...this.buckets.values()].map((g) => [...g]), this.items.length, this.batchSize, rng);
    const batches = order.slice(0, this.stepsPerEpoch * this.gradAccum).map((items, b) => ({
      items,
      prompts: items.map((i, k) => this.prompt(this.items[i]!, epoch, b * this.batchSize + k)),
    }));
    this.cachedEpoch = { epoch, batches };
    return batches;
  }

  /** The micro-batch for optimizer step `step` (0-based completed steps) and accumulation index `micro`. */
  batchAt(step: number, micro: number): Batch {
    const epoch = Math.floor(step / this.stepsPerEpoch);
    const within = step % this.stepsPerEpoch;
    return this.epochBatches(epoch)[within * this.gradAccum + micro]!;
  }

  /** Images of a batch as one [B, H, W, 3] tensor in [-1, 1] (all items must share a size). */
  pixels(indices: number[]): tf.Tensor4D {
    const images = indices.map((i) => this.items[i]!.image);
    const { width, height } = images[0]!;
    if (images.some((im) => im.width !== width || im.height !== height)) throw new Error('pixels(): images of different sizes in one batch');
    if (images.some((im) => im.pixels.length === 0)) throw new Error('pixels(): the images were released (releasePixels)');
    const data = new Float32Array(images.length * height * width * 3);
    images.forEach((im, k) => data.set(im.pixels, k * im.pixels.length));
    return tf.tensor4d(data, [images.length, height, width, 3]);
  }

  /** Loss weight maps at latent size for a batch ([h·w] each; ones without alpha). */
  async weights(indices: number[], latentWidth: number, latentHeight: number): Promise<Float32Array[]> {
    return Promise.all(indices.map((i) => lossWeightMap(this.items[i]!.image.alpha, latentWidth, latentHeight)));
  }

  /** Drop the decoded pixels (after the latents are cached) to free memory. */
  releasePixels(): void {
    for (const item of this.items) item.image.pixels = new Float32Array(0);
  }
}

function makePrompt(o: DatasetOptions, item: DatasetItem, rng: Rng): string {
  const template = item.captionSource === 'txt' && o.captionedTemplate ? o.captionedTemplate : o.template;
  return createPrompt(rng.choice(template.lines), o.name, item.caption, o, rng);
}

function firstLine(err: unknown): string {
  return String(err instanceof Error ? err.message : err).split('\n')[0]!;
}

/** GroupedBatchSampler.__iter__ for one epoch: full batches per size group + proportional random fill, shuffled. */
export function groupedBatches(groups: number[][], n: number, batchSize: number, rng: Rng): number[][] {
  const b = batchSize;
  const nBatch = Math.floor(n / b);
  const expected = groups.map((g) => (g.length / n) * nBatch * b);
  const base = expected.map((e) => Math.floor(Math.floor(e) / b));
  const nRandom = nBatch - base.reduce((s, x) => s + x, 0);
  const probs = expected.map((e) => (nRandom > 0 ? (e % b) / nRandom / b : 0));
  for (const g of groups) rng.shuffle(g);
  const batches: number[][] = [];
  for (const g of groups) for (let i = 0; i < Math.floor(g.length / b); i++) batches.push(g.slice(i * b, (i + 1) * b));
  for (let r = 0; r < nRandom; r++) {
    const group = rng.weighted(groups, probs);
    batches.push(Array.from({ length: b }, () => rng.choice(group))); // with replacement, as random.choices
  }
  return rng.shuffle(batches);
}

export interface DatasetReport {
  dir: string;
  used: {
    file: string; width: number; height: number; sourceWidth: number; sourceHeight: number; caption: string; captionSource: 'txt' | 'filename'; alpha: boolean;
    /** The prompt it trains with (its first use when prompts change per use). */
    prompt: string;
  }[];
  skipped: SkippedFile[];
  /** Images per training size. */
  sizes: { width: number; height: number; count: number }[];
  batchSize: number;
  gradAccum: number;
  stepsPerEpoch: number;
  template: string;
  /** Three prompts as the first steps will use them. */
  examplePrompts: string[];
  latentSampling: LatentSampling;
  warnings: string[];
}

/** What `--dry-run` prints: the set as the trainer will use it. Loads no model. */
export function datasetReport(ds: Dataset, examples = 3): DatasetReport {
  const first = ds.epochBatches(0).flatMap((b) => b.prompts);
  const examplePrompts = first.length >= examples ? first.slice(0, examples) : ds.items.slice(0, examples).map((it, k) => ds.prompt(it, 0, k));
  return {
    dir: ds.options.dir,
    used: ds.items.map((it) => ({
      file: it.file,
      width: it.image.width,
      height: it.image.height,
      sourceWidth: it.image.sourceWidth,
      sourceHeight: it.image.sourceHeight,
      caption: it.caption,
      captionSource: it.captionSource,
      alpha: it.image.alpha !== undefined,
      prompt: ds.prompt(it, 0, it.index),
    })),
    skipped: ds.skipped,
    sizes: [...ds.buckets.entries()].map(([key, ids]) => {
      const [width, height] = key.split('x').map(Number) as [number, number];
      return { width, height, count: ids.length };
    }),
    batchSize: ds.batchSize,
    gradAccum: ds.gradAccum,
    stepsPerEpoch: ds.stepsPerEpoch,
    template: ds.options.template.name,
    examplePrompts,
    latentSampling: ds.latentSampling,
    warnings: ds.warnings,
  };
}

/** The report as text for the terminal. */
export function formatDatasetReport(r: DatasetReport): string {
  const lines = [`Dataset ${r.dir}: ${r.used.length} image(s) used, ${r.skipped.length} skipped`];
  for (const u of r.used) {
    const size = u.width === u.sourceWidth && u.height === u.sourceHeight ? `${u.width}×${u.height}` : `${u.sourceWidth}×${u.sourceHeight} → ${u.width}×${u.height}`;
    const prompt = u.prompt === u.caption ? '' : `  prompt: ${JSON.stringify(u.prompt)}`;
    lines.push(`  ${u.file}  ${size}${u.alpha ? '  alpha' : ''}  caption (${u.captionSource === 'txt' ? '.txt' : 'file name'}): ${JSON.stringify(u.caption)}${prompt}`);
  }
  for (const s of r.skipped) lines.push(`  skipped ${s.file}: ${s.reason}`);
  lines.push(`Sizes: ${r.sizes.map((s) => `${s.width}×${s.height} (${s.count})`).join(', ')}`);
  lines.push(
    `Batch ${r.batchSize} × gradient accumulation ${r.gradAccum} = ${r.batchSize * r.gradAccum} image(s) per step; ` +
      `${r.stepsPerEpoch} step(s) per epoch; latent sampling ${r.latentSampling}`,
  );
  lines.push(`Template ${r.template}; example prompts:`);
  for (const p of r.examplePrompts) lines.push(`  ${p}`);
  for (const w of r.warnings) lines.push(`Warning: ${w}`);
  return lines.join('\n');
}
