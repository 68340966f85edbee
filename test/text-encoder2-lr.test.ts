/**
 * @file SDXL's second text encoder at its own learn rate (textEncoder2Lr, kohya te2): the
 * optimizer's OpenCLIP-G group steps at its rate and resumes from a state saved with both
 * encoders in one group; Dreambooth, fine-tune and LoRA on sdxl-tiny move each encoder's
 * weights by its own rate (AdamW's first step moves a weight by at most its rate, the largest
 * by about that); LoRA's ss_text_encoder_lr is kohya's "[te1, te2]"; SD1 refuses the field.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { tf } from '../trainers/backend/index.ts';
import { validate } from '../schemas/index.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { constantWithWarmup } from '../trainers/optim/lr.ts';
import { makeTrainableOptimizer, readOptimizerState, writeOptimizerState } from '../trainers/optim/trainable.ts';
import { dreamboothSpec, runDreambooth, type DbSpec } from '../trainers/methods/dreambooth.ts';
import { runFinetune, type FinetuneSpec } from '../trainers/methods/finetune/finetune.ts';
import { onGradBackend } from './helpers/golden.ts';
import { ctxFor, jobSuite, readTensors } from './helpers/job-run.ts';

const XL = join('test/fixtures/sdxl-tiny', 'model.safetensors');
const SD1 = join('test/fixtures/sd-tiny', 'model.safetensors');
const suite = jobSuite('sidetrain-te2lr-', ['an orange cat', 'a green triangle']);
let counter = 0;

const L = 'conditioner.embedders.0.';
const G = 'conditioner.embedders.1.';

function dbSpec(extra: Record<string, unknown>): DbSpec {
  const raw: Record<string, unknown> = {
    model: XL, images: suite.images, name: `te2db${++counter}`, instancePrompt: 'a photo of sks cat', width: 64, height: 64, steps: 1, lr: '0.001',
    seed: 3, trainTextEncoder: true, logDir: join(suite.tmp, 'logs'), checkpointDir: join(suite.tmp, 'ckpt'), ...extra,
  };
  assert.deepEqual(validate('dreambooth', raw), []);
  return dreamboothSpec(raw as unknown as DbSpec);
}

function ftSpec(extra: Record<string, unknown>): FinetuneSpec {
  const raw: Record<string, unknown> = {
    model: XL, images: suite.images, name: `te2ft${++counter}`, resolution: 64, steps: 1, lr: 0.001, seed: 5, trainTextEncoder: true,
    lrScheduler: 'constant', warmupSteps: 0, validationSplit: 0, logDir: join(suite.tmp, 'logs'), checkpointDir: join(suite.tmp, 'ckpt'), ...extra,
  };
  assert.deepEqual(validate('finetune', raw), []);
  return raw as unknown as FinetuneSpec;
}

/** The largest |after − before| over the weights whose name starts with `prefix`. */
function maxStep(before: Map<string, Float32Array>, after: Map<string, Float32Array>, prefix: string): number {
  let max = 0;
  for (const [k, a] of before) {
    if (!k.startsWith(prefix)) continue;
    const b = after.get(k)!;
    for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(b[i]! - a[i]!));
  }
  return max;
}

/** AdamW's first step: each weight moves by at most lr (+ lr·wd·|w|), the largest by nearly lr. */
function movedBy(step: number, lr: number, what: string): void {
  assert.ok(step <= lr * 1.02 && step >= lr * 0.5, `${what}: largest step ${step}, want about ${lr}`);
}

test('the optimizer: OpenCLIP-G\'s group at its own rate; a state saved with one text group resumes split', async () => {
  const vars = () => new Map(['unet.w', 'l.w', 'g.w'].map((k) => [k, tf.variable(tf.zeros([3]), true)] as const));
  const grads = () => new Map([...['unet.w', 'l.w', 'g.w']].map((k) => [k, tf.tensor1d([2, -1, 0.5])] as const));
  const split = (v: Map<string, tf.Variable>) => [new Map([['unet.w', v.get('unet.w')!]]), new Map([['l.w', v.get('l.w')!], ['g.w', v.get('g.w')!]])] as const;
  const rate = (lr: number) => constantWithWarmup({ lr, warmupSteps: 0, maxSteps: 10 });
  const v = vars();
  const [unet, text] = split(v);
  const opt = makeTrainableOptimizer('adamw', unet, text, { text2Keys: new Set(['g.w']), textLr: rate(1e-4), text2Lr: rate(1e-2) });
  opt.step(grads(), 1e-3);
  // zero weights: the decoupled weight decay adds nothing, Δ = −lr·g/(|g| + eps)
  for (const [k, lr] of [['unet.w', 1e-3], ['l.w', 1e-4], ['g.w', 1e-2]] as const) {
    (await v.get(k)!.data()).forEach((x, i) => assert.ok(Math.abs(x + lr * Math.sign([2, -1, 0.5][i]!)) < lr * 1e-6, `${k}[${i}] ${x}`));
  }
  // a state from before the split (both encoders in 'text') restores into the two groups
  const file = join(suite.tmp, 'split.optim.safetensors');
  await writeOptimizerState(file, await opt.exportGroups());
  const saved = await readOptimizerState(file);
  assert.deepEqual([...saved.keys()], ['unet', 'text', 'text2']);
  const legacy = new Map([['unet', saved.get('unet')!], ['text', { ...saved.get('text')!, params: new Map([...saved.get('text')!.params, ...saved.get('text2')!.params]) }]]);
  const w = vars();
  const [unet2, text2] = split(w);
  const again = makeTrainableOptimizer('adamw', unet2, text2, { text2Keys: new Set(['g.w']) });
  again.importGroups(legacy);
  const back = await again.exportGroups();
  for (const g of ['text', 'text2']) assert.deepEqual([...back.get(g)!.params.keys()], [...saved.get(g)!.params.keys()], g);
  opt.dispose();
  again.dispose();
  tf.dispose([...v.values(), ...w.values()]);
});

