import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { makeBuckets, nearestBucket, cropBox, cropRng, bucketBatches, bucketTable, formatBucketTable, loadBucketImage, loadNearestBucketImage, sizeBuckets } from '../trainers/data/buckets.ts';
import { nativeResolution } from '../trainers/io/checkpoint.ts';
import { Dataset } from '../trainers/data/dataset.ts';
import { loadTemplate } from '../trainers/text/templates.ts';
import { latentJob } from '../trainers/methods/finetune/data.ts';
import { LatentDiskCache } from '../trainers/train/latent-disk-cache.ts';
import { Rng } from '../trainers/random.ts';

const SIZES: [number, number][] = [
  [512, 512], [768, 512], [512, 768], [1024, 512], [300, 900], [1920, 1080], [1080, 1920], [640, 480], [480, 640], [100, 101], [4000, 1000], [1000, 4000], [333, 777],
];

test('bucket sizes: multiples of 64, within the side limits, never over the area budget', () => {
  const buckets = makeBuckets({ resolution: 512 });
  assert.ok(buckets.length > 5);
  assert.ok(buckets.some((b) => b.width === 512 && b.height === 512));
  for (const b of buckets) {
    assert.equal(b.width % 64, 0);
    assert.equal(b.height % 64, 0);
    assert.ok(b.width * b.height <= 512 * 512, `${b.width}x${b.height}`);
    assert.ok(b.width >= 256 && b.width <= 1024 && b.height >= 256 && b.height <= 1024);
  }
  assert.equal(new Set(buckets.map((b) => `${b.width}x${b.height}`)).size, buckets.length);
  // each bucket is as large as the step allows: one more step on one of its sides breaks the budget or the limit
  const full = (side: number, other: number) => (side + 64) * other > 512 * 512 || side + 64 > 1024;
  for (const b of buckets) assert.ok(full(b.width, b.height) || full(b.height, b.width), `${b.width}x${b.height}`);
  for (const b of makeBuckets({ resolution: 64, step: 64, minSide: 64, maxSide: 64 })) assert.deepEqual([b.width, b.height], [64, 64]);
});

test('every image goes to the bucket nearest its aspect ratio (log-ratio)', () => {
  const buckets = makeBuckets({ resolution: 512 });
  for (const [w, h] of SIZES) {
    const chosen = nearestBucket(buckets, w, h);
    const d = (b: { width: number; height: number }) => Math.abs(Math.log(b.width / b.height) - Math.log(w / h));
    for (const b of buckets) assert.ok(d(chosen) <= d(b) + 1e-12, `${w}x${h}: ${chosen.width}x${chosen.height} vs ${b.width}x${b.height}`);
  }
  assert.deepEqual(nearestBucket(buckets, 512, 512), buckets.find((b) => b.width === 512 && b.height === 512));
  const wide = nearestBucket(buckets, 4000, 1000);
  assert.ok(wide.width > wide.height);
});

test('cover resize and crop: the crop lies inside the resized image, centred without an rng', () => {
  const buckets = makeBuckets({ resolution: 512 });
  for (const [w, h] of SIZES) {
    const b = nearestBucket(buckets, w, h);
    for (const rng of [undefined, Rng.derive(1, 'crop')]) {
      const box = cropBox(w, h, b, rng);
      assert.ok(box.resizeWidth >= b.width && box.resizeHeight >= b.height);
      assert.ok(box.resizeWidth === b.width || box.resizeHeight === b.height || Math.abs(box.resizeWidth / box.resizeHeight - w / h) < 0.02);
      assert.ok(box.left >= 0 && box.left + box.width <= box.resizeWidth);
      assert.ok(box.top >= 0 && box.top + box.height <= box.resizeHeight);
    }
  }
  const c = cropBox(1000, 500, { index: 0, width: 512, height: 512 });
  assert.deepEqual(c, { resizeWidth: 1024, resizeHeight: 512, left: 256, top: 0, width: 512, height: 512 });
});

test('batches never mix buckets, cover every image once per epoch, and repeat for the seed', () => {
  const buckets = makeBuckets({ resolution: 512 });
  const sizes = Array.from({ length: 60 }, (_, i) => SIZES[i % SIZES.length]!);
  const assigned = sizes.map(([w, h]) => nearestBucket(buckets, w, h).index);
  const batches = bucketBatches(assigned, 3, 42, 0);
  for (const batch of batches) {
    assert.ok(batch.length >= 1 && batch.length <= 3);
    assert.equal(new Set(batch.map((i) => assigned[i])).size, 1);
  }
  assert.deepEqual(batches.flat().sort((a, b) => a - b), sizes.map((_, i) => i));
  assert.deepEqual(bucketBatches(assigned, 3, 42, 0), batches);
  assert.notDeepEqual(bucketBatches(assigned, 3, 42, 1), batches);
  const table = bucketTable(buckets, assigned);
  assert.equal(table.reduce((a, r) => a + r.images, 0), 60);
  const text = formatBucketTable(table);
  assert.match(text, /512×512 +1\.00/);
  assert.match(text, /image\(s\)/);
});

