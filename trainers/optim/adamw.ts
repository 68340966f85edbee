/**
 * @file AdamW exactly as torch 1.13 `torch.optim.AdamW` (amsgrad, maximize and capturable off),
 * `_single_tensor_adamw` in torch/optim/adamw.py, for TF.js variables:
 *
 *   step += 1
 *   p   *= 1 - lr·wd                                  (decoupled weight decay, before the moments)
 *   m    = m·β1 + g·(1 − β1)
 *   v    = v·β2 + g·g·(1 − β2)
 *   bc1  = 1 − β1^step;  bc2 = 1 − β2^step            (in float64, as torch does with Python floats)
 *   p   += −(lr / bc1) · m / (√v / √bc2 + eps)        (eps added AFTER dividing by √bc2)
 *
 * Parameters without a gradient in a step are skipped (torch skips `p.grad is None`), so each
 * parameter keeps its own step count, as in torch's per-parameter `state[p]['step']`.
 *
 * The state exports to / imports from the layout of torch's optimizer `state_dict()` that the
 * webui writes into `<name>.pt.optim` (`optimizer_state_dict`), as plain JS objects; the I/O
 * layer pickles it. Parameter indices follow the insertion order of the params Map, as torch
 * numbers `param_groups[0]['params']`.
 *
 * Example:
 *   const opt = new AdamW(new Map([['emb', vec]]), { lr: 0.005, weightDecay: 0 });
 *   opt.step(new Map([['emb', grad]]), schedule.getLr(step));
 *   const sd = opt.stateDict();  // → pt-embedding.ts writes it as .optim
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { checkedUpdates } from './check.ts';
import { adamwConstants, nativeAdamw, optimKernels } from './native.ts';

export interface AdamWOptions {
  /** Initial learn rate (recorded in param_groups; each step() gets the current rate). */
  lr: number;
  /** torch default (0.9, 0.999). */
  betas?: [number, number];
  /** torch default 1e-8. */
  eps?: number;
  /** torch AdamW default 0.01 (the webui's hypernetwork training keeps it); TI uses 0. */
  weightDecay?: number;
}

/** One parameter's entry of torch's `state` dict. */
export interface AdamWParamState {
  /** torch keeps a float32 scalar tensor; here a number. */
  step: number;
  exp_avg: Float32Array;
  exp_avg_sq: Float32Array;
  /** Shape in torch layout (the parameter's checkpoint shape). */
  shape: number[];
}

/** torch 1.13 AdamW param_group keys, in torch's order. */
export interface AdamWParamGroup {
  lr: number;
  betas: [number, number];
  eps: number;
  weight_decay: number;
  amsgrad: boolean;
  foreach: boolean | null;
  maximize: boolean;
  capturable: boolean;
  params: number[];
}

/** torch `optimizer.state_dict()` as plain JS. */
export interface AdamWStateDict {
  state: Map<number, AdamWParamState>;
  param_groups: AdamWParamGroup[];
}

interface Slot {
  step: number;
  m: tf.Variable;
  v: tf.Variable;
}

export class AdamW {
  readonly params: Map<string, tf.Variable>;
  lr: number;
  betas: [number, number];
  eps: number;
  weightDecay: number;
  private readonly slots = new Map<string, Slot>();

  constructor(params: Map<string, tf.Variable>, opts: AdamWOptions) {
    this.params = params;
    this.lr = opts.lr;
    this.betas = opts.betas ?? [0.9, 0.999];
    this.eps = opts.eps ?? 1e-8;
    this.weightDecay = opts.weightDecay ?? 0.01;
    checkHyper(this.lr, this.betas, this.eps, this.weightDecay);
  }

  /** One update with learn rate `lr`; grads are keyed like params (missing = skipped). Grads are not disposed. */
  step(grads: Map<string, Tensor>, lr: number): void {
    const updates = checkedUpdates('AdamW', this.params, grads, lr);
    this.lr = lr;
    for (const [name, p, g] of updates) this.update(p, g, this.slot(name, p), lr);
  }

