/**
 * @file Frozen weights in float16 (trainers/nets/half-params.ts, native/src/half.cc): the
 * converters bit-exact against independent references on every half and on random floats
 * (native, when built, and the pure-JS fallback), the float16 store (layout, laziness, what
 * stays float32), and the tiny UNet with half weights equal — exactly — to the UNet with its
 * weights rounded to float16 and upcast, forward and gradient, with no leaked tensors.
 */
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { initBackend, tf, type Tensor } from '../trainers/backend/index.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { floatToHalfBits, halfBitsToFloat } from '../trainers/io/half.ts';
import { loadAddon } from '../trainers/backend/native/addon.ts';
import { nativeSkip } from './helpers/native.ts';
import { disposeParams, loadParams, type Params } from '../trainers/nets/params.ts';
import { loadUnet, unetForward, type UNetConfig } from '../trainers/nets/unet.ts';
import { createLora, disposeLora, loraTargets, withLora } from '../trainers/nets/lora.ts';
import { shapesOf } from '../trainers/nets/sd.ts';
import {
  HalfParams, HalfTensor, float32ToHalfJs, halfConverter, halfFrozen, halfToFloat32Js,
  loadHalfParams, loadUnetHalf, overlayParams, bf16ToFloat32, float32ToBf16,
} from '../trainers/nets/half-params.ts';
import { bf16BitsToFloat, floatToBf16Bits } from '../trainers/io/half.ts';

const DIR = 'test/fixtures/sd-tiny';

before(async () => {
  await initBackend();
});

/** The native converters if the addon is built (with half.cc), else none: the JS ones are always tested. */
function converters() {
  const list = [{ name: 'js', toFloat: halfToFloat32Js, toHalf: float32ToHalfJs }];
  try {
    const a = loadAddon();
    list.push({
      name: `native-${a.halfIsa()}`,
      toFloat: (b: Uint16Array, out = new Float32Array(b.length)) => (a.halfToFloat(b, out), out),
      toHalf: (v: Float32Array, out = new Uint16Array(v.length)) => ({ bits: out, overflow: a.floatToHalf(v, out) }),
    });
  } catch (err) {
    nativeSkip((err as Error).message); // throws under SIDETRAIN_REQUIRE_NATIVE=1; else the JS ones are still tested
  }
  return list;
}

/** Why the native-vs-JS comparison cannot run (false when it can). */
const nativeConvertersSkip = nativeSkip(converters().length < 2 ? 'native half converters not available (addon not built)' : false);

