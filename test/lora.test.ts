/**
 * @file LoRA adapters: a zero `up` leaves the UNet exactly unchanged; merged weights give the
 * on-the-fly output; kohya names map one-to-one to the checkpoint's modules and back by the
 * webui's own rule (networks.py) on the SD1.5, SD2.1 and tiny layouts; only up/down get
 * gradients; withLora is lazy (ΔW made at each read: same output and gradients as merging
 * eagerly, the base map never copied or iterated); a short run on sd-tiny lowers the loss and
 * writes the kohya file + ss_* metadata; prior preservation is off unless a class prompt is given.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { initBackend, tf } from '../trainers/backend/index.ts';
import { loadSdModel, shapesOf, type SdModel } from '../trainers/nets/sd.ts';
import { unetForward } from '../trainers/nets/unet.ts';
import { encodeText } from '../trainers/nets/clip.ts';
import {
  createLora, disposeLora, kohyaName, loraDelta, loraTargets, mergeLora, networkLayerMapping, webuiModuleFor, withLora,
  type LoraNetwork,
} from '../trainers/nets/lora.ts';
import type { Params } from '../trainers/nets/params.ts';
import { lossAndGrads } from '../trainers/nets/recompute.ts';
import { maxAbsDiff } from './helpers/golden.ts';
import { validate } from '../schemas/index.ts';
import { runLora, type LoraSpec } from '../trainers/methods/lora/lora.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { fileSha256 } from '../trainers/io/checkpoint.ts';
import type { JobContext, JobEvent } from '../trainers/job.ts';

const SD1 = 'test/fixtures/sd-tiny';
const SD2 = 'test/fixtures/sd2-tiny';
let sd1: SdModel;
let tmp: string;

before(async () => {
  await initBackend();
  sd1 = await loadSdModel(join(SD1, 'model.safetensors'), ['unet', 'text']);
  tmp = mkdtempSync(join(tmpdir(), 'sidetrain-lora-'));
});

after(async () => {
  await sd1.source.close();
  rmSync(tmp, { recursive: true, force: true });
});

const keyShapes = (path: string) => new Map(Object.entries(JSON.parse(readFileSync(path, 'utf8')) as Record<string, number[]>));

/** Every target's kohya name goes back to its module by the webui's rule, and names are unique. */
function checkRoundTrip(shapes: Map<string, number[]>, isSd2: boolean, kinds: Parameters<typeof loraTargets>[1]) {
  const targets = loraTargets(shapes, kinds);
  const mapping = networkLayerMapping(shapes.keys());
  const names = new Set<string>();
  for (const t of targets) {
    assert.equal(webuiModuleFor(t.name, mapping, isSd2), t.module, t.name);
    assert.equal(kohyaName(t.module), t.name);
    names.add(t.name);
  }
  assert.equal(names.size, targets.length, 'kohya names are unique');
  return targets;
}

test('kohya names: the SD1.5 list, every attention projection, both ways', () => {
  const shapes = keyShapes(join(SD1, 'keys-sd15.json'));
  const attn = checkRoundTrip(shapes, false, ['attn']);
  assert.equal(attn.length, 16 * 2 * 4); // 16 transformers × (attn1, attn2) × (q, k, v, out)
  const q = attn.find((t) => t.module === 'model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q')!;
  assert.equal(q.name, 'lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q');
  const all = checkRoundTrip(shapes, false, ['attn', 'proj', 'ff', 'resnet', 'text']);
  assert.ok(all.some((t) => t.name === 'lora_te_text_model_encoder_layers_0_self_attn_q_proj'));
  assert.ok(all.some((t) => t.name === 'lora_te_text_model_encoder_layers_11_mlp_fc2'));
  assert.equal(all.filter((t) => t.name.startsWith('lora_te_')).length, 12 * 6);
});

test('kohya names: the SD2.1 list, open_clip q/k/v rows of in_proj_weight', () => {
  const shapes = keyShapes(join(SD1, 'keys-sd21.json'));
  assert.equal(checkRoundTrip(shapes, true, ['attn']).length, 16 * 2 * 4);
  const text = checkRoundTrip(shapes, true, ['text']);
  const k = text.find((t) => t.name === 'lora_te_text_model_encoder_layers_3_self_attn_k_proj')!;
  assert.equal(k.weightKey, 'cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight');
  assert.deepEqual(k.rows, [1024, 2048]);
  assert.ok(text.some((t) => t.name === 'lora_te_text_model_encoder_layers_3_mlp_fc1' && t.module.endsWith('resblocks.3.mlp.c_fc')));
  checkRoundTrip(shapes, true, ['attn', 'proj', 'ff', 'resnet', 'text']);
});

