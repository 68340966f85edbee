/**
 * @file UNet speed and memory: ms per forward and per forward+backward (gradients w.r.t. every
 * UNet weight) at 32×32 latents (256 px), batch 1, 77-token context, on the tiny fixture UNet and
 * on an SD1.5-shaped UNet (config inferred from keys-sd15.json, random weights; 3.4 GB of float32
 * weights, 2× that with gradients), plus peak RSS, on the backend in use. tfjs-backend-wasm has
 * no Conv2DBackpropFilter kernel, so there the backward rows run on the CPU backend and say so.
 * A failing row (e.g. wasm's 4 GB heap) is reported as a row with `error`, not a crash.
 * Run alone with `node --import tsx --expose-gc bench/unet.ts`; `npm run bench` calls `benchUnet()`.
 * SIDETRAIN_BENCH_SD15=0 skips the full-size rows.
 */
import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { initBackend, tf } from '../trainers/backend/index.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { disposeParams, type Params } from '../trainers/nets/params.ts';
import { loadUnet, unetConfigFromKeys, unetForward, unetParamShapes, type UNetConfig } from '../trainers/nets/unet.ts';

const FIXTURE = 'test/fixtures/sd-tiny';
const LATENT = 32;

type Row = Record<string, unknown>;

/** Random weights (TF layout) for every key of `cfg`: U(±1/√fan_in) for matrices, norms 1, biases 0. */
function randomUnetParams(cfg: UNetConfig): Params {
  const params: Params = new Map();
  let seed = 1;
  for (const [key, shape] of unetParamShapes(cfg)) {
    const t = tf.tidy(() => {
      if (shape.length === 1) return key.endsWith('.weight') ? tf.ones(shape) : tf.zeros(shape); // 1-D weights are norms
      const fanIn = shape.slice(1).reduce((a, b) => a * b, 1);
      const tfShape = shape.length === 4 ? [shape[2]!, shape[3]!, shape[1]!, shape[0]!] : shape;
      return tf.randomUniform(tfShape, -1 / Math.sqrt(fanIn), 1 / Math.sqrt(fanIn), 'float32', seed++);
    });
    params.set(key, t);
  }
  return params;
}

const peakRssMb = () => Math.round(process.resourceUsage().maxRSS / 1024); // maxRSS is KiB

/** Mean ms of `calls` runs of `once` after one warm-up. */
async function timeIt(once: () => Promise<void>, calls: number): Promise<number> {
  await once();
  const start = performance.now();
  for (let i = 0; i < calls; i++) await once();
  return (performance.now() - start) / calls;
}

function inputs(cfg: UNetConfig) {
  return {
    x: tf.randomNormal([1, LATENT, LATENT, cfg.inChannels], 0, 1, 'float32', 11),
    context: tf.randomNormal([1, 77, cfg.contextDim], 0, 1, 'float32', 12),
  };
}

async function forwardMs(params: Params, cfg: UNetConfig, calls: number): Promise<number> {
  const { x, context } = inputs(cfg);
  const ms = await timeIt(async () => {
    const out = unetForward(params, cfg, x, [500], context);
    await out.data();
    out.dispose();
  }, calls);
  tf.dispose([x, context]);
  return ms;
}

/** Forward + gradients w.r.t. every weight (the params are made Variables for the run). */
async function forwardBackwardMs(params: Params, cfg: UNetConfig, calls: number): Promise<number> {
  const vars: Params = new Map([...params].map(([k, t]) => [k, tf.variable(t)]));
  const { x, context } = inputs(cfg);
  const ms = await timeIt(async () => {
    const { value, grads } = tf.variableGrads(() => unetForward(vars, cfg, x, [500], context).square().mean() as tf.Scalar);
    await value.data();
    tf.dispose([value, ...Object.values(grads)]);
  }, calls);
  tf.dispose([x, context]);
  disposeParams(vars);
  return ms;
}

/** Run one measurement; on a backend without the conv filter gradient, backward rows use 'cpu'. */
async function row(base: Row, backward: boolean, run: () => Promise<number>): Promise<Row> {
  const original = tf.getBackend();
  const switched = backward && !tf.getKernel('Conv2DBackpropFilter', original);
  const backend = switched ? 'cpu' : (await initBackend()).name; // 'cpu-native' runs as tf backend 'cpu'
  try {
    if (switched) await tf.setBackend('cpu');
    const ms = await run();
    const note = switched ? `${original} has no Conv2DBackpropFilter` : undefined;
    return { ...base, backend, msPerCall: Math.round(ms * 10) / 10, peakRssMB: peakRssMb(), ...(note ? { note } : {}) };
  } catch (err) {
    return { ...base, backend, error: String(err instanceof Error ? err.message : err).split('\n')[0], peakRssMB: peakRssMb() };
  } finally {
    if (switched) await tf.setBackend(original);
    (globalThis as { gc?: () => void }).gc?.();
  }
}

export async function benchUnet(): Promise<Row[]> {
  await initBackend();
  const rows: Row[] = [];
  const source = await openSafetensors(`${FIXTURE}/model.safetensors`);
  const heads = (JSON.parse(readFileSync(`${FIXTURE}/config.json`, 'utf8')) as { unet: { params: Record<string, number> } }).unet.params;
  const tiny = await loadUnet(source, { numHeads: heads.num_heads, numHeadChannels: heads.num_head_channels });
  await source.close();
  const tinyBase = { model: 'sd-tiny', latent: `${LATENT}x${LATENT}` };
  rows.push(await row({ bench: 'unet.forward', ...tinyBase }, false, () => forwardMs(tiny.params, tiny.cfg, 5)));
  rows.push(await row({ bench: 'unet.forward+backward', ...tinyBase }, true, () => forwardBackwardMs(tiny.params, tiny.cfg, 3)));
  disposeParams(tiny.params);
  if (process.env.SIDETRAIN_BENCH_SD15 === '0') return rows;

  const keys = JSON.parse(readFileSync(`${FIXTURE}/keys-sd15.json`, 'utf8')) as Record<string, number[]>;
  const cfg = unetConfigFromKeys(new Map(Object.entries(keys)));
  const sdBase = { model: 'sd15-shaped (random)', latent: `${LATENT}x${LATENT}` };
  let params: Params | undefined;
  rows.push(await row({ bench: 'unet.forward', ...sdBase }, false, async () => {
    params = randomUnetParams(cfg);
    return forwardMs(params, cfg, 1);
  }));
  if (params) disposeParams(params);
  rows.push(await row({ bench: 'unet.forward+backward', ...sdBase }, true, async () => {
    params = randomUnetParams(cfg);
    try {
      return await forwardBackwardMs(params, cfg, 1);
    } finally {
      disposeParams(params);
    }
  }));
  return rows;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  console.table(await benchUnet());
}
