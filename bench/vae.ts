/**
 * @file VAE encode speed and memory: the tiny fixture VAE at 64 px, and an SD1.5-shaped VAE (config
 * inferred from keys-sd15.json, random weights) at 256 px, on the backend in use.
 * Run alone with `node --import tsx --expose-gc bench/vae.ts`; `npm run bench` calls `benchVae()`.
 */
import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { initBackend, tf, type Tensor } from '../trainers/backend/index.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { disposeParams, type Params } from '../trainers/nets/params.ts';
import { loadVae, vaeConfigFromKeys, vaeEncode, vaeParamShapes, type VaeConfig } from '../trainers/nets/vae.ts';

const FIXTURE = 'test/fixtures/sd-tiny';

/** Random weights in TF layout for every key the config implies: convs N(0, 1/fan_in), norms 1/0, biases 0. */
function randomVaeParams(cfg: VaeConfig): Params {
  const params: Params = new Map();
  for (const [key, shape] of vaeParamShapes(cfg)) {
    const t = tf.tidy(() => {
      if (shape.length === 4) {
        const [out, inC, kh, kw] = shape as [number, number, number, number];
        return tf.randomNormal([kh, kw, inC, out], 0, 1 / Math.sqrt(inC * kh * kw), 'float32', 1);
      }
      const isNormWeight = key.endsWith('.weight'); // the only 1-D weights in the VAE are GroupNorm's
      return isNormWeight ? tf.ones(shape) : tf.zeros(shape);
    });
    params.set(key, t);
  }
  return params;
}

function peakRssMb(): number {
  return Math.round(process.resourceUsage().maxRSS / 1024); // maxRSS is in KiB
}

/** Mean ms per encode over `calls` runs after one warm-up. */
async function timeEncode(params: Params, cfg: VaeConfig, size: number, calls: number): Promise<number> {
  const image = tf.randomUniform([1, size, size, cfg.inChannels], -1, 1, 'float32', 2);
  const once = async () => {
    const post = vaeEncode(params, cfg, image);
    await post.mean.data(); // wait for the backend to finish
    tf.dispose([post.mean, post.logvar, post.std] as Tensor[]);
  };
  await once();
  const start = performance.now();
  for (let i = 0; i < calls; i++) await once();
  const ms = (performance.now() - start) / calls;
  image.dispose();
  return ms;
}

export async function benchVae(): Promise<Record<string, unknown>[]> {
  const backend = (await initBackend()).name;
  const rows: Record<string, unknown>[] = [];

  const source = await openSafetensors(`${FIXTURE}/model.safetensors`);
  const tiny = await loadVae(source, { parts: ['encoder'] });
  await source.close();
  const tinyMs = await timeEncode(tiny.params, tiny.cfg, 64, 5);
  rows.push({ bench: 'vae.encode', model: 'sd-tiny', px: 64, backend, msPerCall: Math.round(tinyMs * 10) / 10, peakRssMB: peakRssMb() });
  disposeParams(tiny.params);

  const keys = JSON.parse(readFileSync(`${FIXTURE}/keys-sd15.json`, 'utf8')) as Record<string, number[]>;
  const cfg = vaeConfigFromKeys(new Map(Object.entries(keys)));
  const params = randomVaeParams(cfg);
  const sdMs = await timeEncode(params, cfg, 256, 1); // one call is ~1 min on 2 CPU cores
  rows.push({ bench: 'vae.encode', model: 'sd15-shaped (random)', px: 256, backend, msPerCall: Math.round(sdMs), peakRssMB: peakRssMb() });
  disposeParams(params);
  return rows;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  console.table(await benchVae());
}
