/**
 * @file What the server does with a job request before any worker starts: the dry run (the same on
 * every interface — the dataset report, no model loaded, nothing written), the estimate, and the
 * refusal of a job whose estimated peak exceeds the memory it may use (a 360 GB job on a 24 GB
 * machine used to start and die). Both run in the probe process (probe.ts), never in the server.
 */
import { totalmem } from 'node:os';
import { METHODS } from '../trainers/memory/estimate-methods.ts';
import type { JobEstimate } from '../trainers/memory/estimate.ts';
import { probe, ProbeError } from './probe.ts';
import { RequestError, fieldError } from './spec.ts';

/** The memory one job may use: RAM, or the cgroup's limit where that is lower. */
export function jobMemoryLimit(): number {
  const constrained = process.constrainedMemory?.() ?? 0;
  return constrained > 0 && constrained < totalmem() ? constrained : totalmem();
}

/** A probe failure is the request's: 422 naming the field at fault. */
function asRequestError(err: unknown, field: string): never {
  if (err instanceof ProbeError) throw new RequestError([fieldError(field, err.message)], err.status);
  throw err;
}

/** Has the method an estimate (the estimator knows its memory plan)? */
export const estimable = (type: string): boolean => METHODS.includes(type);

export async function estimateInProbe(type: string, spec: Record<string, unknown>): Promise<JobEstimate> {
  try {
    return (await probe({ op: 'estimate', type, spec, methodsModule: '' })) as JobEstimate;
  } catch (err) {
    asRequestError(err, '/spec/model');
  }
}

export async function dryRunInProbe(methodsModule: string, type: string, spec: Record<string, unknown>): Promise<string> {
  try {
    return String(await probe({ op: 'dryRun', type, spec, methodsModule }));
  } catch (err) {
    asRequestError(err, '/spec/images');
  }
}

/**
 * A job's time before its first step besides caching latents: process start, imports and the
 * backend's set-up (~4 s on 2 cores: bench/estimate-run.ts measured 6–8 s of start and load for an
 * sd-tiny `train` at load 12, whose weights read in no time), then reading and converting the
 * weights at ~0.5 GB/s. Without it the tiny model's total came out 2–3× short of the wall time.
 */
const START_SECONDS = 4;
const LOAD_BYTES_PER_SECOND = 0.5 * 2 ** 30;

export function startSeconds(e: JobEstimate): number {
  const w = e.breakdown.weightBytes;
  return START_SECONDS + (w.text + w.unet + w.vaeEncoder + w.vaeDecoder) / LOAD_BYTES_PER_SECOND;
}

/** Start and load plus the steps: what a user waits for (caching latents aside: one VAE pass per image). */
export function totalSeconds(e: JobEstimate, steps: number): number {
  return startSeconds(e) + e.secondsPerStep * steps;
}

const gb = (bytes: number) => `${(bytes / 2 ** 30).toFixed(1)} GB`;

/** The settings of `spec` that would lower the estimate, as a person would change them. */
function levers(spec: Record<string, unknown>): string[] {
  const out: string[] = [];
  if (typeof spec.width === 'number' && typeof spec.height === 'number') out.push(`a smaller width × height (now ${spec.width} × ${spec.height})`);
  else if (typeof spec.resolution === 'number') out.push(`a smaller resolution (now ${spec.resolution})`);
  if (typeof spec.batchSize === 'number' && spec.batchSize > 1) out.push(`batchSize 1 (now ${spec.batchSize}; gradientAccumulation keeps the effective batch)`);
  if ('gradientCheckpointing' in spec && spec.gradientCheckpointing !== 'on') out.push(`gradientCheckpointing "on"`);
  if ('attentionSlicing' in spec && spec.attentionSlicing !== 'on') out.push(`attentionSlicing "on"`);
  if ('halfFrozenWeights' in spec && spec.halfFrozenWeights !== true) out.push('halfFrozenWeights true');
  return out;
}

/**
 * Refuse (422) a job whose estimated peak exceeds `limitBytes`, naming both numbers and the
 * settings that would make it fit; `force` starts it anyway. Methods without an estimate pass.
 */
export async function checkFits(type: string, spec: Record<string, unknown>, force: boolean, limitBytes = jobMemoryLimit()): Promise<void> {
  if (force || !estimable(type)) return;
  let estimate: JobEstimate;
  try {
    estimate = await estimateInProbe(type, spec);
  } catch (err) {
    // A model file the estimator cannot read (its path is in the message) is refused here; an
    // estimator that does not know this job yet must not stop a job the trainer can run.
    if (err instanceof RequestError && typeof spec.model === 'string' && err.message.includes(spec.model)) throw err;
    return;
  }
  if (estimate.peakBytes <= limitBytes) return;
  const fix = levers(spec);
  throw new RequestError(
    [fieldError('/spec', `needs an estimated ${gb(estimate.peakBytes)} at its peak, more than the ${gb(limitBytes)} this machine gives a job: ${fix.length ? `try ${fix.join(', ')}; ` : ''}or send "force": true to start it anyway`)],
    422,
  );
}
