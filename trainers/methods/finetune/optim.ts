/**
 * @file The fine-tune's optimizer: two parameter groups as diffusers' train_text_to_image.py /
 * EveryDream2 (`text_encoder_lr`): the UNet at `lr` and, with trainTextEncoder, the text encoder
 * at `textEncoderLr` (on SDXL CLIP-L's; OpenCLIP-G a third group at `textEncoder2Lr`, kohya's
 * `learning_rate_te2`) — each group its own optimizer of the chosen kind (optim/trainable.ts
 * TrainableOptimizer), both rates on the same schedule shape (warm-up, then constant or cosine to the
 * last step). The loop passes the UNet's rate; TrainableOptimizer asks the text schedule for its own.
 */
import type { tf } from '../../backend/tf.ts';
import { makeTrainableOptimizer, type TrainableOptimizer } from '../../optim/trainable.ts';
import { useBf16Weights } from '../../optim/bf16-round.ts';
import { constantWithWarmup, cosineWithWarmup, type LrSchedule } from '../../optim/lr.ts';
import type { FinetuneSpec } from './types.ts';

type ScheduleSpec = Pick<FinetuneSpec, 'lrScheduler' | 'warmupSteps' | 'steps'>;

/** The run's schedule shape at peak rate `lr`. */
export function finetuneLrSchedule(spec: ScheduleSpec, lr: number): LrSchedule {
  const warm = { lr, warmupSteps: spec.warmupSteps, maxSteps: spec.steps };
  return spec.lrScheduler === 'cosine' ? cosineWithWarmup(warm) : constantWithWarmup(warm);
}

/**
 * The optimizer over `trainable`: keys in `textKeys` form the text-encoder group (when any are
 * trained), at `textEncoderLr` (default: `lr`), those of them in `text2Keys` (SDXL's OpenCLIP-G)
 * their own group at `textEncoder2Lr` (default: the text rate); the rest the UNet group at the
 * loop's rate.
 */
export function makeFinetuneOptimizer(
  spec: ScheduleSpec & Pick<FinetuneSpec, 'optimizer' | 'lr' | 'textEncoderLr' | 'textEncoder2Lr'> & Partial<Pick<FinetuneSpec, 'bf16Weights' | 'seed'>>,
  trainable: Map<string, tf.Variable>,
  textKeys: ReadonlySet<string>,
  text2Keys: ReadonlySet<string> = new Set(),
): TrainableOptimizer {
  const unetVars = new Map([...trainable].filter(([k]) => !textKeys.has(k)));
  const textVars = new Map([...trainable].filter(([k]) => textKeys.has(k)));
  const textPeak = spec.textEncoderLr ?? spec.lr;
  const optimizer = makeTrainableOptimizer(spec.optimizer, unetVars, textVars, {
    text2Keys, textLr: finetuneLrSchedule(spec, textPeak), text2Lr: finetuneLrSchedule(spec, spec.textEncoder2Lr ?? textPeak),
  });
  // stored as bf16 bits (the job requires fusedBackward with it: memory/options.ts)
  if (spec.bf16Weights) useBf16Weights(optimizer, trainable, spec.seed ?? 0, { store: true });
  return optimizer;
}
