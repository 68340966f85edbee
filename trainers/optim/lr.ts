/**
 * @file Learn-rate schedules. `getLr(step)` is a pure function of the number of optimizer steps
 * already done (`step` = 0 for the first update), so a resumed run gets the same rates.
 *
 * 1. The webui's schedule string, parsed as modules/textual_inversion/learn_schedule.py
 *    (LearnScheduleIterator + LearnRateScheduler, webui v1.10.1) does:
 *      "0.005:100, 1e-3:1000, 1e-5"  → 0.005 while step < 100, 1e-3 while < 1000, 1e-5 to the end
 *    - `RATE:STEP` = RATE until STEP; a STEP beyond max steps is clamped and ends the list;
 *    - `RATE` alone or `RATE:-1` = RATE to max steps, and ends the list (later entries are unused);
 *    - on resume (`curStep`), pairs whose STEP ≤ curStep are dropped;
 *    - a list that ends with a `RATE:STEP` below max steps ends the run at STEP (the webui's
 *      scheduler "finishes" there): that is `endStep`.
 *    The webui also uses this parser for the gradient-clipping value (`clip_grad_sched`).
 *    Stricter than the webui, on purpose: an entry with three parts, an empty entry, a step of 0
 *    or below -1, and steps that do not increase are errors (the webui silently ignores or
 *    truncates them). Not reproduced: when an entry's STEP is clamped to max steps and another
 *    entry follows, the webui's stateful scheduler runs one extra step at the next rate.
 * 2. constantWithWarmup / cosineWithWarmup: transformers' get_constant_schedule_with_warmup and
 *    get_cosine_schedule_with_warmup (linear warm-up from 0, so the very first update has lr 0).
 *
 * Example:
 *   const s = parseLrSchedule('0.005:100, 1e-3:1000, 1e-5', 3000);
 *   s.getLr(0) === 0.005; s.getLr(100) === 1e-3; s.endStep === 3000
 */

export interface LrSegment {
  /** Rate used for every update whose step (0-based, completed steps) is below `until`. */
  rate: number;
  until: number;
}

export interface LrSchedule {
  /** The rate for the update that follows `step` completed steps. */
  getLr(step: number): number;
  /** Training stops when this many steps are done (≤ max steps). */
  endStep: number;
  /** The schedule as rate/until pieces (constant pieces only for the webui string). */
  segments: LrSegment[];
  /** Non-fatal remarks (e.g. entries that can never be reached). */
  warnings: string[];
  /** One line for logs: "0.005 until step 100, 0.001 until step 1000, 1e-05 until step 3000". */
  describe(): string;
}

export const LR_SYNTAX =
  'Syntax: RATE[:STEP], RATE[:STEP], ... — each RATE is used until its STEP; a RATE without ' +
  'STEP (or with :-1) is used to the end. Examples: "0.005", "0.005:100, 1e-3:1000, 1e-5", ' +
  '"0.01:500, 0.001:-1".';

const RATE_RE = /^\+?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$/;
const STEP_RE = /^[-+]?\d+$/;

interface Entry {
  text: string;
  rate: number;
  step?: number;
}

function fail(what: string, text: string, why: string): never {
  throw new Error(`bad ${what} schedule "${text}": ${why}. ${LR_SYNTAX}`);
}

function parseEntries(text: string, what: string): Entry[] {
  if (typeof text !== 'string' || text.trim() === '') fail(what, String(text), 'it is empty');
  const entries: Entry[] = [];
  for (const raw of text.split(',')) {
    const entry = raw.trim();
    if (entry === '') fail(what, text, 'an entry between commas is empty');
    const parts = entry.split(':').map((p) => p.trim());
    if (parts.length > 2) fail(what, text, `'${entry}' has more than one ':'`);
    const [rateText, stepText] = parts as [string, string | undefined];
    if (!RATE_RE.test(rateText)) fail(what, text, `'${rateText}' is not a rate (a number like 0.005 or 1e-3)`);
    const rate = Number(rateText);
    if (!Number.isFinite(rate)) fail(what, text, `'${rateText}' is not a finite number`);
    if (stepText === undefined) {
      entries.push({ text: entry, rate });
      continue;
    }
    if (!STEP_RE.test(stepText)) fail(what, text, `'${stepText}' is not a step (a whole number, or -1 for "to the end")`);
    const step = Number(stepText);
    if (step !== -1 && step < 1) fail(what, text, `step ${step} in '${entry}' must be -1 or at least 1`);
    entries.push({ text: entry, rate, step });
  }
  let last: Entry | undefined;
  for (const e of entries) {
    if (e.step === undefined || e.step === -1) continue;
    if (last && e.step <= last.step!) fail(what, text, `steps must increase, but '${e.text}' comes after '${last.text}'`);
    last = e;
  }
  return entries;
}

