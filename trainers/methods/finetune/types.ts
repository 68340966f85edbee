/**
 * @file The shapes a fine-tune run shares between its modules (trainers/methods/finetune/finetune.ts and the
 * finetune-*.ts files it is split into): the validated job spec, one training sample (an image,
 * its bucket and its cached latent), a micro-batch, and the run's state.
 */
import type { PrecisionOption } from '../../backend/precision.ts';
import type { tf, Tensor } from '../../backend/tf.ts';
import type { CaptionedImage } from '../../data/captioned.ts';
import type { Bucket, CropMode } from '../../data/buckets.ts';
import type { EncodedLatent } from '../../train/latent-disk-cache.ts';
import type { SdModel } from '../../nets/sd.ts';
import type { Params } from '../../nets/params.ts';
import type { VaeConfig } from '../../nets/vae.ts';
import type { ClipTokenizer } from '../../text/tokenizer.ts';
import type { SamplerName } from '../../train/sample.ts';
import type { Ema } from '../../optim/ema.ts';

/** schemas/finetune.json, defaults filled (descriptions there). */
export interface FinetuneSpec {
  /** fp32, bf16 mixed precision, or auto (backend/precision.ts). */
  precision?: PrecisionOption;
  model: string;
  prediction?: 'auto' | 'eps' | 'v';
  images: string;
  manifest?: string;
  name: string;
  checkpointDir: string;
  logDir: string;
  resolution: number;
  crop: CropMode;
  steps: number;
  batchSize: number;
  gradAccum: number;
  lr: number;
  /** Peak learn rate of the text encoder (same warm-up and schedule shape); default `lr`. */
  textEncoderLr?: number;
  lrScheduler: 'constant' | 'cosine';
  warmupSteps: number;
  optimizer: 'adamw' | 'adamw8bit' | 'adafactor';
  trainTextEncoder: boolean;
  minSnrGamma: number;
  noiseOffset: number;
  ema: boolean;
  emaDecay: number;
  emaEvery: number;
  save: 'ema' | 'raw' | 'both';
  validationSplit: number;
  validateEvery: number;
  shuffleTags: boolean;
  keepTokens: number;
  captionDropout: number;
  latentCacheDir?: string;
  half: boolean;
  overwrite: boolean;
  resume: boolean;
  saveEvery: number;
  samplePrompts: string[];
  sampleEvery: number;
  sampler: SamplerName;
  sampleSteps: number;
  sampleCfgScale: number;
  seed: number;
  fusedBackward?: boolean;
  /** Trained weights at bfloat16 precision, updates rounded stochastically (optim/bf16-round.ts). */
  bf16Weights?: boolean;
}

/** An image assigned to its bucket. */
export interface BucketedImage {
  image: CaptionedImage;
  bucket: Bucket;
}

/** A usable image: bucketed, with its cached posterior. */
export interface Sample extends BucketedImage {
  latent: EncodedLatent;
}

export interface FtBatch {
  latents: Tensor; // [B, h, w, C]
  noise: Tensor; // [B, h, w, C]
  timesteps: number[];
  ids: number[][];
}

export interface FtRun {
  spec: FinetuneSpec;
  model: SdModel & Required<Pick<SdModel, 'text' | 'unet'>>;
  tokenizer: ClipTokenizer;
  train: Sample[];
  validation: Sample[];
  /** Training item k (repeats expanded) → sample index. */
  items: number[];
  trainable: Map<string, tf.Variable>;
  ema?: Ema;
  /** The step of the last validation loss logged. */
  validatedAt?: number;
  runDir: string;
  /** The VAE decoder, only when sample images are on. */
  decoder?: { params: Params; cfg: VaeConfig };
}
