/**
 * @file The golden harness: for a fixture directory laid out like test/fixtures/sd-tiny (read its
 * README), load `model.safetensors`, compute every output tensor named in `golden.json` from the
 * inputs it names, and compare with `golden.safetensors` within each tensor's atol. Prompts,
 * timesteps, names, hypernetwork settings and head counts come from golden.json / config.json;
 * shapes, sizes and vector counts from the tensors themselves. Outputs are grouped by name prefix
 * (GROUPS): a group runs when golden.json lists one of its outputs, so a fixture without, say,
 * hypernetwork goldens needs no hypernetwork, and a new family adds a group. An output that no
 * group computes is reported NOT COMPUTED.
 *
 * Under bf16 precision (backend/precision.ts) the goldens are still PyTorch's float32 ones, and
 * bf16 is an approximation of them, so the rule is derived from each tensor's magnitude instead:
 * an output passes within max(atol, 1% of the golden's max |value|) (bf16 keeps 8 bits of
 * mantissa: one rounding is ≤ 0.4% of a value), a gradient (`*.grad.*`, `*.grad_*`) when its
 * cosine similarity to the golden is ≥ 0.995; a gradient golden.json notes as analytically zero
 * has no direction and must stay within 1% of the largest |golden| of its group's gradients.
 * The VAE and the text encoder's forward run float32 under bf16 too (nets/vae.ts, nets/clip.ts).
 * Under fp32 every tensor keeps its own atol, as before.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { tf, type Tensor } from './backend/tf.ts';
import { computePrecision } from './backend/precision.ts';
import { openSafetensors } from './io/safetensors.ts';
import type { TensorSource } from './io/types.ts';
import { loadSdModel, type SdModel } from './nets/sd.ts';
import { encodeText, encodeTextHidden, namedTextOutputs } from './nets/clip.ts';
import { unetForward } from './nets/unet.ts';
import { vaeEncode, samplePosterior, vaeDecode } from './nets/vae.ts';
import { hypernetForward, hypernetHook, hypernetSpecFromWebui, type HypernetworkSpec } from './nets/hypernet.ts';
import { paramToTorch, type Params } from './nets/params.ts';
import { denoisingLoss, type DiffusionBatch } from './train/diffusion-loss.ts';
import { textualInversionLoss } from './methods/textual-inversion.ts';
import { hypernetworkLoss } from './methods/hypernetwork.ts';
import { lossAndGrads } from './nets/recompute.ts';
import type { UNetMemory } from './memory/options.ts';
import { sdxlGoldens } from './golden-sdxl.ts';

export interface GoldenRow {
  name: string;
  /** max |ours − golden|; NaN when not computed. */
  maxAbsDiff: number;
  atol: number;
  /** Under bf16, a gradient's cosine similarity to the golden (it must be ≥ BF16_MIN_COSINE). */
  cosine?: number;
  pass: boolean;
  computed: boolean;
}

/** The bf16 rule (see the file comment). */
export const BF16_REL_TOL = 0.01;
export const BF16_MIN_COSINE = 0.995;

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
type Out = Map<string, Tensor>;

const nchw = (t: Tensor) => t.transpose([0, 3, 1, 2]);
const nhwc = (t: Tensor) => t.transpose([0, 2, 3, 1]);

interface Ctx {
  g: Json;
  inputs: TensorSource;
  model: SdModel;
  input(name: string): Promise<Tensor>;
  /** Gradient checkpointing / attention slicing for every UNet run (absent: whole). */
  memory?: UNetMemory;
  /** train_batch's latents, noise and timesteps (read once). */
  batch(): Promise<DiffusionBatch>;
  /** The frozen text encoder's context of train_batch.ids (computed once; train.context). */
  trainContext(): Tensor;
}

async function textGoldens(c: Ctx, out: Out): Promise<void> {
  const { params, cfg } = c.model.text!;
  const h = encodeTextHidden(params, cfg, c.g.text.ids);
  for (const [name, t] of namedTextOutputs(h)) out.set(name, t);
}

async function unetGoldens(c: Ctx, out: Out): Promise<void> {
  const { params, cfg } = c.model.unet!;
  const x = nhwc(await c.input(c.g.unet.inputs.x));
  const taps = new Map<string, Tensor>();
  out.set('unet.out', nchw(unetForward(params, cfg, x, c.g.unet.inputs.timesteps, await c.input(c.g.unet.inputs.context), { taps, memory: c.memory })));
  out.set('unet.t_emb', taps.get('t_emb')!).set('unet.emb', taps.get('emb')!);
}