test('kohya names: the tiny layouts (1 res block per level) land on the module trained', () => {
  for (const [dir, isSd2] of [[SD1, false], [SD2, true]] as const) {
    const shapes = shapesOfFile(dir);
    const targets = checkRoundTrip(shapes, isSd2, ['attn', 'proj', 'ff', 'resnet', 'text']);
    for (const t of targets) assert.ok(shapes.has(t.weightKey), t.weightKey);
  }
  // a diffusers-style name (SD layout arithmetic) is not one the webui maps onto our modules
  assert.equal(webuiModuleFor('lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q', networkLayerMapping(shapesOfFile(SD1).keys()), false), undefined);
});

function shapesOfFile(dir: string): Map<string, number[]> {
  const header = readFileSync(join(dir, 'model.safetensors'));
  const n = Number(header.readBigUInt64LE(0));
  const json = JSON.parse(header.subarray(8, 8 + n).toString('utf8')) as Record<string, { shape: number[] }>;
  return new Map(Object.entries(json).filter(([k]) => k !== '__metadata__').map(([k, v]) => [k, v.shape]));
}

function unetInputs() {
  const cfg = sd1.unet!.cfg;
  const x = tf.randomNormal([1, 8, 8, cfg.inChannels], 0, 1, 'float32', 1);
  const context = tf.randomNormal([1, 7, cfg.contextDim], 0, 1, 'float32', 2);
  return { x, context, t: [500] };
}

function randomizeUp(net: LoraNetwork, seed: number) {
  let i = 0;
  for (const [k, v] of net.weights) if (k.endsWith('lora_up.weight')) v.assign(tf.randomNormal(v.shape, 0, 0.5, 'float32', seed + i++));
}

test('up = 0 leaves the UNet output exactly unchanged; merged equals on the fly', async () => {
  const { unet } = sd1;
  const net = createLora(loraTargets(shapesOf(sd1.source), ['attn', 'proj', 'ff', 'resnet']), { rank: 4, alpha: 2, seed: 3 });
  const { x, context, t } = unetInputs();
  const base = unetForward(unet!.params, unet!.cfg, x, t, context);
  const zero = tf.tidy(() => unetForward(withLora(unet!.params, net), unet!.cfg, x, t, context));
  assert.equal(await maxAbsDiff(base, zero), 0);
  randomizeUp(net, 10);
  const fly = tf.tidy(() => unetForward(withLora(unet!.params, net, { multiplier: 0.7 }), unet!.cfg, x, t, context));
  const merged = mergeLora(unet!.params, net, 0.7);
  const mergedOut = unetForward(new Map([...unet!.params, ...merged]), unet!.cfg, x, t, context);
  assert.ok((await maxAbsDiff(base, fly)) > 1e-3, 'the LoRA changes the output');
  const diff = await maxAbsDiff(fly, mergedOut);
  assert.ok(diff < 1e-5, `merged vs on the fly ${diff}`);
  tf.dispose([x, context, base, zero, fly, mergedOut, ...merged.values()]);
  disposeLora(net);
});

test('gradients reach up and down only; the text encoder LoRA changes encodeText', async () => {
  const { unet, text } = sd1;
  const net = createLora(loraTargets(shapesOf(sd1.source), ['attn', 'text']), { rank: 2, alpha: 2, seed: 5 });
  randomizeUp(net, 20); // with up = 0 the down gradients are 0
  const { x, context, t } = unetInputs();
  const first = net.targets.find((t) => t.weightKey.startsWith('model.'))!.weightKey;
  const baseVar = tf.variable(unet!.params.get(first)!, false); // frozen base weight
  const { value, grads } = tf.variableGrads(() => tf.tidy(() => {
    const p = withLora(new Map([...unet!.params, [first, baseVar]]), net);
    return unetForward(p, unet!.cfg, x, t, context).square().mean() as tf.Scalar;
  }));
  const byVar = new Map([...net.weights].map(([k, v]) => [v.name, k]));
  for (const [k, v] of net.weights) {
    if (!k.startsWith('lora_unet_')) continue;
    assert.ok(grads[v.name], `gradient for ${k}`);
    assert.ok(tf.tidy(() => grads[v.name]!.abs().max().dataSync()[0]!) > 0, `non-zero gradient for ${k}`);
  }
  assert.equal(grads[baseVar.name], undefined, 'the base weight gets no gradient');
  assert.ok(Object.keys(grads).every((name) => byVar.get(name)?.startsWith('lora_unet_')), 'only UNet up/down get gradients');
  const ids = [[49406, 320, 1125, 49407]];
  const plain = encodeText(text!.params, text!.cfg, ids);
  const adapted = tf.tidy(() => encodeText(withLora(text!.params, net), text!.cfg, ids));
  assert.ok((await maxAbsDiff(plain, adapted)) > 0);
  tf.dispose([value, ...Object.values(grads), x, context, plain, adapted, baseVar]);
  disposeLora(net);
});