  private slot(name: string, p: tf.Variable): Slot {
    let s = this.slots.get(name);
    if (!s) {
      // tidy: the zeros tensor goes, the variable keeps its data (tfjs optimizers do the same).
      s = { step: 0, m: tf.tidy(() => tf.variable(tf.zerosLike(p), false)), v: tf.tidy(() => tf.variable(tf.zerosLike(p), false)) };
      this.slots.set(name, s);
    }
    return s;
  }

  private update(p: tf.Variable, g: Tensor, s: Slot, lr: number): void {
    const [beta1, beta2] = this.betas;
    s.step += 1;
    const bc1 = 1 - beta1 ** s.step;
    const bc2Sqrt = Math.sqrt(1 - beta2 ** s.step);
    // the fused kernel does the same float32 operations in the same order (trainers/optim/native.ts)
    const kernels = optimKernels();
    if (kernels && nativeAdamw(kernels, p, g, s.m, s.v, adamwConstants(lr, this.weightDecay, this.betas, this.eps, bc1, bc2Sqrt))) return;
    tf.tidy(() => {
      let param: Tensor = p;
      if (this.weightDecay !== 0) param = param.mul(1 - lr * this.weightDecay);
      const m = s.m.mul(beta1).add(g.mul(1 - beta1));
      const v = s.v.mul(beta2).add(g.mul(g).mul(1 - beta2));
      const denom = v.sqrt().div(bc2Sqrt).add(this.eps);
      const next = param.add(m.div(denom).mul(-lr / bc1));
      s.m.assign(m);
      s.v.assign(v);
      p.assign(next);
    });
  }

  /** Alias of stateDict() (the name the brief uses). */
  state(): Promise<AdamWStateDict> {
    return this.stateDict();
  }

  /** Alias of loadStateDict(). */
  loadState(sd: AdamWStateDict): void {
    this.loadStateDict(sd);
  }

  /** The per-parameter step count (0 before the first update), e.g. to check a resumed state. */
  stepCount(name: string): number {
    return this.slots.get(name)?.step ?? 0;
  }

  /** torch's state_dict() layout; reads the moments from the backend (async, once per save). */
  async stateDict(): Promise<AdamWStateDict> {
    const state = new Map<number, AdamWParamState>();
    const names = [...this.params.keys()];
    for (const e of this.moments()) {
      const [m, v] = await Promise.all([e.expAvg(), e.expAvgSq()]);
      state.set(names.indexOf(e.name), { step: e.step, exp_avg: m, exp_avg_sq: v, shape: e.shape });
    }
    return { state, param_groups: [this.paramGroup()] };
  }

  /**
   * Each updated parameter's moments in torch layout, read only when asked: a save streams them
   * into its file one at a time instead of holding a copy of every moment (a 4-D moment is
   * transposed, i.e. copied, on the way).
   */
  moments(): { name: string; step: number; shape: number[]; expAvg: () => Promise<Float32Array>; expAvgSq: () => Promise<Float32Array> }[] {
    return [...this.params].flatMap(([name, p]) => {
      const s = this.slots.get(name);
      return s ? [{ name, step: s.step, shape: torchShape(p.shape), expAvg: () => readTorchLayout(s.m), expAvgSq: () => readTorchLayout(s.v) }] : [];
    });
  }

  /** torch's param_groups[0] (hyper-parameters; params by index). */
  paramGroup(): AdamWParamGroup {
    const group: AdamWParamGroup = {
      lr: this.lr,
      betas: [...this.betas],
      eps: this.eps,
      weight_decay: this.weightDecay,
      amsgrad: false,
      foreach: null,
      maximize: false,
      capturable: false,
      params: [...this.params.keys()].map((_, i) => i),
    };
    return group;
  }

