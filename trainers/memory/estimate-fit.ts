/**
 * @file Which memory levers a full-weight job (Dreambooth, fine-tune) needs to fit a limit: the
 * job's estimate with each combination of a ladder that trades time or optimizer fidelity for
 * memory, the one the job would pick (the first that fits: the least change from what was asked),
 * and a sentence saying which. The ladder, each rung adding to the one before:
 *   as given → gradient checkpointing on (every block recomputed) → fused backward (no whole
 *   gradient buffer) → trained weights stored in bf16 (2 bytes a weight; needs the fused backward)
 *   → 8-bit AdamW moments → Adafactor's factored moments.
 * bf16 storage comes before the optimizer rungs: stochastic rounding keeps each update unbiased,
 * while a different optimizer changes the training's dynamics. A rung that cannot apply to the job
 * is left out and said why (fused backward: gradAccum > 1 or clipping by norm; bf16 storage: no
 * fused backward, or a backend without host arrays); an optimizer rung only where it uses less
 * state than the job's own.
 */

/** Optimizer state per parameter, most to least (estimate-methods.ts OPTIMIZER_BYTES). */
const OPTIMIZERS = ['adamw', 'adamw8bit', 'adafactor'];

export interface MemoryCombination {
  /** The options changed from the job's ({} = as given). */
  changes: Record<string, unknown>;
  /** "gradient checkpointing on, fused backward, optimizer adafactor". */
  label: string;
  peakBytes: number;
  secondsPerStep: number;
  fits: boolean;
}

export interface MemoryFit {
  limitBytes: number;
  combinations: MemoryCombination[];
  /** Index of the first combination that fits; undefined when none does. */
  pick?: number;
  /** Rungs left out and why. */
  skipped: string[];
}

/** Backends whose tensors live in host arrays, where bf16Weights can store them (nets/bf16-store.ts). */
const BF16_STORE_BACKENDS = ['cpu-native', 'cpu'];

/** The ladder's option changes for `spec` on `backend` (cumulative), and the rungs that cannot apply. */
export function ladderFor(spec: Record<string, unknown>, backend = 'cpu-native'): { rungs: Record<string, unknown>[]; skipped: string[] } {
  const rungs: Record<string, unknown>[] = [{}];
  const skipped: string[] = [];
  let at: Record<string, unknown> = {};
  const add = (change: Record<string, unknown>) => {
    at = { ...at, ...change };
    rungs.push(at);
  };
  if (spec.gradientCheckpointing !== 'on') add({ gradientCheckpointing: 'on' });
  const accum = typeof spec.gradAccum === 'number' ? spec.gradAccum : 1;
  if (spec.fusedBackward === true) { /* already on */ } else if (accum > 1) skipped.push(`fused backward: needs gradAccum 1 (the job sums ${accum})`);
  else if (spec.clipGrad === 'norm') skipped.push('fused backward: cannot clip by the global norm (clipGrad norm)');
  else add({ fusedBackward: true });
  const fused = spec.fusedBackward === true || at.fusedBackward === true;
  if (spec.bf16Weights === true) { /* already on */ } else if (!fused) skipped.push('trained weights in bf16: needs the fused backward');
  else if (!BF16_STORE_BACKENDS.includes(backend)) skipped.push(`trained weights in bf16: the ${backend} backend has no host arrays to store them in`);
  else add({ bf16Weights: true });
  const own = OPTIMIZERS.indexOf(String(spec.optimizer ?? 'adamw'));
  for (const name of OPTIMIZERS.slice(Math.max(0, own) + 1)) add({ optimizer: name });
  return { rungs, skipped };
}

export function describeChanges(changes: Record<string, unknown>): string {
  const parts: string[] = [];
  if (changes.gradientCheckpointing === 'on') parts.push('gradient checkpointing on');
  if (changes.fusedBackward === true) parts.push('fused backward');
  if (changes.bf16Weights === true) parts.push('trained weights stored in bf16');
  if (typeof changes.optimizer === 'string') parts.push(`optimizer ${changes.optimizer}`);
  return parts.length ? parts.join(', ') : 'as given';
}

/** Estimate every rung with `estimate` (the job's spec overlaid with the changes) against `limitBytes`. */
export async function fitLadder(
  spec: Record<string, unknown>, limitBytes: number,
  estimate: (spec: Record<string, unknown>) => Promise<{ peakBytes: number; secondsPerStep: number }>,
  backend?: string,
): Promise<MemoryFit> {
  const { rungs, skipped } = ladderFor(spec, backend);
  const combinations: MemoryCombination[] = [];
  for (const changes of rungs) {
    const e = await estimate({ ...spec, ...changes });
    const last = combinations[combinations.length - 1];
    if (last && last.peakBytes === e.peakBytes && last.secondsPerStep === e.secondsPerStep) continue; // a lever auto had already pulled
    // a rung that saves nothing here (Adafactor on a conv-heavy UNet: its factored state of a 3×3
    // filter is 2/3 of the filter, more than 8-bit AdamW's 2 bytes per weight) is said, not offered
    if (last && e.peakBytes >= last.peakBytes) {
      skipped.push(`${describeChanges(changes)}: needs ${gb(e.peakBytes)} GB, no less than ${last.label}`);
      continue;
    }
    combinations.push({ changes, label: describeChanges(changes), peakBytes: e.peakBytes, secondsPerStep: e.secondsPerStep, fits: e.peakBytes <= limitBytes });
  }
  const pick = combinations.findIndex((c) => c.fits);
  return { limitBytes, combinations, pick: pick < 0 ? undefined : pick, skipped };
}

const gb = (bytes: number) => (bytes / 2 ** 30).toFixed(1);

/** One sentence for the estimate's notes and the job log. */
export function describeFit(fit: MemoryFit): string {
  const limit = `${gb(fit.limitBytes)} GB`;
  if (fit.pick === 0) return `fits ${limit} as given`;
  if (fit.pick === undefined) {
    const least = fit.combinations.reduce((a, b) => (b.peakBytes < a.peakBytes ? b : a));
    return `does not fit ${limit} with any memory lever: the least is ${gb(least.peakBytes)} GB (${least.label}); lower the resolution or train LoRA`;
  }
  const c = fit.combinations[fit.pick]!;
  return `does not fit ${limit} as given (${gb(fit.combinations[0]!.peakBytes)} GB); fits with ${c.label}: ${gb(c.peakBytes)} GB, ${c.secondsPerStep.toFixed(1)} s/step`;
}