/** The pre-lazy withLora, by hand: every adapted weight merged up front (W + up·down·alpha/rank). */
function eagerMerge(params: Params, net: LoraNetwork): Params {
  const out: Params = new Map(params);
  for (const t of net.targets) if (params.has(t.weightKey)) out.set(t.weightKey, params.get(t.weightKey)!.add(loraDelta(net, t, net.alpha / net.rank)));
  return out;
}

test('lazy withLora: the same UNet output and LoRA gradients as merging eagerly', async () => {
  const { unet } = sd1;
  const net = createLora(loraTargets(shapesOf(sd1.source), ['attn', 'proj', 'resnet']), { rank: 3, alpha: 2, seed: 8 });
  randomizeUp(net, 40);
  const { x, context, t } = unetInputs();
  const vars = [...net.weights.values()];
  const run = (adapt: (p: Params) => Params) =>
    tf.variableGrads(() => tf.tidy(() => unetForward(adapt(unet!.params), unet!.cfg, x, t, context).square().mean() as tf.Scalar), vars);
  const eager = run((p) => eagerMerge(p, net));
  const lazy = run((p) => withLora(p, net));
  assert.equal(await maxAbsDiff(lazy.value, eager.value), 0, 'loss');
  for (const v of vars) assert.equal(await maxAbsDiff(lazy.grads[v.name]!, eager.grads[v.name]!), 0, v.name);
  tf.dispose([x, context, eager.value, lazy.value, ...Object.values(eager.grads), ...Object.values(lazy.grads)]);
  disposeLora(net);
});

test('gradient checkpointing: LoRA gradients (ΔW read inside recomputed blocks) equal the plain pass\'s', async () => {
  const { unet } = sd1;
  const net = createLora(loraTargets(shapesOf(sd1.source), ['attn', 'resnet']), { rank: 2, alpha: 2, seed: 11 });
  randomizeUp(net, 60);
  const { x, context, t } = unetInputs();
  const run = (checkpointing: boolean) => lossAndGrads(() => tf.tidy(() => {
    const eps = unetForward(withLora(unet!.params, net), unet!.cfg, x, t, context, { memory: { checkpointing, attentionSliceBytes: 0 } });
    return eps.square().mean() as tf.Scalar;
  }), net.weights);
  const plain = run(false);
  const ckpt = run(true);
  assert.ok((await maxAbsDiff(ckpt.value, plain.value)) < 1e-6, 'loss');
  // relative to the largest gradient: some (time-embedding projections) are ~1e-11, pure rounding noise
  const maxima = tf.tidy(() => tf.stack(Object.values(plain.grads).map((g) => g.abs().max())).max());
  const scale = (await maxima.data())[0]!;
  maxima.dispose();
  assert.ok(scale > 0);
  for (const k of net.weights.keys()) {
    const [g, c] = [plain.grads[k], ckpt.grads[k]];
    assert.ok(g && c, `a gradient for ${k} both ways`);
    assert.ok((await maxAbsDiff(c, g)) <= 1e-6 * scale, `${k}: checkpointed vs plain`);
  }
  tf.dispose([x, context, plain.value, ckpt.value, ...Object.values(plain.grads), ...Object.values(ckpt.grads)]);
  disposeLora(net);
});

