/**
 * @file A training folder as the user should see it before a job starts, without TF.js and
 * without decoding a pixel (image headers only, so the server can answer at once): every image
 * with its size and the size it trains at, its caption (`<stem>.txt`, else the file name, as
 * dataset.ts reads it) and the prompt it trains with; the files that will be skipped and why.
 * Captions are edited in place: `<stem>.txt` beside the image, written atomically. Used by
 * `sidetrain dataset DIR` and the page's dataset panel (the routes in bridge/dataset-routes.ts).
 */
import { readdir, readFile } from 'node:fs/promises';
import { basename, extname, join } from 'node:path';
import sharp from 'sharp';
import { Rng } from '../random.ts';
import { createPrompt, type Template } from '../text/templates.ts';
import { writeFileAtomic } from '../io/atomic.ts';
import { isImageFile, targetSize } from './images.ts';
import { nearestBucket, sizeBuckets, type Bucket } from './buckets.ts';
import { compileWordRegex } from './word-regex.ts';

export interface PreviewOptions {
  dir: string;
  width: number;
  height: number;
  doNotResize?: boolean;
  /** How images become width × height (dataset.ts ImageFit; default stretch). */
  fit?: 'stretch' | 'crop' | 'buckets';
  /** What [name] becomes. */
  name: string;
  template: Template;
  /** The template of images with a caption file (LoRA/Dreambooth caption mode). */
  captionedTemplate?: Template;
  filenameWordRegex?: string;
  filenameJoinString?: string;
}

export interface PreviewItem {
  file: string;
  sourceWidth: number;
  sourceHeight: number;
  /** The size it trains at. */
  width: number;
  height: number;
  caption: string;
  captionSource: 'txt' | 'filename';
  /** The prompt it trains with (the template's first line where it has several). */
  prompt: string;
}

export interface DatasetPreview {
  dir: string;
  items: PreviewItem[];
  skipped: { file: string; reason: string }[];
}

const NUMBER_PREFIX = /^[-\d]+\s*/;

/**
 * The webui's file-name caption rule (used when there is no `<stem>.txt`). The word regex is the
 * user's own, so it runs on RE2 (re2js): linear time, so `(a|a)+$` cannot hang the worker or the
 * server as it would on V8's backtracking engine. RE2 has no look-arounds or back-references;
 * such a regex is refused when the job is submitted (checkWordRegex).
 */
export function filewordsFromFilename(file: string, wordRegex = '', joinString = ' '): string {
  const text = basename(file, extname(file)).replace(NUMBER_PREFIX, '');
  if (!wordRegex) return text;
  const re = compileWordRegex(wordRegex);
  const groups = re.groupCount(); // capture groups, like Python findall
  return [...re.matchAll(text)].map((m) => (groups === 1 ? (m[1] ?? '') : m[0])).join(joinString);
}

/** `<stem>.txt` beside the image. */
export const captionPath = (imagePath: string) => imagePath.slice(0, imagePath.length - extname(imagePath).length) + '.txt';