async function vaeGoldens(c: Ctx, out: Out): Promise<void> {
  const { params, cfg } = c.model.vae!;
  const post = vaeEncode(params, cfg, nhwc(await c.input('vae.image')));
  const sample = samplePosterior(post, nhwc(await c.input('vae.sample_noise')));
  out.set('vae.posterior_mean', nchw(post.mean)).set('vae.posterior_logvar', nchw(post.logvar));
  out.set('vae.posterior_std', nchw(post.std)).set('vae.posterior_sample', nchw(sample));
  out.set('vae.latent_scaled_mean', nchw(post.mean.mul(cfg.scaleFactor)));
  out.set('vae.decoded', nchw(vaeDecode(params, cfg, nhwc(await c.input('vae.z_scaled')))));
}

function scheduleGoldens(c: Ctx, out: Out): void {
  const s = c.model.schedule;
  out.set('schedule.betas', tf.tensor(s.betas)).set('schedule.alphas_cumprod', tf.tensor(s.alphasCumprod));
  out.set('schedule.sqrt_alphas_cumprod', tf.tensor(s.sqrtAlphasCumprod));
  out.set('schedule.sqrt_one_minus_alphas_cumprod', tf.tensor(s.sqrtOneMinusAlphasCumprod));
}

async function trainBatch(c: Ctx): Promise<DiffusionBatch> {
  const tb = c.g.train_batch;
  return { latents: nhwc(await c.input(tb.x0)), noise: nhwc(await c.input(tb.noise)), timesteps: tb.timesteps };
}

async function trainGoldens(c: Ctx, out: Out): Promise<void> {
  const s = c.model.schedule;
  const batch = await c.batch();
  out.set('train.x_noisy', nchw(s.qSample(batch.latents, batch.noise, batch.timesteps)));
  out.set('train.target', nchw(s.targetFor(c.model.prediction, batch.latents, batch.noise, batch.timesteps)));
  out.set('train.context', c.trainContext().clone());
}

/** ft.*: every weight trainable; gradients of the named checkpoint keys, in checkpoint layout. */
async function fullModelGoldens(c: Ctx, out: Out): Promise<void> {
  const batch = await c.batch();
  const names: string[] = c.g.full_model_gradients.grads;
  const keys = names.map((n) => n.slice('ft.grad.'.length));
  const text = c.model.text!;
  const unet = c.model.unet!;
  const swap = (p: Params) => new Map([...p].map(([k, t]) => [k, keys.includes(k) ? tf.variable(t, true, `ft/${k}`) : t]));
  const textP = swap(text.params);
  const unetP = swap(unet.params);
  const vars = new Map<string, tf.Variable>();
  for (const k of keys) {
    const v = textP.get(k) ?? unetP.get(k);
    if (v instanceof tf.Variable) vars.set(k, v);
  }
  const { value, grads } = lossAndGrads(() => {
    const context = encodeText(textP, text.cfg, c.g.train_batch.ids);
    return denoisingLoss({ ...c.model, unet: { params: unetP, cfg: unet.cfg, memory: c.memory } }, batch, context);
  }, vars);
  out.set(c.g.full_model_gradients.loss, value);
  keys.forEach((k, i) => {
    const shape = text.params.get(k)?.shape ?? unet.params.get(k)?.shape;
    out.set(names[i]!, grads[k] ? paramToTorch(grads[k]) : tf.zeros(shape ?? [0]));
  });
  tf.dispose(Object.values(grads));
  vars.forEach((v) => v.dispose());
}

async function tiGoldens(c: Ctx, out: Out): Promise<void> {
  const batch = await c.batch();
  const ti = c.g.textual_inversion;
  const vectors = tf.variable(await c.input('ti.vectors'), true, 'golden/ti');
  const prompts = ti.ids.map((ids: number[], i: number) => ({ ids, embeddings: [{ name: ti.name, positions: ti.vector_positions[i] }] }));
  const vectorMap = new Map([[ti.name as string, vectors as Tensor]]);
  out.set('ti.context', encodeText(c.model.text!.params, c.model.text!.cfg, ti.ids, {
    splices: prompts.map((p: { embeddings: { positions: number[] }[] }, batchRow: number) => ({ batch: batchRow, positions: p.embeddings[0]!.positions, vectors })),
  }));
  const model = { ...c.model, unet: { ...c.model.unet!, memory: c.memory }, text: c.model.text! };
  const { value, grads } = lossAndGrads(() => textualInversionLoss(model, vectorMap, { ...batch, prompts }), new Map([['vectors', vectors]]));
  out.set('ti.loss', value).set('ti.grad_vectors', grads.vectors!);
  vectors.dispose();
}