test('lazy withLora: nothing made until read, each read a new equal tensor (same dropout mask), base never iterated', async () => {
  const net = createLora(loraTargets(shapesOf(sd1.source), ['attn']), { rank: 4, alpha: 4, seed: 2 });
  randomizeUp(net, 50);
  let iterated = 0;
  class Spy extends Map<string, tf.Tensor> {
    override *entries(): MapIterator<[string, tf.Tensor]> {
      iterated++;
      yield* super.entries();
    }
    override [Symbol.iterator]() {
      return this.entries();
    }
  }
  const base = new Spy(sd1.unet!.params);
  const before = tf.memory().numTensors;
  const view = withLora(base, net, { dropout: 0.5, seed: 3 });
  assert.equal(tf.memory().numTensors, before, 'no tensor made by withLora itself');
  assert.equal(iterated, 0, 'the base map is not copied');
  assert.equal(view.size, base.size);
  assert.deepEqual([...view.keys()], [...base.keys()]);
  const key = net.targets[0]!.weightKey;
  assert.ok(view.has(key));
  const [a, b] = [view.get(key)!, view.get(key)!];
  assert.notEqual(a, b, 'a new tensor per read');
  assert.equal(await maxAbsDiff(a, b), 0, 'same numbers, same mask');
  assert.ok((await maxAbsDiff(a, base.get(key)!)) > 0, 'the adapted weight differs from the base');
  const plainKey = [...base.keys()].find((k) => !net.targets.some((t) => t.weightKey === k))!;
  assert.equal(view.get(plainKey), base.get(plainKey), 'other weights are the base tensors');
  assert.throws(() => view.set(key, a), /read-only/);
  tf.dispose([a, b]);
  disposeLora(net);
});


// ---------------------------------------------------------------------------------------------
// A short run on sd-tiny

function context(): JobContext & { events: JobEvent[] } {
  const events: JobEvent[] = [];
  return { events, signal: new AbortController().signal, emit: (e) => void events.push(e) };
}

function loraSpec(overrides: Record<string, unknown>, images: string): LoraSpec {
  const dir = join(tmp, `run-${Math.random().toString(36).slice(2)}`);
  const spec: Record<string, unknown> = {
    model: join(SD1, 'model.safetensors'), images, name: 'sks', instancePrompt: 'a photo of sks cat', width: 64, height: 64,
    steps: 12, lr: '0.01', rank: 4, alpha: 4, previewEvery: 0, saveEvery: 0, loraDir: join(dir, 'Lora'), logDir: join(dir, 'logs'), ...overrides,
  };
  assert.deepEqual(validate('lora', spec), []);
  return spec as unknown as LoraSpec;
}

test('a short LoRA run on sd-tiny lowers the loss and writes kohya keys + ss_* metadata', async () => {
  const images = join(tmp, 'images');
  mkdirSync(images, { recursive: true });
  for (const f of ['01-orange cat.png', 'green_triangle.png']) copyFileSync(join('test/fixtures/images', f), join(images, f));
  const spec = loraSpec({ targets: ['attn', 'resnet'], trainTextEncoder: true }, images);
  const ctx = context();
  const result = await runLora(spec, ctx);
  assert.equal(result.kind, 'lora');
  assert.equal(result.usage, '<lora:sks:1>');
  assert.equal(result.output, join(spec.loraDir, 'sks.safetensors'));
  const losses = ctx.events.flatMap((e) => (e.type === 'step' ? [e.loss] : []));
  assert.equal(losses.length, 12);
  const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
  assert.ok(mean(losses.slice(-4)) < mean(losses.slice(0, 4)), `loss ${losses.map((l) => l.toFixed(4)).join(' ')}`);

  const file = await openSafetensors(result.output);
  const meta = file.metadata();
  const shapes = shapesOfFile(SD1);
  const mapping = networkLayerMapping(shapes.keys());
  const stems = new Set(file.keys().map((k) => k.replace(/\.(lora_down\.weight|lora_up\.weight|alpha)$/, '')));
  for (const stem of stems) {
    for (const part of ['lora_down.weight', 'lora_up.weight', 'alpha']) assert.ok(file.has(`${stem}.${part}`), `${stem}.${part}`);
    assert.ok(webuiModuleFor(stem, mapping, false), `${stem} maps to a module`);
    assert.deepEqual(file.info(`${stem}.alpha`).shape, []);
  }
  assert.ok(stems.has('lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q'));
  assert.ok(stems.has('lora_unet_input_blocks_1_0_in_layers_2'));
  assert.ok(stems.has('lora_te_text_model_encoder_layers_0_self_attn_q_proj'));
  assert.deepEqual(file.info('lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight').shape, [4, 32, 3, 3]);
  assert.deepEqual(file.info('lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight').shape, [32, 4, 1, 1]);
  const up = await file.read('lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight');
  assert.ok(up.some((x) => x !== 0), 'up trained away from 0');
  assert.equal((await file.read('lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha'))[0], 4);
  assert.equal(meta.ss_base_model_version, 'sd_v1');
  assert.equal(meta.ss_v2, 'False');
  assert.equal(meta.ss_network_module, 'networks.lora');
  assert.equal(meta.ss_network_dim, '4');
  assert.equal(meta.ss_network_alpha, '4');
  assert.equal(meta.ss_resolution, '(64, 64)');
  assert.equal(meta.ss_steps, '12');
  assert.equal(meta.ss_output_name, 'sks');
  assert.equal(meta.ss_new_sd_model_hash, await fileSha256(spec.model));
  assert.match(meta.ss_sd_model_hash!, /^[0-9a-f]{8}$/);
  assert.deepEqual(JSON.parse(meta.ss_tag_frequency!), { '1_images': { 'a photo of sks cat': 2 } });
  assert.ok(Number(meta.ss_training_started_at) > 1.6e9);
  // the addnet hash: sha256 of the tensor data after the header
  const bytes = readFileSync(result.output);
  const data = bytes.subarray(8 + Number(bytes.readBigUInt64LE(0)));
  assert.equal(meta.sshs_model_hash, createHash('sha256').update(data).digest('hex'));
  await file.close();
});

