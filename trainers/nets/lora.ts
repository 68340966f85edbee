/**
 * @file Low-rank adapters (LoRA, Hu et al. 2021; kohya-ss sd-scripts networks/lora.py) keyed the
 * way the webui's built-in Lora extension finds modules (extensions-builtin/Lora/networks.py
 * load_network + lora_convert.convert_diffusers_name_to_compvis, webui v1.10).
 *
 * Names are made from the checkpoint's OWN module path, never from diffusers block numbering:
 * `model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q` →
 * `lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`. The webui converts only
 * diffusers-style names (`lora_unet_down_blocks_…`, assuming 2 res blocks per level); ours pass
 * through unconverted and land, by its "lora_unet → diffusion_model" fallback, on exactly the
 * module trained, whatever the layout. Text encoder: SD1 `lora_te_text_model_encoder_layers_N_…`
 * (the HF module path); SD2 uses the same HF-style names, which the webui maps to open_clip's
 * `resblocks.N` (`mlp_fc1` → `mlp.c_fc`, `self_attn` → `attn`, q/k/v → row blocks of the fused
 * `in_proj_weight`, applied only when q, k, v AND out_proj are all present). SDXL (as kohya
 * sd-scripts sdxl_train_network writes it): CLIP-L `lora_te1_text_model_…` (its HF path) and
 * OpenCLIP-G `lora_te2_text_model_encoder_layers_N_…` (HF-style names of open_clip's resblocks,
 * which the webui maps back onto `1_model_transformer_resblocks_N_…`, q/k/v onto the fused
 * `in_proj_weight`).
 *
 * File layout (kohya): `<name>.lora_down.weight` [r, in] (conv: [r, in, kh, kw]),
 * `<name>.lora_up.weight` [out, r] (conv: [out, r, 1, 1]), `<name>.alpha` scalar;
 * ΔW = up·down·(alpha/r)·multiplier. `withLora` adds ΔW to a base weight each time it is read
 * (lazily, inside the tape), so unetForward/encodeText run unchanged, only up/down get
 * gradients, and a block recomputed for gradient checkpointing recomputes its ΔW too.
 *
 * @example
 *   const net = createLora(loraTargets(shapes, ['attn']), { rank: 16, alpha: 8, seed: 0 });
 *   const eps = tf.tidy(() => unetForward(withLora(unet.params, net), cfg, x, t, ctx));
 */
import { tf, type Tensor } from '../backend/tf.ts';
import type { Params } from './params.ts';
import { UNET_PREFIX } from './unet.ts';

/** Which modules get adapters (schemas/lora.json `targets`). */
export type LoraTargetKind = 'attn' | 'proj' | 'ff' | 'resnet' | 'text';

/** One adapted module. */
export interface LoraTarget {
  /** Kohya name (`lora_unet_…`, `lora_te_…`): the file's key stem. */
  name: string;
  /** Checkpoint module path; SD2 q/k/v: `…attn.q_proj` (a row block of `…attn.in_proj_weight`). */
  module: string;
  /** Checkpoint key of the weight it changes. */
  weightKey: string;
  /** Rows [start, end) of a fused weight (SD2 q/k/v of in_proj_weight). */
  rows?: [number, number];
  outDim: number;
  inDim: number;
  /** Conv kernel [kh, kw]; undefined for Linear. */
  kernel?: [number, number];
}

export interface LoraNetwork {
  rank: number;
  alpha: number;
  targets: LoraTarget[];
  /** `<name>.lora_down.weight` and `<name>.lora_up.weight`, in the file's (PyTorch) layout. */
  weights: Map<string, tf.Variable>;
}

const SD1_TEXT = 'cond_stage_model.transformer.text_model.';
const SD2_TEXT = 'cond_stage_model.model.transformer.resblocks.';
const XL_TEXT_L = 'conditioner.embedders.0.transformer.text_model.';
const XL_TEXT_G = 'conditioner.embedders.1.model.transformer.resblocks.';

/** HF-style (CLIP-L-like) and open_clip-style text-encoder prefixes, with their kohya name stems. */
const HF_TEXT: [prefix: string, stem: string][] = [[SD1_TEXT, 'lora_te_text_model_'], [XL_TEXT_L, 'lora_te1_text_model_']];
const OPEN_CLIP_TEXT: [prefix: string, stem: string][] = [[SD2_TEXT, 'lora_te_text_model_encoder_layers_'], [XL_TEXT_G, 'lora_te2_text_model_encoder_layers_']];

