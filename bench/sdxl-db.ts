/**
 * @file SDXL-shaped Dreambooth (UNet trained, batch 1, prior preservation with one class image)
 * at 1024 px in memory combinations of the estimate's ladder (trainers/memory/estimate-fit.ts:
 * checkpointing → fused backward → trained weights stored in bf16 → 8-bit AdamW → Adafactor), as
 * step rows for bench/steps.ts (issue 19). Each row runs only where its estimate fits the machine
 * (steps.ts skips the others and lists them with their estimate). With the text encoders frozen
 * (released after encoding the prompts) and float32 weights the estimate fits 24 GB with 8-bit
 * AdamW (~23 GB) and Adafactor (~19.5 GB), both with checkpointing and the fused backward; storing
 * the trained weights as bf16 takes 5.1 GB off either.
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

/** The rows: SDXL-shaped Dreambooth at `px` (1024 by default) on `backend`, one per combination. */
export function sdxlDreamboothRows(backend: string, px = 1024): StepRowSpec[] {
  return SDXL_DB_COMBINATIONS.map((c) => ({ model: 'sdxl-shaped', method: 'dreambooth', px, steps: 2, backend, options: c.options, label: c.label }));
}
