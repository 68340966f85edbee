/** @file The webgpu side of the estimate (trainers/memory/estimate-gpu.ts): GPU memory as the budget, the binding limit, nvidia-smi parsing, no score tensors. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { gpuBudgetAndNotes, nvidiaMemory } from '../trainers/memory/estimate-gpu.ts';
import { estimateJob } from '../trainers/memory/estimate.ts';
import type { AdapterSummary } from '../trainers/backend/webgpu/adapter.ts';

const GIB = 2 ** 30;
const adapter: AdapterSummary = {
  vendor: 'nvidia', architecture: 'ampere', device: '', description: 'NVIDIA GeForce RTX 3060', fallback: false, shaderF16: true,
  maxBufferSize: 4 * GIB, maxStorageBufferBindingSize: 2 * GIB,
};

test('nvidia-smi: total and used MiB of the first GPU; no tool or odd output → unknown', () => {
  assert.deepEqual(nvidiaMemory(() => '12288, 3500\n8192, 0\n'), { totalBytes: 12288 * 2 ** 20, usedBytes: 3500 * 2 ** 20 });
  assert.equal(nvidiaMemory(() => { throw new Error('ENOENT'); }), undefined);
  assert.equal(nvidiaMemory(() => 'N/A, N/A'), undefined);
});

test('the budget is 90% of the GPU memory the webui and others leave free, and the note says so', () => {
  const r = gpuBudgetAndNotes(adapter, { totalBytes: 12 * GIB, usedBytes: 4 * GIB }, 200 * 2 ** 20);
  assert.equal(r.budget, 0.9 * 8 * GIB);
  assert.match(r.notes.join('\n'), /12\.0 GB, 4\.0 GB in use by other processes.*--vram unload/);
});

test('a weight over the binding limit is named; unknown memory or no adapter leaves the RAM budget', () => {
  const small = { ...adapter, vendor: 'amd', maxStorageBufferBindingSize: 128 * 2 ** 20 };
  const r = gpuBudgetAndNotes(small, undefined, 151.8 * 2 ** 20);
  assert.equal(r.budget, undefined);
  assert.match(r.notes[0]!, /largest weight \(152 MiB\) is over this adapter's binding limit of 128 MiB/);
  assert.match(r.notes[1]!, /memory size is not known/);
  assert.deepEqual(gpuBudgetAndNotes('only a software adapter (llvmpipe)', undefined, 1), { notes: ['webgpu: only a software adapter (llvmpipe)'] });
});

test('webgpu keeps no attention scores (its WGSL core, like the native one): less memory than the TF-ops backends at the same size', async () => {
  const spec = { model: 'test/fixtures/sd-tiny/model.safetensors', width: 256, height: 256, previewEvery: 0, gradientCheckpointing: 'off', attentionSlicing: 'off' };
  const [gpu, ops] = await Promise.all(['webgpu', 'wasm'].map((backend) => estimateJob('textual_inversion', spec, { backend, memoryBudget: 1e15 })));
  assert.equal(gpu!.backend, 'webgpu');
  assert.ok(gpu!.breakdown.trainPeakBytes < ops!.breakdown.trainPeakBytes, `${gpu!.breakdown.trainPeakBytes} vs ${ops!.breakdown.trainPeakBytes}`);
});
