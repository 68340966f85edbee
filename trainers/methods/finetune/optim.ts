/**
 * @file The fine-tune's optimizer: two parameter groups as diffusers' train_text_to_image.py /
 * EveryDream2 (`text_encoder_lr`): the UNet at `lr` and, with trainTextEncoder, the text encoder
 * at `textEncoderLr` — each group its own optimizer of the chosen kind (optim/trainable.ts
 * TrainableOptimizer), both rates on the same schedule shape (warm-up, then constant or cosine to the
 * last step). The loop passes the UNet's rate; TrainableOptimizer asks the text schedule for its own.
 */
import type { tf } from '../../backend/tf.ts';
import { TrainableOptimizer, makeGroupOptimizer } from '../../optim/trainable.ts';
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
 * trained), at `textEncoderLr` (default: `lr`); the rest the UNet group at the loop's rate.
 */
export function makeFinetuneOptimizer(
  spec: ScheduleSpec & Pick<FinetuneSpec, 'optimizer' | 'lr' | 'textEncoderLr'> & Partial<Pick<FinetuneSpec, 'bf16Weights' | 'seed'>>,
  trainable: Map<string, tf.Variable>,
  textKeys: ReadonlySet<string>,
): TrainableOptimizer {
  const unetVars = new Map([...trainable].filter(([k]) => !textKeys.has(k)));
  const textVars = new Map([...trainable].filter(([k]) => textKeys.has(k)));
  const text = textVars.size ? makeGroupOptimizer(spec.optimizer, textVars) : undefined;
  const textLr = text ? finetuneLrSchedule(spec, spec.textEncoderLr ?? spec.lr) : undefined;
  const optimizer = new TrainableOptimizer(makeGroupOptimizer(spec.optimizer, unetVars), text, textKeys, textLr);
  if (spec.bf16Weights) useBf16Weights(optimizer, trainable, spec.seed ?? 0);
  return optimizer;
}