test('SD2: the family metadata says sd_v2; an existing output is refused without overwrite/resume', async () => {
  const images = join(tmp, 'images2');
  mkdirSync(images, { recursive: true });
  for (const f of ['green_triangle.png', 'green_triangle.txt']) copyFileSync(join('test/fixtures/images', f), join(images, f));
  const spec = loraSpec({ model: join(SD2, 'model.safetensors'), steps: 2, trainTextEncoder: true, shuffleTags: true, tagDropOut: 0.5 }, images);
  const result = await runLora(spec, context());
  const file = await openSafetensors(result.output);
  assert.equal(file.metadata().ss_base_model_version, 'sd_v2');
  assert.equal(file.metadata().ss_v2, 'True');
  // captions (.txt) → prompts are [filewords]: their tags really were shuffled and dropped
  assert.equal(file.metadata().ss_shuffle_caption, 'True');
  assert.equal(file.metadata().ss_caption_tag_dropout_rate, '0.5');
  assert.ok(file.has('lora_te_text_model_encoder_layers_0_self_attn_v_proj.lora_up.weight'));
  await file.close();
  await assert.rejects(runLora({ ...spec }, context()), /already exists/);
  const resumed = await runLora({ ...spec, resume: true, steps: 3 }, context());
  assert.equal(resumed.step, 3);
});

test('resume from the newest snapshot (+ its .optim) continues the run exactly', async () => {
  const images = join(tmp, 'images3');
  mkdirSync(images, { recursive: true });
  copyFileSync(join('test/fixtures/images', 'green_triangle.png'), join(images, 'green_triangle.png'));
  const spec = loraSpec({ steps: 4, saveEvery: 2 }, images);
  const first = await runLora(spec, context());
  assert.deepEqual(first.outputs, [first.output, `${first.output}.optim`]);
  const read = async (path: string) => {
    const f = await openSafetensors(path);
    const values = await Promise.all(f.keys().map(async (k) => [k, await f.read(k)] as const));
    await f.close();
    return new Map(values);
  };
  const straight = await read(first.output);
  rmSync(first.output); // as if killed after the snapshot at step 2
  rmSync(`${first.output}.optim`);
  const ctx = context();
  const resumed = await runLora({ ...spec, resume: true }, ctx);
  assert.equal(resumed.step, 4);
  assert.ok(ctx.events.some((e) => e.type === 'log' && /continuing .*sks-2\.safetensors from step 2 with its optimizer state/.test(e.message)));
  let worst = 0;
  for (const [k, v] of await read(resumed.output)) {
    const w = straight.get(k)!;
    for (let i = 0; i < v.length; i++) worst = Math.max(worst, Math.abs(v[i]! - w[i]!));
  }
  assert.ok(worst < 1e-6, `resumed vs straight run: ${worst}`);
});

