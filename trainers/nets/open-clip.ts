/**
 * @file The pooled output of an OpenCLIP text tower (open_clip model.py `encode_text`, as sgm's
 * `FrozenOpenCLIPEmbedder2(always_return_pooled=True, legacy=False)` returns it for SDXL):
 * every block runs, `ln_final` of the last block's output is taken at the EOS token
 * (`argmax(ids)`: EOS 49407 is the largest id) and projected by `text_projection` ([W, P],
 * applied as `x @ P`). The penultimate output (the input of the last block, no `ln_final`) is
 * the cross-attention context, so one pass gives both.
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { withPrecision } from '../backend/precision.ts';
import { param, type Params } from './params.ts';
import { layerNorm } from './layers.ts';
import { block, causalMask, embed, textKeyNames, type ClipTextConfig, type TextSplice } from './clip.ts';

/** `text_projection` key of an OpenCLIP tower with `cfg.prefix`. */
export const textProjectionKey = (cfg: ClipTextConfig): string => `${cfg.prefix}text_projection`;

export interface OpenClipOutputs {
  /** Input of the last block (no ln_final): [B, T, W], SDXL's G part of the context. */
  penultimate: Tensor;
  /** Output of the last block (no ln_final): [B, T, W]. */
  last: Tensor;
  /** ln_final(last)[b, argmax(ids[b])] @ text_projection: [B, P]. */
  pooled: Tensor;
}

/** Run all blocks of an open_clip tower (`cfg.family` 'sd2' key names) on `ids` [B][T]; float32 forward, as clip.ts encodeText. */
export function encodeOpenClip(p: Params, cfg: ClipTextConfig, ids: number[][], splices: TextSplice[] = []): OpenClipOutputs {
  if (cfg.family !== 'sd2') throw new Error(`open_clip pooled output: '${cfg.prefix}' is not an open_clip tower`);
  return withPrecision('fp32', () => tf.tidy(() => {
    const names = textKeyNames(cfg.family, cfg.prefix);
    let h = embed(p, cfg, ids, splices);
    const mask = causalMask(h.shape[1]!);
    for (let i = 0; i < cfg.layers - 1; i++) h = block(p, cfg, names.block(i), h, mask);
    const penultimate = h;
    const last = block(p, cfg, names.block(cfg.layers - 1), h, mask);
    const normed = layerNorm(p, names.finalLn, last, cfg.layerNormEps); // [B, T, W]
    // the EOS row through a one-hot sum: exact, and differentiable on every backend (no gather grad)
    const [b, t] = [ids.length, ids[0]!.length];
    const pick = new Float32Array(b * t);
    ids.forEach((row, i) => (pick[i * t + argmax(row)] = 1));
    const eos = normed.mul(tf.tensor3d(pick, [b, t, 1])).sum(1); // [B, W]
    return { penultimate, last, pooled: tf.matMul(eos, param(p, textProjectionKey(cfg))) };
  }));
}

/** torch.argmax: the first index of the maximum. */
function argmax(row: number[]): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i;
  return best;
}
