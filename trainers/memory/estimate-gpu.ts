/**
 * @file The webgpu backend's side of the estimate: on a GPU the tensors live in its memory, not
 * in RAM, so the auto budget is the GPU's free memory (what the webui holds already taken off), and
 * the notes say how the job compares with it and with the adapter's per-binding limit (a tensor
 * over it is refused: trainers/backend/webgpu/guard.ts).
 * WebGPU does not tell how much memory a GPU has; NVIDIA's `nvidia-smi` does (AMD, Intel and
 * Apple: unknown here, so only the binding limit is checked and the budget stays a third of RAM).
 */
import { execFileSync } from 'node:child_process';
import { webgpuAdapter, type AdapterSummary } from '../backend/webgpu/adapter.ts';

export interface GpuMemory {
  totalBytes: number;
  /** Used by every process on the GPU now (a webui with its model loaded, a desktop). */
  usedBytes: number;
}

const MIB = 2 ** 20;
const gb = (bytes: number) => (bytes / 2 ** 30).toFixed(1);

/** The first NVIDIA GPU's memory from nvidia-smi, or undefined (no NVIDIA driver, no tool). */
export function nvidiaMemory(run: (cmd: string, args: string[]) => string = (cmd, args) =>
  execFileSync(cmd, args, { encoding: 'utf8', timeout: 3000, stdio: ['ignore', 'pipe', 'ignore'] })): GpuMemory | undefined {
  try {
    const [total, used] = run('nvidia-smi', ['--query-gpu=memory.total,memory.used', '--format=csv,noheader,nounits']).split('\n')[0]!.split(',').map(Number);
    if (!Number.isFinite(total) || !Number.isFinite(used)) return undefined;
    return { totalBytes: total! * MIB, usedBytes: used! * MIB };
  } catch {
    return undefined;
  }
}

/** The auto budget for webgpu (90% of the free GPU memory) and the notes for its estimate. */
export function gpuBudgetAndNotes(adapter: AdapterSummary | string, memory: GpuMemory | undefined, largestTensorBytes: number): { budget?: number; notes: string[] } {
  if (typeof adapter === 'string') return { notes: [`webgpu: ${adapter}`] };
  const notes: string[] = [];
  if (largestTensorBytes > adapter.maxStorageBufferBindingSize) {
    notes.push(`webgpu: the largest weight (${(largestTensorBytes / MIB).toFixed(0)} MiB) is over this adapter's binding limit of ${(adapter.maxStorageBufferBindingSize / MIB).toFixed(0)} MiB: the job will be refused`);
  }
  if (!memory) {
    notes.push(`webgpu on ${adapter.vendor || 'an unknown vendor'}: its memory size is not known here, so the estimate is checked against RAM`);
    return { notes };
  }
  const free = Math.max(0, memory.totalBytes - memory.usedBytes);
  notes.push(`webgpu: peak is GPU memory here; the GPU has ${gb(memory.totalBytes)} GB, ${gb(memory.usedBytes)} GB in use by other processes (a webui holding its model: start sidetrain with --vram unload)`);
  return { budget: 0.9 * free, notes };
}

/** Both, for estimate.ts: asks Dawn and nvidia-smi once per process. */
let cached: Promise<{ adapter: AdapterSummary | string; memory: GpuMemory | undefined }> | undefined;
export async function gpuFacts(): Promise<{ adapter: AdapterSummary | string; memory: GpuMemory | undefined }> {
  cached ??= webgpuAdapter().then((adapter) => ({ adapter, memory: typeof adapter !== 'string' && /nvidia/i.test(adapter.vendor) ? nvidiaMemory() : undefined }));
  return cached;
}
