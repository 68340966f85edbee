/**
 * @file The fine-tune data set: a folder tree of captioned images (EveryDream2 / kohya-ss
 * sd-scripts conventions) with repeats, caption tag shuffling and drop-out, and a seeded
 * validation split.
 * - captions: `<stem>.txt` next to the image, or a manifest file — JSON (`[{file, caption}]` or
 *   `{file: caption}`) or CSV (`file,caption` header; quoted fields allowed); paths relative to
 *   the root. No caption → the file stem (kohya's caption_extension fallback is an empty string;
 *   the stem is what the webui's [filewords] uses, which is less surprising);
 * - repeats: a folder named `N_name` (kohya train_util.py, `10_cat` = each image 10× per epoch)
 *   repeats every image below it N times; nested prefixes multiply;
 * - tags: a caption is a comma-separated tag list; shuffling keeps the first `keepTokens` tags in
 *   place (kohya --keep_tokens) and shuffles the rest; drop-out replaces the whole caption by ''
 *   with probability `captionDropout` (kohya --caption_dropout_rate; trains the unconditional
 *   embedding for classifier-free guidance);
 * - validation: a seeded fraction of the distinct images (never repeated) held out;
 * - images that fail to decode are listed in `skipped`, never fatal. Only the header is read here
 *   (size, EXIF orientation); a file whose pixel data is broken fails later and is reported then.
 *
 * Example:
 *   const set = await loadCaptionedSet({ root, seed: 1, validationSplit: 0.1 });
 *   const caption = makeCaption(set.train[0], { shuffleTags: true, keepTokens: 1 }, Rng.derive(1, 'cap', step));
 */
import { readdir, readFile } from 'node:fs/promises';
import { basename, extname, join, relative, sep } from 'node:path';
import sharp from 'sharp';
import { Rng } from '../random.ts';
import { decodeBmp, isImageFile } from './images.ts';

export interface CaptionedOptions {
  root: string;
  /** A JSON or CSV manifest (path); when given, only its files are used. */
  manifest?: string;
  /** Fraction of distinct images held out for validation (0 = none). */
  validationSplit?: number;
  seed: number;
}

export interface CaptionedImage {
  /** Path relative to the root (forward slashes). */
  file: string;
  path: string;
  caption: string;
  /** Times per epoch, from `N_name` folder prefixes. */
  repeats: number;
  width: number;
  height: number;
}

export interface SkippedImage {
  file: string;
  reason: string;
}

export interface CaptionedSet {
  train: CaptionedImage[];
  validation: CaptionedImage[];
  skipped: SkippedImage[];
}

export interface CaptionOptions {
  shuffleTags?: boolean;
  /** Tags kept in place at the front when shuffling. */
  keepTokens?: number;
  /** Probability of training with an empty caption. */
  captionDropout?: number;
}

/** `10_cat` → 10; anything else → 1. */
export function folderRepeats(folder: string): number {
  const m = /^(\d+)_./.exec(folder);
  return m ? Math.max(1, Number(m[1])) : 1;
}

async function walk(root: string, dir: string, repeats: number, out: { path: string; repeats: number }[]): Promise<void> {
  const entries = (await readdir(dir, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : 1));
  for (const e of entries) {
    const path = join(dir, e.name);
    if (e.isDirectory()) await walk(root, path, repeats * folderRepeats(e.name), out);
    else if (e.isFile() && isImageFile(e.name)) out.push({ path, repeats });
  }
}

/** The image's size as trained (EXIF orientations 5–8 swap width and height). */
async function probeSize(path: string): Promise<{ width: number; height: number }> {
  if (extname(path).toLowerCase() === '.bmp') {
    const bmp = decodeBmp(await readFile(path));
    return { width: bmp.width, height: bmp.height };
  }
  const meta = await sharp(path, { failOn: 'error' }).metadata();
  if (!meta.width || !meta.height) throw new Error('no image size in the file header');
  const swap = (meta.orientation ?? 1) >= 5;
  return swap ? { width: meta.height, height: meta.width } : { width: meta.width, height: meta.height };
}

/** Minimal CSV: rows of fields, double-quoted fields with "" escapes. */
export function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let field = '';
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i]!;
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') (field += '"'), i++;
      else if (ch === '"') quoted = false;
      else field += ch;
    } else if (ch === '"') quoted = true;
    else if (ch === ',') row.push(field), (field = '');
    else if (ch === '\n' || ch === '\r') {
      if (ch === '\r' && text[i + 1] === '\n') i++;
      row.push(field), rows.push(row), (row = []), (field = '');
    } else field += ch;
  }
  if (field !== '' || row.length > 0) row.push(field), rows.push(row);
  return rows.filter((r) => r.some((f) => f.trim() !== ''));
}

