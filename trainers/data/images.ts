/**
 * @file Training images: decode (sharp; a small built-in reader for BMP, which sharp's libvips
 * lacks), resize to the training size, and turn into Float32 RGB in [-1, 1] (`u8/127.5 - 1`,
 * HWC = one NHWC image), ready for the VAE. The alpha channel is kept aside for the optional
 * loss weighting.
 *
 * Semantics of the webui's PersonalizedBase (modules/textual_inversion/dataset.py, v1.10.1):
 * - `Image.open(path).convert('RGB')`: alpha is DROPPED, not composited, so RGB under
 *   transparent pixels is used as stored. We decode to raw RGBA first and strip alpha ourselves
 *   (sharp would premultiply during a resize and change those pixels);
 * - `.resize((width, height), BICUBIC)`: stretched to the training size, aspect not kept;
 *   sharp's 'cubic' kernel is the same Catmull-Rom cubic as PIL's BICUBIC;
 * - "do not resize" (varsize): the size is kept; we centre-crop to a multiple of `sizeMultiple`
 *   (8 by default: the VAE halves the size three times), which the webui leaves to the user;
 * - use_weight: the ORIGINAL alpha is resized (bicubic) to the latent size, shifted to min 0 and
 *   divided by its mean (so the loss stays comparable); no alpha → all ones. Fixed on purpose:
 *   a constant alpha (mean 0 after the shift) gives ones, not the webui's NaN; and the latent
 *   size is passed as (width, height) correctly (the webui swaps them for non-square images).
 * Differences: EXIF orientation is applied (the webui trains phone photos sideways).
 */
import { readFile } from 'node:fs/promises';
import { extname } from 'node:path';
import sharp from 'sharp';

export const IMAGE_EXTENSIONS = ['.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif', '.tif', '.tiff', '.avif'] as const;

export function isImageFile(name: string): boolean {
  return (IMAGE_EXTENSIONS as readonly string[]).includes(extname(name).toLowerCase());
}

export interface AlphaChannel {
  /** One byte per pixel, row-major, at the image's original size. */
  data: Uint8Array;
  width: number;
  height: number;
}

export interface DecodedImage {
  /** Size after resize / crop (the size the VAE sees). */
  width: number;
  height: number;
  /** Size of the file's image. */
  sourceWidth: number;
  sourceHeight: number;
  /**
   * Top-left of the part kept, in pixels of the resized image (0 when stretched): with the two
   * sizes, SDXL's size conditioning (sgm crop_coords_top_left).
   */
  cropLeft: number;
  cropTop: number;
  /** [height, width, 3] RGB in [-1, 1]. */
  pixels: Float32Array;
  /** The original alpha, when asked for and present. */
  alpha?: AlphaChannel;
}

export interface LoadImageOptions {
  width: number;
  height: number;
  /** Keep the image's own size (cropped to a multiple of `sizeMultiple`). */
  doNotResize?: boolean;
  sizeMultiple?: number;
  /** Keep the alpha channel for loss weighting. */
  keepAlpha?: boolean;
}

export interface Rgba {
  data: Buffer;
  width: number;
  height: number;
  hasAlpha: boolean;
}

/** Larger images are refused unread (8192 × 8192): decoded as RGBA they alone would take 256 MB. */
export const MAX_IMAGE_PIXELS = 64 * 2 ** 20;

/** Decode any supported file to 8-bit sRGB RGBA at its own (EXIF-oriented) size. */
export async function decodeRgba(path: string): Promise<Rgba> {
  const file = await readFile(path);
  if (extname(path).toLowerCase() === '.bmp' || (file[0] === 0x42 && file[1] === 0x4d)) return decodeBmp(file);
  const image = sharp(file, { failOn: 'error' });
  const meta = await image.metadata();
  // The header's size, before anything is decoded: a 256-megapixel image took 2 GB in a dry run.
  if ((meta.width ?? 0) * (meta.height ?? 0) > MAX_IMAGE_PIXELS) {
    throw new Error(`${path}: ${meta.width}×${meta.height} is over ${MAX_IMAGE_PIXELS / 2 ** 20} megapixels; scale it down first`);
  }
  const { data, info } = await image
    .rotate()
    .toColourspace('srgb')
    .ensureAlpha()
    .raw({ depth: 'uchar' })
    .toBuffer({ resolveWithObject: true });
  if (info.channels !== 4) throw new Error(`decoded to ${info.channels} channels, expected RGBA`);
  return { data, width: info.width, height: info.height, hasAlpha: meta.hasAlpha === true };
}

