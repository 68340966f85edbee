/**
 * @file A full-size checkpoint with random weights, for benchmarks: SD1.5-shaped (or SD2/SDXL from their keys files):
 * every key and shape of `test/fixtures/sd-tiny/keys-sd15.json`, F16 (as most real SD1.5 files are), written
 * to a temporary folder and removed by the caller. Matrices are U(±1/√fan_in) (so activations
 * stay O(1) through the depth), 1-D `.weight`s (norms) 1, biases 0, the noise-schedule buffers
 * the real ldm `linear` schedule (so q_sample and the loss see real coefficients).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeSafetensors, type TensorToWrite } from '../trainers/io/safetensors.ts';
import { floatToHalfBits } from '../trainers/io/half.ts';

export const SD15_KEYS = 'test/fixtures/sd-tiny/keys-sd15.json';
export const SDXL_KEYS = 'test/fixtures/sdxl-tiny/keys-sdxl.json';

/** ldm make_beta_schedule('linear', 1000, 0.00085, 0.012) and the buffers LatentDiffusion registers. */
function scheduleBuffers(n = 1000): Record<string, Float64Array> {
  const betas = Float64Array.from({ length: n }, (_, i) => (Math.sqrt(0.00085) + ((Math.sqrt(0.012) - Math.sqrt(0.00085)) * i) / (n - 1)) ** 2);
  const acp = new Float64Array(n);
  let prod = 1;
  betas.forEach((b, i) => (acp[i] = prod *= 1 - b));
  const prev = Float64Array.from({ length: n }, (_, i) => (i === 0 ? 1 : acp[i - 1]!));
  const map = (f: (i: number) => number) => Float64Array.from({ length: n }, (_, i) => f(i));
  const postVar = map((i) => (betas[i]! * (1 - prev[i]!)) / (1 - acp[i]!));
  return {
    betas, alphas_cumprod: acp, alphas_cumprod_prev: prev,
    sqrt_alphas_cumprod: map((i) => Math.sqrt(acp[i]!)),
    sqrt_one_minus_alphas_cumprod: map((i) => Math.sqrt(1 - acp[i]!)),
    log_one_minus_alphas_cumprod: map((i) => Math.log(1 - acp[i]!)),
    sqrt_recip_alphas_cumprod: map((i) => Math.sqrt(1 / acp[i]!)),
    sqrt_recipm1_alphas_cumprod: map((i) => Math.sqrt(1 / acp[i]! - 1)),
    posterior_variance: postVar,
    posterior_log_variance_clipped: map((i) => Math.log(Math.max(postVar[i]!, 1e-20))),
    posterior_mean_coef1: map((i) => (betas[i]! * Math.sqrt(prev[i]!)) / (1 - acp[i]!)),
    posterior_mean_coef2: map((i) => ((1 - prev[i]!) * Math.sqrt(1 - betas[i]!)) / (1 - acp[i]!)),
  };
}

/** F16 bits of U(±bound): drawn from a table of 4096 levels (fast for a billion values). */
function uniformHalf(count: number, bound: number, seed: number): Uint8Array {
  const levels = Uint16Array.from({ length: 4096 }, (_, i) => floatToHalfBits(((i + 0.5) / 4096 * 2 - 1) * bound));
  const out = new Uint16Array(count);
  let s = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < count; i++) {
    s ^= s << 13; s ^= s >>> 17; s ^= s << 5; // xorshift32
    out[i] = levels[(s >>> 0) & 4095]!;
  }
  return new Uint8Array(out.buffer);
}

function randomTensor(name: string, shape: number[], seed: number): TensorToWrite {
  const count = shape.reduce((a, b) => a * b, 1);
  if (shape.length === 0) return { name, dtype: 'F16', shape, data: new Uint8Array(2) }; // e.g. OpenCLIP's logit_scale (unused)
  if (name.endsWith('position_ids')) return { name, dtype: 'I64', shape, data: new Uint8Array(new BigInt64Array(Array.from({ length: count }, (_, i) => BigInt(i))).buffer) };
  if (shape.length === 1) {
    const one = floatToHalfBits(name.endsWith('.weight') ? 1 : 0);
    return { name, dtype: 'F16', shape, data: new Uint8Array(new Uint16Array(count).fill(one).buffer) };
  }
  const fanIn = count / shape[0]!;
  return { name, dtype: 'F16', shape, data: async () => uniformHalf(count, 1 / Math.sqrt(fanIn), seed) };
}

/** Write the random SD1.5-shaped checkpoint into a new temp folder; returns its path and a remover. */
export function writeRandomSd15(): Promise<{ path: string; remove: () => Promise<void> }> {
  return writeRandomCheckpoint(SD15_KEYS);
}

/** The same for any `{key: shape}` file (keys-sd21.json, keys-sdxl.json): every key and shape, random weights. */
export async function writeRandomCheckpoint(keysFile: string): Promise<{ path: string; remove: () => Promise<void> }> {
  const shapes = JSON.parse(readFileSync(keysFile, 'utf8')) as Record<string, number[]>;
  const dir = await mkdtemp(join(tmpdir(), 'sidetrain-random-'));
  const path = join(dir, 'random.safetensors');
  const schedule = scheduleBuffers();
  let seed = 1;
  const tensors = Object.entries(shapes).map(([name, shape]): TensorToWrite =>
    schedule[name] ? { name, dtype: 'F32', shape, data: Float32Array.from(schedule[name]) } : randomTensor(name, shape, seed++));
  await writeSafetensors(path, tensors);
  return { path, remove: () => rm(dir, { recursive: true, force: true }) };
}
