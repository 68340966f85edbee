/**
 * @file A whole Stable Diffusion model opened from one checkpoint: family, parameterization, and
 * the parts a job asks for (text encoder, UNet, VAE encoder/decoder, schedule), each loaded only
 * when needed so that a TI job can release the VAE after caching latents.
 *
 * What the tensors cannot say (attention head counts, v vs eps, scale factor) comes, as in the
 * webui (modules/sd_models_config.py find_checkpoint_config_near_filename), from a config next to
 * the checkpoint: `<stem>.yaml` in ldm's or sgm's format, or a fixture-style `config.json`;
 * otherwise the real models' values apply (SD1: 8 UNet heads, SD2/SDXL: 64-channel heads, text
 * heads = width/64; SDXL latents × 0.13025).
 */
import { existsSync, readFileSync } from 'node:fs';
import { basename, dirname, extname, join } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { openCheckpoint, yamlPrediction, type Family, type Prediction } from '../io/checkpoint.ts';
import type { TensorSource } from '../io/types.ts';
import { loadParams, type Params } from './params.ts';
import { textConfigFromKeys, textKeys, type ClipTextConfig } from './clip.ts';
import { sdxlTextConfigs, sdxlTextKeys, type SdxlText } from './sdxl-conditioner.ts';
import { loadUnet, detectVPrediction, type HeadOverrides, type UNetConfig } from './unet.ts';
import { loadVae, type VaeConfig } from './vae.ts';
import type { UNetMemory } from '../memory/options.ts';
import { halfFrozen, loadUnetHalf, type HalfFormat } from './half-params.ts';
import { loadSchedule, type NoiseSchedule } from './noise-schedule.ts';

/** What a config next to the checkpoint says about the model. */
export interface ModelOverrides {
  unetHeads: HeadOverrides;
  textHeads?: number;
  /** SDXL's OpenCLIP-G heads (textHeads is CLIP-L's there). */
  textHeadsG?: number;
  prediction?: Prediction;
  scaleFactor?: number;
  /** The file the overrides came from, for messages. */
  from?: string;
}

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

/** Read `<stem>.yaml` (ldm) or `config.json` (fixture layout) beside the checkpoint, if any. */
export function modelOverrides(checkpointPath: string): ModelOverrides {
  const dir = dirname(checkpointPath);
  const yamlPath = join(dir, `${basename(checkpointPath, extname(checkpointPath))}.yaml`);
  if (existsSync(yamlPath)) {
    const doc = parseYaml(readFileSync(yamlPath, 'utf8')) as Json;
    const params: Json = doc?.model?.params ?? {};
    if (params.network_config) return sgmOverrides(params, yamlPrediction(doc), yamlPath);
    const unet: Json = params.unet_config?.params ?? {};
    return {
      unetHeads: pickHeads(unet),
      prediction: params.parameterization === 'v' ? 'v' : params.parameterization ? 'eps' : undefined,
      scaleFactor: params.scale_factor,
      from: yamlPath,
    };
  }
  const jsonPath = join(dir, 'config.json');
  if (existsSync(jsonPath)) {
    const cfg = JSON.parse(readFileSync(jsonPath, 'utf8')) as Json;
    if (cfg.engine_config?.params?.network_config) {
      const o = sgmOverrides(cfg.engine_config.params, yamlPrediction({ model: cfg.engine_config }), jsonPath);
      return { ...o, textHeadsG: cfg.open_clip_model_config?.text_cfg?.heads ?? o.textHeadsG };
    }
    if (cfg.unet?.params) {
      return {
        unetHeads: pickHeads(cfg.unet.params),
        textHeads: cfg.text_encoder?.params?.heads,
        prediction: cfg.latent_diffusion?.parameterization,
        scaleFactor: cfg.latent_diffusion?.scale_factor,
        from: jsonPath,
      };
    }
  }
  return { unetHeads: {} };
}

/** sgm DiffusionEngine params (sd_xl_base.yaml `model.params`): heads, scale, prediction. */
function sgmOverrides(params: Json, prediction: Prediction, from: string): ModelOverrides {
  const embedders: Json[] = params.conditioner_config?.params?.emb_models ?? [];
  return {
    unetHeads: pickHeads(params.network_config?.params ?? {}),
    textHeads: embedders[0]?.params?.heads,
    prediction,
    scaleFactor: params.scale_factor,
    from,
  };
}

function pickHeads(p: Json): HeadOverrides {
  const out: HeadOverrides = {};
  if (typeof p.num_heads === 'number' && p.num_heads > 0) out.numHeads = p.num_heads;
  if (typeof p.num_head_channels === 'number' && p.num_head_channels > 0) out.numHeadChannels = p.num_head_channels;
  return out;
}

export interface SdModel {
  path: string;
  source: TensorSource;
  family: Family;
  overrides: ModelOverrides;
  /** SD1/SD2's text encoder. */
  text?: { params: Params; cfg: ClipTextConfig };
  /** SDXL's two text encoders (sdxl-conditioner.ts); `text` is absent then. */
  textXl?: SdxlText;
  /** `memory`: the job's gradient checkpointing / attention slicing (memory-options.ts). */
  unet?: { params: Params; cfg: UNetConfig; memory?: UNetMemory };
  vae?: { params: Params; cfg: VaeConfig };
  schedule: NoiseSchedule;
  /** eps or v: from the file's config/metadata, else decided the webui way (a test UNet run). */
  prediction: Prediction;
  /** The file or its config says eps or v (no test run needed). */
  fileSaysPrediction?: boolean;
}