/**
 * The input a hypernetwork module of `size` is applied to for its golden: golden.json says it in
 * the desc of hn.k_out.<size> / hn.v_out.<size> ("… x = <input>"), e.g. unet.context for the
 * context width and hn.in.<size> for a size the context does not have.
 */
function moduleInput(g: Json, size: number): string {
  for (const key of [`hn.k_out.${size}`, `hn.v_out.${size}`]) {
    const name = /\bx = ([\w.]+)/.exec(String(g.tensors[key]?.desc ?? ''))?.[1];
    if (!name) continue;
    if (g.tensors[name]?.kind !== 'input') throw new Error(`golden.json: ${key} is computed from '${name}', which is not an input tensor`);
    return name;
  }
  throw new Error(`golden.json: hn.k_out.${size} does not name its input ("x = <tensor>" in its desc)`);
}

async function hnGoldens(c: Ctx, out: Out): Promise<void> {
  const h = c.g.hypernetwork;
  const batch = await c.batch();
  const context = c.trainContext();
  const spec: HypernetworkSpec = hypernetSpecFromWebui(
    { layer_structure: h.layer_structure, activation_func: h.activation_func, is_layer_norm: h.add_layer_norm,
      use_dropout: h.use_dropout, activate_output: h.activate_output, weight_initialization: h.weight_init },
    h.enable_sizes,
  );
  const params: Params = new Map();
  for (const name of h.state_tensors as string[]) params.set(name.slice('hn.'.length), tf.variable(await c.input(name), true, `golden/${name}`));
  for (const size of spec.sizes) {
    if (!c.g.tensors[`hn.k_out.${size}`] && !c.g.tensors[`hn.v_out.${size}`]) continue;
    const x = await c.input(moduleInput(c.g, size));
    out.set(`hn.k_out.${size}`, hypernetForward(params, spec, size, 'k', x));
    out.set(`hn.v_out.${size}`, hypernetForward(params, spec, size, 'v', x));
    x.dispose();
  }
  const unetContext = await c.input(c.g.unet.inputs.context);
  const hnModel = { ...c.model, unet: { ...c.model.unet!, memory: c.memory }, hypernetwork: { params, spec } };
  const { params: up, cfg } = c.model.unet!;
  const x = nhwc(await c.input(c.g.unet.inputs.x));
  out.set('hn.unet_out', nchw(unetForward(up, cfg, x, c.g.unet.inputs.timesteps, unetContext, { hooks: { kv: hypernetHook(params, spec) }, memory: c.memory })));
  const vars = params as Map<string, tf.Variable>;
  const { value, grads } = lossAndGrads(() => hypernetworkLoss(hnModel, batch, context), vars);
  out.set('hn.loss', value);
  // a module the UNet never applies (no context or block of its width) is on no path: its gradient is zero
  for (const [key, p] of params) out.set(`hn.grad.${key}`, grads[key] ?? tf.zerosLike(p));
  vars.forEach((v) => v.dispose());
}

/** The output groups by name prefix (see the file comment). */
const GROUPS: { prefix: string; run: (c: Ctx, out: Out) => Promise<void> | void }[] = [
  { prefix: 'text.', run: textGoldens },
  { prefix: 'unet.', run: unetGoldens },
  { prefix: 'vae.', run: vaeGoldens },
  { prefix: 'schedule.', run: scheduleGoldens },
  { prefix: 'train.', run: trainGoldens },
  { prefix: 'ft.', run: fullModelGoldens },
  { prefix: 'ti.', run: tiGoldens },
  { prefix: 'hn.', run: hnGoldens },
];

