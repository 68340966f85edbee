/**
 * @file The job's memory decision at start: the toggles of memory/options.ts resolved by the
 * estimate (estimate.ts, from the checkpoint's shapes alone, before anything loads), and said in
 * the job log so a user sees why a step is slower or smaller.
 */
import type { JobContext } from '../job.ts';
import { estimateJob, hasEstimate } from './estimate.ts';
import { describeFit } from './estimate-fit.ts';
import { describeMemory, unetMemoryFor, type MemorySpec, type UNetMemory } from './options.ts';

/**
 * The UNet memory mode for a job of `type` (a trainers/methods/index.ts name) with `spec`, on the
 * backend the job runs (backend/index.ts initBackend's choice).
 */
export async function chooseUNetMemory(
  type: string, spec: Partial<MemorySpec> & object, backend: string, ctx?: Pick<JobContext, 'emit'>,
): Promise<UNetMemory> {
  let memory = unetMemoryFor(spec, true); // without an estimate: only what the user turned on
  let why = '';
  if (hasEstimate(type)) {
    try {
      const estimate = await estimateJob(type, spec as Record<string, unknown>, { backend });
      memory = estimate.memory;
      why = ` (estimated peak ${(estimate.peakBytes / 2 ** 30).toFixed(1)} GB)`;
      // the levers that change the job (fused backward, optimizer) are the user's to turn on: said, not applied
      if (estimate.fit && estimate.fit.pick !== 0) ctx?.emit({ type: 'log', level: 'warn', message: `memory: ${describeFit(estimate.fit)}` });
    } catch (err) {
      why = ` (no estimate: ${(err as Error).message})`;
    }
  }
  ctx?.emit({ type: 'log', level: 'info', message: `memory: ${describeMemory(memory)}${why}` });
  return memory;
}
