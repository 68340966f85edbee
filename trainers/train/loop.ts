/**
 * @file The one training loop every method runs (nanoGPT's train.py, diffusers' TI loop): learn
 * rate from the schedule, gradient accumulation, clipping, optimizer step, loss CSV, progress
 * events, previews, snapshots, cancel and NaN stops. A method supplies only what differs:
 * its trainable variables, its batches and loss, what it does after each step, and how it saves.
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { atomicGroup } from '../io/atomic.ts';
import type { JobContext } from '../job.ts';
import { LossLog } from './loss-log.ts';
import { lossAndGrads } from '../nets/recompute.ts';
import { allFiniteWithin } from '../optim/check.ts';
import { releaseIdleOutputs } from '../backend/native/output.ts';

/** What a method gives the loop. */
export interface TrainMethod<Batch> {
  /** The variables the optimizer updates, by name. */
  trainable: Map<string, tf.Variable>;
  /** The micro-batch of a step: a function of (seed, step, micro), without side effects. */
  nextBatch(step: number, micro: number): Promise<Batch> | Batch;
  /** Scalar loss for one micro-batch of `step`; its gradients are taken by lossAndGrads (nets/recompute.ts). */
  loss(batch: Batch, step: number): tf.Scalar;
  /**
   * After update `step` is applied and checked finite, before its report, snapshot and preview:
   * the method's per-step extras (EMA, validation, loss-part logs, a trainable set that shrinks).
   */
  afterStep?(step: number): Promise<void> | void;
  /** Save a snapshot (periodic) or the final output; returns the paths written. */
  save(step: number, final: boolean): Promise<string[]>;
  /** Render a preview image for this step; returns its path. */
  preview?(step: number): Promise<string>;
  /** Release the batch (cached tensors stay). */
  disposeBatch?(batch: Batch): void;
  /**
   * Largest |value| a trained weight may reach and still be saved (default: any finite value).
   * TI: the `.optim` checksum multiplies the vectors by 100 in float32 (webui Embedding.checksum).
   */
  maxAbs?: number;
}

export interface Optimizer {
  step(grads: Map<string, Tensor>, lr: number): void;
  /**
   * Fused backward: part of the current step's gradients (each parameter at most once per step);
   * `endStep` follows the last part. Without them, `step` is called per part — right for
   * optimizers whose state is per parameter (AdamW, AdamW8bit, Adafactor).
   */
  stepPart?(grads: Map<string, Tensor>, lr: number): void;
  endStep?(): void;
}

export interface LoopOptions {
  startStep: number;
  /** Last step (inclusive), as the webui counts: steps are 1-based. */
  steps: number;
  gradAccum: number;
  /** Learn rate of the update that follows `done` completed steps (trainers/optim/lr.ts getLr). */
  learnRate(done: number): number;
  /** Gradient clipping of the accumulated gradients before update `done + 1` (trainers/optim/clip-grad.ts). */
  clip?: ((grads: Map<string, Tensor>, done: number) => Map<string, Tensor>) & { byNorm?: boolean };
  /**
   * Fused backward (the job's `fusedBackward`): each parameter's gradient is clipped and applied
   * as soon as the backward pass completes it, then freed (nets/recompute.ts). Needs gradAccum 1
   * and a per-element clip (`clip` must not be by norm: trainLoop refuses both).
   */
  fused?: boolean;
  optimizer: Optimizer;
  saveEvery: number;
  previewEvery: number;
  /** Steps per epoch, for the CSV's epoch/epoch_step columns. */
  stepsPerEpoch: number;
  /** The job's loss log (loss-log.ts: `step,epoch,epoch_step,loss,learn_rate`, the webui's textual_inversion_loss.csv columns). */
  csvPath?: string;
}

export interface LoopResult {
  /** The last step whose update was applied. */
  step: number;
  cancelled: boolean;
}

/** Sum gradient maps in place into `acc` (disposing what it replaces). */
function accumulate(acc: Map<string, Tensor>, grads: Record<string, Tensor>): void {
  for (const [name, g] of Object.entries(grads)) {
    const prev = acc.get(name);
    if (prev) {
      acc.set(name, prev.add(g));
      prev.dispose();
      g.dispose();
    } else acc.set(name, g);
  }
}

/** Apply a part of step `step`'s gradients (fused backward): clipped per element, then the optimizer. */
function applyPart(opts: LoopOptions, grads: Map<string, Tensor>, step: number): void {
  const clipped = opts.clip ? opts.clip(grads, step - 1) : grads;
  const lr = opts.learnRate(step - 1);
  if (opts.optimizer.stepPart) opts.optimizer.stepPart(clipped, lr);
  else opts.optimizer.step(clipped, lr);
  if (clipped !== grads) tf.dispose([...clipped.values()]);
}

/** One update with the fused backward: no map of every gradient exists at any time. */
async function fusedStep<B>(method: TrainMethod<B>, opts: LoopOptions, step: number): Promise<number> {
  const batch = await method.nextBatch(step, 0);
  const { value, grads } = lossAndGrads(() => method.loss(batch, step), method.trainable, (name, g) => applyPart(opts, new Map([[name, g]]), step));
  const rest = new Map(Object.entries(grads));
  applyPart(opts, rest, step);
  opts.optimizer.endStep?.();
  tf.dispose([...rest.values()]);
  const loss = (await value.data())[0]!;
  value.dispose();
  method.disposeBatch?.(batch);
  return loss;
}

