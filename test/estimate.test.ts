/**
 * @file estimateJob: deterministic, reads only the checkpoint header (an SD1.5-shaped file that is
 * all holes on disk), scales with resolution and batch, and fails clearly on bad input.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, truncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { estimateJob } from '../trainers/memory/estimate.ts';
import { encodeHeader } from '../trainers/io/safetensors.ts';
import { nativeStatus } from '../trainers/backend/native/index.ts';
import { bf16DenseSpeedup } from '../trainers/backend/precision.ts';
import { nativeSkip } from './helpers/native.ts';

const TINY = 'test/fixtures/sd-tiny/model.safetensors';
const base = { model: TINY, width: 256, height: 256, batchSize: 1, previewEvery: 0 };
/** Every UNet intermediate kept (no checkpointing, whole attention): the plain tape. */
const whole = { gradientCheckpointing: 'off', attentionSlicing: 'off' };

/** keys-sd15.json as an F16 safetensors whose data is never written (sparse): header-only reads must do. */
function sparseSd15(dir: string): string {
  const shapes = JSON.parse(readFileSync('test/fixtures/sd-tiny/keys-sd15.json', 'utf8')) as Record<string, number[]>;
  const tensors = Object.entries(shapes).map(([name, shape]) => ({ name, dtype: 'F16' as const, shape }));
  const header = encodeHeader(tensors);
  const path = join(dir, 'sd15.safetensors');
  writeFileSync(path, header);
  const bytes = tensors.reduce((a, t) => a + t.shape.reduce((x, y) => x * y, 1) * 2, 0);
  truncateSync(path, header.length + bytes);
  return path;
}

test('estimate is deterministic and says which backend', async () => {
  const a = await estimateJob('textual_inversion', { ...base }, { backend: 'cpu-native' });
  const b = await estimateJob('textual_inversion', { ...base }, { backend: 'cpu-native' });
  assert.deepEqual(a, b);
  assert.equal(a.backend, 'cpu-native');
  assert.ok(a.peakBytes > 0 && a.secondsPerStep > 0);
  assert.equal(a.peakBytes, Math.max(a.breakdown.prepPeakBytes, a.breakdown.trainPeakBytes));
});

test('estimate scales with resolution and batch', async () => {
  const at = (px: number, batchSize = 1) => estimateJob('textual_inversion', { ...base, ...whole, width: px, height: px, batchSize }, { backend: 'wasm' });
  const [r256, r512, b2] = await Promise.all([at(256), at(512), at(256, 2)]);
  // per-pixel activations grow with the pixel count (×4), attention scores faster (×16 at full res)
  assert.ok(Math.abs(r512.breakdown.unetActivationBytes / r256.breakdown.unetActivationBytes - 4) < 0.01);
  assert.ok(r512.breakdown.attentionScoreBytes / r256.breakdown.attentionScoreBytes > 8);
  assert.ok(r512.peakBytes > r256.peakBytes && r512.secondsPerStep > 3 * r256.secondsPerStep);
  assert.equal(b2.breakdown.unetActivationBytes, 2 * r256.breakdown.unetActivationBytes);
  assert.ok(b2.peakBytes > r256.peakBytes && b2.secondsPerStep > 1.9 * r256.secondsPerStep);
  // the weights do not depend on the job
  assert.deepEqual(b2.breakdown.weightBytes, r256.breakdown.weightBytes);
});