// ---------------------------------------------------------------------------------------------
// Names

/** open_clip resblock suffix → HF CLIP suffix (the inverse of the webui's SD2 mapping). */
const SD2_TO_HF: Record<string, string> = {
  'attn.q_proj': 'self_attn_q_proj', 'attn.k_proj': 'self_attn_k_proj', 'attn.v_proj': 'self_attn_v_proj',
  'attn.out_proj': 'self_attn_out_proj', 'mlp.c_fc': 'mlp_fc1', 'mlp.c_proj': 'mlp_fc2',
};

const underscore = (s: string) => s.replace(/\./g, '_');

/** Kohya name of a checkpoint module path (dots → underscores, model prefix dropped). */
export function kohyaName(module: string): string {
  if (module.startsWith(UNET_PREFIX)) return `lora_unet_${underscore(module.slice(UNET_PREFIX.length))}`;
  for (const [prefix, stem] of HF_TEXT) if (module.startsWith(prefix)) return `${stem}${underscore(module.slice(prefix.length))}`;
  for (const [prefix, stem] of OPEN_CLIP_TEXT) {
    const m = module.startsWith(prefix) && /^(\d+)\.(.+)$/.exec(module.slice(prefix.length));
    if (m && SD2_TO_HF[m[2]!]) return `${stem}${m[1]}_${SD2_TO_HF[m[2]!]}`;
  }
  throw new Error(`LoRA: no kohya name for module '${module}'`);
}

/**
 * The webui's `network_layer_mapping` (networks.py assign_network_names_to_compvis_modules):
 * every module's path under `sd_model.model` (UNet: `diffusion_model.…`) or under
 * `cond_stage_model.wrapped` (text), dots → underscores, to the checkpoint module path.
 */
export function networkLayerMapping(keys: Iterable<string>): Map<string, string> {
  const mapping = new Map<string, string>();
  for (const key of keys) {
    const module = key.replace(/\.(weight|bias|in_proj_weight|in_proj_bias)$/, '');
    if (module === key) continue;
    if (module.startsWith(UNET_PREFIX)) mapping.set(underscore(module.slice('model.'.length)), module);
    else if (module.startsWith('cond_stage_model.')) mapping.set(underscore(module.slice('cond_stage_model.'.length)), module);
    // SDXL: each embedder's `wrapped` modules, named `<i>_<path>` (0: CLIP-L, 1: OpenCLIP-G)
    else if (/^conditioner\.embedders\.\d+\./.test(module)) mapping.set(underscore(module.slice('conditioner.embedders.'.length)), module);
  }
  return mapping;
}

/** lora_convert.convert_diffusers_name_to_compvis, the text-encoder rule (the UNet rules only fire on diffusers names). */
function convertTextName(name: string, isSd2: boolean): string {
  const g = /^lora_te2_text_model_encoder_layers_(\d+)_(.+)$/.exec(name);
  if (g) return `1_model_transformer_resblocks_${g[1]}_${openClipSuffix(g[2]!)}`;
  const m = /^lora_te_text_model_encoder_layers_(\d+)_(.+)$/.exec(name);
  if (!m) return name;
  const [, layer, rest] = m as unknown as [string, string, string];
  if (!isSd2) return `transformer_text_model_encoder_layers_${layer}_${rest}`;
  return `model_transformer_resblocks_${layer}_${openClipSuffix(rest)}`;
}

/** HF CLIP suffix → open_clip's (mlp_fc1 → mlp_c_fc, mlp_fc2 → mlp_c_proj, self_attn → attn). */
function openClipSuffix(rest: string): string {
  if (rest.includes('mlp_fc1')) return rest.replace('mlp_fc1', 'mlp_c_fc');
  if (rest.includes('mlp_fc2')) return rest.replace('mlp_fc2', 'mlp_c_proj');
  return rest.replace('self_attn', 'attn');
}