/** LearnScheduleIterator: which (rate, until) pairs a run from `curStep` to `maxSteps` uses. */
function webuiSegments(entries: Entry[], maxSteps: number, curStep: number): { segments: LrSegment[]; unused: Entry[] } {
  const segments: LrSegment[] = [];
  for (let i = 0; i < entries.length; i++) {
    const { rate, step } = entries[i]!;
    const endsList = step === undefined || step === -1 || step > maxSteps;
    if (step === undefined || step === -1) segments.push({ rate, until: maxSteps });
    else if (step > curStep) segments.push({ rate, until: Math.min(step, maxSteps) });
    if (endsList) return { segments, unused: step !== undefined && step > maxSteps ? [] : entries.slice(i + 1) };
  }
  return { segments, unused: [] };
}

function checkSteps(maxSteps: number, curStep: number): void {
  if (!Number.isInteger(maxSteps) || maxSteps < 1) throw new Error(`max steps must be a whole number ≥ 1, got ${maxSteps}`);
  if (!Number.isInteger(curStep) || curStep < 0) throw new Error(`current step must be a whole number ≥ 0, got ${curStep}`);
  if (curStep >= maxSteps) {
    throw new Error(`already trained to step ${curStep}, which is not below max steps ${maxSteps}: raise the steps to continue`);
  }
}

function fromSegments(segments: LrSegment[], warnings: string[], endStep = segments[segments.length - 1]!.until): LrSchedule {
  return {
    segments,
    warnings,
    endStep,
    getLr(step: number): number {
      for (const s of segments) if (step < s.until) return s.rate;
      return segments[segments.length - 1]!.rate;
    },
    describe: () => segments.map((s) => `${s.rate} until step ${s.until}`).join(', '),
  };
}

/**
 * Parse a webui schedule string for a run that is at `curStep` and stops at `maxSteps`.
 * `what` names the setting in error messages ("learn rate", "gradient clip value").
 */
export function parseLrSchedule(text: string, maxSteps: number, curStep = 0, what = 'learn rate'): LrSchedule {
  checkSteps(maxSteps, curStep);
  const entries = parseEntries(text, what);
  const { segments, unused } = webuiSegments(entries, maxSteps, curStep);
  if (segments.length === 0) {
    const lastStep = entries[entries.length - 1]!.step;
    throw new Error(`${what} schedule "${text}" ends at step ${lastStep}, but training is already at step ${curStep}: nothing left to train`);
  }
  const warnings = unused.length
    ? [`${what} schedule: ${unused.map((e) => `'${e.text}'`).join(', ')} never used (an earlier entry already runs to the end)`]
    : [];
  return fromSegments(segments, warnings);
}

/** Check a schedule string without a run (schema-level validation); returns the error text or undefined. */
export function lrScheduleError(text: string, what = 'learn rate'): string | undefined {
  try {
    parseEntries(text, what);
    return undefined;
  } catch (err) {
    return (err as Error).message;
  }
}

export interface WarmupOptions {
  /** Peak learn rate. */
  lr: number;
  warmupSteps: number;
  maxSteps: number;
}

function warmupFactor(step: number, warmupSteps: number): number | undefined {
  return step < warmupSteps ? step / Math.max(1, warmupSteps) : undefined;
}

function checkWarmup({ lr, warmupSteps, maxSteps }: WarmupOptions): void {
  if (!(lr > 0) || !Number.isFinite(lr)) throw new Error(`learn rate must be a positive number, got ${lr}`);
  if (!Number.isInteger(warmupSteps) || warmupSteps < 0) throw new Error(`warm-up steps must be a whole number ≥ 0, got ${warmupSteps}`);
  checkSteps(maxSteps, 0);
}

/** transformers get_constant_schedule_with_warmup: lr·step/warmup, then lr. */
export function constantWithWarmup(opts: WarmupOptions): LrSchedule {
  checkWarmup(opts);
  const { lr, warmupSteps, maxSteps } = opts;
  const schedule = fromSegments([{ rate: lr, until: maxSteps }], []);
  schedule.getLr = (step) => lr * (warmupFactor(step, warmupSteps) ?? 1);
  schedule.describe = () => `${lr} after ${warmupSteps} warm-up steps, until step ${maxSteps}`;
  return schedule;
}

/**
 * transformers get_cosine_schedule_with_warmup: linear warm-up, then
 * lr · max(0, ½(1 + cos(π · cycles · 2 · progress))); `cycles` 0.5 = one half-cosine down to 0.
 */
export function cosineWithWarmup(opts: WarmupOptions & { cycles?: number }): LrSchedule {
  checkWarmup(opts);
  const { lr, warmupSteps, maxSteps, cycles = 0.5 } = opts;
  const schedule = fromSegments([{ rate: lr, until: maxSteps }], []);
  schedule.getLr = (step) => {
    const warm = warmupFactor(step, warmupSteps);
    if (warm !== undefined) return lr * warm;
    const progress = (step - warmupSteps) / Math.max(1, maxSteps - warmupSteps);
    return lr * Math.max(0, 0.5 * (1 + Math.cos(Math.PI * cycles * 2 * progress)));
  };
  schedule.describe = () => `cosine from ${lr} after ${warmupSteps} warm-up steps to step ${maxSteps}`;
  return schedule;
}
