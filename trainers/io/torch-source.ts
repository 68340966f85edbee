/**
 * @file A torch checkpoint (`.ckpt`/`.pt` state dict) as a TensorSource: the top-level
 * `state_dict` wrapper (Lightning checkpoints) is unwrapped, string keys holding tensors become
 * the keys, other top-level scalars (`global_step`, `epoch`) become metadata strings.
 */
import type { DType, TensorInfo, TensorSource } from './types.ts';
import { TensorRef } from './pyobjects.ts';
import { openTorchZip, type TorchZip } from './torchzip.ts';

export class TorchSource implements TensorSource {
  private tensors = new Map<string, TensorRef>();
  private meta: Record<string, string> = {};

  constructor(readonly zip: TorchZip) {
    const top = zip.value;
    if (!(top instanceof Map)) throw new Error(`${zip.path}: top-level object is not a dict, so not a state dict`);
    const sd = top.get('state_dict');
    const dict = sd instanceof Map ? sd : top;
    for (const [k, v] of dict) if (typeof k === 'string' && v instanceof TensorRef) this.tensors.set(k, v);
    for (const [k, v] of top) {
      if (typeof k === 'string' && ['string', 'number', 'boolean', 'bigint'].includes(typeof v)) this.meta[k] = String(v);
    }
  }

  get path(): string {
    return this.zip.path;
  }
  keys(): string[] {
    return [...this.tensors.keys()];
  }
  has(key: string): boolean {
    return this.tensors.has(key);
  }
  info(key: string): TensorInfo {
    const t = this.ref(key);
    return { dtype: t.storage.dtype as DType, shape: [...t.shape] };
  }
  metadata(): Record<string, string> {
    return { ...this.meta };
  }
  read(key: string): Promise<Float32Array> {
    return this.zip.readTensor(this.ref(key));
  }
  readRaw(key: string): Promise<Uint8Array> {
    return this.zip.readTensorRaw(this.ref(key));
  }
  close(): Promise<void> {
    return this.zip.close();
  }
  private ref(key: string): TensorRef {
    const t = this.tensors.get(key);
    if (!t) throw new Error(`${this.zip.path}: no tensor '${key}'`);
    return t;
  }
}

export async function openTorchCheckpoint(path: string): Promise<TorchSource> {
  const zip = await openTorchZip(path);
  try {
    return new TorchSource(zip);
  } catch (err) {
    await zip.close();
    throw err;
  }
}
