/**
 * @file Write a fine-tuned model as a full checkpoint the webui loads (`models/Stable-diffusion/
 * <name>.safetensors`), in the original LDM key layout: every key of the input file is present,
 * in the file's own names and dtypes (F16 throughout with `half`, as the webui's checkpoint
 * merger's "save as float16"). Trained tensors come from the params (TF layout → torch layout
 * with paramToTorch); every other key is copied from the source one tensor at a time, so a 4 GB
 * model is never one Buffer. Training metadata goes in `__metadata__`. Atomic; an existing file
 * is replaced only with `overwrite`.
 *
 * Example:
 *   const raw = await openTensorFile('v1-5.safetensors');
 *   await writeCheckpoint({ dir: 'models/Stable-diffusion', name: 'sks-cat', source: raw, trained: unet.params,
 *                           metadata: { sidetrain_method: 'dreambooth' } });
 */
import { join } from 'node:path';
import { mkdir } from 'node:fs/promises';
import type { DType, TensorSource } from '../io/types.ts';
import { bytesToFloat32, float32ToBytes } from '../io/dtypes.ts';
import { keyMapping } from '../io/checkpoint.ts';
import { writeSafetensors, type TensorToWrite } from '../io/safetensors.ts';
import { paramToTorch, type Params } from './params.ts';
import type { Tensor } from '../backend/tf.ts';

export interface CheckpointWriteOptions {
  /** Output folder (created when missing). */
  dir: string;
  /** File stem: the checkpoint's name in the webui. */
  name: string;
  /** The input model, opened raw (openTensorFile): its keys and dtypes are what gets written. */
  source: TensorSource & { readRaw?(key: string): Promise<Uint8Array> };
  /** Trained tensors by public key (io/checkpoint.ts normalised names), TF layout. */
  trained: Params;
  /** Store every float tensor as F16. */
  half?: boolean;
  overwrite?: boolean;
  /** Strings for `__metadata__` (non-strings are JSON-encoded). */
  metadata?: Record<string, unknown>;
}

const FLOAT_DTYPES: ReadonlySet<DType> = new Set(['F64', 'F32', 'F16', 'BF16']);

/** The dtype a key is written with: the source's, or F16 for floats under `half`. */
export function outputDtype(dtype: DType, half: boolean): DType {
  return half && FLOAT_DTYPES.has(dtype) ? 'F16' : dtype;
}

/** Write `<dir>/<name>.safetensors`; returns its path. Fails naming any trained key the source lacks. */
export async function writeCheckpoint(opts: CheckpointWriteOptions): Promise<string> {
  const path = join(opts.dir, `${opts.name}.safetensors`);
  const rawKeys = opts.source.keys();
  // public (normalised) name → file name, so trained keys land on the file's own (legacy) names
  const publicToFile = keyMapping(rawKeys, false, opts.source.path);
  const fileToPublic = new Map([...publicToFile].map(([pub, file]) => [file, pub]));
  const missing = [...opts.trained.keys()].filter((k) => !publicToFile.has(k));
  if (missing.length) throw new Error(`${path}: trained weights not in ${opts.source.path}: ${missing.slice(0, 5).join(', ')}`);
  const tensors: TensorToWrite[] = rawKeys.map((key) => {
    const info = opts.source.info(key);
    const dtype = outputDtype(info.dtype, opts.half ?? false);
    const trained = opts.trained.get(fileToPublic.get(key) ?? '');
    return { name: key, dtype, shape: info.shape, data: trained ? () => trainedValues(key, trained, info.shape) : () => copied(opts.source, key, info.dtype, dtype) };
  });
  await mkdir(opts.dir, { recursive: true });
  await writeSafetensors(path, tensors, stringMetadata(opts.metadata ?? {}), { overwrite: opts.overwrite ?? false });
  return path;
}

async function trainedValues(key: string, t: Tensor, shape: number[]): Promise<Float32Array> {
  const torch = paramToTorch(t);
  try {
    if (torch.shape.join(',') !== shape.join(',')) throw new Error(`trained '${key}' has shape [${torch.shape}], the checkpoint has [${shape}]`);
    return (await torch.data()) as Float32Array;
  } finally {
    torch.dispose();
  }
}

/** An untouched tensor: its bytes as stored when the dtype stays, else converted through float32. */
async function copied(source: CheckpointWriteOptions['source'], key: string, from: DType, to: DType): Promise<Float32Array | Uint8Array> {
  if (from === to && source.readRaw) return source.readRaw(key);
  const values = source.readRaw ? bytesToFloat32(await source.readRaw(key), from, key) : await source.read(key);
  return from === to ? float32ToBytes(values, to) : values;
}

function stringMetadata(meta: Record<string, unknown>): Record<string, string> {
  return Object.fromEntries(Object.entries(meta).map(([k, v]) => [k, typeof v === 'string' ? v : JSON.stringify(v)]));
}
