/**
 * @file bf16Weights' storage (trainers/nets/bf16-store.ts): a stored variable's float32 array is
 * dropped between uses and every read (kernels, dataSync, the optimizer's host path) sees the same
 * values; a Dreambooth run on sd-tiny and on sdxl-tiny with the weights stored as bf16 bits ends
 * bit-identical to the emulation it replaces (float32 arrays of bf16-exact values), with no more
 * than a share of the trained weights resident as float32 at any time; bf16Weights without
 * fusedBackward is refused naming both options.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { tf } from '../trainers/backend/index.ts';
import { Bf16Store, lastBf16StoreReport } from '../trainers/nets/bf16-store.ts';
import { nearestBf16, setBf16Store } from '../trainers/optim/bf16-round.ts';
import { hostValues, assignValues } from '../trainers/optim/native.ts';
import { validate } from '../schemas/index.ts';
import { dreamboothSpec, runDreambooth, type DbSpec } from '../trainers/methods/dreambooth.ts';
import { onGradBackend } from './helpers/golden.ts';
import { ctxFor, jobSuite, readTensors, tempWithImages } from './helpers/job-run.ts';
import { runFinetune, type FinetuneSpec } from '../trainers/methods/finetune/finetune.ts';

const suite = jobSuite('sidetrain-bf16store-');

interface CpuData { values?: unknown }
const backendValues = (t: tf.Tensor) => (tf.backend() as unknown as { data: { get(id: object): CpuData } }).data.get(t.dataId).values;

test('a stored variable: evicted between uses, read alike by kernels, dataSync and hostValues; commit keeps an update\'s bits', async () => {
  await onGradBackend(async () => {
    const values = nearestBf16(Float32Array.from({ length: 12 }, (_, i) => Math.sin(i + 1) * 3));
    const v = tf.variable(tf.tensor(values, [3, 4]), true);
    const x = tf.tensor([[1], [2], [3], [4]]);
    const expected = tf.matMul(v, x).dataSync();
    const store = new Bf16Store([v]);
    try {
      assert.equal(backendValues(v), undefined, 'no float32 array while stored');
      assert.equal(store.storedBytes(), 24);
      assert.deepEqual(tf.matMul(v, x).dataSync(), expected, 'a kernel reads the stored values');
      assert.deepEqual(tf.matMul(v.reshape([3, 4]), x).dataSync(), expected, 'so does a view');
      assert.equal(backendValues(v), undefined, 'outside a step a kernel\'s copy lives for that kernel');
      assert.deepEqual(v.dataSync(), values);
      assert.deepEqual(await v.data(), values);
      assert.deepEqual(hostValues(v), values);
      store.sticky = true;
      tf.matMul(v, x).dispose();
      assert.ok(backendValues(v) instanceof Float32Array, 'inside a step the copy stays until released');
      assert.equal(store.residentBytes, 48);
      store.release();
      store.sticky = false;
      assert.equal(backendValues(v), undefined);
      assert.equal(store.residentBytes, 0);
      assert.equal(store.peakResidentBytes, 48);
      const updated = nearestBf16(values.map((a) => a * 0.5 + 0.25));
      assignValues(v, updated);
      store.commit(v);
      assert.equal(backendValues(v), undefined, 'the update\'s array dropped after its bits are kept');
      assert.deepEqual(v.dataSync(), updated);
    } finally {
      store.dispose();
    }
    assert.ok(backendValues(v) instanceof Float32Array, 'dispose makes a live variable float32 again');
    assert.deepEqual(v.dataSync(), nearestBf16(values.map((a) => a * 0.5 + 0.25)));
    tf.dispose([v, x]);
  });
});

let counter = 0;
function specFor(model: string, extra: Record<string, unknown> = {}): DbSpec {
  const raw: Record<string, unknown> = {
    model, images: suite.images, name: `bf16s${++counter}`, instancePrompt: 'a photo of sks cat', width: 64, height: 64, steps: 3, lr: '0.001', seed: 5,
    logDir: join(suite.tmp, 'logs'), checkpointDir: join(suite.tmp, 'ckpt'), bf16Weights: true, fusedBackward: true, saveEvery: 0, previewEvery: 0, ...extra,
  };
  assert.deepEqual(validate('dreambooth', raw), []);
  return dreamboothSpec(raw as unknown as DbSpec);
}

/** The run with the weights stored as bf16 bits and the emulated one: the same bits in every tensor written. */
async function storedEqualsEmulated(model: string, extra: Record<string, unknown>): Promise<void> {
  await onGradBackend(async () => {
    setBf16Store(false);
    let emulated;
    try {
      emulated = await runDreambooth(specFor(model, extra), ctxFor([]));
    } finally {
      setBf16Store(true);
    }
    const stored = await runDreambooth(specFor(model, extra), ctxFor([]));
    const report = lastBf16StoreReport()!;
    console.log(`bf16 store: ${report.storedBytes} B of bits, at most ${report.peakResidentBytes} B float32 resident`);
    assert.ok(report.storedBytes > 0);
    // the float32 copies alive at once: a block's and the tape's (time embedding, conv_in/out, …), never the whole set
    assert.ok(report.peakResidentBytes < 2 * report.storedBytes * 0.75, `peak resident ${report.peakResidentBytes} B of ${2 * report.storedBytes} B float32`);
    const [e, s] = [await readTensors(emulated.output), await readTensors(stored.output)];
    assert.equal(s.size, e.size);
    for (const [k, v] of e) assert.deepEqual(s.get(k), v, `${k}: stored = emulated, bit for bit`);
  });
}

