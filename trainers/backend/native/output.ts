/**
 * @file Output arrays for the native kernels, not zero-filled. `new Float32Array(n)` zeroes its
 * memory on the JavaScript thread, one core, before the kernel overwrites every element: a
 * 512 px SD1.5 TI step allocates ~6 GB of kernel outputs, and the zeroing left the second core
 * idle for ~0.4 s of a ~11 s step. Every kernel handed one of these writes all of it (the GEMMs
 * store, rather than add, in their first k block; a transposed conv zeroes its input gradient
 * itself when a stride phase has no tap); the native tests run with poisoned outputs (NaN) to
 * keep it so. `SIDETRAIN_POISON_OUTPUTS=1` poisons them in any run (the golden harness, a job).
 */

let poison = process.env.SIDETRAIN_POISON_OUTPUTS === '1';

/** Fill every output array with NaN from now on (on), or leave it uninitialised (off). */
export function poisonOutputs(on: boolean): void {
  poison = on;
}

/** A Float32Array of n elements whose contents are unspecified: the kernel must write each one. */
export function outputArray(n: number): Float32Array {
  // allocUnsafeSlow: a buffer of its own (not a slice of Node's pool), malloc'd without zeroing
  const out = new Float32Array(Buffer.allocUnsafeSlow(n * 4).buffer, 0, n);
  if (poison) out.fill(NaN);
  return out;
}
