/** @file Deterministic test inputs shared by the native kernel tests. */

/** n uniform values in [-1, 1) from a small LCG seeded with `seed`, so that failures reproduce. */
export function values(n: number, seed: number): Float32Array {
  let s = seed >>> 0;
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    v[i] = s / 2 ** 31 - 1;
  }
  return v;
}