test('loadBucketImage: decoded, covered and cropped to the bucket size', async () => {
  const tmp = await mkdtemp(join(tmpdir(), 'buckets-'));
  try {
    const path = join(tmp, 'wide.png');
    await sharp({ create: { width: 200, height: 100, channels: 3, background: { r: 255, g: 0, b: 0 } } }).png().toFile(path);
    const img = await loadBucketImage(path, { index: 0, width: 128, height: 64 });
    assert.deepEqual([img.width, img.height, img.pixels.length], [128, 64, 128 * 64 * 3]);
    assert.deepEqual(Array.from(img.pixels.subarray(0, 3)), [1, -1, -1]);
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
});

test('random crop: in bounds, one fixed offset per image for a seed, different across images and seeds', () => {
  const bucket = { index: 0, width: 256, height: 256 };
  const boxOf = (file: string, seed: number, w = 900, h = 700) => cropBox(w, h, bucket, cropRng('random', seed, file));
  assert.equal(cropRng('center', 1, 'a.png'), undefined);
  const offsets = new Set<string>();
  for (let i = 0; i < 20; i++) {
    const file = `dir/img${i}.png`;
    const box = boxOf(file, 7);
    assert.ok(box.left >= 0 && box.left + box.width <= box.resizeWidth, `${file}: left ${box.left}`);
    assert.ok(box.top >= 0 && box.top + box.height <= box.resizeHeight, `${file}: top ${box.top}`);
    assert.deepEqual(boxOf(file, 7), box, 'same seed and image → same crop');
    offsets.add(`${box.left},${box.top}`);
  }
  assert.ok(offsets.size >= 15, `different images get different crops (${offsets.size} distinct of 20)`);
  const seeds = new Set([1, 2, 3, 4, 5].map((seed) => JSON.stringify(boxOf('dir/img0.png', seed))));
  assert.ok(seeds.size >= 4, 'another seed, another crop');
  // both offsets are drawn: a wide image moves along x, a tall one along y
  assert.ok(new Set(Array.from({ length: 10 }, (_, i) => boxOf(`w${i}`, 1, 1000, 256).left)).size > 5);
  assert.ok(new Set(Array.from({ length: 10 }, (_, i) => boxOf(`t${i}`, 1, 256, 1000).top)).size > 5);
});

test('random crop and the latent cache: the key holds the crop; the pixels are cut where the key says', async () => {
  const tmp = await mkdtemp(join(tmpdir(), 'buckets-'));
  try {
    // a red ramp 0..255 along x; 256×64 into a 128×64 bucket needs no resize, so red at x=0 is the left offset
    const width = 256, height = 64;
    const data = Buffer.alloc(width * height * 3);
    for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) data[(y * width + x) * 3] = x;
    const path = join(tmp, 'ramp.png');
    await sharp(data, { raw: { width, height, channels: 3 } }).png().toFile(path);
    const bucket = { index: 0, width: 128, height: 64 };
    const image = { file: 'ramp.png', path, caption: '', repeats: 1, width, height };
    const center = latentJob({ image, bucket }, 'center', 5);
    assert.equal(center.variant, '128x64@64,0'); // the key of earlier (centre-only) versions
    const cache = new LatentDiskCache(tmp, 'vae');
    for (const seed of [5, 6, 7]) {
      const random = latentJob({ image, bucket }, 'random', seed);
      assert.match(random.variant, /^128x64@\d+,0\/random$/);
      assert.notEqual(cache.keyOf('digest', random.variant), cache.keyOf('digest', center.variant));
      assert.equal(latentJob({ image, bucket }, 'random', seed).variant, random.variant);
      const left = Number(/@(\d+),/.exec(random.variant)![1]);
      const pixels = await random.pixels();
      assert.equal(pixels.pixels[0], Math.fround(left / 127.5 - 1), `seed ${seed}: crop starts at x=${left}`);
    }
    const centred = await center.pixels();
    assert.equal(centred.pixels[0], Math.fround(64 / 127.5 - 1));
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
});

test('default training side per family: SDXL 1024, SD1/SD2 512', () => {
  assert.deepEqual([nativeResolution('sdxl'), nativeResolution('sd1'), nativeResolution('sd2')], [1024, 512, 512]);
});

test('SDXL buckets around 1024²: sides multiples of 64 from 512 to 2048, never over 1024² pixels, the usual SDXL sizes among them', () => {
  const buckets = sizeBuckets(1024, 1024);
  for (const b of buckets) {
    assert.equal(b.width % 64, 0);
    assert.equal(b.height % 64, 0);
    assert.ok(b.width * b.height <= 1024 * 1024, `${b.width}×${b.height}`);
    assert.ok(Math.min(b.width, b.height) >= 512 && Math.max(b.width, b.height) <= 2048, `${b.width}×${b.height}`);
  }
  const has = (w: number, h: number) => buckets.some((b) => b.width === w && b.height === h);
  for (const [w, h] of [[1024, 1024], [1152, 896], [896, 1152], [1216, 832], [1344, 768], [768, 1344], [1536, 640]] as const) assert.ok(has(w, h), `${w}×${h}`);
  // the same rule at SD's 512²: sides 256…1024
  const sd = sizeBuckets(512, 512);
  assert.ok(sd.some((b) => b.width === 512 && b.height === 512) && sd.every((b) => b.width * b.height <= 512 * 512 && Math.min(b.width, b.height) >= 256));
  // a non-square training size is a pixel budget
  assert.ok(sizeBuckets(768, 512).every((b) => b.width * b.height <= 768 * 512));
  assert.throws(() => sizeBuckets(32, 32), /under 64×64/);
});

test('an image cut to its nearest bucket: source size and crop top-left kept (SDXL size conditioning), alpha cut the same way', async () => {
  const tmp = await mkdtemp(join(tmpdir(), 'buckets-'));
  try {
    const path = join(tmp, 'wide.png');
    // 16:9 with alpha: left half opaque, right half transparent
    const [w, h] = [1600, 900];
    const rgba = Buffer.alloc(w * h * 4);
    for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) rgba.set([0, 255, 0, x < w / 2 ? 255 : 0], (y * w + x) * 4);
    await sharp(rgba, { raw: { width: w, height: h, channels: 4 } }).png().toFile(path);
    const buckets = sizeBuckets(1024, 1024);
    const img = await loadNearestBucketImage(path, buckets, { keepAlpha: true });
    const bucket = nearestBucket(buckets, w, h);
    const box = cropBox(w, h, bucket);
    assert.deepEqual([img.width, img.height], [bucket.width, bucket.height]);
    assert.ok(Math.abs(Math.log(img.width / img.height) - Math.log(16 / 9)) < 0.1, `${img.width}×${img.height}`);
    assert.deepEqual([img.sourceWidth, img.sourceHeight, img.cropLeft, img.cropTop], [w, h, box.left, box.top]);
    assert.ok(box.left + box.top > 0, 'a 16:9 image in a bucket of another ratio is cropped');
    assert.deepEqual([img.alpha!.width, img.alpha!.height, img.alpha!.data.length], [img.width, img.height, img.width * img.height]);
    const mid = Math.round(w / 2 * (box.resizeWidth / w)) - box.left; // the alpha edge after resize and crop
    assert.equal(img.alpha!.data[10 * img.width + mid - 8], 255);
    assert.equal(img.alpha!.data[10 * img.width + mid + 8], 0);
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
});

test('dataset with aspect buckets: each image in the bucket of its shape, not stretched; batches never mix buckets', async () => {
  const tmp = await mkdtemp(join(tmpdir(), 'buckets-ds-'));
  try {
    const shapes: [string, number, number][] = [['a-wide.png', 320, 180], ['b-tall.png', 180, 320], ['c-square.png', 200, 200], ['d-wide.png', 330, 190]];
    for (const [file, width, height] of shapes) await sharp({ create: { width, height, channels: 3, background: { r: 9, g: 9, b: 9 } } }).png().toFile(join(tmp, file));
    const ds = await Dataset.load({
      dir: tmp, width: 256, height: 256, fit: 'buckets', name: 'tok', template: await loadTemplate('none'), seed: 1, onWarning: () => {}, batchSize: 2, gradAccum: 1,
      shuffleTags: false, tagDropOut: 0, doNotResize: false, useWeight: false, latentSampling: 'once', filenameWordRegex: '', filenameJoinString: ' ',
    });
    const buckets = sizeBuckets(256, 256);
    for (const it of ds.items) {
      const b = nearestBucket(buckets, it.image.sourceWidth, it.image.sourceHeight);
      assert.deepEqual([it.image.width, it.image.height], [b.width, b.height], it.file);
    }
    const size = (i: number) => `${ds.items[i]!.image.width}x${ds.items[i]!.image.height}`;
    assert.notEqual(size(0), size(1));
    assert.equal(size(0), size(3));
    for (let epoch = 0; epoch < 3; epoch++) for (const batch of ds.epochBatches(epoch)) assert.equal(new Set(batch.items.map(size)).size, 1);
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
});
