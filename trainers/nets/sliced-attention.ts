/**
 * @file Attention computed a slice of query rows at a time, with a custom gradient that recomputes
 * each slice's scores in the backward pass (the memory-efficient attention of Rabe & Staats 2021
 * and diffusers' sliced attention, without the online softmax: a slice holds its full rows). The
 * [B·heads, Tq, Tk] scores never exist at once, in the forward or in the backward, and the tape
 * keeps only q, k, v and the output.
 *
 * Backward of o = softmax(s)·v with s = q·kᵀ·scale, per slice (p the recomputed probabilities):
 *   dv += pᵀ·do;  dp = do·vᵀ;  ds = p ⊙ (dp − D) with D = rowsum(do ⊙ o);  dq = ds·k·scale;  dk += dsᵀ·q·scale.
 */
import { tf, type Tensor } from '../tf.ts';

/** Rows per slice so one slice's scores stay within `maxBytes` (at least 1 row). */
export function sliceRows(batchHeads: number, tq: number, tk: number, maxBytes: number): number {
  return Math.max(1, Math.min(tq, Math.floor(maxBytes / (batchHeads * tk * 4))));
}

/** The slices [start, size) covering `n` rows. */
function slices(n: number, rows: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let start = 0; start < n; start += rows) out.push([start, Math.min(rows, n - start)]);
  return out;
}

const rowsOf = (t: Tensor, start: number, size: number) => t.slice([0, start, 0], [-1, size, -1]);

/** softmax(q·kᵀ·scale)·v of one slice of q: q [BH, n, d], k and v [BH, Tk, d] → probabilities [BH, n, Tk]. */
const probabilities = (q: Tensor, k: Tensor, scale: number) => tf.softmax(tf.matMul(q, k, false, true).mul(scale));

/** Adds `next` into the accumulator slot, disposing the old sum. */
function addInto(acc: Tensor | undefined, next: Tensor): Tensor {
  if (!acc) return next;
  const sum = acc.add(next);
  acc.dispose();
  next.dispose();
  return sum;
}

/**
 * Scaled dot-product attention on heads already split: qh [BH, Tq, d], kh and vh [BH, Tk, d] →
 * [BH, Tq, d], `rows` query rows at a time. Same numbers as the whole computation.
 */
export function slicedAttentionCore(qh: Tensor, kh: Tensor, vh: Tensor, rows: number): Tensor {
  const scale = qh.shape[2]! ** -0.5;
  const parts = slices(qh.shape[1]!, rows);
  const run = tf.customGrad((q, k, v, save) => {
    const outParts = parts.map(([s, n]) => tf.tidy(() => tf.matMul(probabilities(rowsOf(q as Tensor, s, n), k as Tensor, scale), v as Tensor)));
    const out = outParts.length === 1 ? outParts[0]! : tf.concat(outParts, 1); // [BH, Tq, d]
    if (outParts.length > 1) tf.dispose(outParts);
    (save as tf.GradSaveFunc)([q as Tensor, k as Tensor, v as Tensor, out]);
    return { value: out, gradFunc: (dy, saved) => backward(dy as Tensor, saved, parts, scale) };
  });
  return run(qh, kh, vh);
}

function backward(dOut: Tensor, saved: Tensor[], parts: Array<[number, number]>, scale: number): Tensor[] {
  const [q, k, v, out] = saved as [Tensor, Tensor, Tensor, Tensor];
  const rowDot = tf.tidy(() => dOut.mul(out).sum(-1, true)); // D [BH, Tq, 1]
  let dk: Tensor | undefined;
  let dv: Tensor | undefined;
  const dq: Tensor[] = [];
  for (const [s, n] of parts) {
    const [dqPart, dkPart, dvPart] = tf.tidy(() => {
      const qPart = rowsOf(q, s, n);
      const doPart = rowsOf(dOut, s, n); // [BH, n, d]
      const p = probabilities(qPart, k, scale); // [BH, n, Tk]
      const dp = tf.matMul(doPart, v, false, true); // [BH, n, Tk]
      const ds = p.mul(dp.sub(rowsOf(rowDot, s, n))).mul(scale);
      return [tf.matMul(ds, k), tf.matMul(ds, qPart, true, false), tf.matMul(p, doPart, true, false)];
    });
    dq.push(dqPart!);
    dk = addInto(dk, dkPart!);
    dv = addInto(dv, dvPart!);
  }
  rowDot.dispose();
  const dqAll = dq.length === 1 ? dq[0]! : tf.concat(dq, 1);
  if (dq.length > 1) tf.dispose(dq);
  return [dqAll, dk!, dv!];
}