/** convert('RGB'): drop the alpha byte of every pixel. */
export function stripAlpha(rgba: Rgba): Buffer {
  const n = rgba.width * rgba.height;
  const rgb = Buffer.alloc(n * 3);
  for (let i = 0; i < n; i++) {
    rgb[i * 3] = rgba.data[i * 4]!;
    rgb[i * 3 + 1] = rgba.data[i * 4 + 1]!;
    rgb[i * 3 + 2] = rgba.data[i * 4 + 2]!;
  }
  return rgb;
}

export function alphaOf(rgba: Rgba): AlphaChannel {
  const n = rgba.width * rgba.height;
  const data = new Uint8Array(n);
  for (let i = 0; i < n; i++) data[i] = rgba.data[i * 4 + 3]!;
  return { data, width: rgba.width, height: rgba.height };
}

/** The training size of an image: the requested size, or its own size cropped to a multiple. */
export function targetSize(sourceWidth: number, sourceHeight: number, opts: LoadImageOptions): { width: number; height: number } {
  if (!opts.doNotResize) return { width: opts.width, height: opts.height };
  const m = opts.sizeMultiple ?? 8;
  const width = Math.floor(sourceWidth / m) * m;
  const height = Math.floor(sourceHeight / m) * m;
  if (width === 0 || height === 0) throw new Error(`image is ${sourceWidth}×${sourceHeight}, smaller than ${m} px`);
  return { width, height };
}

async function resizeRgb(rgb: Buffer, w: number, h: number, width: number, height: number, crop: boolean): Promise<Buffer> {
  if (w === width && h === height) return rgb;
  const img = sharp(rgb, { raw: { width: w, height: h, channels: 3 } });
  const out = crop
    ? img.extract({ left: Math.floor((w - width) / 2), top: Math.floor((h - height) / 2), width, height })
    : img.resize(width, height, { fit: 'fill', kernel: 'cubic' });
  return out.raw().toBuffer();
}

/** u8 → [-1, 1] as the webui: `np.array(image) / 127.5 - 1`. */
export function toUnitRange(rgb: Uint8Array): Float32Array {
  const out = new Float32Array(rgb.length);
  for (let i = 0; i < rgb.length; i++) out[i] = rgb[i]! / 127.5 - 1;
  return out;
}

/** Decode, resize (or crop) and convert one training image. Throws with the reason on failure. */
export async function loadImage(path: string, opts: LoadImageOptions): Promise<DecodedImage> {
  const rgba = await decodeRgba(path);
  const { width, height } = targetSize(rgba.width, rgba.height, opts);
  const rgb = await resizeRgb(stripAlpha(rgba), rgba.width, rgba.height, width, height, opts.doNotResize === true);
  const cropped = opts.doNotResize === true;
  return {
    width,
    height,
    sourceWidth: rgba.width,
    sourceHeight: rgba.height,
    cropLeft: cropped ? Math.floor((rgba.width - width) / 2) : 0,
    cropTop: cropped ? Math.floor((rgba.height - height) / 2) : 0,
    pixels: toUnitRange(rgb),
    alpha: opts.keepAlpha && rgba.hasAlpha ? alphaOf(rgba) : undefined,
  };
}

/**
 * The per-pixel loss weight at latent size [latentHeight, latentWidth] (use_weight): the alpha
 * resized bicubically, minus its minimum, divided by its mean. No alpha → ones.
 */
