/**
 * @file SDXL-shaped Dreambooth (UNet trained, text encoders frozen), batch 1 with and without prior
 * preservation, at 1024 px in memory combinations of the estimate's ladder (trainers/memory/estimate-fit.ts:
 * checkpointing → fused backward → trained weights stored in bf16 → 8-bit AdamW → Adafactor), as
 * step rows for bench/steps.ts (issue 19). Each row runs only where its estimate fits the machine
 * (steps.ts skips the others and lists them with their estimate).
 */
import type { StepRowSpec } from './steps.ts';

/** The combinations: the ladder's float32 rungs, then bf16 storage with each smaller optimizer. */
export const SDXL_DB_COMBINATIONS: { label: string; options: Record<string, unknown> }[] = [
  { label: 'adamw', options: { optimizer: 'adamw', gradientCheckpointing: 'off' } },
  { label: 'adamw+ckpt', options: { optimizer: 'adamw', gradientCheckpointing: 'on' } },
  { label: 'adamw+ckpt+fused', options: { optimizer: 'adamw', gradientCheckpointing: 'on', fusedBackward: true } },
  { label: 'adamw8bit+ckpt+fused', options: { optimizer: 'adamw8bit', gradientCheckpointing: 'on', fusedBackward: true } },
  { label: 'adafactor+ckpt+fused', options: { optimizer: 'adafactor', gradientCheckpointing: 'on', fusedBackward: true } },
  { label: 'adamw8bit+ckpt+fused+bf16', options: { optimizer: 'adamw8bit', gradientCheckpointing: 'on', fusedBackward: true, bf16Weights: true } },
  { label: 'adafactor+ckpt+fused+bf16', options: { optimizer: 'adafactor', gradientCheckpointing: 'on', fusedBackward: true, bf16Weights: true } },
];

/**
 * The rows: SDXL-shaped Dreambooth at `px` (1024 by default) on `backend`, each combination twice:
 * batch 1 as the issue sizes it (one instance image a step, prior preservation off: `+noprior`),
 * and with prior preservation (one class image beside it: a batch of 2, twice the activations).
 */
export function sdxlDreamboothRows(backend: string, px = 1024): StepRowSpec[] {
  return SDXL_DB_COMBINATIONS.flatMap((c) => [
    { model: 'sdxl-shaped' as const, method: 'dreambooth', px, steps: 2, backend, options: { ...c.options, classPrompt: '' }, label: `${c.label}+noprior` },
    { model: 'sdxl-shaped' as const, method: 'dreambooth', px, steps: 2, backend, options: c.options, label: c.label },
  ]);
}
