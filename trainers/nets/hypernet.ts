/**
 * @file The webui's HypernetworkModule (AUTOMATIC1111 v1.10.1 modules/hypernetworks/hypernetwork.py):
 * per enabled context width `size`, a (k, v) pair of residual MLPs `x + mlp(x)·multiplier` that
 * transform the attention context before to_k / to_v in every CrossAttention whose context width
 * equals `size` (attn2 with the text width, attn1 with a channel count).
 *
 * The MLP is the webui's torch.nn.Sequential, so parameter keys carry the Sequential index:
 * activation, LayerNorm and Dropout layers take indices too (`[1,2,1]` + swish → linear.0,
 * linear.2; + linear → linear.0, linear.1). Params are keyed `${size}.${k|v}.linear.N.{weight,bias}`.
 *
 * @example
 *   const params = createHypernetwork(spec, 42);
 *   unetForward(unet, cfg, x, t, ctx, { hooks: { kv: hypernetHook(params, spec) } });
 */
import { mulberry32 } from '../random.ts';
import { tf, type Tensor } from '../backend/tf.ts';
import { param, type Params } from './params.ts';
import { gelu, layerNorm, linear, silu } from './layers.ts';

export interface HypernetworkSpec {
  /** Context widths with a module pair (webui enable_sizes, e.g. 768, 320, 640, 1280). */
  sizes: number[];
  /** Width multipliers, first and last 1 (webui layer_structure, e.g. [1, 2, 1]). */
  layerStructure: number[];
  /** webui activation_func name ('linear', 'relu', 'swish' = Hardswish, …). */
  activation: string;
  /** LayerNorm after each Linear (webui add_layer_norm / is_layer_norm). */
  layerNorm: boolean;
  /** webui use_dropout. */
  dropout: boolean;
  /** Dropout probability after each layer (same length as layerStructure); default: the webui's. */
  dropoutStructure?: number[];
  /** Activation after the last Linear too (webui activate_output). */
  activateOutput: boolean;
  /** webui weight_init: Normal | XavierUniform | XavierNormal | KaimingUniform | KaimingNormal. */
  weightInit: string;
  /** Dropout before the last Linear in the webui's default structure (webui last_layer_dropout). */
  lastLayerDropout: boolean;
}

export type KV = 'k' | 'v';

/**
 * A spec from the fields a webui hypernetwork `.pt` stores, with the webui's load() defaults
 * (a missing `activate_output` means TRUE there; a missing `activation_func` means none).
 */
export function hypernetSpecFromWebui(meta: Record<string, unknown>, sizes: number[]): HypernetworkSpec {
  const ds = meta.dropout_structure as number[] | null | undefined;
  return {
    sizes,
    layerStructure: (meta.layer_structure as number[] | undefined) ?? [1, 2, 1],
    activation: (meta.activation_func as string | null | undefined) ?? 'linear',
    layerNorm: Boolean(meta.is_layer_norm ?? false),
    dropout: ds ? ds.some((p) => p > 0) : Boolean(meta.use_dropout ?? false),
    dropoutStructure: ds ?? undefined,
    activateOutput: Boolean(meta.activate_output ?? true),
    weightInit: (meta.weight_initialization as string | undefined) ?? 'Normal',
    lastLayerDropout: Boolean(meta.last_layer_dropout ?? false),
  };
}

// ---------------------------------------------------------------------------------------------
// Activations: the webui's activation_dict (its own names + torch.nn.modules.activation lower-cased)

type Act = (x: Tensor, training: boolean, weight?: Tensor, seed?: number) => Tensor;

