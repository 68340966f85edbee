/**
 * The training size a job leaves out is its model family's native one (SDXL 1024, SD1/SD2 512), and
 * an SDXL job's images are cut to aspect-ratio buckets (crop recorded for the size conditioning)
 * where an SD1 job's are stretched as the webui does.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { initBackend } from '../trainers/backend/index.ts';
import { withNativeSize } from '../trainers/train/run.ts';
import { loadDataset, type CommonSpec } from '../trainers/train/prepare.ts';
import { validate } from '../schemas/index.ts';
import { nearestBucket, sizeBuckets } from '../trainers/data/buckets.ts';

const XL = 'test/fixtures/sdxl-tiny/model.safetensors';
const SD1 = 'test/fixtures/sd-tiny/model.safetensors';
let tmp: string;

before(async () => {
  await initBackend();
  tmp = await mkdtemp(join(tmpdir(), 'native-size-'));
  for (const [file, width, height] of [['wide.png', 400, 200], ['tall.png', 150, 300]] as const) {
    await sharp({ create: { width, height, channels: 3, background: { r: 200, g: 10, b: 10 } } }).png().toFile(join(tmp, file));
  }
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

test('the schemas leave width and height out; the run fills in the family\'s native side', async () => {
  for (const schema of ['textual-inversion', 'hypernetwork', 'lora', 'dreambooth']) {
    const spec: Record<string, unknown> = { model: XL, images: tmp, name: 'x', instancePrompt: 'sks', initText: 'cat' };
    validate(schema, spec);
    assert.equal(spec.width, undefined, schema);
    assert.equal(spec.height, undefined, schema);
  }
  assert.deepEqual(await sizeOf({ model: XL }), [1024, 1024]);
  assert.deepEqual(await sizeOf({ model: SD1 }), [512, 512]);
  assert.deepEqual(await sizeOf({ model: XL, width: 768 }), [768, 1024]);
  assert.deepEqual(await sizeOf({ model: XL, width: 64, height: 96 }), [64, 96]);
  // not a checkpoint: the default, and the load then says what is wrong
  assert.deepEqual(await sizeOf({ model: join(tmp, 'wide.png') }), [512, 512]);
});

async function sizeOf(spec: { model: string; width?: number; height?: number }): Promise<[number, number]> {
  const s = (await withNativeSize(spec)) as { width: number; height: number };
  return [s.width, s.height];
}

function spec(model: string, width: number, height: number, extra: Record<string, unknown> = {}): CommonSpec {
  const s: Record<string, unknown> = { model, images: tmp, name: 'tok', initText: 'cat', width, height };
  assert.deepEqual(validate('textual-inversion', s), []);
  return { ...s, ...extra } as unknown as CommonSpec; // extra: the prior-preservation options of a LoRA spec
}

test('SDXL: each image in the bucket of its shape, crop top-left kept; SD1: stretched to width × height', async () => {
  const xl = await loadDataset(spec(XL, 128, 128), () => {});
  const buckets = sizeBuckets(128, 128);
  for (const it of xl.items) {
    const b = nearestBucket(buckets, it.image.sourceWidth, it.image.sourceHeight);
    assert.deepEqual([it.image.width, it.image.height], [b.width, b.height], it.file);
  }
  const tall = xl.items.find((it) => it.file === 'tall.png')!.image;
  assert.ok(tall.height > tall.width, `${tall.width}×${tall.height}`);
  const wide = xl.items.find((it) => it.file === 'wide.png')!.image;
  assert.ok(wide.width > wide.height && wide.cropLeft + wide.cropTop >= 0);
  const sd1 = await loadDataset(spec(SD1, 128, 128), () => {});
  for (const it of sd1.items) assert.deepEqual([it.image.width, it.image.height, it.image.cropLeft, it.image.cropTop], [128, 128, 0, 0], it.file);
});

test('SDXL with class images: every image cut to width × height itself (one latent size per batch), crop recorded', async () => {
  const ds = await loadDataset(spec(XL, 128, 128, { classPrompt: 'a cat', classImages: 2 }), () => {});
  for (const it of ds.items) assert.deepEqual([it.image.width, it.image.height], [128, 128], it.file);
  const wide = ds.items.find((it) => it.file === 'wide.png')!.image; // 400×200 covered to 256×128: 64 px off each side
  assert.deepEqual([wide.cropLeft, wide.cropTop], [64, 0]);
});
