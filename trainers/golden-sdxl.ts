/**
 * @file The SDXL part of the golden harness (a fixture laid out like test/fixtures/sdxl-tiny;
 * read its README): both text encoders, the conditioner's crossattn/vector, the sgm UNet with
 * label_emb, the sigma-space denoiser, sgm's loss and its gradients with every weight trainable,
 * and Textual Inversion with `clip_l` + `clip_g` vectors through the trainer's own loss. Prompts,
 * ids, sizes, timesteps, gradient names and vector positions come from golden.json alone.
 */
import { tf, type Tensor } from './backend/tf.ts';
import type { SdModel } from './nets/sd.ts';
import { encodeTextHidden } from './nets/clip.ts';
import { encodeOpenClip } from './nets/open-clip.ts';
import { encodeSdxlText, sizeEmbeddings, vectorConditioning, type SdxlText, type SizeCond } from './nets/sdxl-conditioner.ts';
import { unetForward } from './nets/unet.ts';
import { paramToTorch, type Params } from './nets/params.ts';
import { lossAndGrads } from './nets/recompute.ts';
import type { UNetMemory } from './memory/options.ts';
import { sgmDenoise, sgmLoss, sgmNoised, sigmaToTimestep } from './train/sgm-loss.ts';
import type { DiffusionBatch } from './train/diffusion-loss.ts';
import { xlTextualInversionLoss, xlTiConditioning, type XlTiModel } from './methods/textual-inversion-xl.ts';

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
type Out = Map<string, Tensor>;

const nchw = (t: Tensor) => t.transpose([0, 3, 1, 2]);
const nhwc = (t: Tensor) => t.transpose([0, 2, 3, 1]);

export interface XlCtx {
  g: Json;
  model: SdModel;
  input(name: string): Promise<Tensor>;
  memory?: UNetMemory;
}

/** golden.json vector_conditioning.inputs → one SizeCond per batch row. */
function sizesOf(g: Json): SizeCond[] {
  const v = g.vector_conditioning.inputs;
  return (v.original_size_as_tuple as [number, number][]).map((original, i) => ({
    original, crop: v.crop_coords_top_left[i], target: v.target_size_as_tuple[i],
  }));
}

function textGoldens(c: XlCtx, text: SdxlText, out: Out): void {
  const { ids_clip_l: idsL, ids_clip_g: idsG } = c.g.text;
  const hl = encodeTextHidden(text.params, text.cfg.l, idsL);
  out.set('text_l.embeddings', hl.embeddings).set('text_l.penultimate', hl.context);
  hl.hidden.forEach((t, i) => out.set(`text_l.hidden.${i + 1}`, t));
  tf.dispose([hl.lastHiddenState, hl.penultimateLn]);
  const hg = encodeTextHidden(text.params, text.cfg.g, idsG);
  out.set('text_g.embeddings', hg.embeddings);
  tf.dispose([...hg.hidden, hg.lastHiddenState, hg.penultimateLn, hg.context]);
  const g = encodeOpenClip(text.params, text.cfg.g, idsG);
  out.set('text_g.penultimate', g.penultimate).set('text_g.last', g.last).set('text_g.pooled', g.pooled);
  const cond = encodeSdxlText(text, idsL, idsG);
  const adm = c.model.unet!.cfg.admInChannels;
  out.set('cond.crossattn', cond.crossattn).set('cond.vector', vectorConditioning(cond.pooled, sizesOf(c.g), adm));
  out.set('cond.size_embeddings', sizeEmbeddings(sizesOf(c.g), (adm - text.cfg.pooledDim) / 6));
  cond.pooled.dispose();
}

async function unetGoldens(c: XlCtx, out: Out): Promise<void> {
  const { params, cfg } = c.model.unet!;
  const inp = c.g.unet.inputs;
  const x = nhwc(await c.input(inp.x));
  const [context, y] = [await c.input(inp.context), await c.input(inp.y)];
  const taps = new Map<string, Tensor>();
  out.set('unet.out', nchw(unetForward(params, cfg, x, inp.timesteps, context, { taps, memory: c.memory, y })));
  for (const k of ['t_emb', 'time_emb', 'label_emb', 'emb']) out.set(`unet.${k}`, taps.get(k)!);
  const sigmas = await (await c.input('denoiser.sigma')).data();
  const timesteps = Array.from(sigmas, (s) => sigmaToTimestep(c.model.schedule.sigmas, s));
  const denoiser = { ...c.model, unet: { ...c.model.unet!, memory: c.memory } };
  out.set('denoiser.out', nchw(sgmDenoise(denoiser, x, timesteps, { crossattn: context, vector: y })));
}