export type SdPart = 'text' | 'unet' | 'vae-encoder' | 'vae-decoder';

export function shapesOf(source: TensorSource): Map<string, number[]> {
  return new Map(source.keys().map((k) => [k, source.info(k).shape] as [string, number[]]));
}

/** Load the text encoder from an open source. */
export async function loadText(source: TensorSource, heads?: number): Promise<{ params: Params; cfg: ClipTextConfig }> {
  const cfg = textConfigFromKeys(shapesOf(source), heads ? { heads } : {});
  const { used } = textKeys(cfg);
  const wanted = new Set(used);
  return { params: await loadParams(source, [cfg.prefix], (k) => !wanted.has(k)), cfg };
}

/** Load SDXL's two text encoders from an open source. */
export async function loadTextXl(source: TensorSource, overrides: Pick<ModelOverrides, 'textHeads' | 'textHeadsG'> = {}): Promise<SdxlText> {
  const cfg = sdxlTextConfigs(shapesOf(source), { l: overrides.textHeads, g: overrides.textHeadsG });
  const wanted = new Set(sdxlTextKeys(cfg).used);
  return { params: await loadParams(source, [cfg.l.prefix, cfg.g.prefix], (k) => !wanted.has(k)), cfg };
}

/** SDXL's VAE latent scale (sd_xl_base.yaml scale_factor). */
export const SDXL_SCALE_FACTOR = 0.13025;

/** The VAE latent scale of a model: its config's, else the family's (SDXL 0.13025, SD1/SD2 0.18215). */
export function scaleFactorOf(model: Pick<SdModel, 'overrides' | 'family'>): number | undefined {
  return model.overrides.scaleFactor ?? (model.family === 'sdxl' ? SDXL_SCALE_FACTOR : undefined);
}

/** Frozen parts kept in float16 (half-params.ts): the job's halfFrozenWeights, for the parts that do not train; bf16 under bf16 precision. */
export interface HalfParts { unet?: boolean; text?: boolean; format?: HalfFormat }

/**
 * Open a checkpoint and load the requested parts. The caller closes `source` when done.
 * `xl`: the caller handles SDXL (`textXl`, `y`); without it an SDXL file is refused, naming it.
 */
export async function loadSdModel(
  path: string, parts: SdPart[], half: HalfParts = {}, opts: { xl?: boolean; what?: string; prediction?: Prediction | 'auto' } = {},
): Promise<SdModel> {
  return loadSdParts(await openSdModel(path, opts), parts, half, opts);
}

/**
 * The checkpoint opened, its family, schedule and overrides read, no weights loaded yet
 * (loadSdParts adds them): a job can encode its latents with the VAE encoder alone first.
 */
export async function openSdModel(path: string, opts: { xl?: boolean; what?: string } = {}): Promise<SdModel> {
  const ckpt = await openCheckpoint(path);
  if (ckpt.family === 'sdxl' && !opts.xl) {
    await ckpt.source.close();
    throw new Error(`${path}: an SDXL checkpoint; ${opts.what ?? 'this method'} trains SD1.x/SD2.x checkpoints only`);
  }
  const overrides = modelOverrides(path);
  return {
    path, source: ckpt.source, family: ckpt.family, overrides,
    schedule: await loadSchedule(ckpt.source),
    prediction: ckpt.prediction ?? overrides.prediction ?? 'eps',
    fileSaysPrediction: ckpt.prediction !== undefined || overrides.prediction !== undefined,
  };
}

/** Load `parts` into an opened model (openSdModel); returns it. */
export async function loadSdParts(
  model: SdModel, parts: SdPart[], half: HalfParts = {}, opts: { prediction?: Prediction | 'auto' } = {},
): Promise<SdModel> {
  const { source, overrides, family } = model;
  const xl = family === 'sdxl';
  if (parts.includes('text') && !xl) model.text = await loadText(source, overrides.textHeads);
  if (parts.includes('text') && xl) model.textXl = await loadTextXl(source, overrides);
  if (model.text && half.text) model.text.params = await halfFrozen(model.text.params, undefined, half.format);
  if (model.textXl && half.text) model.textXl.params = await halfFrozen(model.textXl.params, undefined, half.format);
  if (parts.includes('unet')) model.unet = half.unet ? await loadUnetHalf(source, overrides.unetHeads, undefined, half.format) : await loadUnet(source, overrides.unetHeads);
  const vaeParts = (['encoder', 'decoder'] as const).filter((p) => parts.includes(`vae-${p}`));
  if (vaeParts.length) model.vae = await loadVae(source, { parts: [...vaeParts], scaleFactor: scaleFactorOf(model) });
  // the job's --prediction eps|v wins: models whose file carries no hint (v-prediction SDXL finetunes)
  if (opts.prediction === 'eps' || opts.prediction === 'v') model.prediction = opts.prediction;
  // SD2 without a config saying which: the webui's test run (needs the UNet)
  else if (!model.fileSaysPrediction && family === 'sd2' && model.unet) {
    model.prediction = (await detectVPrediction(model.unet.params, model.unet.cfg)) ? 'v' : 'eps';
  }
  return model;
}

/** Token padding of the model's tokenizer: SD1 pads with EOS, SD2 (open_clip) with 0. */
export function paddingFor(family: Family): 'eos' | 'zero' {
  return family === 'sd1' ? 'eos' : 'zero';
}
