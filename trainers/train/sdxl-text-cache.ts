/**
 * @file SDXL's frozen text encoders run once per prompt, then released (issue 18's memory lever,
 * kohya sdxl_train_network.py --cache_text_encoder_outputs): when neither encoder trains and every
 * prompt of the run is known before its first step (fixed prompts: no tag shuffling or drop-out),
 * each prompt's conditioning — crossattn [1, T, W_L + W_G] and pooled [1, P], ~0.6 MB — is
 * computed once, and both encoders' weights (~0.8 billion parameters in SDXL: 1.6 GB in float16,
 * 3.3 GB in float32) are freed before training starts.
 *
 * Keyed by the OpenCLIP-G id row the batches carry (CLIP-L's row follows from it: xlIds).
 *
 * Example:
 *   const cache = XlTextCache.build(run.model.textXl, rows);   // every row a batch or preview uses
 *   releaseTextXl(run.model);                                  // the encoders' weights are gone
 *   const cond = cache.conditioning(batch.ids);                // [B, T, W], [B, P]: the caller disposes
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { encodeSdxlText, type SdxlConditioning, type SdxlText } from '../nets/sdxl-conditioner.ts';
import { disposeParams } from '../nets/params.ts';
import { xlIds } from './sdxl-sampling.ts';

/** More distinct prompts than this and the encoders stay (their outputs would outweigh them: 2048 × 0.6 MB ≈ 1.3 GB). */
export const MAX_CACHED_PROMPTS = 2048;

const keyOf = (row: number[]) => row.join(',');

export class XlTextCache {
  private constructor(private readonly rows: Map<string, { crossattn: Tensor; pooled: Tensor }>) {}

  /** Encode each distinct row once (one at a time: peak memory is one prompt's activations). */
  static build(text: SdxlText, idRows: number[][]): XlTextCache {
    const rows = new Map<string, { crossattn: Tensor; pooled: Tensor }>();
    for (const row of idRows) {
      const key = keyOf(row);
      if (rows.has(key)) continue;
      const { idsL, idsG } = xlIds([row]);
      rows.set(key, encodeSdxlText(text, idsL, idsG));
    }
    return new XlTextCache(rows);
  }

  get size(): number {
    return this.rows.size;
  }

  /** The conditioning of a batch's rows (new tensors the caller disposes); a row not cached is a bug, said so. */
  conditioning(ids: number[][]): SdxlConditioning {
    const entries = ids.map((row) => {
      const entry = this.rows.get(keyOf(row));
      if (!entry) throw new Error('SDXL text cache: a prompt that was not known before training (the text encoders were released)');
      return entry;
    });
    return tf.tidy(() => ({ crossattn: tf.concat(entries.map((e) => e.crossattn)), pooled: tf.concat(entries.map((e) => e.pooled)) }));
  }

  dispose(): void {
    for (const e of this.rows.values()) tf.dispose([e.crossattn, e.pooled]);
    this.rows.clear();
  }
}

/**
 * Free both encoders' weights; `params` is left an empty map, so anything that still reached for
 * them fails on the missing key instead of computing with nothing.
 */
export function releaseTextXl(model: { textXl?: SdxlText }): void {
  if (!model.textXl) return;
  disposeParams(model.textXl.params);
  model.textXl.params = new Map();
}
