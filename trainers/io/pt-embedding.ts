/**
 * @file Textual Inversion embedding files, every layout the webui loads
 * (modules/textual_inversion/textual_inversion.py `create_embedding_from_data`):
 * `string_to_param` (a dict or a pickled ParameterDict), diffusers `{token: tensor}`,
 * kohya `{emb_params}`, SDXL `{clip_l, clip_g}` safetensors. Writing uses `Embedding.save`'s exact
 * layout, and `.optim` has `Embedding.checksum()` as its hash (the webui ignores it otherwise).
 */
import { extname } from 'node:path';
import { TensorRef, asMap } from './pyobjects.ts';
import { adamwStateDict, type AdamGroup, type AdamParamState } from './optim-file.ts';
import { openTorchZip } from './torchzip.ts';
import { openSafetensors } from './safetensors.ts';
import { writeTorchZip } from './torchzip.ts';
import { SaveTensor } from './pickle-write.ts';
import type { WriteOptions } from './atomic.ts';

export type EmbeddingLayout = 'string_to_param' | 'diffusers' | 'kohya' | 'sdxl';

export interface EmbeddingVectors {
  /** [vectors, width] row-major. */
  values: Float32Array;
  shape: [number, number];
}

export interface Embedding {
  layout: EmbeddingLayout;
  /** `name` in the file, else the file stem (the webui uses the file name as the token). */
  name: string;
  /** One entry for SD1/SD2 ('*'), or `clip_l` / `clip_g` for SDXL. */
  vectors: Record<string, EmbeddingVectors>;
  step?: number;
  sdCheckpoint?: string;
  sdCheckpointName?: string;
}

function stem(path: string): string {
  const base = path.split(/[/\\]/).pop()!;
  return base.slice(0, base.length - extname(base).length);
}

function as2d(values: Float32Array, shape: number[], path: string, what: string): EmbeddingVectors {
  if (shape.length === 1) return { values, shape: [1, shape[0]!] }; // webui: `emb.unsqueeze(0)`
  if (shape.length !== 2) throw new Error(`${path}: ${what} has shape [${shape.join(', ')}], expected [vectors, width]`);
  return { values, shape: [shape[0]!, shape[1]!] };
}

export async function readEmbedding(path: string): Promise<Embedding> {
  if (extname(path).toLowerCase() === '.safetensors') return readSafetensorsEmbedding(path);
  const zip = await openTorchZip(path);
  try {
    const data = zip.value;
    if (!(data instanceof Map)) throw new Error(`${path}: top level is not a dict, not an embedding`);
    const read = async (t: TensorRef, what: string) => as2d(await zip.readTensor(t), t.shape, path, what);
    const str = (k: string) => (typeof data.get(k) === 'string' ? (data.get(k) as string) : undefined);
    const common = { name: str('name') ?? stem(path), step: typeof data.get('step') === 'number' ? (data.get('step') as number) : undefined, sdCheckpoint: str('sd_checkpoint') ?? str('hash'), sdCheckpointName: str('sd_checkpoint_name') };
    if (data.has('string_to_param')) {
      const params = asMap(data.get('string_to_param'));
      if (!params) throw new Error(`${path}: string_to_param is neither a dict nor a ParameterDict`);
      if (params.size !== 1) throw new Error(`${path}: embedding file has ${params.size} terms in string_to_param, expected 1`);
      const [[, t]] = [...params];
      if (!(t instanceof TensorRef)) throw new Error(`${path}: string_to_param['*'] is not a tensor`);
      return { layout: 'string_to_param', ...common, vectors: { '*': await read(t, "string_to_param['*']") } };
    }
    if (data.get('emb_params') instanceof TensorRef) {
      return { layout: 'kohya', ...common, vectors: { '*': await read(data.get('emb_params') as TensorRef, 'emb_params') } };
    }
    const tensors = [...data].filter(([, v]) => v instanceof TensorRef);
    if (tensors.length === 1 && data.size === 1) {
      return { layout: 'diffusers', ...common, vectors: { '*': await read(tensors[0]![1] as TensorRef, `'${String(tensors[0]![0])}'`) } };
    }
    throw new Error(`${path}: not an embedding (no string_to_param, emb_params or single {token: tensor}); keys: ${[...data.keys()].map(String).join(', ')}`);
  } finally {
    await zip.close();
  }
}

async function readSafetensorsEmbedding(path: string): Promise<Embedding> {
  const st = await openSafetensors(path);
  try {
    const keys = st.keys();
    const vec = async (k: string) => as2d(await st.read(k), st.info(k).shape, path, `'${k}'`);
    const base = { name: stem(path), ...(st.metadata().step ? { step: Number(st.metadata().step) } : {}) };
    if (st.has('clip_l') && st.has('clip_g')) return { layout: 'sdxl', ...base, vectors: { clip_l: await vec('clip_l'), clip_g: await vec('clip_g') } };
    if (st.has('emb_params')) return { layout: 'kohya', ...base, vectors: { '*': await vec('emb_params') } };
    if (keys.length === 1) return { layout: 'diffusers', ...base, vectors: { '*': await vec(keys[0]!) } };
    throw new Error(`${path}: not an embedding (expected clip_l+clip_g, emb_params or one tensor; found ${keys.join(', ')})`);
  } finally {
    await st.close();
  }
}

/** webui `Embedding.checksum()`: `const_hash(vec.reshape(-1) * 100) & 0xffff` as 4 hex digits. */
export function embeddingChecksum(values: Float32Array): string {
  let r = 0n;
  for (const v of values) {
    const scaled = Math.fround(v * 100); // float32 tensor multiply
    const i = BigInt(Math.trunc(scaled)); // python int() truncates toward zero
    r = BigInt.asUintN(32, (r * 281n) ^ (i * 997n));
  }
  return (r & 0xffffn).toString(16).padStart(4, '0');
}

export interface EmbeddingToWrite {
  name: string;
  /** [vectors, width] row-major float32. */
  values: Float32Array;
  shape: [number, number];
  step: number;
  sdCheckpoint: string | null;
  sdCheckpointName: string | null;
}

/** `Embedding.save`: exactly the webui's keys; the vectors tensor carries requires_grad=True. */
export async function writeEmbedding(path: string, e: EmbeddingToWrite, options: WriteOptions = {}): Promise<void> {
  const value = new Map<unknown, unknown>([
    ['string_to_token', new Map([['*', 265]])],
    ['string_to_param', new Map([['*', new SaveTensor('F32', [...e.shape], e.values, true)]])],
    ['name', e.name],
    ['step', e.step],
    ['sd_checkpoint', e.sdCheckpoint],
    ['sd_checkpoint_name', e.sdCheckpointName],
  ]);
  await writeTorchZip(path, value, options);
}

/** `<embedding>.pt.optim`: `{hash: checksum(vectors), optimizer_state_dict}`. */
export async function writeEmbeddingOptim(path: string, vectors: Float32Array, state: AdamParamState, group: AdamGroup, options: WriteOptions = {}): Promise<void> {
  const value = new Map<unknown, unknown>([['hash', embeddingChecksum(vectors)], ['optimizer_state_dict', adamwStateDict([state], group)]]);
  await writeTorchZip(path, value, options);
}
