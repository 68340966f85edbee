/**
 * @file Preview sampler with few steps: DDIM's 'uniform' timesteps stay inside the schedule (the webui
 * clips them to 999; 3 steps used to end on t = 1000 and gave NaN latents → an all-black preview),
 * DDIM from the clipped first step reaches what the math says, and the real tiny models sampled with
 * DDIM and Euler at 1–9 steps give finite latents and a decoded image that is not constant.
 */
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { initBackend, tf, type Tensor } from '../trainers/backend/index.ts';
import { loadSdModel, paddingFor } from '../trainers/nets/sd.ts';
import { encodeText } from '../trainers/nets/clip.ts';
import { unetForward } from '../trainers/nets/unet.ts';
import { vaeDecode } from '../trainers/nets/vae.ts';
import { disposeParams } from '../trainers/nets/params.ts';
import { ClipTokenizer } from '../trainers/text/tokenizer.ts';
import { ddimTimesteps, imageToRgb, sampleLatents, type Denoiser } from '../trainers/train/sample.ts';
import { seededNormal } from '../trainers/random.ts';
import { loadSchedule, type Parameterization } from '../trainers/nets/noise-schedule.ts';

before(async () => {
  await initBackend();
});

test('DDIM uniform timesteps: inside 1..T−1 for every step count, clipped like the webui', () => {
  assert.deepEqual(ddimTimesteps(3, 1000), [1, 334, 667, 999]); // webui get_timesteps; unclipped: …, 1000
  assert.deepEqual(ddimTimesteps(1, 1000), [1]);
  assert.deepEqual(ddimTimesteps(2, 1000), [1, 501]);
  assert.equal(ddimTimesteps(9, 1000).at(-1), 999);
  assert.equal(ddimTimesteps(20, 1000).at(-1), 951);
  for (const trainSteps of [10, 1000]) {
    for (let n = 1; n <= trainSteps; n++) {
      const ts = ddimTimesteps(n, trainSteps);
      assert.ok(ts.length >= n, `${n}/${trainSteps}: ${ts.length} timesteps`);
      assert.ok(ts.every((t, i) => Number.isInteger(t) && t >= 1 && t <= trainSteps - 1 && (i === 0 || t >= ts[i - 1]!)), `${n}/${trainSteps}: ${ts}`);
    }
  }
  assert.throws(() => ddimTimesteps(1001, 1000), /DDIM steps must be an integer in 1\.\.1000/);
  assert.throws(() => ddimTimesteps(0, 1000), /DDIM steps/);
});

test('DDIM with 3 and 9 steps (timestep 999 first): an oracle model gives the exact eta-0 result', async () => {
  const schedule = await loadSchedule(undefined);
  const acp = schedule.alphasCumprod;
  const shape = [1, 2, 2, 4]; // NHWC, 16×16 px with an ×8 VAE
  const clean = tf.randomNormal(shape, 0, 1, 'float32', 3);
  const noise = tf.tensor(seededNormal(9, 16), shape);
  const vae = { params: new Map(), cfg: { chMult: [1, 2, 2, 2], embedDim: 4 } } as never; // only the sizes are read
  for (const parameterization of ['eps', 'v'] as const satisfies readonly Parameterization[]) {
    const oracle: Denoiser = (x, t) => tf.tidy(() => {
      const a = acp[t]!; // undefined past the schedule → NaN, as in the old bug
      const eps = x.sub(clean.mul(Math.sqrt(a))).div(Math.sqrt(1 - a));
      return parameterization === 'eps' ? eps : eps.mul(Math.sqrt(a)).sub(clean.mul(Math.sqrt(1 - a)));
    });
    for (const steps of [3, 9]) {
      const inputs = { denoise: oracle, schedule, vae, context: tf.zeros([1, 1, 1]) };
      const x = sampleLatents(inputs, { sampler: 'ddim', steps, parameterization, cfgScale: 1, seed: 9, width: 16, height: 16 });
      // eta 0 keeps the first eps estimate (at t = 999) and ends at alphas_prev[0] = acp[0]
      const expected = tf.tidy(() => {
        const epsT = noise.sub(clean.mul(Math.sqrt(acp[999]!))).div(Math.sqrt(1 - acp[999]!));
        return clean.mul(Math.sqrt(acp[0]!)).add(epsT.mul(Math.sqrt(1 - acp[0]!)));
      });
      const err = tf.tidy(() => tf.abs(x.sub(expected)).max());
      const e = (await err.data())[0]!;
      assert.ok(e < 1e-4, `ddim/${parameterization}/${steps}: max error ${e}`);
      tf.dispose([x, expected, err, inputs.context]);
    }
  }
  tf.dispose([clean, noise]);
});

async function stats(t: Tensor): Promise<{ finite: boolean; min: number; max: number }> {
  const v = await t.data();
  let min = Infinity;
  let max = -Infinity;
  for (const x of v) {
    min = Math.min(min, x);
    max = Math.max(max, x);
  }
  return { finite: v.every(Number.isFinite), min, max };
}

for (const fixture of ['test/fixtures/sd-tiny', 'test/fixtures/sd2-tiny']) {
  test(`few-step previews on ${fixture}: DDIM and Euler, 1–9 steps, finite latents, a non-constant image`, async () => {
    const model = await loadSdModel(`${fixture}/model.safetensors`, ['text', 'unet', 'vae-decoder']);
    const { text, unet, vae } = model as Required<typeof model>;
    const tokenizer = await ClipTokenizer.load();
    const pad = paddingFor(model.family);
    const context = encodeText(text.params, text.cfg, [tokenizer.encode('a photo of a cat', pad)]);
    const uncondContext = encodeText(text.params, text.cfg, [tokenizer.encode('', pad)]);
    const denoise: Denoiser = (x, t, ctx) => unetForward(unet.params, unet.cfg, x, new Array(x.shape[0]).fill(t), ctx);
    const inputs = { denoise, schedule: model.schedule, vae, context, uncondContext };
    const size = 8 * 2 ** (vae.cfg.chMult.length - 1); // 8 latent cells a side
    for (const sampler of ['ddim', 'euler'] as const) {
      for (const steps of [1, 2, 3, 5, 9]) {
        const what = `${sampler}/${steps} steps`;
        const latents = sampleLatents(inputs, { sampler, steps, cfgScale: 7, seed: 1234, width: size, height: size, parameterization: model.prediction });
        const ls = await stats(latents);
        assert.ok(ls.finite, `${what}: latents not finite`);
        const image = vaeDecode(vae.params, vae.cfg, latents);
        const is = await stats(image);
        assert.ok(is.finite && is.max - is.min > 0.1, `${what}: decoded range [${is.min}, ${is.max}]`);
        const rgb = await imageToRgb(image);
        assert.ok(new Set(rgb).size > 16, `${what}: ${new Set(rgb).size} distinct byte values (black preview)`);
        tf.dispose([latents, image]);
      }
    }
    tf.dispose([context, uncondContext]);
    for (const part of [text, unet, vae]) disposeParams(part.params);
    await model.source.close();
  });
}