test('SD1.5 shapes from the header only: float32 weights of the real parameter counts', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'sidetrain-estimate-'));
  try {
    const path = sparseSd15(dir);
    const e = await estimateJob('textual_inversion', { model: path, width: 512, height: 512, previewEvery: 0, ...whole }, { backend: 'wasm' });
    assert.equal(e.breakdown.weightBytes.unet, 859_520_964 * 4);
    assert.equal(e.breakdown.weightBytes.text, 123_060_480 * 4);
    assert.equal(e.breakdown.weightBytes.vaeDecoder, 0); // no previews, no decoder
    assert.equal(e.breakdown.weightBytes.trainable, 768 * 4 * 4); // one vector: value, grad, m, v
    // 8-head self-attention over 4096 tokens: scores dominate at 512 px (composed attention, as on WASM)
    assert.ok(e.breakdown.attentionScoreBytes > e.breakdown.unetActivationBytes);
    // the native attention core keeps no score tensor, the fused norms fewer intermediates
    const native = await estimateJob('textual_inversion', { model: path, width: 512, height: 512, previewEvery: 0, ...whole }, { backend: 'cpu-native' });
    assert.equal(native.breakdown.attentionScoreBytes, 0);
    assert.ok(native.breakdown.unetActivationBytes < e.breakdown.unetActivationBytes, 'fused norms keep fewer intermediates');
    const hn = await estimateJob('hypernetwork', { model: path, width: 512, height: 512, previewEvery: 0 }, { backend: 'cpu-native' });
    assert.ok(hn.breakdown.weightBytes.trainable > e.breakdown.weightBytes.trainable);
    assert.equal(hn.breakdown.textActivationBytes, 0); // frozen text encoder: no tape
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('estimate errors clearly on a bad model path or job type', async () => {
  await assert.rejects(estimateJob('textual_inversion', { ...base, model: '/no/such/model.safetensors' }), /model '\/no\/such\/model\.safetensors' does not exist/);
  await assert.rejects(estimateJob('textual_inversion', { ...base, model: 'test/fixtures/sd-tiny/README.md' }), /cannot read model/);
  await assert.rejects(estimateJob('textual_inversion', { ...base, model: 'test/fixtures/sd-tiny' }), /cannot read model/);
  await assert.rejects(estimateJob('lora_magic', { ...base }), /no estimate for job type 'lora_magic'/);
});

test('memory levers: checkpointing keeps block outputs only, slicing drops the kept scores, auto turns checkpointing on above the budget', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'sidetrain-estimate-'));
  try {
    const model = sparseSd15(dir);
    const job = { model, width: 512, height: 512, previewEvery: 0 };
    const est = (extra: object, budget = 1e15) => estimateJob('textual_inversion', { ...job, ...extra }, { backend: 'wasm', memoryBudget: budget });
    const [plain, sliced, ckpt, auto, autoRoomy] = await Promise.all([
      est(whole), est({ gradientCheckpointing: 'off', attentionSlicing: 'auto' }), est({ gradientCheckpointing: 'on', attentionSlicing: 'off' }),
      est({}, 8 * 2 ** 30), est({}),
    ]);
    assert.equal(plain.memory.checkpointing, false);
    assert.equal(plain.memory.attentionSliceBytes, 0);
    assert.ok(sliced.breakdown.attentionScoreBytes < plain.breakdown.attentionScoreBytes / 2, 'the 4096-token layers are sliced');
    assert.equal(sliced.breakdown.unetActivationBytes, plain.breakdown.unetActivationBytes);
    assert.ok(ckpt.breakdown.unetActivationBytes < plain.breakdown.unetActivationBytes / 4);
    assert.ok(ckpt.secondsPerStep > plain.secondsPerStep, 'the recompute costs time');
    const blocks = auto.memory.checkpointBlocks ?? [];
    assert.ok(auto.memory.checkpointing || blocks.length > 0, 'does not fit 8 GB without it');
    assert.ok(auto.peakBytes <= 8 * 2 ** 30);
    assert.ok(!auto.memory.checkpointing || blocks.length === 0);
    assert.equal(autoRoomy.memory.checkpointing, false, 'fits the budget as is');
    assert.equal(autoRoomy.memory.checkpointBlocks, undefined);
    assert.ok(auto.notes.some((n) => /gradient checkpointing on/.test(n)));
    // just enough: a tighter budget checkpoints more blocks, each choice fitting its budget
    const tight = await est({}, 7 * 2 ** 30);
    const tightBlocks = tight.memory.checkpointing ? Infinity : (tight.memory.checkpointBlocks ?? []).length;
    assert.ok(tight.peakBytes <= 7 * 2 ** 30 && tightBlocks > blocks.length);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('every method has an estimate: what it trains, its optimizer state, prior preservation and EMA', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'sidetrain-estimate-'));
  try {
    const model = sparseSd15(dir);
    const job = { model, width: 256, height: 256, previewEvery: 0, ...whole };
    const est = (type: string, extra: object = {}) => estimateJob(type, { ...job, ...extra }, { backend: 'cpu-native' });
    const unetParams = 859_520_964;
    const db = await est('dreambooth');
    assert.equal(db.breakdown.weightBytes.trainable, unetParams * (4 + 8)); // gradient + AdamW m, v (the value is the model's weight)
    const db8 = await est('dreambooth', { optimizer: 'adamw8bit' });
    assert.ok(db8.breakdown.weightBytes.trainable < 0.55 * db.breakdown.weightBytes.trainable, '8-bit moments: 2 bytes instead of 8');
    const prior = await est('dreambooth', { classPrompt: 'a photo of a cat', classImages: 10 });
    assert.equal(prior.breakdown.unetActivationBytes, 2 * db.breakdown.unetActivationBytes, 'instance + class rows');
    const te = await est('dreambooth', { trainTextEncoder: true });
    assert.equal(te.breakdown.weightBytes.trainable, (unetParams + 123_060_480) * 12);
    const ft = await est('finetune', { resolution: 256 });
    const ema = await est('finetune', { resolution: 256, ema: true });
    assert.equal(ema.breakdown.weightBytes.trainable - ft.breakdown.weightBytes.trainable, unetParams * 4);
    const lora = await est('lora', { rank: 16 });
    const lora4 = await est('lora', { rank: 4 });
    assert.ok(lora.breakdown.weightBytes.trainable > 0 && lora.breakdown.weightBytes.trainable < 2 ** 30);
    assert.ok(Math.abs(lora.breakdown.weightBytes.trainable / lora4.breakdown.weightBytes.trainable - 4) < 1e-9, 'adapters scale with the rank');
    assert.equal(lora.breakdown.textActivationBytes, 0);
    assert.ok((await est('lora', { trainTextEncoder: true })).breakdown.textActivationBytes > 0);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('halfFrozenWeights: frozen UNet at 2 bytes a value plus one block in float32, and checkpointing with it', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'sidetrain-estimate-'));
  try {
    const model = sparseSd15(dir);
    const job = { model, width: 256, height: 256, previewEvery: 0 };
    const [f32, f16] = await Promise.all([true, false].map((full) => estimateJob('hypernetwork', { ...job, gradientCheckpointing: 'on', halfFrozenWeights: !full }, { backend: 'cpu-native' })));
    const unet = 859_520_964 * 4;
    assert.ok(f16!.breakdown.weightBytes.unet > unet / 2 && f16!.breakdown.weightBytes.unet < 0.7 * unet);
    assert.ok(f16!.breakdown.weightBytes.text < f32!.breakdown.weightBytes.text, 'a hypernetwork does not train the text encoder');
    const auto = await estimateJob('hypernetwork', { ...job, halfFrozenWeights: true }, { backend: 'cpu-native', memoryBudget: 1e15 });
    assert.equal(auto.memory.checkpointing, true, 'float16 weights turn auto checkpointing on');
    const ti = await estimateJob('textual_inversion', { ...job, halfFrozenWeights: true }, { backend: 'cpu-native' });
    assert.equal(ti.breakdown.weightBytes.text, f32!.breakdown.weightBytes.text, 'TI backpropagates through the text encoder: it stays float32');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('dreambooth --lora is estimated as the LoRA it trains, prior rows and optimizer included', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'sidetrain-estimate-'));
  try {
    const model = sparseSd15(dir);
    const job = { model, width: 256, height: 256, previewEvery: 0, ...whole, classPrompt: 'a photo of a cat', classImages: 4 };
    const [dbLora, lora, lora8] = await Promise.all([
      estimateJob('dreambooth', { ...job, lora: true, rank: 16 }, { backend: 'cpu-native' }),
      estimateJob('lora', { ...job, rank: 16 }, { backend: 'cpu-native' }),
      estimateJob('lora', { ...job, rank: 16, optimizer: 'adamw8bit' }, { backend: 'cpu-native' }),
    ]);
    assert.deepEqual(dbLora.breakdown, lora.breakdown);
    assert.ok(lora8.breakdown.weightBytes.trainable < lora.breakdown.weightBytes.trainable);
    const solo = await estimateJob('lora', { ...job, classPrompt: '', rank: 16 }, { backend: 'cpu-native' });
    assert.equal(lora.breakdown.unetActivationBytes, 2 * solo.breakdown.unetActivationBytes, 'class rows double the batch');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('fusedBackward: the UNet gradient buffer becomes one block\'s, checkpointing turns on, checkpointing off is refused', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'sidetrain-est-'));
  try {
    const job = { model: sparseSd15(dir), width: 512, height: 512, instancePrompt: 'sks', optimizer: 'adafactor' };
    const [plain, fused] = await Promise.all([false, true].map((f) => estimateJob('dreambooth', { ...job, gradientCheckpointing: 'on', fusedBackward: f }, { backend: 'cpu-native' })));
    const unetParams = 859_520_964;
    const saved = plain!.breakdown.weightBytes.trainable - fused!.breakdown.weightBytes.trainable;
    // the whole UNet's float32 gradients less the largest block's (SD1.5: output_blocks.3–5, ~100 M values)
    assert.ok(saved > 0.8 * 4 * unetParams && saved < 4 * unetParams, `saved ${saved}`);
    assert.ok(fused!.notes.some((n) => /fused backward/.test(n)));
    const auto = await estimateJob('dreambooth', { ...job, fusedBackward: true }, { backend: 'cpu-native', memoryBudget: 1e15 });
    assert.equal(auto.memory.checkpointing, true);
    await assert.rejects(estimateJob('dreambooth', { ...job, gradientCheckpointing: 'off', fusedBackward: true }), /fusedBackward needs gradient checkpointing/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('estimate knows the precision: fp32 as before; no bf16 on backends without its kernels', async () => {
  const fp32 = await estimateJob('textual_inversion', { ...base, ...whole, precision: 'fp32' }, { backend: 'cpu-native' });
  const plain = await estimateJob('textual_inversion', { ...base, ...whole }, { backend: 'cpu-native' });
  assert.equal(fp32.secondsPerStep, plain.secondsPerStep);
  const wasm = await estimateJob('textual_inversion', { ...base, ...whole, precision: 'bf16' }, { backend: 'wasm' });
  assert.ok(!wasm.notes.some((n) => /bf16/.test(n)), 'no bf16 kernels on wasm');
});

const native = nativeStatus();
test('estimate under bf16 scales the dense time by the measured bf16/fp32 rate and says so; memory unchanged', { skip: nativeSkip(native.available ? false : native.reason) }, async () => {
  const fp32 = await estimateJob('textual_inversion', { ...base, ...whole, precision: 'fp32' }, { backend: 'cpu-native' });
  const bf16 = await estimateJob('textual_inversion', { ...base, ...whole, precision: 'bf16' }, { backend: 'cpu-native' });
  assert.ok(bf16.notes.some((n) => /^precision bf16: dense products at [\d.]+× the fp32 rate/.test(n)), bf16.notes.join('; '));
  const k = bf16DenseSpeedup();
  assert.ok(k > 0);
  assert.ok(k >= 1 ? bf16.secondsPerStep <= fp32.secondsPerStep : bf16.secondsPerStep > fp32.secondsPerStep, `speedup ${k}: ${bf16.secondsPerStep} vs ${fp32.secondsPerStep}`);
  assert.equal(bf16.peakBytes, fp32.peakBytes, 'same memory: the store is 2 bytes a weight either way');
});

test('full-weight jobs: the memory-lever ladder against a limit, the least change that fits picked and said', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'sidetrain-est-'));
  try {
    const job = { model: sparseSd15(dir), width: 512, height: 512, instancePrompt: 'sks', gradientCheckpointing: 'off' };
    const e = await estimateJob('dreambooth', job, { backend: 'cpu-native', memoryLimit: 8 * 2 ** 30 });
    const fit = e.fit!;
    const bf16 = 'gradient checkpointing on, fused backward, trained weights stored in bf16';
    assert.deepEqual(fit.combinations.map((c) => c.label), [
      'as given', 'gradient checkpointing on', 'gradient checkpointing on, fused backward', bf16, `${bf16}, optimizer adamw8bit`,
    ]);
    // SD1.5's UNet is 69% 3×3 convs, whose Adafactor state is 2/3 of their size: more than 8-bit AdamW's, so not offered
    assert.match(fit.skipped.join('\n'), /optimizer adafactor: needs [\d.]+ GB, no less than gradient checkpointing on, fused backward, trained weights stored in bf16, optimizer adamw8bit/);
    // bf16 storage: the UNet's 3.4 GB of float32 weights become 1.7 GB of bits plus the largest block's copy (and the tape's)
    const [fused, stored] = [fit.combinations[2]!, fit.combinations[3]!];
    const saved = fused.peakBytes - stored.peakBytes;
    assert.ok(saved > 1.2 * 2 ** 30 && saved < 1.75 * 2 ** 30, `bf16 storage saves ${saved / 2 ** 30} GB on SD1.5`);
    const noted = await estimateJob('dreambooth', { ...job, gradientCheckpointing: 'on', fusedBackward: true, bf16Weights: true }, { backend: 'cpu-native', memoryLimit: 8 * 2 ** 30 });
    assert.equal(noted.peakBytes, stored.peakBytes);
    assert.ok(noted.notes.some((n) => /trained weights stored in bfloat16/.test(n)), noted.notes.join('\n'));
    // a backend without host arrays: no bf16 rung, said why
    const wasm = await estimateJob('dreambooth', job, { backend: 'wasm', memoryLimit: 8 * 2 ** 30 });
    assert.match(wasm.fit!.skipped.join('\n'), /trained weights in bf16: the wasm backend has no host arrays/);
    const peaks = fit.combinations.map((c) => c.peakBytes);
    peaks.slice(1).forEach((p, i) => assert.ok(p < peaks[i]!, `each rung needs less: ${peaks}`));
    assert.equal(fit.pick, fit.combinations.findIndex((c) => c.peakBytes <= 8 * 2 ** 30));
    assert.ok(e.notes.some((n) => n.includes(`fits with ${fit.combinations[fit.pick!]!.label}`)), e.notes.join('\n'));
    // gradAccum > 1: no fused rung, said why; Adafactor already: no optimizer rung
    const accum = await estimateJob('finetune', { ...job, gradAccum: 2, optimizer: 'adafactor', resolution: 512 }, { backend: 'cpu-native', memoryLimit: 1 });
    assert.deepEqual(accum.fit!.combinations.map((c) => c.label), ['as given', 'gradient checkpointing on']);
    assert.match(accum.fit!.skipped.join(), /fused backward: needs gradAccum 1/);
    assert.match(accum.fit!.skipped.join(), /trained weights in bf16: needs the fused backward/);
    assert.equal(accum.fit!.pick, undefined);
    assert.ok(accum.notes.some((n) => /does not fit 0\.0 GB with any memory lever/.test(n)));
    // LoRA and the other methods have no ladder
    assert.equal((await estimateJob('dreambooth', { ...job, lora: true }, { backend: 'cpu-native' })).fit, undefined);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
