/**
 * @file Open any SD1/SD2/SDXL checkpoint (`.safetensors`, `.ckpt`) lazily and say what it is, the
 * way the webui decides (modules/sd_models_config.py `guess_model_config_from_state_dict`,
 * `find_checkpoint_config_near_filename`): a `<stem>.yaml` beside the file wins; SD2 when
 * `cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight` exists; SDXL when both
 * `conditioner.embedders.0` (CLIP-L) and `.1` (OpenCLIP-G) do; the SDXL refiner, inpainting
 * (9 input channels), instruct-pix2pix (8), depth/unCLIP/AltDiffusion are refused.
 * Keys are normalised: legacy SD1 text-encoder names get `text_model.` (webui
 * sd_models.transform_checkpoint_dict_key), `model_ema.*` copies are hidden unless asked for.
 */
import { createReadStream } from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { extname } from 'node:path';
import YAML from 'yaml';
import type { TensorInfo, TensorSource } from './types.ts';
import { openSafetensors } from './safetensors.ts';
import { openTorchCheckpoint } from './torch-source.ts';

export type Family = 'sd1' | 'sd2' | 'sdxl';

/**
 * The side a family trains at when the job gives no size: SDXL 1024 (sgm's sd_xl_base.yaml, kohya
 * sdxl_train), SD1/SD2 512 (the webui's Train tab).
 */
export function nativeResolution(family: Family): number {
  return family === 'sdxl' ? 1024 : 512;
}
export type Prediction = 'eps' | 'v';

export interface Checkpoint {
  source: TensorSource;
  family: Family;
  /** undefined: SD2 without a yaml or metadata saying which — the caller decides (webui runs the UNet once). */
  prediction?: Prediction;
  /** Where `prediction` came from, for messages. */
  predictionFrom?: string;
}

const SD1_TEXT_LEGACY = /^cond_stage_model\.transformer\.(embeddings|encoder|final_layer_norm)\./;
const UNET_IN = 'model.diffusion_model.input_blocks.0.0.weight';
const SD2_TEXT = 'cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight';
const SD1_TEXT = 'cond_stage_model.transformer.text_model.embeddings.token_embedding.weight';
const XL_TEXT_L = 'conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight';
const XL_TEXT_G = 'conditioner.embedders.1.model.token_embedding.weight';

/** Open `.safetensors` / `.ckpt` / `.pt` by content, not by trusting the extension alone. */
export async function openTensorFile(path: string): Promise<TensorSource> {
  const st = await stat(path);
  if (st.isDirectory()) throw new Error(`${path}: is a directory, not a checkpoint file`);
  const head = await readHead(path, 4);
  if (head[0] === 0x50 && head[1] === 0x4b) return openTorchCheckpoint(path);
  if (extname(path).toLowerCase() === '.safetensors' || head.length < 4 || head[0] !== 0x80) return openSafetensors(path);
  return openTorchCheckpoint(path); // a pickle: legacy torch → clear error there
}

async function readHead(path: string, n: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of createReadStream(path, { start: 0, end: n - 1 })) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

export async function openCheckpoint(path: string, options: { ema?: boolean } = {}): Promise<Checkpoint> {
  const raw = await openTensorFile(path);
  try {
    const source = normaliseKeys(raw, options.ema ?? false);
    const family = detectFamily(source);
    const { prediction, from } = await detectPrediction(path, family, raw.metadata(), raw.keys());
    return { source, family, prediction, predictionFrom: from };
  } catch (err) {
    await raw.close();
    throw err;
  }
}

/** The family of a checkpoint file from its keys alone (the header), without loading anything. */
export async function peekFamily(path: string): Promise<Family> {
  const raw = await openTensorFile(path);
  try {
    return detectFamily(normaliseKeys(raw, false));
  } finally {
    await raw.close();
  }
}

/**
 * The family when `path` is a regular file with a checkpoint's header, else undefined: for what
 * only picks a default from it (a dry run must not block on a FIFO or fail on a model the run
 * itself will refuse with its own message).
 */
export async function headerFamily(path: string): Promise<Family | undefined> {
  try {
    if (!(await stat(path)).isFile()) return undefined;
    return await peekFamily(path);
  } catch {
    return undefined;
  }
}

/** SD1 / SD2 / SDXL from the keys, or an error saying what the model is and that it is not supported. */
export function detectFamily(src: Pick<TensorSource, 'path' | 'has' | 'info' | 'keys'>): Family {
  const refuse = (what: string): never => {
    throw new Error(`${src.path}: ${what} — sidetrain trains SD1.x, SD2.x and SDXL base checkpoints only`);
  };
  const xl = src.keys().some((k) => k.startsWith('conditioner.embedders.'));
  if (xl && !src.has(XL_TEXT_L)) refuse('this is an SDXL refiner (no CLIP-L at conditioner.embedders.0)');
  if (xl && !src.has(XL_TEXT_G)) refuse(`unknown SDXL layout: no OpenCLIP-G ('${XL_TEXT_G}')`);
  if (src.keys().some((k) => k.startsWith('depth_model.'))) refuse('this is an SD2 depth model');
  if (src.keys().some((k) => k.startsWith('embedder.model.'))) refuse('this is an SD2 unCLIP model');
  if (src.keys().some((k) => k.startsWith('cond_stage_model.roberta.'))) refuse('this is an AltDiffusion model');
  if (!src.has(UNET_IN)) refuse(`unknown layout: no UNet ('${UNET_IN}'); is this a full SD checkpoint (not a VAE, LoRA or embedding)?`);
  const inChannels = src.info(UNET_IN).shape[1];
  if (inChannels === 9) refuse('this is an inpainting model (UNet input has 9 channels)');
  if (inChannels !== 4) refuse(`unknown UNet input with ${inChannels} channels (instruct-pix2pix has 8)`);
  if (xl) return 'sdxl';
  if (src.has(SD2_TEXT)) return 'sd2';
  if (src.has(SD1_TEXT)) return 'sd1';
  return refuse('unknown layout: no SD1 (cond_stage_model.transformer.*) or SD2 (cond_stage_model.model.*) text encoder');
}