/** The caption of one image: its `<stem>.txt`, else its file name. */
export async function readCaption(path: string, opts: Pick<PreviewOptions, 'filenameWordRegex' | 'filenameJoinString'> = {}): Promise<{ caption: string; captionSource: 'txt' | 'filename' }> {
  try {
    return { caption: (await readFile(captionPath(path), 'utf8')).trim(), captionSource: 'txt' };
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  return { caption: filewordsFromFilename(path, opts.filenameWordRegex, opts.filenameJoinString), captionSource: 'filename' };
}

/** Width and height from the header (EXIF rotation applied), or the reason it cannot be read. */
async function headerSize(path: string): Promise<{ width: number; height: number } | string> {
  try {
    const buf = await readFile(path);
    if (buf[0] === 0x42 && buf[1] === 0x4d && buf.length >= 26) return { width: buf.readInt32LE(18), height: Math.abs(buf.readInt32LE(22)) }; // BMP: sharp lacks it
    const meta = await sharp(buf).metadata();
    if (!meta.width || !meta.height) return 'no image size in its header';
    const turned = (meta.orientation ?? 1) >= 5;
    return turned ? { width: meta.height, height: meta.width } : { width: meta.width, height: meta.height };
  } catch (err) {
    return String(err instanceof Error ? err.message : err).split('\n')[0]!;
  }
}

/** Every file of the folder: the images with caption and prompt, the rest skipped with why. */
export async function previewDataset(opts: PreviewOptions): Promise<DatasetPreview> {
  const entries = (await readdir(opts.dir, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const items: PreviewItem[] = [];
  const skipped: DatasetPreview['skipped'] = [];
  let buckets: Bucket[] | undefined;
  for (const e of entries) {
    if (e.name.startsWith('.')) continue;
    if (e.isDirectory()) {
      skipped.push({ file: e.name, reason: 'a folder (sub-folders are not read)' });
      continue;
    }
    if (!isImageFile(e.name)) {
      if (extname(e.name).toLowerCase() !== '.txt') skipped.push({ file: e.name, reason: `not an image file (${extname(e.name) || 'no extension'})` });
      continue;
    }
    const path = join(opts.dir, e.name);
    const size = await headerSize(path);
    if (typeof size === 'string') {
      skipped.push({ file: e.name, reason: size });
      continue;
    }
    let train: { width: number; height: number };
    try {
      train = trainSize(size, opts, () => (buckets ??= sizeBuckets(opts.width, opts.height)));
    } catch (err) {
      skipped.push({ file: e.name, reason: (err as Error).message });
      continue;
    }
    const caption = await readCaption(path, opts);
    const template = caption.captionSource === 'txt' && opts.captionedTemplate ? opts.captionedTemplate : opts.template;
    const prompt = createPrompt(template.lines[0] ?? '', opts.name, caption.caption, {}, new Rng(0));
    items.push({ file: e.name, sourceWidth: size.width, sourceHeight: size.height, ...train, ...caption, prompt });
  }
  return { dir: opts.dir, items, skipped };
}

/** The size an image trains at, as Dataset.load cuts it (stretched, cut to width × height, or to its nearest bucket). */
function trainSize(size: { width: number; height: number }, opts: PreviewOptions, buckets: () => Bucket[]): { width: number; height: number } {
  if (opts.doNotResize || !opts.fit || opts.fit === 'stretch') return targetSize(size.width, size.height, { width: opts.width, height: opts.height, doNotResize: opts.doNotResize });
  if (opts.fit === 'crop') return { width: opts.width, height: opts.height };
  const b = nearestBucket(buckets(), size.width, size.height);
  return { width: b.width, height: b.height };
}

/** A file name of an image directly in `dir` (no path), or an error naming what is wrong. */
function imageName(file: string): string {
  if (!file || /[\\/\0]/.test(file) || file === '.' || file === '..') throw new Error(`'${file}' is not a file name in the folder`);
  if (!isImageFile(file)) throw new Error(`'${file}' is not an image file`);
  return file;
}

/** Write an image's caption as `<stem>.txt` beside it (atomically; an empty caption is written as such). */
export async function writeCaption(dir: string, file: string, caption: string): Promise<string> {
  const path = captionPath(join(dir, imageName(file)));
  await writeFileAtomic(path, new TextEncoder().encode(`${caption.trim()}\n`), { overwrite: true });
  return path;
}

/** A small JPEG of an image for the page (longest side `size` px, EXIF rotation applied). */
export async function thumbnail(dir: string, file: string, size = 192): Promise<Buffer> {
  const buf = await readFile(join(dir, imageName(file)));
  return sharp(buf).rotate().resize(size, size, { fit: 'inside', withoutEnlargement: true }).flatten({ background: '#ffffff' }).jpeg({ quality: 80 }).toBuffer();
}
