import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, mkdir, writeFile, copyFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { tf, initBackend } from '../trainers/backend/index.ts';
import { Dataset, datasetReport, formatDatasetReport, filewordsFromFilename, groupedBatches, type DatasetOptions } from '../trainers/data/dataset.ts';
import { loadImage, lossWeightMap } from '../trainers/data/images.ts';
import { loadTemplate, type Template } from '../trainers/text/templates.ts';
import { Rng } from '../trainers/random.ts';

const IMAGES = 'test/fixtures/images';
let tmp: string;
let subjectFw: Template;

before(async () => {
  await initBackend();
  tmp = await mkdtemp(join(tmpdir(), 'dataset-'));
  subjectFw = await loadTemplate('subject_filewords');
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function opts(extra: Partial<DatasetOptions> = {}): DatasetOptions {
  return {
    dir: IMAGES, width: 64, height: 64, name: 'tok', template: subjectFw, seed: 1234, onWarning: () => {}, batchSize: 1, gradAccum: 1,
    shuffleTags: false, tagDropOut: 0, doNotResize: false, useWeight: false, latentSampling: 'once', filenameWordRegex: '', filenameJoinString: ' ',
    ...extra,
  };
}

test('every image in the folder is decoded and resized; captions from .txt or the file name', async () => {
  const ds = await Dataset.load(opts());
  assert.deepEqual(
    ds.items.map((it) => [it.file, it.caption, it.captionSource, it.image.width, it.image.height]),
    [
      ['0042 blue square.jpg', 'blue square', 'filename', 64, 64],
      ['01-orange cat.png', 'orange cat', 'filename', 64, 64],
      ['gray box.webp', 'gray box', 'filename', 64, 64],
      ['green_triangle.png', 'green triangle, transparent background, simple', 'txt', 64, 64],
      ['stripes.bmp', 'stripes', 'filename', 64, 64],
    ],
  );
  assert.deepEqual(ds.skipped, [
    { file: 'README.md', reason: 'not an image file (.md)' },
    { file: 'corrupt', reason: 'a folder (sub-folders are not read)' },
  ]);
  const cat = ds.items[1]!.image;
  assert.equal(cat.pixels.length, 64 * 64 * 3);
  // top-left pixel is the background #cfe8ff → u8/127.5 - 1
  assert.deepEqual(Array.from(cat.pixels.subarray(0, 3)), [207, 232, 255].map((v) => Math.fround(v / 127.5 - 1)));
  for (const it of ds.items) for (const v of it.image.pixels) assert.ok(v >= -1 && v <= 1);
  assert.deepEqual([ds.items[1]!.image.sourceWidth, ds.items[0]!.image.sourceWidth], [64, 96]);
});

test('BMP files are read (sharp has no BMP loader): bottom-up rows, BGR order', async () => {
  const img = await loadImage(join(IMAGES, 'stripes.bmp'), { width: 0, height: 0, doNotResize: true });
  assert.deepEqual([img.width, img.height], [40, 32]);
  const px = (x: number, y: number) => Array.from(img.pixels.subarray((y * 40 + x) * 3, (y * 40 + x) * 3 + 3)).map((v) => Math.round((v + 1) * 127.5));
  assert.deepEqual(px(0, 0), [255, 0, 0]); // top rows are red
  assert.deepEqual(px(0, 20), [255, 220, 0]);
  assert.deepEqual(px(7, 20), [0, 0, 0]);
});

test('grayscale and 16-bit images decode to 8-bit RGB', async () => {
  const gray = join(tmp, 'gray.png');
  await sharp({ create: { width: 16, height: 16, channels: 3, background: '#808080' } }).toColourspace('b-w').png().toFile(gray);
  const deep = join(tmp, 'deep.png');
  await sharp({ create: { width: 16, height: 16, channels: 3, background: '#ff0000' } }).toColourspace('rgb16').png().toFile(deep);
  const g = await loadImage(gray, { width: 16, height: 16 });
  assert.deepEqual(Array.from(g.pixels.subarray(0, 3)).map((v) => Math.round((v + 1) * 127.5)), [128, 128, 128]);
  const d = await loadImage(deep, { width: 8, height: 8 });
  assert.deepEqual(Array.from(d.pixels.subarray(0, 3)).map((v) => Math.round((v + 1) * 127.5)), [255, 0, 0]);
});

test('an unreadable image is skipped with a warning naming it', async () => {
  const warnings: string[] = [];
  const ds = await Dataset.load(opts({ dir: join(IMAGES, 'corrupt'), onWarning: (m) => warnings.push(m) }));
  assert.deepEqual(ds.items.map((i) => i.file), ['good.png']);
  assert.equal(warnings.length, 1);
  assert.match(warnings[0]!, /^skipping test\/fixtures\/images\/corrupt\/broken\.png: .+/);
  const report = formatDatasetReport(datasetReport(ds));
  assert.match(report, /skipped broken\.png: /);
  assert.match(report, /1 image\(s\) used, 1 skipped/);
});

test('an empty, missing or image-less folder is a clear error naming it', async () => {
  const empty = join(tmp, 'empty');
  await mkdir(empty);
  await assert.rejects(Dataset.load(opts({ dir: empty })), new RegExp(`images folder ${empty} is empty`));
  await assert.rejects(Dataset.load(opts({ dir: join(tmp, 'nope') })), /images folder .*nope does not exist/);
  const notes = join(tmp, 'notes');
  await mkdir(notes);
  await writeFile(join(notes, 'a.txt'), 'caption');
  await assert.rejects(Dataset.load(opts({ dir: notes })), /notes has no images \(png, jpg/);
  const broken = join(tmp, 'broken');
  await mkdir(broken);
  await copyFile(join(IMAGES, 'corrupt', 'broken.png'), join(broken, 'x.png'));
  await assert.rejects(Dataset.load(opts({ dir: broken })), /has no usable images: x\.png \(/);
});

test('"do not resize" keeps sizes (cropped to a multiple of 8) and batches are size-bucketed', async () => {
  const odd = join(tmp, 'odd');
  await mkdir(odd);
  await sharp({ create: { width: 50, height: 37, channels: 3, background: '#123456' } }).png().toFile(join(odd, 'a.png'));
  await sharp({ create: { width: 50, height: 37, channels: 3, background: '#654321' } }).png().toFile(join(odd, 'b.png'));
  await sharp({ create: { width: 24, height: 24, channels: 3, background: '#000000' } }).png().toFile(join(odd, 'c.png'));
  const ds = await Dataset.load(opts({ dir: odd, doNotResize: true, batchSize: 2 }));
  assert.deepEqual(ds.items.map((i) => [i.image.width, i.image.height]), [[48, 32], [48, 32], [24, 24]]);
  const all = await Dataset.load(opts({ doNotResize: true, batchSize: 2 }));
  assert.deepEqual([...all.buckets.keys()], ['40x32', '64x64', '96x64']);
  for (let epoch = 0; epoch < 20; epoch++) {
    for (const b of all.epochBatches(epoch)) {
      const sizes = new Set(b.items.map((i) => `${all.items[i]!.image.width}x${all.items[i]!.image.height}`));
      assert.equal(sizes.size, 1, `epoch ${epoch} batch ${b.items} mixes sizes`);
    }
  }
});

test('order and prompts are deterministic from the seed; batchAt(step, micro) follows the epochs', async () => {
  const a = await Dataset.load(opts({ batchSize: 1, gradAccum: 2, shuffleTags: true }));
  const b = await Dataset.load(opts({ batchSize: 1, gradAccum: 2, shuffleTags: true }));
  const c = await Dataset.load(opts({ batchSize: 1, gradAccum: 2, shuffleTags: true, seed: 99 }));
  assert.equal(a.stepsPerEpoch, 2); // 5 // 1 // 2
  const plan = (d: Dataset) => [0, 1, 2, 3].map((e) => d.epochBatches(e));
  assert.deepEqual(plan(a), plan(b));
  assert.notDeepEqual(plan(a), plan(c));
  for (const e of plan(a)) {
    assert.equal(e.length, 4); // stepsPerEpoch · gradAccum batches; the 5th image waits for another epoch
    assert.equal(new Set(e.flatMap((x) => x.items)).size, 4);
  }
  assert.deepEqual(a.batchAt(0, 1), a.epochBatches(0)[1]);
  assert.deepEqual(a.batchAt(3, 0), a.epochBatches(1)[2]);
  // a fresh Dataset (a resumed run) gives the same batch for the same step
  assert.deepEqual(b.batchAt(7, 1), a.batchAt(7, 1));
});

test('without shuffle/drop-out each image keeps the prompt chosen at load; with them prompts change per use', async () => {
  const fixed = await Dataset.load(opts());
  const seen = new Map<number, Set<string>>();
  for (let e = 0; e < 6; e++) {
    for (const batch of fixed.epochBatches(e)) batch.items.forEach((i, k) => seen.set(i, (seen.get(i) ?? new Set()).add(batch.prompts[k]!)));
  }
  for (const prompts of seen.values()) assert.equal(prompts.size, 1);
  assert.equal(fixed.items[1]!.fixedPrompt!.includes('tok, orange cat'), true);
  const dynamic = await Dataset.load(opts({ tagDropOut: 0.5 }));
  assert.equal(dynamic.items[3]!.fixedPrompt, undefined);
  const variants = new Set<string>();
  for (let e = 0; e < 10; e++) variants.add(dynamic.prompt(dynamic.items[3]!, e, 0));
  assert.ok(variants.size > 3);
});

test('batch and accumulation are clamped to the set (webui), with warnings; steps per epoch', async () => {
  const warnings: string[] = [];
  const ds = await Dataset.load(opts({ batchSize: 8, gradAccum: 4, onWarning: (m) => warnings.push(m) }));
  assert.deepEqual([ds.batchSize, ds.gradAccum, ds.stepsPerEpoch], [5, 1, 1]);
  assert.equal(warnings.length, 2);
  assert.match(warnings[0]!, /batch size 8 is more than the 5 images: using 5/);
  const ga = await Dataset.load(opts({ batchSize: 2, gradAccum: 3 }));
  assert.deepEqual([ga.batchSize, ga.gradAccum, ga.stepsPerEpoch], [2, 2, 1]);
});

test('GroupedBatchSampler: full batches per group plus proportional random ones', () => {
  const batches = groupedBatches([[0, 1, 2], [3, 4]], 5, 2, new Rng(1));
  assert.equal(batches.length, 3); // 1 + 1 full, 1 random; the loop uses the first 2
  for (const b of batches) assert.ok(b.every((i) => i <= 2) || b.every((i) => i >= 3));
  const one = groupedBatches([[0, 1, 2, 3, 4, 5, 6]], 7, 3, new Rng(2));
  assert.equal(one.length, 2);
  assert.equal(new Set(one.flat()).size, 6);
});

test('useWeight: alpha → loss weight at latent size (min 0, mean 1); no alpha → ones', async () => {
  const ds = await Dataset.load(opts({ useWeight: true }));
  const [noAlpha, tri] = await ds.weights([1, 3], 8, 8);
  assert.ok(noAlpha!.every((v) => v === 1));
  assert.equal(tri!.length, 64);
  assert.equal(Math.min(...tri!), 0);
  assert.ok(Math.abs(tri!.reduce((s, v) => s + v, 0) / 64 - 1) < 1e-5);
  assert.ok(tri![0]! === 0 && tri![5 * 8 + 4]! > 1, "transparent corner, opaque lower centre");
  const solid = { data: new Uint8Array(16).fill(255), width: 4, height: 4 };
  assert.ok((await lossWeightMap(solid, 2, 2)).every((v) => v === 1)); // the webui would give NaN here
  const plain = await Dataset.load(opts());
  assert.equal(plain.items[3]!.image.alpha, undefined);
});

test('file-name captions: number prefix stripped; optional word regex and join string', () => {
  assert.equal(filewordsFromFilename('/x/0042 blue square.jpg'), 'blue square');
  assert.equal(filewordsFromFilename('12-3-cat.png'), 'cat');
  assert.equal(filewordsFromFilename('v2 cat.png'), 'v2 cat');
  assert.equal(filewordsFromFilename('01-a_b-c (1).png', '\\w+', ' '), 'a_b c 1');
  assert.equal(filewordsFromFilename('cat-dog.png', '([a-z])[a-z]*', ','), 'c,d');
  assert.throws(() => filewordsFromFilename('x.png', '(a)(b)'), /2 groups/);
});

test('pixels(): one [B, H, W, 3] tensor per batch, no leaks; releasePixels frees the images', async () => {
  const ds = await Dataset.load(opts({ batchSize: 2 }));
  const before = tf.memory().numTensors;
  const t = ds.pixels([0, 1]);
  assert.deepEqual(t.shape, [2, 64, 64, 3]);
  const data = await t.data();
  assert.deepEqual(Array.from(data.subarray(64 * 64 * 3, 64 * 64 * 3 + 3)), Array.from(ds.items[1]!.image.pixels.subarray(0, 3)));
  t.dispose();
  assert.equal(tf.memory().numTensors, before);
  ds.releasePixels();
  assert.throws(() => ds.pixels([0]), /released/);
});

test('datasetReport: used/skipped with why, sizes, captions, three example prompts, steps per epoch', async () => {
  const ds = await Dataset.load(opts({ batchSize: 2, gradAccum: 1 }));
  const r = datasetReport(ds);
  assert.equal(r.used.length, 5);
  assert.equal(r.skipped.length, 2);
  assert.deepEqual(r.sizes, [{ width: 64, height: 64, count: 5 }]);
  assert.equal(r.examplePrompts.length, 3);
  for (const p of r.examplePrompts) assert.match(p, /tok/);
  assert.equal(r.stepsPerEpoch, 2);
  const text = formatDatasetReport(r);
  assert.match(text, /0042 blue square\.jpg {2}96×64 → 64×64 {2}caption \(file name\): "blue square"/);
  assert.match(text, /2 step\(s\) per epoch/);
});
