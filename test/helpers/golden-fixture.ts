/**
 * @file A second, differently shaped golden fixture, built in the test from test/fixtures/sd-tiny:
 * its model and every golden as shipped, plus a hypernetwork module pair of a second size that is
 * neither the context width nor any channel count of the tiny UNet (sd-tiny: context 32, channels
 * 32/64), listed FIRST — the case that made the harness apply every size's module to unet.context.
 * Where its goldens come from, without PyTorch:
 * - hn.k_out.<size> / hn.v_out.<size>: the module applied to a new input hn.in.<size> by an
 *   independent float64 reference of webui's HypernetworkModule (referenceModule), which the test
 *   first checks against sd-tiny's own PyTorch goldens for size 32;
 * - hn.grad.<size>.*: exactly zero — the webui applies a module only where the context (or, in
 *   self-attention, the block input) has its width, and the tiny UNet has that width nowhere;
 * - hn.unet_out, hn.loss and the size-32 gradients: sd-tiny's PyTorch goldens, unchanged (the
 *   extra pair is on no path).
 */
import { copyFileSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { openSafetensors, writeSafetensors, type TensorToWrite } from '../../trainers/io/safetensors.ts';

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

/** Deterministic uniform [-scale, scale) values (a small LCG). */
function values(n: number, seed: number, scale: number): Float32Array {
  let s = seed >>> 0;
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    v[i] = (s / 2 ** 31 - 1) * scale;
  }
  return v;
}

/** webui activation 'swish' is torch.nn.Hardswish: x·relu6(x + 3)/6. */
const hardswish = (x: number) => (x * Math.min(Math.max(x + 3, 0), 6)) / 6;

/**
 * webui HypernetworkModule.forward for layer structure [1, m, 1] with 'swish', no LayerNorm,
 * no dropout, linear output: y = x + W2·act(W1·x + b1) + b2 on the last axis, in float64.
 * `w1` [m·size, size], `w2` [size, m·size] row-major (torch Linear layout).
 */
export function referenceModule(x: Float32Array, size: number, w1: Float32Array, b1: Float32Array, w2: Float32Array, b2: Float32Array): Float32Array {
  const hidden = b1.length;
  const y = new Float32Array(x.length);
  const h = new Float64Array(hidden);
  for (let r = 0; r < x.length / size; r++) {
    const xr = x.subarray(r * size, (r + 1) * size);
    for (let j = 0; j < hidden; j++) {
      let acc = b1[j]!;
      for (let i = 0; i < size; i++) acc += w1[j * size + i]! * xr[i]!;
      h[j] = hardswish(acc);
    }
    for (let o = 0; o < size; o++) {
      let acc = b2[o]!;
      for (let j = 0; j < hidden; j++) acc += w2[o * hidden + j]! * h[j]!;
      y[r * size + o] = xr[o]! + acc;
    }
  }
  return y;
}

/** What referenceModule covers; the builder refuses any other hypernetwork rather than guess. */
export function checkReferenceCovers(h: Json): void {
  const [first, , last, ...more] = h.layer_structure as number[];
  const ok = h.activation_func === 'swish' && !h.add_layer_norm && !h.use_dropout && !h.activate_output && first === 1 && last === 1 && more.length === 0;
  if (!ok) throw new Error(`the reference module covers layer structure [1, m, 1] with swish only, not ${JSON.stringify(h.layer_structure)} ${h.activation_func}`);
}

/** The module tensors of `size` as the fixture names them: {k: [w1, b1, w2, b2], v: …}. */
function moduleNames(h: Json, size: number): Record<'k' | 'v', string[]> {
  const pick = (kv: string) => (h.state_tensors as string[]).filter((n) => n.startsWith(`hn.${h.enable_sizes[0]}.${kv}.`)).map((n) => n.replace(`hn.${h.enable_sizes[0]}.`, `hn.${size}.`));
  return { k: pick('k'), v: pick('v') };
}

/**
 * Write the fixture into `dir` from `source` (a fixture with one hypernetwork size: sd-tiny):
 * model.safetensors (a link), config.json, golden.json and golden.safetensors with `size` added.
 */
export async function buildTwoSizeFixture(source: string, dir: string, size: number): Promise<void> {
  const g = JSON.parse(readFileSync(join(source, 'golden.json'), 'utf8')) as Json;
  const h = g.hypernetwork as Json;
  checkReferenceCovers(h);
  const [old] = h.enable_sizes as number[];
  const file = await openSafetensors(join(source, 'golden.safetensors'));
  const tensors: TensorToWrite[] = [];
  try {
    for (const name of file.keys()) tensors.push({ name, dtype: 'F32', shape: file.info(name).shape, data: await file.read(name) });
  } finally {
    await file.close();
  }
  const add = (name: string, shape: number[], data: Float32Array, meta: Json) => {
    tensors.push({ name, dtype: 'F32', shape, data });
    g.tensors[name] = { ...meta, shape, dtype: 'float32' };
  };
  const names = moduleNames(h, size);
  const scaled = (shape: number[]) => shape.map((d) => (d / old!) * size); // every module dim is a multiple of the size
  const inputShape = [...(g.tensors[`hn.k_out.${old}`].shape as number[]).slice(0, -1), size];
  const xIn = values(inputShape.reduce((a, b) => a * b, 1), 7, 1.5);
  add(`hn.in.${size}`, inputShape, xIn, { kind: 'input', desc: `input of the size-${size} modules (no context of the tiny UNet has this width)` });
  let seed = 100;
  for (const kv of ['k', 'v'] as const) {
    const w: Float32Array[] = [];
    for (const name of names[kv]) {
      const shape = scaled(g.tensors[name.replace(`hn.${size}.`, `hn.${old}.`)].shape);
      const data = values(shape.reduce((a, b) => a * b, 1), seed++, 0.3);
      w.push(data);
      add(name, shape, data, { kind: 'input', desc: `HypernetworkModule (${kv}) for size ${size}: ${name.split('.').slice(3).join('.')}` });
      const grad = `hn.grad.${name.slice('hn.'.length)}`;
      add(grad, shape, new Float32Array(data.length), { kind: 'output', atol: g.tensors[grad.replace(`hn.grad.${size}.`, `hn.grad.${old}.`)].atol, desc: `d hn.loss / d ${name.slice(3)}: 0, the size is no width of the UNet` });
    }
    const out = referenceModule(xIn, size, w[0]!, w[1]!, w[2]!, w[3]!);
    add(`hn.${kv}_out.${size}`, inputShape, out, { kind: 'output', atol: g.tensors[`hn.${kv}_out.${old}`].atol, desc: `module_${kv}(x) = x + linear(x) for size ${size}; x = hn.in.${size}` });
  }
  h.enable_sizes = [size, old];
  h.state_tensors = [...names.k, ...names.v, ...h.state_tensors];
  writeFileSync(join(dir, 'golden.json'), JSON.stringify(g, null, 1));
  await writeSafetensors(join(dir, 'golden.safetensors'), tensors);
  symlinkSync(resolve(source, 'model.safetensors'), join(dir, 'model.safetensors'));
  copyFileSync(join(source, 'config.json'), join(dir, 'config.json'));
}