/** Compute every golden output of `dir` and compare; one row per golden output tensor (`memory`: with checkpointing/slicing). */
export async function runGolden(dir: string, opts: { memory?: UNetMemory } = {}): Promise<GoldenRow[]> {
  for (const file of ['golden.json', 'golden.safetensors', 'model.safetensors']) {
    if (!existsSync(join(dir, file))) throw new Error(`${dir} is not a golden fixture: it has no ${file} (see test/fixtures/sd-tiny/README.md)`);
  }
  const g = JSON.parse(readFileSync(join(dir, 'golden.json'), 'utf8')) as Json;
  const inputs = await openSafetensors(join(dir, 'golden.safetensors'));
  const model = await loadSdModel(join(dir, 'model.safetensors'), ['text', 'unet', 'vae-encoder', 'vae-decoder'], {}, { xl: true });
  const input = async (name: string) => {
    const { shape } = inputs.info(name);
    return tf.tensor(await inputs.read(name), shape);
  };
  let batch: DiffusionBatch | undefined;
  let trainContext: Tensor | undefined;
  const c: Ctx = {
    g, inputs, model, input, memory: opts.memory,
    batch: async () => (batch ??= await trainBatch(c)),
    trainContext: () => (trainContext ??= encodeText(model.text!.params, model.text!.cfg, g.train_batch.ids)),
  };
  const out: Out = new Map();
  const outputs = Object.entries(g.tensors as Record<string, Json>).filter(([, meta]) => meta.kind === 'output').map(([name]) => name);
  try {
    if (model.family === 'sdxl') {
      // the SDXL part lives in golden-sdxl.ts; the VAE is the same network
      await vaeGoldens(c, out);
      await sdxlGoldens(c, out);
      return await compare(g, inputs, out, computePrecision() === 'bf16');
    }
    for (const group of GROUPS) if (outputs.some((name) => name.startsWith(group.prefix))) await group.run(c, out);
    return await compare(g, inputs, out, computePrecision() === 'bf16');
  } finally {
    tf.dispose([...out.values()]);
    if (batch) tf.dispose([batch.latents, batch.noise]);
    trainContext?.dispose();
    await inputs.close();
    await model.source.close();
  }
}

async function compare(g: Json, inputs: TensorSource, out: Out, bf16: boolean): Promise<GoldenRow[]> {
  const rows: GoldenRow[] = [];
  // largest golden |value| of each group's gradients (`hn.grad`, `ft.grad`, …): the scale an
  // analytically zero gradient is measured against under bf16
  const gradScale = new Map<string, number>();
  for (const [name, meta] of Object.entries(g.tensors as Record<string, Json>)) {
    const group = /^([^.]+\.grad)/.exec(name)?.[1];
    if (meta.kind === 'output' && group) gradScale.set(group, Math.max(gradScale.get(group) ?? 0, (meta.max_abs as number) ?? 0));
  }
  for (const [name, meta] of Object.entries(g.tensors as Record<string, Json>)) {
    if (meta.kind !== 'output') continue;
    const ours = out.get(name);
    let atol = meta.atol as number;
    if (!ours) {
      rows.push({ name, maxAbsDiff: NaN, atol, pass: false, computed: false });
      continue;
    }
    const want = await inputs.read(name);
    const got = await ours.data();
    let max = got.length === want.length ? 0 : Infinity;
    for (let i = 0; i < want.length && max !== Infinity; i++) {
      const d = Math.abs(got[i]! - want[i]!);
      if (!(d <= max)) max = Number.isNaN(d) ? Infinity : d;
    }
    if (!bf16) {
      rows.push({ name, maxAbsDiff: max, atol, pass: max <= atol, computed: true });
      continue;
    }
    let dot = 0, gg = 0, oo = 0, scale = 0;
    for (let i = 0; i < want.length; i++) {
      dot += got[i]! * want[i]!;
      gg += want[i]! * want[i]!;
      oo += got[i]! * got[i]!;
      scale = Math.max(scale, Math.abs(want[i]!));
    }
    if (/(^|[._])grad[._]/.test(name)) {
      const cosine = gg === 0 && oo === 0 ? 1 : dot / Math.sqrt(gg * oo);
      if (meta.note === 'analytically zero') {
        // zero but for rounding (a key bias's, by softmax's shift invariance): no direction to
        // compare, so it must stay within 1% of its group's largest gradient
        atol = Math.max(atol, BF16_REL_TOL * (gradScale.get(/^([^.]+\.grad)/.exec(name)?.[1] ?? '') ?? 0));
        rows.push({ name, maxAbsDiff: max, atol, pass: max <= atol, computed: true });
      } else {
        rows.push({ name, maxAbsDiff: max, atol, cosine, pass: max !== Infinity && cosine >= BF16_MIN_COSINE, computed: true });
      }
    } else {
      atol = Math.max(atol, BF16_REL_TOL * scale);
      rows.push({ name, maxAbsDiff: max, atol, pass: max <= atol, computed: true });
    }
  }
  return rows;
}