const ALL_HALVES = Uint16Array.from({ length: 65536 }, (_, i) => i);
const isNanHalf = (h: number) => (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0;

/** Independent float32 bits of a half: io/half.ts's value, or the quieted NaN with its payload. */
function refFloatBits(h: number): number {
  if (isNanHalf(h)) return ((h & 0x8000) << 16 | 0x7fc00000 | ((h & 0x3ff) << 13)) >>> 0;
  const f = new Float32Array([halfBitsToFloat(h)]);
  return new Uint32Array(f.buffer)[0]!;
}

/** Random float32 bit patterns (every class: NaN, Inf, subnormal) plus values around float16's range and ties. */
function randomFloats(n: number): Float32Array {
  const bits = new Uint32Array(n);
  let s = 0x12345678;
  const next = () => ((s ^= s << 13), (s ^= s >>> 17), (s ^= s << 5), s >>> 0);
  for (let i = 0; i < n; i++) bits[i] = next();
  const f = new Float32Array(bits.buffer);
  for (let i = 0; i < n / 2; i++) f[i] = (next() / 2 ** 32 - 0.5) * 2 ** ((next() % 44) - 28); // 2^-29 .. 2^15
  for (let i = 0; i < 4096; i++) f[n / 2 + i] = (halfBitsToFloat(i * 16) + halfBitsToFloat(i * 16 + 1)) / 2; // ties
  f.set([65504, 65519.99, 65520, -65520, 1e6, 2 ** -25, 2 ** -24 * 1.5, 3 * 2 ** -26], n / 2 + 4096);
  return f;
}

test('float16 → float32 is bit-exact on all 65536 halves (subnormals, ±0, ±Inf, NaN payloads)', () => {
  const ref = Uint32Array.from(ALL_HALVES, refFloatBits);
  for (const c of converters()) {
    const got = new Uint32Array(c.toFloat(ALL_HALVES).buffer);
    const bad = ref.findIndex((r, i) => got[i] !== r);
    assert.equal(bad, -1, `${c.name}: half 0x${bad.toString(16)} → 0x${got[bad]?.toString(16)}, expected 0x${ref[bad]?.toString(16)}`);
  }
});

test('float32 → float16 rounds to nearest even like the reference, round-trips every half, counts overflows', () => {
  for (const c of converters()) {
    const back = c.toHalf(c.toFloat(ALL_HALVES)).bits; // NaNs come back quiet
    assert.equal(back.findIndex((h, i) => h !== (isNanHalf(i) ? i | 0x200 : i)), -1, `${c.name}: round trip`);
    const values = randomFloats(1 << 18);
    const { bits, overflow } = c.toHalf(values);
    const x32 = new Uint32Array(values.buffer);
    let expectOverflow = 0;
    for (let i = 0; i < values.length; i++) {
      const v = values[i]!;
      const nan = Number.isNaN(v);
      const want = nan ? ((x32[i]! >>> 16) & 0x8000) | 0x7e00 | ((x32[i]! & 0x7fffff) >>> 13) : floatToHalfBits(v);
      if (Number.isFinite(v) && (want & 0x7fff) === 0x7c00) expectOverflow++;
      assert.equal(bits[i], want, `${c.name}: ${v} (0x${x32[i]!.toString(16)}) → 0x${bits[i]!.toString(16)}, expected 0x${want.toString(16)}`);
    }
    assert.equal(overflow, expectOverflow, `${c.name}: overflow count`);
    assert.ok(expectOverflow > 2);
  }
  assert.match(halfConverter(), /^(f16c|portable|js)$/);
});

test('native and JS converters agree on large arrays (threaded chunks and tails)', { skip: nativeConvertersSkip }, () => {
  const c = converters();
  const values = randomFloats(300_001 - 1); // not a multiple of the chunk or the vector width
  const [js, nat] = [c[0]!.toHalf(values), c[1]!.toHalf(values)];
  assert.deepEqual(nat.bits, js.bits);
  assert.equal(nat.overflow, js.overflow);
  assert.deepEqual(new Uint32Array(c[1]!.toFloat(js.bits).buffer), new Uint32Array(c[0]!.toFloat(js.bits).buffer));
});

/** Params with every float32 value rounded to float16 and back (the reference for the half store). */
async function roundedCopy(params: Params): Promise<Params> {
  const out: Params = new Map();
  for (const [k, t] of params) out.set(k, tf.tensor(halfToFloat32Js(float32ToHalfJs((await t.data()) as Float32Array).bits), t.shape));
  return out;
}

function unetInputs(cfg: UNetConfig) {
  return {
    x: tf.randomNormal([2, 8, 8, cfg.inChannels], 0, 1, 'float32', 3),
    context: tf.randomNormal([2, 5, cfg.contextDim], 0, 1, 'float32', 4),
  };
}

async function assertSame(a: Tensor, b: Tensor, what: string) {
  assert.deepEqual(a.shape, b.shape, what);
  const [x, y] = [await a.data(), await b.data()];
  const bad = x.findIndex((v, i) => !Object.is(v, y[i]));
  assert.equal(bad, -1, `${what}: element ${bad}: ${x[bad]} vs ${y[bad]}`);
}

test('the tiny UNet with float16 frozen weights equals the UNet with weights rounded to float16 (exact), no leaks', async () => {
  const src = await openSafetensors(`${DIR}/model.safetensors`);
  const start = tf.memory().numTensors;
  const { params, cfg } = await loadUnet(src);
  const rounded = await roundedCopy(params);
  const loaded = tf.memory().numTensors;
  const half = await halfFrozen(params);
  assert.equal(params.size, 0, 'the float32 map is emptied');
  assert.equal(tf.memory().numTensors, loaded - rounded.size, 'the float32 originals are disposed');
  assert.equal(half.size, rounded.size);
  assert.deepEqual([...half.keys()], [...rounded.keys()], 'same keys, same order');
  assert.equal(half.report().floatTensors, 0);

  const { x, context } = unetInputs(cfg);
  const want = unetForward(rounded, cfg, x, [10, 700], context);
  const n0 = tf.memory().numTensors;
  const got = unetForward(half, cfg, x, [10, 700], context);
  assert.equal(tf.memory().numTensors, n0 + 1, 'a forward leaves only its output (every upcast weight freed)');
  await assertSame(got, want, 'unet out');

  // the fp16 file's own bits (raw read, conv filters transposed as bits) give the same model
  const src16 = await openSafetensors(`${DIR}/model-fp16.safetensors`);
  const fromFile = await loadUnetHalf(src16);
  assert.equal(fromFile.params.report().floatTensors, 0);
  const got16 = unetForward(fromFile.params, cfg, x, [10, 700], context);
  await assertSame(got16, want, 'unet out from the F16 file');
  tf.dispose([x, context, want, got, got16]);
  disposeParams(rounded);
  half.dispose();
  fromFile.params.dispose();
  await src.close();
  await src16.close();
  assert.equal(tf.memory().numTensors, start, 'nothing left');
});

test('gradients through float16 frozen weights: trainable keys stay variables; grads equal the rounded model\'s', async () => {
  const src = await openSafetensors(`${DIR}/model.safetensors`);
  const { params, cfg } = await loadUnet(src);
  const rounded = await roundedCopy(params);
  const trainKey = `${cfg.prefix}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`;
  assert.ok(params.has(trainKey));
  const v = tf.variable(rounded.get(trainKey)!.clone(), true);
  params.get(trainKey)!.dispose();
  params.set(trainKey, v);
  const half = await halfFrozen(params, (k) => k === trainKey);
  assert.equal(half.get(trainKey), v, 'the variable itself, not a copy');
  assert.equal(half.report().floatTensors, 1);
  const { x, context } = unetInputs(cfg);
  const start = tf.memory().numTensors;
  const lossOf = (p: Params) => () => unetForward(p, cfg, x, [10, 700], context).square().mean() as tf.Scalar;
  const g1 = tf.variableGrads(lossOf(half), [v]);
  const g0 = tf.variableGrads(lossOf(new Map([...rounded].map(([k, t]) => [k, k === trainKey ? v : t]))), [v]);
  await assertSame(g1.value, g0.value, 'loss');
  await assertSame(g1.grads[v.name]!, g0.grads[v.name]!, 'grad');
  tf.dispose([g1.value, g0.value, g1.grads[v.name]!, g0.grads[v.name]!]);
  assert.equal(tf.memory().numTensors, start, 'backward keeps no upcast weight');
  tf.dispose([x, context, v]);
  disposeParams(rounded);
  half.dispose();
  await src.close();
});

test('the store: iteration materialises lazily, set/delete/has/keys, overflowing tensors stay float32', async () => {
  const p: Params = new Map([
    ['a.weight', tf.tensor2d([[1, 2.0001], [3, -4]])],
    ['big.weight', tf.tensor1d([1e6, 1])], // beyond ±65504: float16 would make it Inf
    ['conv.weight', tf.ones([3, 3, 2, 4])],
  ]);
  const n = tf.memory().numTensors;
  const half = await halfFrozen(p);
  assert.ok(half instanceof Map && half instanceof HalfParams);
  assert.deepEqual([...half.keys()], ['a.weight', 'big.weight', 'conv.weight']);
  assert.equal(half.isHalf('big.weight'), false);
  assert.equal(half.isHalf('conv.weight'), true);
  assert.equal(tf.memory().numTensors, n - 2);
  const seen: string[] = [];
  for (const [k, t] of half) {
    seen.push(k);
    assert.equal(tf.memory().numTensors, n - 2 + (half.isHalf(k) ? 1 : 0), 'one tensor at a time');
    if (half.isHalf(k)) t.dispose();
  }
  assert.deepEqual(seen, ['a.weight', 'big.weight', 'conv.weight']);
  const a = tf.tidy(() => half.get('a.weight')!.add(0));
  assert.deepEqual(await a.data(), new Float32Array([1, 2, 3, -4])); // 2.0001 rounds to 2 in float16
  const conv = half.get('conv.weight')!;
  assert.deepEqual(conv.shape, [3, 3, 2, 4]);
  assert.notEqual(half.get('conv.weight'), conv, 'a fresh tensor per read'); // (that one is left to the test's end)
  tf.dispose([a, conv]);
  assert.ok(half.delete('a.weight') && !half.has('a.weight') && half.size === 2);
  const raw = half.raw('conv.weight');
  assert.ok(raw instanceof HalfTensor && raw.bits.length === 72);
  half.dispose();
  assert.equal(half.size, 0);
});

test('loadHalfParams: F16 file bits and a float32 file give the same layout and values as loadParams, keep() stays float32', async () => {
  const src = await openSafetensors(`${DIR}/model-fp16.safetensors`);
  const ref = await loadParams(src, ['model.diffusion_model.']);
  const keepKey = 'model.diffusion_model.out.2.weight';
  const src32 = await openSafetensors(`${DIR}/model.safetensors`); // read as float32, rounded here
  for (const source of [src, src32]) {
    const half = await loadHalfParams(source, ['model.diffusion_model.'], (k) => k === keepKey);
    assert.deepEqual([...half.keys()], [...ref.keys()]);
    assert.equal(half.isHalf(keepKey), false);
    assert.equal(half.report().floatTensors, 1);
    for (const [k, t] of ref) {
      const got = half.get(k)!;
      if (k === keepKey && source === src32) continue; // kept float32: not rounded
      await assertSame(got, t, `${source.path}: ${k}`);
      if (half.isHalf(k)) got.dispose();
    }
    half.dispose();
  }
  disposeParams(ref);
  await src.close();
  await src32.close();
});

test('overlayParams: a view over a float16 base materialises nothing until read; overrides win', async () => {
  const half = await halfFrozen(new Map([['a', tf.tensor1d([1, 2])], ['b', tf.tensor1d([3])]]));
  const b2 = tf.tensor1d([30]);
  const c = tf.tensor1d([40]);
  const n = tf.memory().numTensors;
  const view = overlayParams(half, new Map([['b', b2], ['c', c]]));
  assert.equal(tf.memory().numTensors, n);
  assert.deepEqual([...view.keys()], ['a', 'b', 'c']);
  assert.equal(view.size, 3);
  assert.ok(view.has('a') && view.has('c') && !view.has('d'));
  assert.equal(view.get('b'), b2);
  const a = view.get('a')!;
  assert.deepEqual(await a.data(), new Float32Array([1, 2]));
  assert.equal(tf.memory().numTensors, n + 1);
  const d = tf.scalar(1);
  view.set('d', d);
  assert.equal(view.get('d'), d);
  assert.equal(half.has('d'), false, 'the base is not written');
  assert.throws(() => view.delete('a'));
  tf.dispose([a, b2, c, d]);
  half.dispose();
});

test('LoRA over a float16 UNet (the lazy withLora view): loss and adapter gradients equal the rounded model\'s', async () => {
  const src = await openSafetensors(`${DIR}/model.safetensors`);
  const { params, cfg } = await loadUnet(src);
  const rounded = await roundedCopy(params);
  const half = await halfFrozen(params);
  const net = createLora(loraTargets(shapesOf(src), ['attn', 'resnet']), { rank: 2, alpha: 1, seed: 5 });
  const vars = [...net.weights.values()];
  // lora_up starts at zero (no gradient for lora_down then): nudge it so both get gradients
  for (const v of vars) v.assign(tf.tidy(() => v.add(tf.randomNormal(v.shape, 0, 0.01, 'float32', 9))));
  const { x, context } = unetInputs(cfg);
  const start = tf.memory().numTensors;
  const lossOf = (p: Params) => () => unetForward(withLora(p, net), cfg, x, [10, 700], context).square().mean() as tf.Scalar;
  const g1 = tf.variableGrads(lossOf(half), vars);
  const g0 = tf.variableGrads(lossOf(rounded), vars);
  await assertSame(g1.value, g0.value, 'loss');
  for (const v of vars) await assertSame(g1.grads[v.name]!, g0.grads[v.name]!, v.name);
  tf.dispose([g1.value, g0.value, ...Object.values(g1.grads), ...Object.values(g0.grads)]);
  assert.equal(tf.memory().numTensors, start, 'no upcast weight outlives the step');
  tf.dispose([x, context]);
  disposeLora(net);
  disposeParams(rounded);
  half.dispose();
  await src.close();
});

test('bfloat16 store (bf16 precision): array converters equal io/half.ts; the tiny UNet from it equals the bf16-rounded UNet exactly', async () => {
  const probe = Float32Array.from([0, -0, 1, -1.00390625, 3.14159, 1e-40, -1e-45, 65504, 1e38, 3.4e38, Infinity, -Infinity, NaN, 1.0039062, 1.01171875]);
  const bits = float32ToBf16(probe);
  for (let i = 0; i < probe.length; i++) assert.equal(bits[i], floatToBf16Bits(probe[i]!), `bits of ${probe[i]}`);
  const back = bf16ToFloat32(bits);
  for (let i = 0; i < probe.length; i++) assert.ok(Object.is(back[i], bf16BitsToFloat(bits[i]!)) || Number.isNaN(back[i]!), `value of ${probe[i]}`);

  const src = await openSafetensors(`${DIR}/model.safetensors`);
  const start = tf.memory().numTensors;
  const { params, cfg } = await loadUnet(src);
  const rounded: Params = new Map();
  for (const [k, t] of params) rounded.set(k, tf.tensor(bf16ToFloat32(float32ToBf16((await t.data()) as Float32Array)), t.shape));
  const half = await halfFrozen(params, undefined, 'bf16');
  assert.equal(half.report().floatTensors, 0, 'nothing stays float32: bf16 cannot overflow');
  const { x, context } = unetInputs(cfg);
  const want = unetForward(rounded, cfg, x, [10, 700], context);
  const got = unetForward(half, cfg, x, [10, 700], context);
  await assertSame(got, want, 'unet out (bf16 store)');
  // loading straight into the bf16 store gives the same weights
  const loaded = await loadUnetHalf(src, {}, undefined, 'bf16');
  const got2 = unetForward(loaded.params, cfg, x, [10, 700], context);
  await assertSame(got2, want, 'unet out (loadUnetHalf bf16)');
  tf.dispose([x, context, want, got, got2]);
  disposeParams(rounded);
  half.dispose();
  loaded.params.dispose();
  await src.close();
  assert.equal(tf.memory().numTensors, start, 'nothing left');
});