test('Dreambooth on sd-tiny: bf16 storage is bit-identical to the emulated bf16Weights', async () => {
  await storedEqualsEmulated('test/fixtures/sd-tiny/model.safetensors', { optimizer: 'adafactor', classPrompt: 'a photo of a cat', classImages: 1, classSteps: 2 });
});

test('Dreambooth on sdxl-tiny: bf16 storage is bit-identical to the emulated bf16Weights', async () => {
  await storedEqualsEmulated('test/fixtures/sdxl-tiny/model.safetensors', { trainTextEncoder: true, textEncoderLr: '0.0005', optimizer: 'adamw8bit' });
});

test('fine-tune on sd-tiny with EMA: bf16 storage writes the same raw and EMA checkpoints as the emulation', async () => {
  const { images } = tempWithImages('sidetrain-bf16store-ft-', ['an orange cat', 'a green triangle']);
  const specFor = (name: string) => {
    const raw: Record<string, unknown> = {
      model: 'test/fixtures/sd-tiny/model.safetensors', images, name, resolution: 64, steps: 3, lr: 1e-3, seed: 4, ema: true, emaDecay: 0.5, save: 'both',
      validationSplit: 0, checkpointDir: join(suite.tmp, 'ft-ckpt'), logDir: join(suite.tmp, 'ft-logs'), bf16Weights: true, fusedBackward: true, trainTextEncoder: true,
    };
    assert.deepEqual(validate('finetune', raw), []);
    return raw as unknown as FinetuneSpec;
  };
  await onGradBackend(async () => {
    setBf16Store(false);
    let emulated;
    try {
      emulated = await runFinetune(specFor('ft-emulated'), ctxFor([]));
    } finally {
      setBf16Store(true);
    }
    const stored = await runFinetune(specFor('ft-stored'), ctxFor([]));
    assert.equal(stored.outputs.length, 2, 'raw and EMA');
    for (const [i, path] of emulated.outputs.entries()) {
      const [e, s] = [await readTensors(path), await readTensors(stored.outputs[i]!)];
      for (const [k, v] of e) assert.deepEqual(s.get(k), v, `${k}: stored = emulated`);
    }
  });
});

test('bf16Weights without fusedBackward is refused, naming both', async () => {
  await assert.rejects(runDreambooth(specFor('test/fixtures/sd-tiny/model.safetensors', { fusedBackward: false }), ctxFor([])), /bf16Weights.*fusedBackward/);
});