/** Diffusers-style UNet names that convert_diffusers_name_to_compvis rewrites assuming SD's layout. */
const DIFFUSERS_UNET = /^lora_unet_(conv_in|conv_out|time_embedding_linear_|down_blocks_|mid_block_|up_blocks_)/;

/**
 * The module the webui applies a kohya name to (networks.py load_network): convert, look up;
 * else a `_q_proj/_k_proj/_v_proj` suffix names a row block of its MultiheadAttention parent;
 * else `lora_unet` → `diffusion_model`. Returns the checkpoint module path (SD2 q/k/v:
 * `…attn.q_proj`), or undefined when the webui would skip the name.
 */
export function webuiModuleFor(name: string, mapping: Map<string, string>, isSd2: boolean): string | undefined {
  if (DIFFUSERS_UNET.test(name)) return undefined; // converted by SD-layout arithmetic: not ours to emit
  const key = convertTextName(name, isSd2);
  const direct = mapping.get(key);
  if (direct) return direct;
  const xproj = /^(.*)_([qkv]_proj)$/.exec(key);
  const parent = xproj && mapping.get(xproj[1]!);
  if (parent) return `${parent}.${xproj![2]}`;
  if (name.includes('lora_unet')) return mapping.get(name.replace('lora_unet', 'diffusion_model'));
  if (name.includes('lora_te1_text_model')) return mapping.get(name.replace('lora_te1_text_model', '0_transformer_text_model'));
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// Targets from the checkpoint's shapes

const UNET_PATTERNS: Record<Exclude<LoraTargetKind, 'text'>, RegExp> = {
  attn: /\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$/,
  proj: /\.(proj_in|proj_out)\.weight$/,
  ff: /\.ff\.net\.(0\.proj|2)\.weight$/,
  // LoCon: the ResBlock convs, its time projection and skip, and the resamplers
  resnet: /\.(\d+\.(in_layers\.2|out_layers\.3|skip_connection|emb_layers\.1|op|conv))\.weight$/,
};
const SD1_TEXT_LINEAR = /^encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$/;
const SD2_TEXT_LINEAR = /^\d+\.(attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.weight$/;

function unetKind(key: string, kinds: Set<LoraTargetKind>): boolean {
  if (!key.startsWith(UNET_PREFIX)) return false;
  if (kinds.has('attn') && UNET_PATTERNS.attn.test(key)) return true;
  if (kinds.has('proj') && UNET_PATTERNS.proj.test(key)) return true;
  if (kinds.has('ff') && UNET_PATTERNS.ff.test(key)) return true;
  return kinds.has('resnet') && UNET_PATTERNS.resnet.test(key) && /(input_blocks|middle_block|output_blocks)\./.test(key);
}

function target(module: string, weightKey: string, shape: number[], rows?: [number, number]): LoraTarget {
  const [out, inDim, kh, kw] = shape as [number, number, number?, number?];
  const t: LoraTarget = { name: kohyaName(module), module, weightKey, outDim: rows ? rows[1] - rows[0] : out, inDim };
  if (rows) t.rows = rows;
  if (shape.length === 4) t.kernel = [kh!, kw!];
  return t;
}

/** Text-encoder targets: HF CLIP separate Linears; open_clip q/k/v row blocks of in_proj_weight + out_proj + MLP. */
function textTargets(key: string, shape: number[]): LoraTarget[] {
  const hf = HF_TEXT.find(([prefix]) => key.startsWith(prefix))?.[0];
  if (hf) return SD1_TEXT_LINEAR.test(key.slice(hf.length)) ? [target(key.slice(0, -'.weight'.length), key, shape)] : [];
  const oc = OPEN_CLIP_TEXT.find(([prefix]) => key.startsWith(prefix))?.[0];
  if (!oc) return [];
  const rest = key.slice(oc.length);
  if (SD2_TEXT_LINEAR.test(rest)) return [target(key.slice(0, -'.weight'.length), key, shape)];
  if (!/^\d+\.attn\.in_proj_weight$/.test(rest)) return [];
  const width = shape[0]! / 3; // rows q; k; v (nn.MultiheadAttention)
  const attn = key.slice(0, -'.in_proj_weight'.length);
  return ['q', 'k', 'v'].map((p, i) => target(`${attn}.${p}_proj`, key, [width, shape[1]!], [i * width, (i + 1) * width]));
}

/** Every module of the kinds asked for, in checkpoint key order, from {key → PyTorch shape}. */
export function loraTargets(shapes: Map<string, number[]>, kinds: readonly LoraTargetKind[]): LoraTarget[] {
  const want = new Set(kinds);
  const out: LoraTarget[] = [];
  for (const [key, shape] of shapes) {
    if (unetKind(key, want) && key.endsWith('.weight')) out.push(target(key.slice(0, -'.weight'.length), key, shape));
    else if (want.has('text')) out.push(...textTargets(key, shape));
  }
  if (!out.length) throw new Error(`LoRA: the model has no modules of kind ${kinds.join(', ')}`);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Weights

/** Kohya's init: down ~ kaiming_uniform(a=√5) = U(±1/√fan_in), up = 0 (the LoRA starts as a no-op). */
export function createLora(targets: LoraTarget[], opts: { rank: number; alpha: number; seed: number }): LoraNetwork {
  const weights = new Map<string, tf.Variable>();
  targets.forEach((t, i) => {
    const [kh, kw] = t.kernel ?? [1, 1];
    const bound = 1 / Math.sqrt(t.inDim * kh * kw);
    const downShape = t.kernel ? [opts.rank, t.inDim, kh, kw] : [opts.rank, t.inDim];
    const upShape = t.kernel ? [t.outDim, opts.rank, 1, 1] : [t.outDim, opts.rank];
    weights.set(`${t.name}.lora_down.weight`, tf.variable(tf.randomUniform(downShape, -bound, bound, 'float32', opts.seed * 100003 + i), true));
    weights.set(`${t.name}.lora_up.weight`, tf.variable(tf.zeros(upShape), true));
  });
  return { rank: opts.rank, alpha: opts.alpha, targets, weights };
}

export function disposeLora(net: LoraNetwork): void {
  for (const v of net.weights.values()) v.dispose();
}

export interface ApplyOptions {
  /** The webui multiplier (`<lora:name:M>`); default 1. */
  multiplier?: number;
  /** Rank dropout (kohya `rank_dropout`): each rank is dropped with this probability, the rest scaled by 1/(1−p). */
  dropout?: number;
  seed?: number;
}

/** ΔW of one target in the base weight's layout: Linear [out, in]; conv TF filter [kh, kw, in, out]. */
export function loraDelta(net: LoraNetwork, t: LoraTarget, scale: number, rankMask?: Tensor): Tensor {
  const r = net.rank;
  const down = net.weights.get(`${t.name}.lora_down.weight`)!;
  let up = net.weights.get(`${t.name}.lora_up.weight`)!.reshape([t.outDim, r]) as Tensor; // [out, r]
  if (rankMask) up = up.mul(rankMask); // [out, r] · [r]
  if (!t.kernel) return tf.matMul(up, down).mul(scale); // [out, in]
  const [kh, kw] = t.kernel;
  const downCols = down.transpose([2, 3, 1, 0]).reshape([kh * kw * t.inDim, r]); // [kh·kw·in, r]
  return tf.matMul(downCols, up, false, true).reshape([kh, kw, t.inDim, t.outDim]).mul(scale); // [kh, kw, in, out]
}

/**
 * `params` with every target weight it holds read as W + ΔW, computed AT EACH READ (`get`), so
 * the gradient to up/down is taken wherever the weight is used — also inside a block that is
 * recomputed under tf.customGrad for gradient checkpointing, where a ΔW computed beforehand
 * would be a captured constant and its gradient lost. Each read makes new tensors: read inside
 * the tape / tidy of the forward pass. Rank-dropout masks come from fixed seeds per target, so
 * every read of a weight gives the same mask. Targets of another network (UNet vs text encoder)
 * are skipped, so one LoraNetwork serves both. SD2 q/k/v deltas are stacked into the fused
 * weight (zeros for absent parts). has/keys/size are the base map's (nothing is copied or
 * materialised); iterating yields tensors read one at a time, merged where adapted.
 */
export function withLora(params: Params, net: LoraNetwork, opts: ApplyOptions = {}): Params {
  return new LoraParams(params, net, opts);
}

/**
 * The lazy view withLora returns: the base map is read through, never copied or iterated (a
 * HalfParams base would materialise every weight), and reads of adapted keys add ΔW. Read-only.
 */
class LoraParams extends Map<string, Tensor> {
  /** Adapted weight key → its targets, each with its dropout-mask index (fixed, as the eager order). */
  private readonly adapted = new Map<string, { target: LoraTarget; maskIndex: number }[]>();
  private readonly scale: number;

  constructor(private readonly base: Params, private readonly net: LoraNetwork, private readonly opts: ApplyOptions) {
    super();
    this.scale = (net.alpha / net.rank) * (opts.multiplier ?? 1);
    const byWeight = new Map<string, LoraTarget[]>();
    for (const t of net.targets) byWeight.set(t.weightKey, [...(byWeight.get(t.weightKey) ?? []), t]);
    let n = 0;
    for (const [key, targets] of byWeight) {
      if (!base.has(key)) continue; // a target of the other network
      const ordered = targets[0]!.rows ? [...targets].sort((a, b) => a.rows![0] - b.rows![0]) : [targets[0]!];
      this.adapted.set(key, ordered.map((target) => ({ target, maskIndex: n++ })));
    }
  }

  override get(key: string): Tensor | undefined {
    const base = this.base.get(key);
    const parts = this.adapted.get(key);
    return base && parts ? base.add(this.delta(base, parts)) : base;
  }

  /** ΔW of one weight: one target's, or the row blocks of a fused weight stacked with zeros between. */
  private delta(base: Tensor, parts: { target: LoraTarget; maskIndex: number }[]): Tensor {
    if (!parts[0]!.target.rows) return loraDelta(this.net, parts[0]!.target, this.scale, this.mask(parts[0]!.maskIndex));
    const rows = base.shape[0]!;
    const blocks: Tensor[] = [];
    let at = 0;
    for (const { target: t, maskIndex } of parts) {
      if (t.rows![0] > at) blocks.push(tf.zeros([t.rows![0] - at, base.shape[1]!]));
      blocks.push(loraDelta(this.net, t, this.scale, this.mask(maskIndex)));
      at = t.rows![1];
    }
    if (at < rows) blocks.push(tf.zeros([rows - at, base.shape[1]!]));
    return tf.concat(blocks, 0); // [rows, in]
  }

  /** Rank-dropout mask [r] of the i-th adapted target (kohya rank_dropout), or none. */
  private mask(i: number): Tensor | undefined {
    const p = this.opts.dropout ?? 0;
    if (p <= 0) return undefined;
    return tf.randomUniform([this.net.rank], 0, 1, 'float32', (this.opts.seed ?? 0) * 7919 + i).greaterEqual(p).toFloat().div(1 - p);
  }

  override has(key: string): boolean {
    return this.base.has(key);
  }

  override get size(): number {
    return this.base.size;
  }

  override keys(): MapIterator<string> {
    return this.base.keys();
  }

  override *entries(): MapIterator<[string, Tensor]> {
    for (const key of this.base.keys()) yield [key, this.get(key)!];
  }

  override *values(): MapIterator<Tensor> {
    for (const key of this.base.keys()) yield this.get(key)!;
  }

  override [Symbol.iterator](): MapIterator<[string, Tensor]> {
    return this.entries();
  }

  override forEach(fn: (value: Tensor, key: string, map: Map<string, Tensor>) => void, thisArg?: unknown): void {
    for (const [key, value] of this.entries()) fn.call(thisArg, value, key, this);
  }

  override set(): this {
    throw new Error('withLora: the adapted Params are a read-only view of the base weights');
  }

  override delete(): boolean {
    throw new Error('withLora: the adapted Params are a read-only view of the base weights');
  }

  override clear(): void {
    throw new Error('withLora: the adapted Params are a read-only view of the base weights');
  }
}

/** The merged weights W + ΔW of every target (new tensors; the caller disposes them). */
export function mergeLora(params: Params, net: LoraNetwork, multiplier = 1): Params {
  const keys = [...new Set(net.targets.map((t) => t.weightKey))].filter((k) => params.has(k));
  const merged = tf.tidy(() => {
    const full = withLora(params, net, { multiplier });
    return keys.map((k) => full.get(k)!);
  });
  return new Map(keys.map((k, i) => [k, merged[i]!]));
}