test('SD2 text LoRA: q/k/v deltas land on their row blocks of the fused in_proj_weight', async () => {
  const sd2 = await loadSdModel(join(SD2, 'model.safetensors'), ['text']);
  try {
    const net = createLora(loraTargets(shapesOf(sd2.source), ['text']), { rank: 2, alpha: 1, seed: 7 });
    const k = net.targets.find((t) => t.name === 'lora_te_text_model_encoder_layers_0_self_attn_k_proj')!;
    const up = net.weights.get(`${k.name}.lora_up.weight`)!;
    up.assign(tf.randomNormal(up.shape, 0, 1, 'float32', 9));
    const merged = mergeLora(sd2.text!.params, net);
    const base = sd2.text!.params.get(k.weightKey)!;
    const delta = tf.tidy(() => merged.get(k.weightKey)!.sub(base));
    const expected = tf.tidy(() => tf.matMul(up, net.weights.get(`${k.name}.lora_down.weight`)!).mul(net.alpha / net.rank));
    const rows = tf.split(delta, 3, 0);
    const zero = tf.zerosLike(rows[0]!);
    assert.equal(await maxAbsDiff(rows[0]!, zero), 0, 'q rows unchanged');
    assert.ok((await maxAbsDiff(rows[1]!, expected)) < 1e-6, 'k rows get up·down·alpha/rank');
    assert.equal(await maxAbsDiff(rows[2]!, zero), 0, 'v rows unchanged');
    assert.equal(rows[1]!.shape[0], k.outDim);
    tf.dispose([delta, expected, zero, ...rows, ...merged.values()]);
    disposeLora(net);
  } finally {
    await sd2.source.close();
  }
});

test('rank dropout: seeded, drops ranks of ΔW and rescales the rest; p = 0 is the plain delta', async () => {
  const net = createLora(loraTargets(shapesOf(sd1.source), ['attn']), { rank: 8, alpha: 8, seed: 1 });
  randomizeUp(net, 30);
  const key = net.targets[0]!.weightKey;
  const params = new Map([[key, sd1.unet!.params.get(key)!]]);
  const [plain, a, b, c] = [{}, { dropout: 0.5, seed: 4 }, { dropout: 0.5, seed: 4 }, { dropout: 0.5, seed: 5 }]
    .map((o) => tf.tidy(() => withLora(params, net, o).get(key)!));
  assert.equal(await maxAbsDiff(a!, b!), 0, 'same seed, same mask');
  assert.ok((await maxAbsDiff(a!, c!)) > 0, 'another seed, another mask');
  assert.ok((await maxAbsDiff(a!, plain!)) > 0);
  tf.dispose([plain!, a!, b!, c!]);
  disposeLora(net);
});

test('train lora: prior preservation only with a class prompt (class images, prior-loss.csv, reg-image metadata)', async () => {
  const images = join(tmp, 'images4');
  mkdirSync(images, { recursive: true });
  copyFileSync(join('test/fixtures/images', 'green_triangle.png'), join(images, 'green_triangle.png'));
  const plain = loraSpec({ steps: 1, previewEvery: 1, previewSteps: 2, shuffleTags: true, tagDropOut: 0.5 }, images);
  const off = await runLora(plain, context());
  assert.ok(existsSync(join(plain.logDir, 'sks', 'images', 'sks-1.png')), 'a preview of the merged LoRA');
  const offFile = await openSafetensors(off.output);
  assert.equal(offFile.metadata().ss_num_reg_images, '0');
  // no captions: every prompt is the instance prompt, which has no tags to shuffle or drop
  assert.equal(offFile.metadata().ss_shuffle_caption, 'False');
  assert.equal(offFile.metadata().ss_caption_tag_dropout_rate, '0');
  assert.equal(offFile.metadata().ss_sidetrain_class_prompt, undefined);
  await offFile.close();
  assert.ok(!existsSync(join(plain.logDir, 'sks', 'prior-loss.csv')));

  const spec = loraSpec({ steps: 2, classPrompt: 'a photo of a triangle', classImages: 1, classSteps: 2, priorWeight: 0.5, optimizer: 'adafactor' }, images);
  const ctx = context();
  const on = await runLora(spec, ctx);
  assert.ok(ctx.events.some((e) => e.type === 'log' && /generating 1 class images/.test(e.message)));
  const onFile = await openSafetensors(on.output);
  const meta = onFile.metadata();
  await onFile.close();
  assert.equal(meta.ss_num_reg_images, '1');
  assert.equal(meta.ss_prior_loss_weight, '0.5');
  assert.equal(meta.ss_sidetrain_class_prompt, 'a photo of a triangle');
  assert.equal(meta.ss_sidetrain_method, 'lora');
  assert.match(meta.ss_optimizer!, /Adafactor/);
  const rows = readFileSync(join(spec.logDir, 'sks', 'prior-loss.csv'), 'utf8').trim().split('\n');
  assert.equal(rows[0], 'step,instance_loss,class_loss');
  assert.equal(rows.length, 3);
  for (const r of rows.slice(1)) assert.ok(r.split(',').slice(1).every((x) => Number.isFinite(Number(x)) && x !== ''), r);
});
