/**
 * @file The shapes a fine-tune run shares between its modules (finetune.ts and data.ts, loss.ts,
 * optim.ts, save.ts beside it): the validated job spec, one training sample (an image,
 * its bucket and its cached latent), a micro-batch, and the run's state.
 */
import type { tf, Tensor } from '../../backend/tf.ts';
import type { CaptionedImage } from '../../data/captioned.ts';
import type { Bucket } from '../../data/buckets.ts';
import type { EncodedLatent } from '../../train/latent-disk-cache.ts';
import type { SdModel } from '../../nets/sd.ts';
import type { SizeCond } from '../../nets/sdxl-conditioner.ts';
import type { Params } from '../../nets/params.ts';
import type { VaeConfig } from '../../nets/vae.ts';
import type { ClipTokenizer } from '../../text/tokenizer.ts';
import type { WithFolders } from '../../train/run.ts';
import type { FinetuneJob } from '../../../schemas/types.ts';
import type { Ema } from '../../optim/ema.ts';

/** The job's options (schemas/finetune.json, defaults filled; descriptions there), folders set. */
export type FinetuneSpec = WithFolders<FinetuneJob, 'logDir' | 'checkpointDir'>;

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
  /** SDXL: each row's size conditioning (source size, crop top-left in the resized image, bucket). */
  sizes?: SizeCond[];
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