async function detectPrediction(path: string, family: Family, meta: Record<string, string>, keys: string[]): Promise<{ prediction?: Prediction; from?: string }> {
  const yamlPath = path.slice(0, path.length - extname(path).length) + '.yaml';
  const yamlText = await readFile(yamlPath, 'utf8').catch(() => undefined);
  if (yamlText !== undefined) {
    let doc: unknown;
    try {
      doc = YAML.parse(yamlText);
    } catch (err) {
      throw new Error(`${yamlPath}: not valid YAML (${(err as Error).message})`);
    }
    return { prediction: yamlPrediction(doc), from: yamlPath };
  }
  const pt = meta['modelspec.prediction_type'] ?? meta.prediction_type;
  if (pt === 'v' || pt === 'v_prediction') return { prediction: 'v', from: 'metadata' };
  if (pt === 'epsilon' || pt === 'eps') return { prediction: 'eps', from: 'metadata' };
  if (meta.ss_v_parameterization === 'True') return { prediction: 'v', from: 'metadata' };
  if (family === 'sd1') return { prediction: 'eps', from: 'SD1 default (v1-inference.yaml)' };
  // Forge/ComfyUI mark v-prediction SDXL finetunes with an empty `v_pred` tensor
  if (family === 'sdxl' && keys.includes('v_pred')) return { prediction: 'v', from: "the checkpoint's v_pred key" };
  if (family === 'sdxl') return { prediction: 'eps', from: 'SDXL default (sd_xl_base.yaml)' };
  return {};
}

/** ldm yaml: `model.params.parameterization`; sgm yaml: the denoiser's scaling (VScaling = v). */
export function yamlPrediction(doc: unknown): Prediction {
  const params = (doc as { model?: { params?: Record<string, any> } })?.model?.params ?? {}; // eslint-disable-line @typescript-eslint/no-explicit-any
  if (params.parameterization !== undefined) return params.parameterization === 'v' ? 'v' : 'eps';
  const scaling = String(params.denoiser_config?.params?.scaling_config?.target ?? '');
  return /\.VScaling(EDM)?$/.test(scaling) ? 'v' : 'eps';
}

/** Public key → key in the file. */
export function keyMapping(keys: readonly string[], ema: boolean, path: string): Map<string, string> {
  const map = new Map<string, string>();
  const present = new Set(keys);
  for (const key of keys) {
    if (key.startsWith('model_ema.')) continue;
    const pub = SD1_TEXT_LEGACY.test(key) ? key.replace('cond_stage_model.transformer.', 'cond_stage_model.transformer.text_model.') : key;
    map.set(pub, key);
  }
  if (!ema) return map;
  // ldm LitEma names: the DiffusionWrapper parameter name with the dots removed.
  let found = 0;
  for (const pub of map.keys()) {
    if (!pub.startsWith('model.diffusion_model.')) continue;
    const emaKey = 'model_ema.' + pub.slice('model.'.length).replaceAll('.', '');
    if (present.has(emaKey)) {
      map.set(pub, emaKey);
      found++;
    }
  }
  if (!found) throw new Error(`${path}: EMA weights asked for, but the file has no model_ema.* copies`);
  return map;
}

export function normaliseKeys(src: TensorSource, ema: boolean): TensorSource {
  const map = keyMapping(src.keys(), ema, src.path);
  const inner = (key: string): string => {
    const k = map.get(key);
    if (k === undefined) throw new Error(`${src.path}: no tensor '${key}'`);
    return k;
  };
  return {
    path: src.path,
    keys: () => [...map.keys()],
    has: (key) => map.has(key),
    info: (key): TensorInfo => src.info(inner(key)),
    read: (key) => src.read(inner(key)),
    metadata: () => src.metadata(),
    close: () => src.close(),
  };
}

/** sha256 of a file, hex, streamed. */
export async function fileSha256(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** The webui's short hash (`sd_models.model_hash`, v1.x): first 10 hex digits of sha256. */
export async function modelHash(path: string): Promise<string> {
  return (await fileSha256(path)).slice(0, 10);
}

/** A TensorSource over `{key: shape}` (e.g. keys-sd15.json), for layout checks without weights. */
export function shapeOnlySource(path: string, shapes: Record<string, number[]>): TensorSource {
  return {
    path,
    keys: () => Object.keys(shapes),
    has: (k) => Object.hasOwn(shapes, k),
    info: (k) => {
      if (!Object.hasOwn(shapes, k)) throw new Error(`${path}: no tensor '${k}'`);
      return { dtype: 'F32', shape: shapes[k]! };
    },
    read: () => Promise.reject(new Error(`${path}: shapes only, no data`)),
    metadata: () => ({}),
    close: async () => {},
  };
}