test('SDXL Dreambooth: each encoder moves by its own rate; a rate of 0 leaves that encoder as it was', async () => {
  await onGradBackend(async () => {
    const base = await readTensors(XL);
    const r1 = await readTensors((await runDreambooth(dbSpec({ textEncoderLr: '0.0001', textEncoder2Lr: '0.002' }), ctxFor([]))).output);
    movedBy(maxStep(base, r1, L), 1e-4, 'CLIP-L at textEncoderLr');
    movedBy(maxStep(base, r1, G), 2e-3, 'OpenCLIP-G at textEncoder2Lr');
    movedBy(maxStep(base, r1, 'model.diffusion_model.'), 1e-3, 'UNet at lr');
    const r2 = await readTensors((await runDreambooth(dbSpec({ textEncoderLr: '0.001', textEncoder2Lr: '0' }), ctxFor([]))).output);
    assert.equal(maxStep(base, r2, G), 0, 'OpenCLIP-G at 0: unchanged');
    movedBy(maxStep(base, r2, L), 1e-3, 'CLIP-L');
    // unset: OpenCLIP-G at the text encoder's rate (kohya: te2 = te1)
    const r3 = await readTensors((await runDreambooth(dbSpec({ textEncoderLr: '0.0003', textEncoders: 'clip-g' }), ctxFor([]))).output);
    movedBy(maxStep(base, r3, G), 3e-4, 'OpenCLIP-G at textEncoderLr');
    assert.equal(maxStep(base, r3, L), 0, 'clip-g only: CLIP-L unchanged');
  });
});

test('SDXL fine-tune: each encoder moves by its own peak rate', async () => {
  await onGradBackend(async () => {
    const base = await readTensors(XL);
    const r = await runFinetune(ftSpec({ textEncoderLr: 0.0001, textEncoder2Lr: 0.003 }), ctxFor([]));
    const out = await readTensors(r.output);
    movedBy(maxStep(base, out, L), 1e-4, 'CLIP-L at textEncoderLr');
    movedBy(maxStep(base, out, G), 3e-3, 'OpenCLIP-G at textEncoder2Lr');
  });
});

test('SDXL Dreambooth --lora: OpenCLIP-G\'s adapters at their own rate; ss_text_encoder_lr as kohya\'s list', async () => {
  await onGradBackend(async () => {
    const spec = dbSpec({ lora: true, loraDir: join(suite.tmp, 'lora'), textEncoderLr: '0.0001', textEncoder2Lr: '0.002' });
    const r = await runDreambooth(spec, ctxFor([]));
    const f = await openSafetensors(r.output);
    assert.equal(f.metadata().ss_text_encoder_lr, '[0.0001, 0.002]');
    await f.close();
    // lora_up starts at zero, so after one AdamW step it holds the step itself
    const t = await readTensors(r.output);
    const up = (te: string) => Math.max(...[...t].filter(([k]) => k.startsWith(te) && k.includes('lora_up')).flatMap(([, a]) => [...a].map(Math.abs)));
    movedBy(up('lora_te1_'), 1e-4, 'CLIP-L adapters');
    movedBy(up('lora_te2_'), 2e-3, 'OpenCLIP-G adapters');
  });
});

test('SD1: a textEncoder2Lr is refused, naming the field', async () => {
  const sd1 = { model: SD1, textEncoder2Lr: '0.001' };
  await assert.rejects(runDreambooth(dbSpec(sd1), ctxFor([])), /textEncoder2Lr.*one text encoder/);
  await assert.rejects(runDreambooth(dbSpec({ ...sd1, lora: true, loraDir: join(suite.tmp, 'lora') }), ctxFor([])), /textEncoder2Lr.*one text encoder/);
  await assert.rejects(runFinetune(ftSpec({ model: SD1, textEncoder2Lr: 0.001 }), ctxFor([])), /textEncoder2Lr.*one text encoder/);
});
