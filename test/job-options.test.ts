/**
 * @file Job options reach the code that uses them. Each method's schema goes through the job
 * builder (bridge/spec.ts prepareSpec: defaults filled, paths checked) with every dataset option set
 * away from its default, and the dataset the trainer loads (train/prepare.ts loadDataset) must hold
 * exactly those values — an option that is accepted, shown in the forms and written into a file's
 * metadata but never given to the dataset (tag shuffling and drop-out once were) fails here.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { prepareSpec, type Folders } from '../bridge/spec.ts';
import { getSchema, loadSchemas } from '../schemas/index.ts';
import { methods } from '../trainers/methods/index.ts';
import { loadDataset, type CommonSpec } from '../trainers/train/prepare.ts';
import type { DatasetOptions } from '../trainers/data/dataset.ts';

loadSchemas();
const tmp = mkdtempSync(join(tmpdir(), 'sidetrain-job-options-'));
const images = join(tmp, 'images');
mkdirSync(images);
for (const f of ['01-orange cat.png', 'green_triangle.png', 'green_triangle.txt', 'stripes.bmp']) copyFileSync(join('test/fixtures/images', f), join(images, f));
const folders: Folders = { embeddings: join(tmp, 'emb'), hypernetworks: join(tmp, 'hn'), lora: join(tmp, 'lora'), checkpoints: join(tmp, 'ckpt'), logs: join(tmp, 'log') };

/** Every dataset option a schema can carry, each away from its schema default. */
const CHANGED: Partial<Record<keyof DatasetOptions, unknown>> = {
  width: 128, height: 96, doNotResize: true, useWeight: true, shuffleTags: true, tagDropOut: 0.25,
  latentSampling: 'random', batchSize: 2, gradAccum: 2, seed: 77, filenameWordRegex: '\\w+', filenameJoinString: '_',
};

for (const type of ['textual_inversion', 'hypernetwork', 'lora']) {
  test(`${type}: every dataset option of the schema reaches the dataset as given`, async () => {
    const props = (getSchema(methods[type]!.schema) as { properties: Record<string, unknown> }).properties;
    const options = Object.keys(CHANGED).filter((k) => k in props);
    assert.ok(options.length >= 10, `${type}: ${options.join(', ')}`);
    const raw = { model: 'test/fixtures/sd-tiny/model.safetensors', images, name: `opt_${type}`, template: 'style_filewords', ...('instancePrompt' in props ? { instancePrompt: 'a photo of sks' } : {}), ...Object.fromEntries(options.map((k) => [k, CHANGED[k as keyof DatasetOptions]])) };
    const spec = await prepareSpec(methods, type, raw, folders);
    const ds = await loadDataset(spec as unknown as CommonSpec, () => {});
    for (const key of options) assert.deepEqual(ds.options[key as keyof DatasetOptions], CHANGED[key as keyof DatasetOptions], `${type}: /${key} did not reach the dataset`);
    assert.equal(ds.options.template.name, 'style_filewords', `${type}: /template`);
    assert.equal(ds.options.name, `opt_${type}`, `${type}: /name`);
  });
}
