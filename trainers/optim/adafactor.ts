/**
 * @file Adafactor as transformers' `transformers.optimization.Adafactor` with `relative_step=False`
 * and a given learn rate (the setting kohya's sd-scripts and most Dreambooth guides use):
 *
 *   step += 1;  β2t = 1 − step^decayRate                         (decayRate −0.8)
 *   u  = g² + eps1                                                (eps1 1e-30)
 *   ≥2-D params, factored (torch layout, over the last two dims):
 *     R = R·β2t + mean_{-1}(u)·(1−β2t);  C = C·β2t + mean_{-2}(u)·(1−β2t)
 *     û = g · rsqrt(R / mean_{-1}(R))[…, None] · rsqrt(C)[…, None, :]
 *   1-D params: V = V·β2t + u·(1−β2t);  û = g · rsqrt(V)
 *   û /= max(1, RMS(û) / clipThreshold)                           (clipThreshold 1)
 *   û *= lr · (scaleParameter ? max(eps2, RMS(p)) : 1)            (eps2 1e-3)
 *   β1 set: M = M·β1 + û·(1−β1); û = M
 *   p -= p·weightDecay·lr;  p -= û
 *
 * The factored statistics are O(rows + cols) per matrix instead of O(rows·cols): the memory win.
 * Conv filters are TF [kh,kw,in,out] here and torch [out,in,kh,kw] in transformers, so the
 * factoring is done in torch layout (the last two torch dims are kh, kw), matching PyTorch.
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { checkedUpdates } from './check.ts';
import { TF_TO_TORCH_CONV, TORCH_TO_TF_CONV } from '../nets/params.ts';
import type { ExportedBuffer, ExportedOptimizerState, StatefulOptimizer } from './optim-state.ts';
import { nativeAdafactor } from './native.ts';

export interface AdafactorOptions {
  /** (eps1, eps2): regulariser of g², floor of the parameter scale. transformers (1e-30, 1e-3). */
  eps?: [number, number];
  clipThreshold?: number;
  decayRate?: number;
  /** First moment coefficient; undefined = none (transformers default). */
  beta1?: number;
  weightDecay?: number;
  /** Scale the step by the parameter's RMS (transformers default true; kohya/Dreambooth use false). */
  scaleParameter?: boolean;
}

interface Slot {
  step: number;
  /** factored: row [torch shape[:-1]] and col [shape[:-2] + shape[-1:]]; else the full V. */
  row?: tf.Variable;
  col?: tf.Variable;
  v?: tf.Variable;
  m?: tf.Variable;
}

const torchLayout = (t: Tensor): Tensor => (t.rank === 4 ? t.transpose(TF_TO_TORCH_CONV) : t);
const tfLayout = (t: Tensor): Tensor => (t.rank === 4 ? t.transpose(TORCH_TO_TF_CONV) : t);
const rms = (t: Tensor): Tensor => t.square().mean().sqrt();

export class Adafactor implements StatefulOptimizer {
  readonly params: Map<string, tf.Variable>;
  readonly eps: [number, number];
  readonly clipThreshold: number;
  readonly decayRate: number;
  readonly beta1?: number;
  readonly weightDecay: number;
  readonly scaleParameter: boolean;
  private readonly slots = new Map<string, Slot>();

  constructor(params: Map<string, tf.Variable>, opts: AdafactorOptions = {}) {
    this.params = params;
    this.eps = opts.eps ?? [1e-30, 1e-3];
    this.clipThreshold = opts.clipThreshold ?? 1;
    this.decayRate = opts.decayRate ?? -0.8;
    this.beta1 = opts.beta1;
    this.weightDecay = opts.weightDecay ?? 0;
    this.scaleParameter = opts.scaleParameter ?? false;
  }

  step(grads: Map<string, Tensor>, lr: number): void {
    for (const [name, p, g] of checkedUpdates('Adafactor', this.params, grads, lr)) this.update(p, g, this.slot(name, p), lr);
  }

  private slot(name: string, p: tf.Variable): Slot {
    let s = this.slots.get(name);
    if (s) return s;
    const shape = torchShape(p.shape);
    const zeros = (sh: number[]) => tf.variable(tf.zeros(sh), false);
    s = { step: 0 };
    if (shape.length >= 2) {
      s.row = zeros(shape.slice(0, -1));
      s.col = zeros([...shape.slice(0, -2), shape[shape.length - 1]!]);
    } else s.v = zeros(shape);
    if (this.beta1 !== undefined) s.m = zeros(shape);
    this.slots.set(name, s);
    return s;
  }