export async function lossWeightMap(alpha: AlphaChannel | undefined, latentWidth: number, latentHeight: number): Promise<Float32Array> {
  const n = latentWidth * latentHeight;
  if (!alpha) return new Float32Array(n).fill(1);
  const { data, info } = await sharp(Buffer.from(alpha.data), { raw: { width: alpha.width, height: alpha.height, channels: 1 } })
    .resize(latentWidth, latentHeight, { fit: 'fill', kernel: 'cubic' })
    .raw()
    .toBuffer({ resolveWithObject: true });
  // sharp may hand back a one-channel image as sRGB (3 equal channels): take the first.
  const resized = Uint8Array.from({ length: n }, (_, i) => data[i * info.channels]!);
  let min = Infinity;
  for (const v of resized) min = Math.min(min, v);
  let sum = 0;
  for (const v of resized) sum += v - min;
  const mean = sum / n;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = mean > 0 ? (resized[i]! - min) / mean : 1;
  return out;
}

/**
 * Minimal BMP reader (uncompressed 8/24/32-bit and 32-bit BITFIELDS: what image editors write).
 * Other variants throw, and the image is skipped with that reason.
 */
export function decodeBmp(buf: Buffer): Rgba {
  if (buf.length < 54 || buf.toString('latin1', 0, 2) !== 'BM') throw new Error('not a BMP file');
  const dataOffset = buf.readUInt32LE(10);
  const dibSize = buf.readUInt32LE(14);
  const width = buf.readInt32LE(18);
  const rawHeight = buf.readInt32LE(22);
  const bpp = buf.readUInt16LE(28);
  const compression = buf.readUInt32LE(30);
  const height = Math.abs(rawHeight);
  if (width <= 0 || height === 0) throw new Error(`BMP has size ${width}×${rawHeight}`);
  if (![0, 3].includes(compression) || ![8, 24, 32].includes(bpp) || (compression === 3 && bpp !== 32)) {
    throw new Error(`unsupported BMP variant (${bpp} bit, compression ${compression}); save it as PNG`);
  }
  const stride = Math.floor((bpp * width + 31) / 32) * 4;
  if (dataOffset + stride * height > buf.length) throw new Error('BMP pixel data is truncated');
  const masks = compression === 3 ? bmpMasks(buf, dibSize) : undefined;
  const palette = bpp === 8 ? 14 + dibSize : 0;
  const data = Buffer.alloc(width * height * 4);
  for (let y = 0; y < height; y++) {
    const row = dataOffset + stride * (rawHeight > 0 ? height - 1 - y : y); // positive height = bottom-up
    for (let x = 0; x < width; x++) {
      const o = (y * width + x) * 4;
      if (bpp === 8) {
        const p = palette + buf[row + x]! * 4;
        data[o] = buf[p + 2]!;
        data[o + 1] = buf[p + 1]!;
        data[o + 2] = buf[p]!;
        data[o + 3] = 255;
      } else if (masks) {
        const px = buf.readUInt32LE(row + x * 4);
        for (let c = 0; c < 4; c++) data[o + c] = masks[c] ? channel(px, masks[c]!) : 255;
      } else {
        const p = row + x * (bpp / 8);
        data[o] = buf[p + 2]!;
        data[o + 1] = buf[p + 1]!;
        data[o + 2] = buf[p]!;
        data[o + 3] = 255; // BI_RGB 32-bit: the 4th byte is unused by the format
      }
    }
  }
  return { data, width, height, hasAlpha: masks !== undefined && masks[3] !== 0 };
}

function bmpMasks(buf: Buffer, dibSize: number): number[] {
  const at = 14 + 40; // masks follow a 40-byte header, or sit inside a V4/V5 header at the same place
  return [buf.readUInt32LE(at), buf.readUInt32LE(at + 4), buf.readUInt32LE(at + 8), dibSize >= 56 ? buf.readUInt32LE(at + 12) : 0];
}

function channel(px: number, mask: number): number {
  let shift = 0;
  while (((mask >>> shift) & 1) === 0) shift++;
  const max = mask >>> shift;
  return Math.round((((px & mask) >>> shift) * 255) / max);
}