async function oneStep<B>(method: TrainMethod<B>, opts: LoopOptions, step: number): Promise<number> {
  if (opts.fused) return fusedStep(method, opts, step);
  const grads = new Map<string, Tensor>();
  let lossSum = 0;
  for (let micro = 0; micro < opts.gradAccum; micro++) {
    const batch = await method.nextBatch(step, micro);
    const { value, grads: g } = lossAndGrads(() => method.loss(batch, step).div(opts.gradAccum) as tf.Scalar, method.trainable);
    lossSum += (await value.data())[0]! * opts.gradAccum;
    value.dispose();
    accumulate(grads, g);
    method.disposeBatch?.(batch);
  }
  const clipped = opts.clip ? opts.clip(grads, step - 1) : grads;
  opts.optimizer.step(clipped, opts.learnRate(step - 1));
  tf.dispose([...grads.values(), ...(clipped === grads ? [] : clipped.values())]);
  return lossSum / opts.gradAccum;
}

/**
 * Run steps startStep+1 … steps. Stops after the current step when ctx.signal aborts, and
 * with an error (after keeping the last good snapshot) when the loss or a variable is NaN/Inf.
 */
export async function trainLoop<B>(method: TrainMethod<B>, opts: LoopOptions, ctx: JobContext): Promise<LoopResult> {
  if (opts.fused && opts.gradAccum !== 1) throw new Error(`fusedBackward applies each gradient as it is computed, so it cannot sum ${opts.gradAccum} micro-batches (gradAccum): use gradAccum 1 or turn fusedBackward off`);
  // torch's clip_grad_norm_ scales by the norm of ALL gradients, known only after the last one;
  // clipping each parameter by its own norm would be a different method, so the pair is refused
  if (opts.fused && opts.clip?.byNorm) throw new Error('fusedBackward cannot clip by the global gradient norm (it is known only when every gradient exists): use clipGrad value or disabled, or turn fusedBackward off');
  const log = opts.csvPath ? await LossLog.start(opts.csvPath, opts.startStep, ctx) : undefined;
  const started = Date.now();
  let step = opts.startStep;
  let lastSnapshot: string | undefined;
  while (step < opts.steps && !ctx.signal.aborted) {
    await ctx.waitIfPaused?.(); // the server's "pause while the webui generates" mode
    if (ctx.signal.aborted) break;
    const next = step + 1;
    const loss = await oneStep(method, opts, next);
    if (!Number.isFinite(loss) || !(await allFiniteWithin(method.trainable.values(), method.maxAbs ?? Infinity))) {
      throw new NonFiniteError(next, loss, lastSnapshot);
    }
    step = next;
    await method.afterStep?.(step);
    await report(opts, ctx, log, step, loss, started);
    const saving = opts.saveEvery > 0 && step % opts.saveEvery === 0 && step < opts.steps;
    const previewing = method.preview && opts.previewEvery > 0 && step % opts.previewEvery === 0;
    // a snapshot's buffers and a preview's other shapes: not beside the steps' idle outputs
    if (saving || previewing) releaseIdleOutputs();
    if (saving) {
      const paths = await atomicGroup(() => method.save(step, false), (p) => p[0]); // snapshot + .optim together
      // the snapshot itself; its side files (.optim) are not snapshots of their own
      lastSnapshot = paths[0] ?? lastSnapshot;
      if (paths[0]) ctx.emit({ type: 'snapshot', step, path: paths[0] });
    }
    if (previewing) {
      ctx.emit({ type: 'preview', step, path: await method.preview!(step) });
    }
  }
  releaseIdleOutputs(); // the final save and sampling come next
  return { step, cancelled: ctx.signal.aborted && step < opts.steps };
}

async function report(opts: LoopOptions, ctx: JobContext, log: LossLog | undefined, step: number, loss: number, started: number): Promise<void> {
  const lr = opts.learnRate(step - 1);
  const epoch = Math.floor((step - 1) / opts.stepsPerEpoch);
  const epochStep = ((step - 1) % opts.stepsPerEpoch) + 1;
  await log?.append({ step, epoch, epochStep, loss, learnRate: lr });
  const done = step - opts.startStep;
  const itPerSec = done / Math.max((Date.now() - started) / 1000, 1e-9);
  const etaSeconds = (opts.steps - step) / Math.max(itPerSec, 1e-9);
  ctx.emit({ type: 'step', step, totalSteps: opts.steps, epoch, loss, learnRate: lr, itPerSec, etaSeconds });
}

/** NaN/Inf in the loss or the weights: the run stops and keeps the last good snapshot. */
export class NonFiniteError extends Error {
  constructor(
    readonly step: number,
    readonly loss: number,
    /** The last snapshot this run saved, if any (it is left as it was). */
    readonly lastSnapshot?: string,
  ) {
    super(
      `step ${step}: the loss or a trained weight became ${Number.isNaN(loss) ? 'NaN' : 'non-finite or too large'} ` +
        `(loss ${loss}); ${lastSnapshot ? `the last good snapshot ${lastSnapshot} was kept` : 'no snapshot had been saved yet; nothing was written'} ` +
        '— lower the learn rate or enable gradient clipping',
    );
  }
}
