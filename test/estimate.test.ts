/**
 * @file estimateJob: deterministic, reads only the checkpoint header (an SD1.5-shaped file that is
 * all holes on disk), scales with resolution and batch, and fails clearly on bad input.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, truncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { estimateJob } from '../trainers/estimate.ts';
import { encodeHeader } from '../trainers/io/safetensors.ts';

const TINY = 'test/fixtures/sd-tiny/model.safetensors';
const base = { model: TINY, width: 256, height: 256, batchSize: 1, previewEvery: 0 };

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
  const at = (px: number, batchSize = 1) => estimateJob('textual_inversion', { ...base, width: px, height: px, batchSize }, { backend: 'cpu-native' });
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
    const e = await estimateJob('textual_inversion', { model: path, width: 512, height: 512, previewEvery: 0 }, { backend: 'cpu-native' });
    assert.equal(e.breakdown.weightBytes.unet, 859_520_964 * 4);
    assert.equal(e.breakdown.weightBytes.text, 123_060_480 * 4);
    assert.equal(e.breakdown.weightBytes.vaeDecoder, 0); // no previews, no decoder
    assert.equal(e.breakdown.weightBytes.trainable, 768 * 4 * 4); // one vector: value, grad, m, v
    // 8-head self-attention over 4096 tokens: scores dominate at 512 px
    assert.ok(e.breakdown.attentionScoreBytes > e.breakdown.unetActivationBytes);
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
