/**
 * @file Where a full-model step's optimizer time goes: builds trainable variables totalling
 * `--params` float32 values (UNet-like shapes), random gradients, and times one step of each
 * optimizer, the loop's finite check, clip-grad norm and the EMA update, on the TF-ops path
 * and (with the cpu-native backend) the native path. Prints seconds per pass and the same
 * scaled to the SD1.5 UNet's 860M trained values.
 *
 *   node --import tsx --expose-gc bench/optim.ts --params 10e6 [--paths tf,native] [--only adamw,check] [--reps 1]
 *
 * --reps N times N passes after the first and prints the fastest (one pass is noisy on a shared machine).
 */
import { tf, initBackend, type Tensor } from '../trainers/backend/index.ts';
import { AdamW } from '../trainers/optim/adamw.ts';
import { AdamW8bit } from '../trainers/optim/adamw8bit.ts';
import { Adafactor } from '../trainers/optim/adafactor.ts';
import { Ema } from '../trainers/optim/ema.ts';
import { clipGradNorm } from '../trainers/optim/clip-grad.ts';
import { allFiniteWithin } from '../trainers/optim/check.ts';
import { setNativeOptim, optimKernels } from '../trainers/optim/native.ts';

const SD15 = 860e6;

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1]! : fallback;
}

/** Variables of 1280×1280 (plus one 3×3 conv) up to `total` values, with matching random grads. */
function model(total: number): { params: Map<string, tf.Variable>; grads: Map<string, Tensor> } {
  const params = new Map<string, tf.Variable>();
  const grads = new Map<string, Tensor>();
  let n = 0;
  for (let i = 0; n < total; i++) {
    const shape = i === 0 ? [3, 3, 320, 320] : [1280, 1280];
    params.set(`w${i}`, tf.variable(tf.randomNormal(shape, 0, 0.02), true));
    grads.set(`w${i}`, tf.randomNormal(shape, 0, 1e-3));
    n += shape.reduce((a, b) => a * b, 1);
  }
  return { params, grads };
}

async function time(label: string, total: number, f: () => Promise<void> | void): Promise<void> {
  await f(); // first call allocates state
  let s = Infinity;
  for (let i = 0; i < Number(arg('reps', '1')); i++) {
    const t0 = performance.now();
    await f();
    s = Math.min(s, (performance.now() - t0) / 1000);
  }
  console.log(`${label.padEnd(28)} ${s.toFixed(3)} s   → ${(s * SD15 / total).toFixed(1)} s at 860M`);
}

async function main(): Promise<void> {
  const backend = await initBackend();
  const total = Number(arg('params', '10e6'));
  const paths = arg('paths', 'tf,native').split(',');
  const only = arg('only', 'adamw,adamw8bit,adafactor,check,clip,ema').split(',');
  const { params, grads } = model(total);
  console.log(`backend ${backend.name}, ${total / 1e6}M values in ${params.size} variables`);
  for (const path of paths) {
    setNativeOptim(path === 'native');
    if (path === 'native' && !optimKernels()) {
      console.log('native: not available on this backend/addon');
      continue;
    }
    console.log(`--- ${path}`);
    const lr = 1e-5;
    if (only.includes('adamw')) {
      const o = new AdamW(params, { lr });
      await time('adamw step', total, () => o.step(grads, lr));
      o.dispose();
    }
    if (only.includes('adamw8bit')) {
      const o = new AdamW8bit(params);
      await time('adamw8bit step', total, () => o.step(grads, lr));
      o.dispose();
    }
    if (only.includes('adafactor')) {
      const o = new Adafactor(params);
      await time('adafactor step', total, () => o.step(grads, lr));
      o.dispose();
    }
    if (only.includes('check')) await time('finite check', total, async () => void (await allFiniteWithin(params.values(), 1e6)));
    if (only.includes('clip')) {
      await time('clip-grad norm', total, async () => {
        const { grads: out, totalNorm } = clipGradNorm(grads, 1);
        await totalNorm.data();
        tf.dispose([...out.values(), totalNorm]);
      });
    }
    if (only.includes('ema')) {
      const ema = await Ema.fromParams(params, { decay: 0.999 });
      await time('ema update', total, () => ema.update(params));
    }
  }
  setNativeOptim(true);
}

await main();