  /**
   * Load a torch state_dict (torch `load_state_dict` semantics: hyper-parameters come from the
   * saved group). Throws, naming the index and both shapes, when it does not fit these params.
   */
  loadStateDict(sd: AdamWStateDict): void {
    const group = checkGroups(sd, this.params.size);
    const names = [...this.params.keys()];
    for (const [index, entry] of sd.state) {
      const name = names[group.params.indexOf(index)];
      if (name === undefined) throw new Error(`AdamW state: entry ${index} is not a parameter of the group`);
      checkEntry(index, name, entry, torchShape(this.params.get(name)!.shape));
    }
    this.disposeSlots();
    for (const [index, entry] of sd.state) {
      const name = names[group.params.indexOf(index)]!;
      this.slots.set(name, {
        step: entry.step,
        m: tf.tidy(() => tf.variable(fromTorchLayout(entry.exp_avg, entry.shape), false)),
        v: tf.tidy(() => tf.variable(fromTorchLayout(entry.exp_avg_sq, entry.shape), false)),
      });
    }
    this.lr = group.lr;
    this.betas = [group.betas[0], group.betas[1]];
    this.eps = group.eps;
    this.weightDecay = group.weight_decay;
  }

  private disposeSlots(): void {
    for (const s of this.slots.values()) tf.dispose([s.m, s.v]);
    this.slots.clear();
  }

  /** Release the moment buffers (the params belong to the caller). */
  dispose(): void {
    this.disposeSlots();
  }
}

function checkHyper(lr: number, betas: [number, number], eps: number, wd: number): void {
  // torch.optim.AdamW.__init__ checks these same ranges.
  if (!(lr >= 0)) throw new Error(`AdamW: invalid learn rate ${lr}`);
  if (!(eps >= 0)) throw new Error(`AdamW: invalid eps ${eps}`);
  for (const b of betas) if (!(b >= 0 && b < 1)) throw new Error(`AdamW: invalid beta ${b} (must be in [0, 1))`);
  if (!(wd >= 0)) throw new Error(`AdamW: invalid weight decay ${wd}`);
}

function checkGroups(sd: AdamWStateDict, nParams: number): AdamWParamGroup {
  if (sd.param_groups.length !== 1) throw new Error(`AdamW state: expected 1 param group, found ${sd.param_groups.length}`);
  const group = sd.param_groups[0]!;
  if (group.params.length !== nParams) {
    throw new Error(`AdamW state: the saved group has ${group.params.length} parameters, this model has ${nParams}`);
  }
  if (group.amsgrad || group.maximize) throw new Error('AdamW state: amsgrad/maximize states are not supported');
  checkHyper(group.lr, group.betas, group.eps, group.weight_decay);
  return group;
}

function checkEntry(index: number, name: string, e: AdamWParamState, shape: number[]): void {
  const size = shape.reduce((a, b) => a * b, 1);
  if (!tf.util.arraysEqual(e.shape, shape)) {
    throw new Error(`AdamW state: entry ${index} ('${name}') has shape [${e.shape}], the parameter has [${shape}]`);
  }
  if (e.exp_avg.length !== size || e.exp_avg_sq.length !== size) {
    throw new Error(`AdamW state: entry ${index} ('${name}') moments have ${e.exp_avg.length}/${e.exp_avg_sq.length} values, expected ${size}`);
  }
  if (!Number.isInteger(e.step) || e.step < 0) throw new Error(`AdamW state: entry ${index} has step ${e.step}`);
}

// Moments have the parameter's layout; 4-D (conv) params are TF [kh,kw,in,out] here and torch
// [out,in,kh,kw] in the file (trainers/nets/params.ts layout rule).
function torchShape(shape: number[]): number[] {
  return shape.length === 4 ? [shape[3]!, shape[2]!, shape[0]!, shape[1]!] : [...shape];
}

async function readTorchLayout(t: Tensor): Promise<Float32Array> {
  if (t.rank !== 4) return (await t.data()) as Float32Array;
  const torch = tf.transpose(t, [3, 2, 0, 1]);
  try {
    return (await torch.data()) as Float32Array;
  } finally {
    torch.dispose();
  }
}

function fromTorchLayout(values: Float32Array, shape: number[]): Tensor {
  return tf.tidy(() => {
    const t = tf.tensor(values, shape, 'float32');
    return shape.length === 4 ? t.transpose([2, 3, 1, 0]) : t;
  });
}
