/**
 * @file webui hypernetwork `.pt` files (modules/hypernetworks/hypernetwork.py `Hypernetwork.save`
 * / `load`): `{<int size>: (k state dict, v state dict), step, name, layer_structure, …}`, each
 * state dict an OrderedDict `linear.<index in the Sequential>.{weight,bias}` with `_metadata`.
 * Every metadata key is written explicitly (`load` has defaults that differ from `save`'s values,
 * e.g. `activate_output` defaults to True). `.optim`: hash = first 10 hex of sha256 of the `.pt`.
 */
import { PyOrderedDict, PyTuple, TensorRef } from './pyobjects.ts';
import { openTorchZip, writeTorchZip } from './torchzip.ts';
import { SaveTensor } from './pickle-write.ts';
import { modelHash } from './checkpoint.ts';
import { adamwStateDict, type AdamGroup, type AdamParamState } from './optim-file.ts';
import { pendingPath, type WriteOptions } from './atomic.ts';

export interface HypernetTensor {
  values: Float32Array;
  shape: number[];
}

/** One module's weights: `linear.N.weight` → tensor. */
export type HypernetModule = Map<string, HypernetTensor>;

/** The metadata keys in the order webui v1.10 writes them. */
export interface HypernetMeta {
  step: number;
  name: string;
  layer_structure: number[];
  activation_func: string;
  is_layer_norm: boolean;
  weight_initialization: string;
  sd_checkpoint: string | null;
  sd_checkpoint_name: string | null;
  activate_output: boolean;
  use_dropout: boolean;
  dropout_structure: number[];
  last_layer_dropout: boolean;
  optional_info: string | null;
}

export interface Hypernetwork {
  /** size (context width) → [k module, v module]. */
  modules: Map<number, [HypernetModule, HypernetModule]>;
  meta: HypernetMeta;
  /** Keys the file lacked (the webui's load defaults apply to them). */
  missing: string[];
}

const META_KEYS: (keyof HypernetMeta)[] = [
  'step', 'name', 'layer_structure', 'activation_func', 'is_layer_norm', 'weight_initialization', 'sd_checkpoint',
  'sd_checkpoint_name', 'activate_output', 'use_dropout', 'dropout_structure', 'last_layer_dropout', 'optional_info',
];

/** webui `Hypernetwork.load` defaults for keys a file lacks. */
const LOAD_DEFAULTS: HypernetMeta = {
  step: 0, name: '', layer_structure: [1, 2, 1], activation_func: 'linear', is_layer_norm: false,
  weight_initialization: 'Normal', sd_checkpoint: null, sd_checkpoint_name: null, activate_output: true,
  use_dropout: false, dropout_structure: [], last_layer_dropout: false, optional_info: null,
};

export async function readHypernetwork(path: string): Promise<Hypernetwork> {
  const zip = await openTorchZip(path);
  try {
    const data = zip.value;
    if (!(data instanceof Map)) throw new Error(`${path}: top level is not a dict, not a hypernetwork`);
    const modules = new Map<number, [HypernetModule, HypernetModule]>();
    for (const [size, pair] of data) {
      if (typeof size !== 'number') continue;
      const items = pair instanceof PyTuple ? pair.items : Array.isArray(pair) ? pair : [];
      if (items.length !== 2) throw new Error(`${path}: size ${size} is not a (k, v) pair of state dicts`);
      const [k, v] = await Promise.all(items.map(async (sd, i) => readModule(path, zip.readTensor.bind(zip), sd, `${size}.${'kv'[i]}`)));
      modules.set(size, [k!, v!]);
    }
    if (!modules.size) throw new Error(`${path}: no int size keys, not a hypernetwork`);
    const stem = path.split(/[/\\]/).pop()!.replace(/\.[^.]*$/, '');
    const meta = { ...LOAD_DEFAULTS, name: stem } as unknown as Record<string, unknown>;
    const missing: string[] = [];
    for (const key of META_KEYS) {
      if (data.has(key)) meta[key] = data.get(key);
      else missing.push(key);
    }
    return { modules, meta: meta as unknown as HypernetMeta, missing };
  } finally {
    await zip.close();
  }
}

async function readModule(path: string, read: (t: TensorRef) => Promise<Float32Array>, sd: unknown, what: string): Promise<HypernetModule> {
  if (!(sd instanceof Map)) throw new Error(`${path}: module ${what} is not a state dict`);
  const out: HypernetModule = new Map();
  for (const [key, t] of sd) {
    if (!(t instanceof TensorRef)) throw new Error(`${path}: module ${what} key '${String(key)}' is not a tensor`);
    // webui fix_old_state_dict: linear1/linear2 → linear.0/linear.1
    const name = String(key).replace(/^linear1\./, 'linear.0.').replace(/^linear2\./, 'linear.1.');
    out.set(name, { values: await read(t), shape: [...t.shape] });
  }
  return out;
}

/** The Sequential's children as the webui builds them (names for the state dict `_metadata`). */
export function sequentialLength(meta: HypernetMeta): number {
  const ls = meta.layer_structure;
  let n = 0;
  for (let i = 0; i < ls.length - 1; i++) {
    n++; // Linear
    if (!(meta.activation_func === 'linear' || meta.activation_func == null || (i >= ls.length - 2 && !meta.activate_output))) n++;
    if (meta.is_layer_norm) n++;
    if (meta.use_dropout && (meta.dropout_structure[i + 1] ?? 0) > 0) n++;
  }
  return n;
}

function stateDict(mod: HypernetModule, children: number): PyOrderedDict {
  const sd = new PyOrderedDict([...mod].map(([k, t]) => [k, new SaveTensor('F32', t.shape, t.values)]));
  const meta = new PyOrderedDict([['', new Map([['version', 1]])], ['linear', new Map([['version', 1]])]]);
  for (let i = 0; i < children; i++) meta.set(`linear.${i}`, new Map([['version', 1]]));
  sd.attrs.set('_metadata', meta);
  return sd;
}

/** `Hypernetwork.save`, with every metadata key written. */
export async function writeHypernetwork(path: string, hn: Omit<Hypernetwork, 'missing'>, options: WriteOptions = {}): Promise<void> {
  const children = sequentialLength(hn.meta);
  const value = new Map<unknown, unknown>();
  for (const [size, [k, v]] of hn.modules) value.set(size, new PyTuple([stateDict(k, children), stateDict(v, children)]));
  for (const key of META_KEYS) value.set(key, hn.meta[key]);
  await writeTorchZip(path, value, options);
}

/** `<hypernetwork>.pt.optim` — write it after the `.pt` (its hash is the `.pt`'s sha256). */
export async function writeHypernetworkOptim(
  path: string, ptPath: string, states: AdamParamState[], group: AdamGroup, optimizerName = 'AdamW', options: WriteOptions = {},
): Promise<void> {
  const value = new Map<unknown, unknown>([
    ['optimizer_name', optimizerName], ['hash', await modelHash(pendingPath(ptPath))], ['optimizer_state_dict', adamwStateDict(states, group)],
  ]);
  await writeTorchZip(path, value, options);
}
