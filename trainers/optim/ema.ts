/**
 * @file Exponential moving average of the trained weights, kept on the CPU as Float32Arrays
 * (why: a second copy of the UNet in device memory is what a fine-tune can least afford; the
 * webui checkpoint's `model_ema.*` is the same idea, ldm/modules/ema.py LitEma).
 * Every `every` optimizer steps: ema ← decay·ema + (1 − decay)·param, with the effective decay
 * optionally warmed up as in LitEma / diffusers EMAModel: min(decay, (1 + u)/(10 + u)), u = the
 * number of updates so far (early on the average follows the weights closely instead of
 * remembering the random start for thousands of steps).
 * State (shadow weights + update count + settings) saves to and loads from one safetensors file,
 * so a resumed run continues the average exactly.
 *
 * Example:
 *   const ema = await Ema.fromParams(trainable, { decay: 0.999, every: 1 });
 *   if (ema.due(step)) await ema.update(trainable);
 *   ema.weights(); // Map<key, Float32Array>, checkpoint shape
 */
import type { Tensor } from '../backend/tf.ts';
import { openSafetensors, writeSafetensors } from '../io/safetensors.ts';
import { optimKernels } from './native.ts';

export interface EmaOptions {
  /** Decay per update (LitEma default 0.9999). */
  decay: number;
  /** Update every N optimizer steps (default 1). */
  every?: number;
  /** Warm the decay up as min(decay, (1+u)/(10+u)). Default false. */
  warmup?: boolean;
}

export class Ema {
  /** Number of updates done. */
  updates = 0;

  private constructor(
    readonly options: Required<EmaOptions>,
    private readonly shadow: Map<string, { values: Float32Array; shape: number[] }>,
  ) {}

  /** Start the average at the current weights. */
  static async fromParams(params: ReadonlyMap<string, Tensor>, options: EmaOptions): Promise<Ema> {
    const shadow = new Map<string, { values: Float32Array; shape: number[] }>();
    for (const [key, t] of params) shadow.set(key, { values: Float32Array.from(await t.data()), shape: [...t.shape] });
    return new Ema(normalise(options), shadow);
  }

  /** From plain arrays (tests, or weights already on the host). */
  static fromArrays(weights: ReadonlyMap<string, { values: Float32Array; shape: number[] }>, options: EmaOptions): Ema {
    const shadow = new Map([...weights].map(([k, w]) => [k, { values: Float32Array.from(w.values), shape: [...w.shape] }]));
    return new Ema(normalise(options), shadow);
  }

  /** Whether optimizer step `step` (1-based, after the step) is an update step. */
  due(step: number): boolean {
    return step % this.options.every === 0;
  }

  /** The decay the next update uses. */
  currentDecay(): number {
    const { decay, warmup } = this.options;
    return warmup ? Math.min(decay, (1 + this.updates) / (10 + this.updates)) : decay;
  }

  /** ema ← d·ema + (1 − d)·param, for every key (reads the tensors to the host). */
  async update(params: ReadonlyMap<string, Tensor>): Promise<void> {
    const arrays = new Map<string, Float32Array>();
    for (const [key, t] of params) arrays.set(key, (await t.data()) as Float32Array);
    this.updateArrays(arrays);
  }

  updateArrays(params: ReadonlyMap<string, ArrayLike<number>>): void {
    const d = this.currentDecay();
    const kernels = optimKernels();
    for (const [key, { values }] of this.shadow) {
      const p = params.get(key);
      if (!p) throw new Error(`EMA: no value for '${key}' in this update`);
      if (p.length !== values.length) throw new Error(`EMA: '${key}' has ${p.length} values, the average ${values.length}`);
      // natively the same float64 expression, threaded (the shadow is this object's own array)
      if (kernels && p instanceof Float32Array) kernels.emaUpdate(values, p, values, d);
      else for (let i = 0; i < values.length; i++) values[i] = d * values[i]! + (1 - d) * p[i]!;
    }
    this.updates++;
  }

  /** The averaged weights, by key. */
  weights(): Map<string, { values: Float32Array; shape: number[] }> {
    return this.shadow;
  }

  /** Write the state (an existing file is replaced: a run's own snapshot). */
  async save(path: string): Promise<void> {
    const tensors = [...this.shadow].map(([name, w]) => ({ name, dtype: 'F32' as const, shape: w.shape, data: w.values }));
    const { decay, every, warmup } = this.options;
    await writeSafetensors(path, tensors, { format: 'sidetrain-ema', decay: String(decay), every: String(every), warmup: String(warmup), updates: String(this.updates) }, { overwrite: true });
  }

  static async load(path: string): Promise<Ema> {
    const file = await openSafetensors(path);
    try {
      const meta = file.metadata();
      if (meta.format !== 'sidetrain-ema') throw new Error(`${path}: not an EMA state file (metadata format is '${meta.format ?? ''}')`);
      const shadow = new Map<string, { values: Float32Array; shape: number[] }>();
      for (const key of file.keys()) shadow.set(key, { values: await file.read(key), shape: file.info(key).shape });
      const ema = new Ema(normalise({ decay: Number(meta.decay), every: Number(meta.every), warmup: meta.warmup === 'true' }), shadow);
      ema.updates = Number(meta.updates);
      return ema;
    } finally {
      await file.close();
    }
  }
}

function normalise(o: EmaOptions): Required<EmaOptions> {
  if (!(o.decay >= 0 && o.decay < 1)) throw new Error(`EMA decay must be in [0, 1), got ${o.decay}`);
  const every = o.every ?? 1;
  if (!Number.isInteger(every) || every < 1) throw new Error(`EMA 'every' must be a positive integer, got ${every}`);
  return { decay: o.decay, every, warmup: o.warmup ?? false };
}