const relu6 = (x: Tensor) => tf.clipByValue(x, 0, 6);
const softplus = (x: Tensor) => tf.where(x.greater(20), x, tf.softplus(x)); // torch threshold 20
const ACTIVATIONS: Record<string, Act> = {
  relu: (x) => tf.relu(x),
  leakyrelu: (x) => tf.leakyRelu(x, 0.01),
  elu: (x) => tf.elu(x),
  celu: (x) => tf.elu(x), // alpha 1
  selu: (x) => tf.selu(x),
  swish: (x) => x.mul(relu6(x.add(3))).div(6), // webui 'swish' is torch.nn.Hardswish, not SiLU
  hardswish: (x) => x.mul(relu6(x.add(3))).div(6),
  hardsigmoid: (x) => relu6(x.add(3)).div(6),
  hardtanh: (x) => tf.clipByValue(x, -1, 1),
  relu6,
  tanh: (x) => tf.tanh(x),
  sigmoid: (x) => tf.sigmoid(x),
  silu: (x) => silu(x),
  mish: (x) => x.mul(tf.tanh(softplus(x))),
  gelu: (x) => gelu(x),
  softplus,
  softsign: (x) => x.div(x.abs().add(1)),
  tanhshrink: (x) => x.sub(tf.tanh(x)),
  logsigmoid: (x) => tf.logSigmoid(x),
  hardshrink: (x) => tf.where(x.abs().greater(0.5), x, tf.zerosLike(x)),
  softshrink: (x) => tf.where(x.greater(0.5), x.sub(0.5), tf.where(x.less(-0.5), x.add(0.5), tf.zerosLike(x))),
  // torch RReLU(1/8, 1/3): random negative slope while training, the mean slope in eval
  rrelu: (x, training, _w, seed) =>
    tf.where(x.greaterEqual(0), x, x.mul(training ? tf.randomUniform(x.shape, 1 / 8, 1 / 3, 'float32', seed) : (1 / 8 + 1 / 3) / 2)),
  prelu: (x, _t, w) => tf.where(x.greaterEqual(0), x, x.mul(w!)),
};
/** webui names that exist in torch.nn.modules.activation but need arguments or change the width. */
const UNSUPPORTED = ['threshold', 'glu', 'multiheadattention', 'softmax', 'softmin', 'softmax2d', 'logsoftmax'];
/** torch.nn.PReLU is the one activation with a weight (num_parameters 1, init 0.25), saved as linear.N.weight. */
const PARAM_ACTIVATIONS = new Set(['prelu']);

// ---------------------------------------------------------------------------------------------
// The Sequential, layer by layer (HypernetworkModule.__init__)

export type HnLayer =
  | { kind: 'linear'; index: number; inDim: number; outDim: number }
  | { kind: 'act'; index: number; name: string }
  | { kind: 'layernorm'; index: number; dim: number }
  | { kind: 'dropout'; index: number; p: number };

/** webui parse_dropout_structure: [0, 0.3 × (n−3), last_layer_dropout ? 0.3 : 0, 0]; zeros without dropout. */
export function defaultDropoutStructure(layerStructure: number[], dropout: boolean, lastLayerDropout: boolean): number[] {
  if (!dropout) return layerStructure.map(() => 0);
  return [0, ...Array<number>(Math.max(0, layerStructure.length - 3)).fill(0.3), lastLayerDropout ? 0.3 : 0, 0];
}

/** Throws a clear error for structures the webui refuses (or that sidetrain cannot run). */
export function validateHypernetworkSpec(spec: HypernetworkSpec): void {
  const ls = spec.layerStructure;
  if (ls.length < 2 || ls[0] !== 1 || ls[ls.length - 1] !== 1) {
    throw new Error(`hypernetwork: layer structure must start and end with 1, got [${ls.join(', ')}]`);
  }
  if (ls.some((m) => !(m > 0))) throw new Error(`hypernetwork: layer structure entries must be > 0, got [${ls.join(', ')}]`);
  if (UNSUPPORTED.includes(spec.activation)) {
    throw new Error(`hypernetwork: activation '${spec.activation}' needs arguments or changes the width; not supported`);
  }
  if (spec.activation !== 'linear' && !(spec.activation in ACTIVATIONS)) {
    throw new Error(`hypernetwork: unknown activation '${spec.activation}', expected one of linear, ${Object.keys(ACTIVATIONS).join(', ')}`);
  }
  if (!(spec.weightInit in INITS)) {
    throw new Error(`hypernetwork: unknown weight init '${spec.weightInit}', expected one of ${Object.keys(INITS).join(', ')}`);
  }
  const ds = spec.dropoutStructure;
  if (ds && ds.length !== ls.length) throw new Error(`hypernetwork: dropout structure needs ${ls.length} entries, got ${ds.length}`);
  if (ds?.some((p) => !(p >= 0 && p < 1))) throw new Error(`hypernetwork: dropout must be in [0, 1), got [${ds.join(', ')}]`);
  if (ds && ds[ds.length - 1] !== 0) throw new Error('hypernetwork: the last dropout entry must be 0 (no dropout after the output)');
  for (const s of spec.sizes) if (!Number.isInteger(s) || s < 1) throw new Error(`hypernetwork: bad size ${s}`);
}