  private update(p: tf.Variable, grad: Tensor, s: Slot, lr: number): void {
    s.step += 1;
    const beta2t = 1 - s.step ** this.decayRate;
    // the fused kernel does the same float32 operations in the same order (native/src/optim.cc)
    const b1 = this.beta1 ?? 0;
    const k = Float32Array.from([beta2t, 1 - beta2t, this.eps[0], this.clipThreshold, this.eps[1], lr, b1, 1 - b1, this.weightDecay]);
    if (nativeAdafactor(p, grad, s, k, this.scaleParameter)) return;
    tf.tidy(() => {
      const g = torchLayout(grad);
      const u = g.square().add(this.eps[0]);
      let update: Tensor;
      if (s.row && s.col) {
        const row = s.row.mul(beta2t).add(u.mean(-1).mul(1 - beta2t));
        const col = s.col.mul(beta2t).add(u.mean(-2).mul(1 - beta2t));
        s.row.assign(row);
        s.col.assign(col);
        const rFactor = row.div(row.mean(-1, true)).rsqrt().expandDims(-1);
        const cFactor = col.expandDims(-2).rsqrt();
        update = rFactor.mul(cFactor).mul(g);
      } else {
        const v = s.v!.mul(beta2t).add(u.mul(1 - beta2t));
        s.v!.assign(v);
        update = v.rsqrt().mul(g);
      }
      update = update.div(tf.maximum(rms(update).div(this.clipThreshold), 1));
      const scale = this.scaleParameter ? tf.maximum(rms(p), this.eps[1]).mul(lr) : tf.scalar(lr);
      update = update.mul(scale);
      if (s.m) {
        const m = s.m.mul(this.beta1!).add(update.mul(1 - this.beta1!));
        s.m.assign(m);
        update = m;
      }
      let next: Tensor = p;
      if (this.weightDecay !== 0) next = next.sub(p.mul(scale).mul(this.weightDecay));
      p.assign(next.sub(tfLayout(update)));
    });
  }

  stepCount(name: string): number {
    return this.slots.get(name)?.step ?? 0;
  }

  /** transformers' state names: exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq, exp_avg (torch layout). */
  async exportState(): Promise<ExportedOptimizerState> {
    const params: ExportedOptimizerState['params'] = new Map();
    for (const [name, s] of this.slots) {
      const buffers = new Map<string, ExportedBuffer>();
      const named: [string, tf.Variable | undefined][] = [['exp_avg_sq_row', s.row], ['exp_avg_sq_col', s.col], ['exp_avg_sq', s.v], ['exp_avg', s.m]];
      for (const [key, t] of named) if (t) buffers.set(key, { dtype: 'F32', shape: [...t.shape], data: (await t.data()) as Float32Array });
      params.set(name, { step: s.step, buffers });
    }
    const hyper = { eps: this.eps, clipThreshold: this.clipThreshold, decayRate: this.decayRate, beta1: this.beta1 ?? null, weightDecay: this.weightDecay, scaleParameter: this.scaleParameter };
    return { optimizer: 'adafactor', hyper, params };
  }

  importState(state: ExportedOptimizerState): void {
    if (state.optimizer !== 'adafactor') throw new Error(`Adafactor: the saved state is for ${state.optimizer}`);
    const loaded = new Map<string, Slot>();
    try {
      for (const [name, entry] of state.params) {
        const p = this.params.get(name);
        if (!p) throw new Error(`Adafactor state: '${name}' is not a trained parameter`);
        const fresh = this.expected(p);
        const slot: Slot = { step: entry.step };
        loaded.set(name, slot);
        for (const [key, shape] of fresh) {
          const b = entry.buffers.get(key);
          if (!b || !tf.util.arraysEqual(b.shape, shape)) throw new Error(`Adafactor state: '${name}' ${key} is missing or has the wrong shape`);
          const v = tf.variable(tf.tensor(b.data as Float32Array, shape), false);
          if (key === 'exp_avg_sq_row') slot.row = v;
          else if (key === 'exp_avg_sq_col') slot.col = v;
          else if (key === 'exp_avg_sq') slot.v = v;
          else slot.m = v;
        }
      }
    } catch (err) {
      for (const s of loaded.values()) disposeSlot(s);
      throw err;
    }
    for (const s of this.slots.values()) disposeSlot(s);
    this.slots.clear();
    for (const [k, s] of loaded) this.slots.set(k, s);
  }

  /** The state buffers a parameter has, with their torch-layout shapes. */
  private expected(p: tf.Variable): [string, number[]][] {
    const shape = torchShape(p.shape);
    const out: [string, number[]][] = shape.length >= 2
      ? [['exp_avg_sq_row', shape.slice(0, -1)], ['exp_avg_sq_col', [...shape.slice(0, -2), shape[shape.length - 1]!]]]
      : [['exp_avg_sq', shape]];
    if (this.beta1 !== undefined) out.push(['exp_avg', shape]);
    return out;
  }

  dispose(): void {
    for (const s of this.slots.values()) disposeSlot(s);
    this.slots.clear();
  }
}

function torchShape(shape: number[]): number[] {
  return shape.length === 4 ? TF_TO_TORCH_CONV.map((i) => shape[i]!) : [...shape];
}

function disposeSlot(s: Slot): void {
  tf.dispose([s.row, s.col, s.v, s.m].filter((t): t is tf.Variable => !!t));
}
