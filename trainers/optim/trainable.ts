/**
 * @file The optimizer of every method that trains network weights (Dreambooth, LoRA, fine-tune):
 * the weights made trainable variables, one optimizer per parameter group (UNet,
 * optionally the text encoder with its own learn-rate schedule and step limit, as diffusers'
 * two param groups), chosen by name (adamw | adamw8bit | adafactor), and its state saved beside a
 * snapshot as `<name>-<step>.optim.safetensors`: tensors `<group>:<param>#<buffer>` (F32 or U8),
 * the per-parameter steps and hyper-parameters in `__metadata__`.
 */
import { tf, type Tensor } from '../backend/tf.ts';
import type { Params } from '../nets/params.ts';
import { AdamW, type AdamWStateDict } from './adamw.ts';
import { AdamW8bit } from './adamw8bit.ts';
import type { ExportedBuffer, ExportedOptimizerState, StatefulOptimizer } from './optim-state.ts';
import { Adafactor } from './adafactor.ts';
import { openSafetensors, writeSafetensors, type TensorToWrite } from '../io/safetensors.ts';
import type { LrSchedule } from './lr.ts';

export type OptimizerName = 'adamw' | 'adamw8bit' | 'adafactor';

/** torch AdamW (trainers/optim/adamw.ts) behind the exportable-state interface. */
class AdamWGroup implements StatefulOptimizer {
  constructor(readonly inner: AdamW) {}
  step(grads: Map<string, Tensor>, lr: number): void {
    this.inner.step(grads, lr);
  }
  async exportState(lazy = false): Promise<ExportedOptimizerState> {
    const params: ExportedOptimizerState['params'] = new Map();
    for (const e of this.inner.moments()) {
      const buffers = new Map<string, ExportedBuffer>([
        ['exp_avg', { dtype: 'F32', shape: e.shape, data: lazy ? e.expAvg : await e.expAvg() }],
        ['exp_avg_sq', { dtype: 'F32', shape: e.shape, data: lazy ? e.expAvgSq : await e.expAvgSq() }],
      ]);
      params.set(e.name, { step: e.step, buffers });
    }
    const { params: _indices, ...hyper } = this.inner.paramGroup();
    return { optimizer: 'adamw', hyper, params };
  }
  importState(state: ExportedOptimizerState): void {
    if (state.optimizer !== 'adamw') throw new Error(`AdamW: the saved state is for ${state.optimizer}`);
    const names = [...this.inner.params.keys()];
    const sd: AdamWStateDict = { state: new Map(), param_groups: [{ ...(state.hyper as Omit<AdamWStateDict["param_groups"][number], "params">), params: names.map((_, i) => i) }] };
    for (const [name, e] of state.params) {
      const index = names.indexOf(name);
      if (index < 0) throw new Error(`AdamW state: '${name}' is not a trained parameter`);
      const m = e.buffers.get('exp_avg');
      const v = e.buffers.get('exp_avg_sq');
      if (!m || !v) throw new Error(`AdamW state: '${name}' lacks exp_avg/exp_avg_sq`);
      sd.state.set(index, { step: e.step, exp_avg: m.data as Float32Array, exp_avg_sq: v.data as Float32Array, shape: m.shape });
    }
    this.inner.loadStateDict(sd);
  }
  dispose(): void {
    this.inner.dispose();
  }
}

/** The optimizer `name` over `params` (AdamW variants with diffusers' weight decay 1e-2). */
export function makeGroupOptimizer(name: OptimizerName, params: Map<string, tf.Variable>): StatefulOptimizer {
  if (name === 'adamw8bit') return new AdamW8bit(params, { weightDecay: 1e-2 });
  if (name === 'adafactor') return new Adafactor(params);
  return new AdamWGroup(new AdamW(params, { lr: 0, weightDecay: 1e-2 }));
}

/**
 * The weights `keys` of `params` (default: every one) become trainable variables, in place (same
 * keys; the replaced tensors are disposed); returns them in that order, also added to `into`.
 */
export function makeTrainable(
  params: Params, into = new Map<string, tf.Variable>(), keys: Iterable<string> = params.keys(),
): Map<string, tf.Variable> {
  for (const key of [...keys]) {
    const t = params.get(key)!;
    const v = tf.variable(t, true);
    t.dispose();
    params.set(key, v);
    into.set(key, v);
  }
  return into;
}

/**
 * The loop's optimizer: the UNet group at the loop's rate; the text group at its own schedule
 * until `textSteps` updates (0 = always). `done` counts completed steps (a resumed run's step).
 */
export class TrainableOptimizer {
  done = 0;
  /**
   * bf16Weights (optim/bf16-round.ts): after each update a parameter's values are rounded
   * stochastically to bfloat16 precision, keyed by its name and the step.
   */
  round?: { vars: Map<string, tf.Variable>; apply: (name: string, variable: tf.Variable, step: number) => void };
  constructor(
    readonly unet: StatefulOptimizer,
    readonly text?: StatefulOptimizer,
    /** Names of the text encoder's parameters (their gradients go to `text`). */
    readonly textKeys: ReadonlySet<string> = new Set(),
    public textLr?: LrSchedule,
    public textSteps = 0,
  ) {}