/** The module's layers with their Sequential indices, for context width `size`. */
export function hypernetLayers(spec: HypernetworkSpec, size: number): HnLayer[] {
  validateHypernetworkSpec(spec);
  const ls = spec.layerStructure;
  const drop = spec.dropoutStructure ?? defaultDropoutStructure(ls, spec.dropout, spec.lastLayerDropout);
  const layers: HnLayer[] = [];
  const add = (l: HnLayer extends infer L ? (L extends HnLayer ? Omit<L, 'index'> : never) : never) => layers.push({ ...l, index: layers.length } as HnLayer);
  for (let i = 0; i < ls.length - 1; i++) {
    const outDim = Math.trunc(size * ls[i + 1]!); // python int(dim * multiplier)
    add({ kind: 'linear', inDim: Math.trunc(size * ls[i]!), outDim });
    const last = i >= ls.length - 2;
    if (spec.activation !== 'linear' && (!last || spec.activateOutput)) add({ kind: 'act', name: spec.activation });
    if (spec.layerNorm) add({ kind: 'layernorm', dim: outDim });
    if (drop[i + 1]! > 0) add({ kind: 'dropout', p: drop[i + 1]! });
  }
  return layers;
}

// ---------------------------------------------------------------------------------------------
// Weight init (webui: Normal → N(0, 0.01) weights and zero biases, and ALWAYS for LayerNorm)

// mulberry32 (trainers/random.ts): a seed gives the same weights on every backend
const rng = mulberry32;

type Sampler = (n: number, fanIn: number, fanOut: number, rand: () => number) => Float32Array;
const fill = (n: number, f: () => number) => Float32Array.from({ length: n }, f);
const normal = (rand: () => number, std: number) => () =>
  std * Math.sqrt(-2 * Math.log(1 - rand())) * Math.cos(2 * Math.PI * rand()); // Box–Muller
const uniform = (rand: () => number, bound: number) => () => (2 * rand() - 1) * bound;

/** torch.nn.init: kaiming with nonlinearity relu or leaky_relu (a = 0) both have gain √2. */
const INITS: Record<string, Sampler> = {
  Normal: (n, _i, _o, r) => fill(n, normal(r, 0.01)),
  XavierUniform: (n, i, o, r) => fill(n, uniform(r, Math.sqrt(6 / (i + o)))),
  XavierNormal: (n, i, o, r) => fill(n, normal(r, Math.sqrt(2 / (i + o)))),
  KaimingUniform: (n, i, _o, r) => fill(n, uniform(r, Math.sqrt(6 / i))),
  KaimingNormal: (n, i, _o, r) => fill(n, normal(r, Math.sqrt(2 / i))),
};

function initLayer(spec: HypernetworkSpec, l: HnLayer, rand: () => number): [string, Tensor][] {
  if (l.kind === 'linear') {
    const w = INITS[spec.weightInit]!(l.outDim * l.inDim, l.inDim, l.outDim, rand);
    return [['weight', tf.tensor2d(w, [l.outDim, l.inDim])], ['bias', tf.zeros([l.outDim])]];
  }
  if (l.kind === 'layernorm') return [['weight', tf.tensor1d(INITS.Normal!(l.dim, 0, 0, rand))], ['bias', tf.zeros([l.dim])]];
  if (l.kind === 'act' && PARAM_ACTIVATIONS.has(l.name)) return [['weight', tf.fill([1], 0.25)]];
  return [];
}