function scheduleGoldens(c: XlCtx, out: Out): void {
  const s = c.model.schedule;
  out.set('schedule.betas', tf.tensor(s.betas)).set('schedule.alphas_cumprod', tf.tensor(s.alphasCumprod));
  out.set('schedule.sigmas', tf.tensor(s.sigmas));
}

/** train.*, ft.*: sgm loss with every named weight trainable; gradients in checkpoint layout. */
function fullModelGoldens(c: XlCtx, text: SdxlText, out: Out, batch: DiffusionBatch): void {
  const tb = c.g.train_batch;
  const sizes = sizesOf(c.g);
  const unet = c.model.unet!;
  const m = { ...c.model, unet: { ...unet, memory: c.memory } };
  out.set('train.sigmas', tf.tensor(batch.timesteps.map((t) => c.model.schedule.sigmas[t]!)));
  out.set('train.noised_input', nchw(sgmNoised(m, batch)));
  const cond0 = encodeSdxlText(text, tb.ids_clip_l, tb.ids_clip_g);
  out.set('train.crossattn', cond0.crossattn).set('train.vector', vectorConditioning(cond0.pooled, sizes, unet.cfg.admInChannels));
  cond0.pooled.dispose();

  const names: string[] = c.g.full_model_gradients.grads;
  const keys = names.map((n) => n.slice('ft.grad.'.length));
  const vars = new Map<string, tf.Variable>();
  const swap = (p: Params): Params => new Map([...p].map(([k, t]) => {
    if (!keys.includes(k)) return [k, t];
    const v = tf.variable(t, true, `ft/${k}`);
    vars.set(k, v);
    return [k, v];
  }));
  const textP = swap(text.params);
  const unetP = swap(unet.params);
  let perSample: Tensor | undefined;
  const { value, grads } = lossAndGrads(() => {
    const cond = encodeSdxlText({ ...text, params: textP }, tb.ids_clip_l, tb.ids_clip_g);
    const vector = vectorConditioning(cond.pooled, sizes, unet.cfg.admInChannels);
    const r = sgmLoss({ ...m, unet: { ...m.unet, params: unetP } }, batch, { crossattn: cond.crossattn, vector });
    perSample?.dispose();
    perSample = tf.keep(r.perSample.clone());
    return r.loss;
  }, vars);
  out.set(c.g.full_model_gradients.loss, value.reshape([1])).set('ft.loss_per_sample', perSample!);
  keys.forEach((k, i) => {
    const shape = text.params.get(k)?.shape ?? unet.params.get(k)?.shape;
    out.set(names[i]!, grads[k] ? paramToTorch(grads[k]) : tf.zeros(shape ?? [0]));
  });
  tf.dispose(Object.values(grads));
  vars.forEach((v) => v.dispose());
}

async function tiGoldens(c: XlCtx, text: SdxlText, out: Out, batch: DiffusionBatch): Promise<void> {
  const ti = c.g.textual_inversion;
  const l = tf.variable(await c.input('ti.clip_l'), true, 'golden/ti_l');
  const g = tf.variable(await c.input('ti.clip_g'), true, 'golden/ti_g');
  const xlBatch = { ...batch, idsL: ti.ids_clip_l, idsG: ti.ids_clip_g, positions: ti.vector_positions, sizes: sizesOf(c.g) };
  const cond = xlTiConditioning(text, { l, g }, xlBatch);
  out.set('ti.crossattn', cond.crossattn).set('ti.pooled', cond.pooled);
  const model: XlTiModel = { ...c.model, unet: { ...c.model.unet!, memory: c.memory }, textXl: text };
  const { value, grads } = lossAndGrads(() => xlTextualInversionLoss(model, { l, g }, xlBatch), new Map([['l', l], ['g', g]]));
  out.set('ti.loss', value.reshape([1])).set('ti.grad_clip_l', grads.l!).set('ti.grad_clip_g', grads.g!);
  l.dispose();
  g.dispose();
}

/** Every SDXL golden output except the VAE's (shared with SD1/SD2, golden.ts). */
export async function sdxlGoldens(c: XlCtx, out: Out): Promise<void> {
  const text = c.model.textXl;
  if (!text) throw new Error('golden: an SDXL fixture needs the SDXL text encoders');
  textGoldens(c, text, out);
  await unetGoldens(c, out);
  scheduleGoldens(c, out);
  const tb = c.g.train_batch;
  const batch = { latents: nhwc(await c.input(tb.x0)), noise: nhwc(await c.input(tb.noise)), timesteps: tb.timesteps as number[] };
  fullModelGoldens(c, text, out, batch);
  await tiGoldens(c, text, out, batch);
}
