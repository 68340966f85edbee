/**
 * @file Text encoder speed (tiny fixture and an SD1.5-shaped ViT-L text tower with random
 * weights) and the memory-discipline check of issue 4: 100 full forward+backward passes
 * (text encoder → UNet, every weight trainable) must not grow tf.memory().numTensors or RSS.
 * Run: `npm run bench -- --only text` or `node --import tsx bench/text.ts`.
 */
import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { initBackend, tf } from '../trainers/backend/index.ts';
import { disposeParams, paramFromTorch, type Params } from '../trainers/nets/params.ts';
import { encodeText, textConfigFromKeys, textKeys } from '../trainers/nets/clip.ts';
import { loadSdModel } from '../trainers/nets/sd.ts';
import { denoisingLoss } from '../trainers/train/diffusion-loss.ts';

type Row = Record<string, unknown>;
const FIXTURE = 'test/fixtures/sd-tiny';
const rssMb = () => Math.round(process.memoryUsage().rss / 2 ** 20);
const peakRssMb = () => Math.round(process.resourceUsage().maxRSS / 1024);
const IDS = [[49406, 320, 1125, 539, 320, 2368, ...new Array(71).fill(49407)]];

async function encodeMs(params: Params, cfg: ReturnType<typeof textConfigFromKeys>, calls: number): Promise<number> {
  const once = async () => {
    const out = encodeText(params, cfg, IDS);
    await out.data();
    out.dispose();
  };
  await once();
  const t0 = performance.now();
  for (let i = 0; i < calls; i++) await once();
  return (performance.now() - t0) / calls;
}

/** The SD1.5 text tower's keys and shapes with random values (12 heads: width / 64). */
function randomSd15Text(): { params: Params; cfg: ReturnType<typeof textConfigFromKeys> } {
  const keys = JSON.parse(readFileSync(`${FIXTURE}/keys-sd15.json`, 'utf8')) as Record<string, number[]>;
  const cfg = textConfigFromKeys(new Map(Object.entries(keys)));
  const params: Params = new Map();
  for (const k of textKeys(cfg).used) {
    const shape = keys[k]!;
    const n = shape.reduce((a, b) => a * b, 1);
    params.set(k, paramFromTorch(Float32Array.from({ length: n }, () => (Math.random() - 0.5) * 0.04), shape));
  }
  return { params, cfg };
}

/** 100 forward+backward passes through text encoder and UNet; tensor count and RSS before/after. */
async function leakLoop(): Promise<Row> {
  const model = await loadSdModel(`${FIXTURE}/model.safetensors`, ['text', 'unet']);
  const text = model.text!;
  const unet = model.unet!;
  const vars = new Map([...text.params, ...unet.params].map(([k, t]) => [k, tf.variable(t, true)]));
  const textP = new Map([...text.params.keys()].map((k) => [k, vars.get(k)!]));
  const unetP = new Map([...unet.params.keys()].map((k) => [k, vars.get(k)!]));
  const batch = { latents: tf.randomNormal([1, 8, 8, 4], 0, 1, 'float32', 1), noise: tf.randomNormal([1, 8, 8, 4], 0, 1, 'float32', 2), timesteps: [500] };
  const step = async () => {
    const { value, grads } = tf.variableGrads(() => denoisingLoss({ ...model, unet: { params: unetP, cfg: unet.cfg } }, batch, encodeText(textP, text.cfg, IDS)));
    await value.data();
    tf.dispose([value, ...Object.values(grads)]);
  };
  for (let i = 0; i < 5; i++) await step(); // warm-up: kernels and allocator settle
  const tensors0 = tf.memory().numTensors;
  const rss0 = rssMb();
  for (let i = 0; i < 100; i++) await step();
  const row = { bench: 'leak: 100 fwd+bwd (text+unet)', model: 'sd-tiny', tensorGrowth: tf.memory().numTensors - tensors0, rssGrowthMB: rssMb() - rss0, peakRssMB: peakRssMb() };
  tf.dispose([batch.latents, batch.noise, ...vars.values()]);
  disposeParams(text.params);
  disposeParams(unet.params);
  await model.source.close();
  return row;
}

export async function benchText(): Promise<Row[]> {
  const backend = (await initBackend()).name;
  const rows: Row[] = [];
  const tiny = await loadSdModel(`${FIXTURE}/model.safetensors`, ['text']);
  rows.push({ bench: 'text.encode', model: 'sd-tiny', backend, msPerCall: Math.round((await encodeMs(tiny.text!.params, tiny.text!.cfg, 20)) * 10) / 10, peakRssMB: peakRssMb() });
  disposeParams(tiny.text!.params);
  await tiny.source.close();
  if (process.env.SIDETRAIN_BENCH_SD15 !== '0') {
    const sd = randomSd15Text();
    rows.push({ bench: 'text.encode', model: 'sd15-shaped (random)', backend, msPerCall: Math.round(await encodeMs(sd.params, sd.cfg, 3)), peakRssMB: peakRssMb() });
    disposeParams(sd.params);
  }
  rows.push({ ...(await leakLoop()), backend });
  return rows;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  console.table(await benchText());
}
