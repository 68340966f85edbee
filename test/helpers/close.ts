/** @file A float32-accumulation tolerance check shared by the native kernel tests. */
import assert from 'node:assert/strict';

/** Max |a-b| must be within float32 accumulation error of the values' scale (sums of k products of values in [-1, 1]). */
export function assertClose(label: string, a: Float32Array, b: Float32Array, k: number): void {
  assert.equal(a.length, b.length, `${label}: length`);
  let diff = 0, scale = 0;
  for (let i = 0; i < a.length; i++) {
    diff = Math.max(diff, Math.abs(a[i]! - b[i]!));
    scale = Math.max(scale, Math.abs(b[i]!));
  }
  // float32 sums of k products of values in [-1, 1]: error ≲ k·eps per output
  const tol = 4 * Math.max(1, k) * 1.2e-7 * Math.max(1, scale / Math.sqrt(k));
  assert.ok(diff <= tol, `${label}: max abs diff ${diff} > ${tol} (scale ${scale})`);
}