/** Manifest → Map(relative file → caption). */
export async function readManifest(path: string): Promise<Map<string, string>> {
  const text = await readFile(path, 'utf8');
  const norm = (f: string) => f.replaceAll('\\', '/').replace(/^\.\//, '');
  if (extname(path).toLowerCase() === '.csv') {
    const [header, ...rows] = parseCsv(text);
    const fi = header?.findIndex((h) => /^(file|image|file_name|path)$/i.test(h.trim())) ?? -1;
    const ci = header?.findIndex((h) => /^(caption|text|prompt)$/i.test(h.trim())) ?? -1;
    if (fi < 0 || ci < 0) throw new Error(`${path}: CSV header needs a file column and a caption column, got "${header?.join(',')}"`);
    return new Map(rows.map((r) => [norm(r[fi] ?? ''), (r[ci] ?? '').trim()]));
  }
  const json = JSON.parse(text) as unknown;
  if (Array.isArray(json)) {
    return new Map(json.map((e: { file?: string; file_name?: string; caption?: string; text?: string }) => [norm(e.file ?? e.file_name ?? ''), (e.caption ?? e.text ?? '').trim()]));
  }
  if (json && typeof json === 'object') return new Map(Object.entries(json as Record<string, string>).map(([f, c]) => [norm(f), String(c).trim()]));
  throw new Error(`${path}: manifest must be an array of {file, caption} or an object {file: caption}`);
}

async function captionFor(path: string, manifest: Map<string, string> | undefined, file: string): Promise<string> {
  if (manifest) return manifest.get(file) ?? '';
  const stem = path.slice(0, path.length - extname(path).length);
  try {
    return (await readFile(`${stem}.txt`, 'utf8')).trim();
  } catch {
    return basename(stem);
  }
}

/** Walk the tree, read captions and image sizes, split off the validation images. */
export async function loadCaptionedSet(opts: CaptionedOptions): Promise<CaptionedSet> {
  const found: { path: string; repeats: number }[] = [];
  await walk(opts.root, opts.root, 1, found);
  const manifest = opts.manifest ? await readManifest(opts.manifest) : undefined;
  const images: CaptionedImage[] = [];
  const skipped: SkippedImage[] = [];
  for (const { path, repeats } of found) {
    const file = relative(opts.root, path).split(sep).join('/');
    if (manifest && !manifest.has(file)) continue;
    try {
      const { width, height } = await probeSize(path);
      images.push({ file, path, caption: await captionFor(path, manifest, file), repeats, width, height });
    } catch (err) {
      skipped.push({ file, reason: (err as Error).message });
    }
  }
  return { ...splitValidation(images, opts.validationSplit ?? 0, opts.seed), skipped };
}

/** A seeded split; at least one training image is always kept. */
export function splitValidation(images: CaptionedImage[], fraction: number, seed: number): { train: CaptionedImage[]; validation: CaptionedImage[] } {
  const n = Math.min(images.length - 1, Math.round(images.length * fraction));
  if (n <= 0) return { train: images, validation: [] };
  const order = Rng.derive(seed, 'validation').shuffle(images.map((_, i) => i));
  const held = new Set(order.slice(0, n));
  return { train: images.filter((_, i) => !held.has(i)), validation: images.filter((_, i) => held.has(i)) };
}

/** The caption for one use of an image: drop-out, then tag shuffling past the first keepTokens. */
export function makeCaption(caption: string, opts: CaptionOptions, rng: Rng): string {
  if ((opts.captionDropout ?? 0) > 0 && rng.next() < opts.captionDropout!) return '';
  if (!opts.shuffleTags) return caption;
  const tags = caption.split(',').map((t) => t.trim()).filter((t) => t !== '');
  const keep = Math.max(0, opts.keepTokens ?? 0);
  return [...tags.slice(0, keep), ...rng.shuffle(tags.slice(keep))].join(', ');
}

/** Training items with repeats expanded: item k → image index. */
export function expandRepeats(images: readonly CaptionedImage[]): number[] {
  return images.flatMap((img, i) => Array.from({ length: img.repeats }, () => i));
}

/** The report lines for skipped images. */
export function formatSkipped(skipped: readonly SkippedImage[]): string {
  if (skipped.length === 0) return 'all images decoded';
  return [`${skipped.length} image(s) skipped:`, ...skipped.map((s) => `  ${s.file}: ${s.reason}`)].join('\n');
}
