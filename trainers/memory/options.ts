/**
 * @file The memory levers a job chooses (schemas/common.json memoryToggle): gradient checkpointing
 * of UNet blocks, sliced attention, frozen weights kept in float16. The spec says auto/on/off;
 * `UNetMemory` is what the UNet forward is told after the job has decided.
 */

export type MemoryToggle = 'auto' | 'on' | 'off';

/** The job options (every method schema has them). */
export interface MemorySpec {
  gradientCheckpointing: MemoryToggle;
  attentionSlicing: MemoryToggle;
  halfFrozenWeights: boolean;
  /** Each gradient applied and freed as the backward pass completes it (train/loop.ts); needs every block checkpointed. */
  fusedBackward?: boolean;
  /** Trained weights stored as bfloat16 (nets/bf16-store.ts); needs fusedBackward. */
  bf16Weights?: boolean;
}

/** What unetForward does; absent = everything whole (the reference path the goldens check). */
export interface UNetMemory {
  /** Run every block under a recompute-in-backward custom gradient. */
  checkpointing: boolean;
  /**
   * Or only these blocks (`input_blocks.1`, `middle_block`, …): auto picks the ones that free the
   * most memory per recomputed FLOP until the job fits (estimate.ts).
   */
  checkpointBlocks?: string[];
  /** Slice attention whose full scores would exceed this many bytes; 0 = never slice. */
  attentionSliceBytes: number;
}

/**
 * auto slices layers whose scores exceed 64 MB, into slices of that size: SD1.5 at 512 px
 * (4096² × 8 heads × 4 B = 512 MB → 8 slices); 256 px (32 MB) runs whole.
 */
export const AUTO_SLICE_BYTES = 64 * 2 ** 20;
/** `on` keeps each slice's scores near 32 MB. */
export const ON_SLICE_BYTES = 32 * 2 ** 20;

/**
 * The UNet's memory mode from the job's toggles; `fits` says whether the job fits without
 * checkpointing (estimate.ts). Float16 frozen weights turn auto checkpointing on: without it the
 * tape keeps every upcast weight until the backward pass, float16 and float32 copies together.
 */
export function unetMemoryFor(spec: Partial<MemorySpec>, fits: boolean): UNetMemory {
  const ckpt = spec.gradientCheckpointing ?? 'auto';
  const slicing = spec.attentionSlicing ?? 'auto';
  // a block's weight gradients are complete when its recompute ends; without checkpointing they all arrive at the end
  // a weight's float32 copy may be dropped only when its block's gradient has been applied, which the fused backward does mid-pass
  if (spec.bf16Weights === true && spec.fusedBackward !== true) throw new Error('bf16Weights stores the trained weights as 2-byte bfloat16, which needs fusedBackward (a float32 copy lives only while its checkpointed block runs and its update is applied): turn fusedBackward on (with gradAccum 1 and clipGrad value or disabled), or turn bf16Weights off');
  if (spec.fusedBackward === true && ckpt === 'off') throw new Error('fusedBackward needs gradient checkpointing (every UNet block is recomputed and its gradients applied at once): set gradientCheckpointing auto or on, or turn fusedBackward off');
  return {
    checkpointing: ckpt === 'on' || (ckpt === 'auto' && (!fits || spec.halfFrozenWeights === true || spec.fusedBackward === true)),
    attentionSliceBytes: slicing === 'off' ? 0 : slicing === 'on' ? ON_SLICE_BYTES : AUTO_SLICE_BYTES,
  };
}

/** "gradient checkpointing on 8 UNet blocks (input_blocks.1, …), attention sliced above 64 MB of scores" */
export function describeMemory(m: UNetMemory): string {
  const blocks = m.checkpointBlocks ?? [];
  const ckpt = m.checkpointing ? 'on' : blocks.length ? `on ${blocks.length} UNet block(s) (${blocks.join(', ')})` : 'off';
  return `gradient checkpointing ${ckpt}; attention ${m.attentionSliceBytes ? `sliced above ${m.attentionSliceBytes / 2 ** 20} MB of scores` : 'whole'}`;
}
