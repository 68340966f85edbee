/**
 * @file trainers/nets/checkpoint-write.ts: a full checkpoint written from the tiny fixtures reloads
 * with every key, dtype and untouched tensor identical, trained tensors replaced (in torch
 * layout), `half` stores F16, metadata is kept, and an existing file is never replaced silently.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend, tf } from '../trainers/backend/index.ts';
import { openTensorFile } from '../trainers/io/checkpoint.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { writeCheckpoint } from '../trainers/nets/checkpoint-write.ts';
import { paramFromTorch, type Params } from '../trainers/nets/params.ts';

const MODEL = 'test/fixtures/sd-tiny/model.safetensors';
const CONV = 'model.diffusion_model.input_blocks.1.0.in_layers.2.weight';
const LINEAR = 'model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight';
let tmp: string;

before(async () => {
  await initBackend();
  tmp = mkdtempSync(join(tmpdir(), 'sidetrain-ckw-'));
});
after(() => rmSync(tmp, { recursive: true, force: true }));

/** Trained stand-ins: the source tensors + 1, in TF layout. */
async function trained(src: Awaited<ReturnType<typeof openTensorFile>>): Promise<Params> {
  const p: Params = new Map();
  for (const k of [CONV, LINEAR]) {
    const values = await src.read(k);
    p.set(k, paramFromTorch(values.map((v) => v + 1), src.info(k).shape));
  }
  return p;
}

test('every key reloads identical; trained keys carry the trained values in torch layout', async () => {
  const src = await openTensorFile(MODEL);
  const params = await trained(src);
  const path = await writeCheckpoint({ dir: tmp, name: 'full', source: src, trained: params, metadata: { sidetrain_method: 'dreambooth', steps: 3 } });
  const out = await openSafetensors(path);
  try {
    assert.deepEqual(out.keys().sort(), src.keys().sort());
    assert.deepEqual(out.metadata(), { sidetrain_method: 'dreambooth', steps: '3' });
    for (const k of src.keys()) {
      assert.deepEqual(out.info(k), src.info(k), k);
      const want = await src.read(k);
      const got = await out.read(k);
      if (params.has(k)) assert.deepEqual(got, want.map((v) => v + 1), k);
      else assert.deepEqual(got, want, k);
    }
  } finally {
    await out.close();
    await src.close();
    tf.dispose([...params.values()]);
  }
});

test('half stores floats as F16; an existing file is kept unless overwrite', async () => {
  const src = await openTensorFile(MODEL);
  const params: Params = new Map();
  try {
    const path = await writeCheckpoint({ dir: tmp, name: 'half', source: src, trained: params, half: true });
    const out = await openSafetensors(path);
    for (const k of out.keys()) {
      const dtype = src.info(k).dtype;
      assert.equal(out.info(k).dtype, dtype.startsWith('F') || dtype === 'BF16' ? 'F16' : dtype, k);
    }
    const got = await out.read(LINEAR);
    const want = await src.read(LINEAR);
    assert.ok(got.every((v, i) => Math.abs(v - want[i]!) <= Math.abs(want[i]!) * 1e-3 + 1e-7));
    await out.close();
    await assert.rejects(writeCheckpoint({ dir: tmp, name: 'half', source: src, trained: params }), /already exists/);
    await writeCheckpoint({ dir: tmp, name: 'half', source: src, trained: params, overwrite: true });
    await assert.rejects(writeCheckpoint({ dir: tmp, name: 'bad', source: src, trained: new Map([['nope', tf.zeros([1])]]) }), /nope/);
  } finally {
    await src.close();
  }
});

test('a .ckpt source is written as safetensors with its own keys and dtypes', async () => {
  const src = await openTensorFile('test/fixtures/sd-tiny/model.ckpt');
  try {
    const path = await writeCheckpoint({ dir: tmp, name: 'from-ckpt', source: src, trained: new Map() });
    const out = await openSafetensors(path);
    assert.deepEqual(out.keys().sort(), src.keys().sort());
    for (const k of src.keys()) {
      assert.equal(out.info(k).dtype, src.info(k).dtype, k);
      assert.deepEqual(await out.read(k), await src.read(k), k);
    }
    await out.close();
  } finally {
    await src.close();
  }
});