/** A new hypernetwork with the webui's initialisation: trainable tf.Variables keyed `${size}.k.linear.N.weight`. */
export function createHypernetwork(spec: HypernetworkSpec, seed: number): Params {
  const rand = rng(seed);
  const params: Params = new Map();
  for (const size of spec.sizes) {
    for (const kv of ['k', 'v'] as const) {
      for (const l of hypernetLayers(spec, size)) {
        for (const [name, t] of initLayer(spec, l, rand)) {
          // the webui trains Linear and LayerNorm weights only (HypernetworkModule.trainables)
          const trainable = l.kind !== 'act';
          params.set(`${size}.${kv}.linear.${l.index}.${name}`, tf.variable(t, trainable));
          t.dispose();
        }
      }
    }
  }
  return params;
}

// ---------------------------------------------------------------------------------------------
// Forward

export interface HypernetOptions {
  /** Strength (webui <hypernet:name:multiplier>); ignored (= 1) while training, as the webui does. */
  multiplier?: number;
  /** Train mode: dropout active, multiplier 1. */
  training?: boolean;
  /**
   * Seed of the train-mode randomness (dropout masks, RReLU slopes), mixed with the layer's name:
   * a block recomputed for gradient checkpointing (recompute.ts) draws the same masks again.
   * Absent: unseeded, as torch.
   */
  seed?: number;
}

/** FNV-1a of `text` mixed into `seed`: one stream per (seed, layer). */
function mixSeed(seed: number, text: string): number {
  let h = (2166136261 ^ seed) >>> 0;
  for (let i = 0; i < text.length; i++) h = Math.imul(h ^ text.charCodeAt(i), 16777619) >>> 0;
  return h;
}

function runLayer(p: Params, key: string, l: HnLayer, h: Tensor, training: boolean, seed?: number): Tensor {
  const layerSeed = seed === undefined ? undefined : mixSeed(seed, key);
  switch (l.kind) {
    case 'linear': return linear(p, key, h);
    case 'act': return ACTIVATIONS[l.name]!(h, training, PARAM_ACTIVATIONS.has(l.name) ? param(p, `${key}.weight`) : undefined, layerSeed);
    case 'layernorm': return layerNorm(p, key, h, 1e-5);
    case 'dropout': return training ? tf.dropout(h, l.p, undefined, layerSeed) : h;
  }
}

/** HypernetworkModule.forward: x + linear(x)·multiplier. x [..., size] → same shape. */
export function hypernetForward(p: Params, spec: HypernetworkSpec, size: number, kv: KV, x: Tensor, opts: HypernetOptions = {}): Tensor {
  const training = opts.training ?? false;
  const multiplier = training ? 1 : (opts.multiplier ?? 1);
  return tf.tidy(() => {
    let h = x;
    for (const l of hypernetLayers(spec, size)) h = runLayer(p, `${size}.${kv}.linear.${l.index}`, l, h, training, opts.seed);
    return x.add(h.mul(multiplier));
  });
}

/**
 * The UNet kv hook (webui apply_single_hypernetwork): the module pair whose size equals the
 * context's last dimension, or undefined when no size matches.
 */
export function hypernetHook(p: Params, spec: HypernetworkSpec, opts: HypernetOptions = {}) {
  return (context: Tensor, layer = ''): [Tensor, Tensor] | undefined => {
    const size = context.shape[context.rank - 1]!;
    if (!spec.sizes.includes(size)) return undefined;
    const layerOpts = opts.seed === undefined ? opts : { ...opts, seed: mixSeed(opts.seed, layer) };
    return [hypernetForward(p, spec, size, 'k', context, layerOpts), hypernetForward(p, spec, size, 'v', context, layerOpts)];
  };
}
