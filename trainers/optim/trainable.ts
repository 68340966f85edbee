/**
 * @file The optimizer of every method that trains network weights (Dreambooth, LoRA, fine-tune):
 * the weights made trainable variables, one optimizer per parameter group (UNet,
 * optionally the text encoder with its own learn-rate schedule and step limit, as diffusers'
 * two param groups; on SDXL OpenCLIP-G may be a third group at its own rate, as kohya's
 * `learning_rate_te2` / `text_encoder_lr` list), chosen by name (adamw | adamw8bit | adafactor), and its state saved beside a
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
  round?: { vars: Map<string, tf.Variable>; apply: (name: string, variable: tf.Variable, step: number) => void; dispose?: () => void };
  /**
   * SDXL's second text encoder (OpenCLIP-G, kohya te2) as its own group (`withText2`): its keys
   * are also in `textKeys` (the text side: same step limit), their updates at `text2Lr`.
   */
  text2?: { optimizer: StatefulOptimizer; keys: ReadonlySet<string>; lr?: LrSchedule };
  constructor(
    readonly unet: StatefulOptimizer,
    readonly text?: StatefulOptimizer,
    /** Names of the text encoder's parameters (their gradients go to `text`). */
    readonly textKeys: ReadonlySet<string> = new Set(),
    public textLr?: LrSchedule,
    public textSteps = 0,
  ) {}

  /** OpenCLIP-G's weights `keys` (also in `textKeys`) as their own group at `lr`. */
  withText2(optimizer: StatefulOptimizer, keys: ReadonlySet<string>, lr?: LrSchedule): this {
    const stray = [...keys].find((k) => !this.textKeys.has(k));
    if (stray) throw new Error(`second text-encoder group: '${stray}' is not a text-encoder weight`);
    this.text2 = { optimizer, keys, lr };
    return this;
  }

  textActive(done: number): boolean {
    return (!!this.text || !!this.text2) && (this.textSteps === 0 || done < this.textSteps);
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
    const textUpdated = textGrads.size > 0 && this.textActive(this.done);
    if (textUpdated) this.stepText(textGrads, lr);
    if (!this.round) return;
    for (const name of [...unetGrads.keys(), ...(textUpdated ? textGrads.keys() : [])]) {
      const v = this.round.vars.get(name);
      if (v) this.round.apply(name, v, this.done);
    }
  }

  /** The text side's gradients: OpenCLIP-G's (with `text2`) at its rate, the rest at the text rate. */
  private stepText(grads: Map<string, Tensor>, lr: number): void {
    const second = new Map<string, Tensor>();
    const first = new Map<string, Tensor>();
    for (const [k, g] of grads) (this.text2?.keys.has(k) ? second : first).set(k, g);
    const textLr = this.textLr?.getLr(this.done) ?? lr;
    if (first.size) {
      if (!this.text) throw new Error(`text-encoder gradient for '${[...first.keys()][0]}' but no text-encoder group`);
      this.text.step(first, textLr);
    }
    if (second.size) this.text2!.optimizer.step(second, this.text2!.lr?.getLr(this.done) ?? textLr);
  }

  endStep(): void {
    this.done++;
  }

  async exportGroups(): Promise<Map<string, ExportedOptimizerState>> {
    // lazy buffers: the writer reads one at a time (no copy of every moment at once; estimate-methods.ts)
    const groups = new Map([['unet', await this.unet.exportState(true)]]);
    if (this.text) groups.set('text', await this.text.exportState(true));
    if (this.text2) groups.set('text2', await this.text2.optimizer.exportState(true));
    return groups;
  }

  importGroups(groups: Map<string, ExportedOptimizerState>): void {
    const unet = groups.get('unet');
    if (!unet) throw new Error('no unet group');
    const saved = this.text2 && !groups.has('text2') ? splitText2(groups, this.text2.keys) : groups;
    if (this.text && !saved.has('text')) throw new Error('the saved state has no text-encoder group (the run did not train it)');
    if (this.text2 && !saved.has('text2')) throw new Error('the saved state has no OpenCLIP-G group (the run did not train it)');
    this.unet.importState(unet);
    if (this.text) this.text.importState(saved.get('text')!);
    if (this.text2) this.text2.optimizer.importState(saved.get('text2')!);
  }

  dispose(): void {
    this.unet.dispose();
    this.text?.dispose();
    this.text2?.optimizer.dispose();
    this.round?.dispose?.();
  }
}

/**
 * The optimizer `name` over the UNet's `unet` and the text encoders' `text` weights: those in
 * `text2Keys` (SDXL's OpenCLIP-G) a group of their own at `text2Lr`, the rest of `text` the text
 * group at `textLr`; both text groups stop after `textSteps` updates (0 = never).
 */
export function makeTrainableOptimizer(
  name: OptimizerName, unet: Map<string, tf.Variable>, text: Map<string, tf.Variable>,
  opts: { text2Keys?: ReadonlySet<string>; textLr?: LrSchedule; text2Lr?: LrSchedule; textSteps?: number } = {},
): TrainableOptimizer {
  const second = new Map([...text].filter(([k]) => opts.text2Keys?.has(k)));
  const first = new Map([...text].filter(([k]) => !second.has(k)));
  const optimizer = new TrainableOptimizer(
    makeGroupOptimizer(name, unet), first.size ? makeGroupOptimizer(name, first) : undefined, new Set(text.keys()), opts.textLr, opts.textSteps ?? 0,
  );
  return second.size ? optimizer.withText2(makeGroupOptimizer(name, second), new Set(second.keys()), opts.text2Lr) : optimizer;
}

/**
 * A state saved with both SDXL encoders in one 'text' group (before OpenCLIP-G had its own rate)
 * as 'text' and 'text2': each parameter's moments and step are its own, so they split as they are.
 */
function splitText2(groups: Map<string, ExportedOptimizerState>, keys: ReadonlySet<string>): Map<string, ExportedOptimizerState> {
  const text = groups.get('text');
  if (!text) return groups;
  const part = (second: boolean): ExportedOptimizerState => ({ ...text, params: new Map([...text.params].filter(([k]) => keys.has(k) === second)) });
  const out = new Map(groups);
  const first = part(false);
  if (first.params.size) out.set('text', first);
  else out.delete('text');
  out.set('text2', part(true));
  return out;
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