  textActive(done: number): boolean {
    return !!this.text && (this.textSteps === 0 || done < this.textSteps);
  }

  step(grads: Map<string, Tensor>, lr: number): void {
    this.stepPart(grads, lr);
    this.endStep();
  }

  /** Part of a step's gradients (the loop's fused backward): each group's per-parameter update, no step counted. */
  stepPart(grads: Map<string, Tensor>, lr: number): void {
    const textGrads = new Map<string, Tensor>();
    const unetGrads = new Map<string, Tensor>();
    for (const [k, g] of grads) (this.textKeys.has(k) ? textGrads : unetGrads).set(k, g);
    if (unetGrads.size) this.unet.step(unetGrads, lr);
    const textUpdated = !!this.text && textGrads.size > 0 && this.textActive(this.done);
    if (textUpdated) this.text!.step(textGrads, this.textLr?.getLr(this.done) ?? lr);
    if (!this.round) return;
    for (const name of [...unetGrads.keys(), ...(textUpdated ? textGrads.keys() : [])]) {
      const v = this.round.vars.get(name);
      if (v) this.round.apply(name, v, this.done);
    }
  }

  endStep(): void {
    this.done++;
  }

  async exportGroups(): Promise<Map<string, ExportedOptimizerState>> {
    // lazy buffers: the writer reads one at a time (no copy of every moment at once; estimate-methods.ts)
    const groups = new Map([['unet', await this.unet.exportState(true)]]);
    if (this.text) groups.set('text', await this.text.exportState(true));
    return groups;
  }

  importGroups(groups: Map<string, ExportedOptimizerState>): void {
    const unet = groups.get('unet');
    if (!unet) throw new Error('no unet group');
    if (this.text && !groups.has('text')) throw new Error('the saved state has no text-encoder group (the run did not train it)');
    this.unet.importState(unet);
    if (this.text) this.text.importState(groups.get('text')!);
  }

  dispose(): void {
    this.unet.dispose();
    this.text?.dispose();
  }
}

/**
 * The loop's trainable set: `all`, less the text group's `textKeys` from the step its limit
 * stops it (no gradients are taken for them then); `prune(done)` after each step.
 */
export function textLimitedTrainable(
  optimizer: TrainableOptimizer, all: Iterable<[string, tf.Variable]>, textKeys: Iterable<string>, startStep: number,
): { trainable: Map<string, tf.Variable>; prune(done: number): void } {
  const trainable = new Map(all);
  const keys = [...textKeys];
  const prune = (done: number) => {
    if (!optimizer.textActive(done)) for (const k of keys) trainable.delete(k);
  };
  prune(startStep);
  return { trainable, prune };
}

/** Write the groups' states to one safetensors file (replaced if present: it belongs to this run). */
export async function writeOptimizerState(path: string, groups: Map<string, ExportedOptimizerState>, extra: Record<string, string> = {}): Promise<void> {
  const tensors: TensorToWrite[] = [];
  const meta: Record<string, string> = { ...extra };
  for (const [group, state] of groups) {
    const steps: Record<string, number> = {};
    for (const [param, e] of state.params) {
      steps[param] = e.step;
      for (const [buf, b] of e.buffers) {
        tensors.push({ name: `${group}:${param}#${buf}`, dtype: b.dtype, shape: b.shape, data: b.data });
      }
    }
    meta[`${group}.optimizer`] = state.optimizer;
    meta[`${group}.hyper`] = JSON.stringify(state.hyper);
    meta[`${group}.steps`] = JSON.stringify(steps);
  }
  await writeSafetensors(path, tensors, meta, { overwrite: true });
}

export async function readOptimizerState(path: string): Promise<Map<string, ExportedOptimizerState>> {
  const file = await openSafetensors(path);
  try {
    const meta = file.metadata();
    const groups = new Map<string, ExportedOptimizerState>();
    for (const key of Object.keys(meta).filter((k) => k.endsWith('.optimizer'))) {
      const group = key.slice(0, -'.optimizer'.length);
      const steps = JSON.parse(meta[`${group}.steps`] ?? '{}') as Record<string, number>;
      const params: ExportedOptimizerState['params'] = new Map(Object.entries(steps).map(([p, step]) => [p, { step, buffers: new Map() }]));
      groups.set(group, { optimizer: meta[key]!, hyper: JSON.parse(meta[`${group}.hyper`] ?? '{}') as Record<string, unknown>, params });
    }
    for (const name of file.keys()) {
      const colon = name.indexOf(':');
      const hash = name.lastIndexOf('#');
      const entry = groups.get(name.slice(0, colon))?.params.get(name.slice(colon + 1, hash));
      if (!entry) throw new Error(`${path}: tensor '${name}' belongs to no parameter in the metadata`);
      const { dtype, shape } = file.info(name);
      const data = dtype === 'U8' ? await file.readRaw(name) : await file.read(name);
      entry.buffers.set(name.slice(hash + 1), { dtype: dtype === 'U8' ? 'U8' : 'F32', shape, data });
    }
    return groups;
  } finally {
    await file.close();
  }
}
