/**
 * @file The one source of randomness in training — everything random that must repeat for the
 * same seed: data order, template choice, tag shuffling and drop-out, dropout masks' seeds, and
 * (through `seededNormal`) every noise tensor: latent sampling, diffusion noise, sampler noise,
 * weight init. Nothing in trainers/ calls Math.random except `Rng.randomSeed` (`seed: -1`).
 *
 * sfc32 (Chris Doty-Humphrey's Small Fast Counting generator): 128-bit state, passes PractRand,
 * plain 32-bit integer arithmetic, so it gives the same sequence on every platform. Python's
 * Mersenne Twister (what the webui uses) is not reproduced: the webui never seeds it, so no
 * webui run is repeatable to begin with.
 *
 * Streams are derived, not shared: `Rng.derive(seed, 'epoch', 3)` is the same stream whatever
 * happened before, which is what makes a resumed run continue exactly where a killed one was.
 *
 * Example:
 *   const rng = Rng.derive(1234, 'prompts');
 *   rng.shuffle(tags); rng.choice(lines); rng.next() // [0, 1)
 */

/** 32-bit FNV-1a of a string, the seed mixer for derived streams. */
function fnv1a(text: string, hash = 0x811c9dc5): number {
  for (let i = 0; i < text.length; i++) {
    hash ^= text.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193) >>> 0;
  }
  return hash >>> 0;
}

/** splitmix32: spreads one 32-bit seed over the four state words. */
function splitmix32(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x9e3779b9) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  };
}

export type RngState = [number, number, number, number];

export class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;

  /** `seed`: any integer (taken modulo 2^32) or a string. */
  constructor(seed: number | string) {
    const s = typeof seed === 'string' ? fnv1a(seed) : Number(BigInt.asUintN(32, BigInt(Math.trunc(seed))));
    const mix = splitmix32(s);
    this.a = mix();
    this.b = mix();
    this.c = mix();
    this.d = mix();
    for (let i = 0; i < 12; i++) this.nextUint32(); // warm-up, as sfc32's author recommends
  }

  /** An independent stream for (seed, ...labels); same inputs → same stream. */
  static derive(seed: number, ...labels: (string | number)[]): Rng {
    return new Rng(`${BigInt.asUintN(32, BigInt(Math.trunc(seed)))}/${labels.join('/')}`);
  }

  nextUint32(): number {
    const t = (((this.a + this.b) >>> 0) + this.d) >>> 0;
    this.d = (this.d + 1) >>> 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) >>> 0;
    this.c = ((this.c << 21) | (this.c >>> 11)) >>> 0;
    this.c = (this.c + t) >>> 0;
    return t;
  }

  /** Uniform in [0, 1) with 53 random bits. */
  next(): number {
    const hi = this.nextUint32() >>> 5; // 27 bits
    const lo = this.nextUint32() >>> 6; // 26 bits
    return (hi * 67108864 + lo) / 9007199254740992;
  }

  /** Uniform integer in [0, n), without modulo bias. */
  int(n: number): number {
    if (!Number.isInteger(n) || n <= 0 || n > 2 ** 32) throw new Error(`Rng.int: n must be an integer in 1..2^32, got ${n}`);
    const limit = 2 ** 32 - (2 ** 32 % n);
    let x = this.nextUint32();
    while (x >= limit) x = this.nextUint32();
    return x % n;
  }

  /** One element, uniformly (Python's random.choice). */
  choice<T>(items: readonly T[]): T {
    if (items.length === 0) throw new Error('Rng.choice: empty list');
    return items[this.int(items.length)]!;
  }

  /** Fisher–Yates shuffle in place; returns the same array. */
  shuffle<T>(items: T[]): T[] {
    for (let i = items.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      [items[i], items[j]] = [items[j]!, items[i]!];
    }
    return items;
  }

  /** Pick with probability proportional to `weights` (Python's random.choices, k = 1). */
  weighted<T>(items: readonly T[], weights: readonly number[]): T {
    const total = weights.reduce((s, w) => s + w, 0);
    if (!(total > 0)) return this.choice(items);
    let r = this.next() * total;
    for (let i = 0; i < items.length; i++) {
      r -= weights[i]!;
      if (r < 0) return items[i]!;
    }
    return items[items.length - 1]!;
  }

  /** The generator state, to save and restore a stream exactly. */
  getState(): RngState {
    return [this.a, this.b, this.c, this.d];
  }

  setState(state: RngState): void {
    [this.a, this.b, this.c, this.d] = state.map((x) => x >>> 0) as RngState;
  }

  /** A fresh random seed for `seed: -1` (recorded in the job's settings so the run can be repeated). */
  static randomSeed(): number {
    return Math.floor(Math.random() * 2 ** 32);
  }
}

/**
 * mulberry32: a 32-bit-state PRNG, values in [0, 1); same seed → same sequence on every platform.
 * The element stream of `seededNormal` (and of hypernetwork weight init): a per-element generator
 * this cheap keeps large noise tensors fast, while `Rng.derive` gives each tensor its own seed.
 */
export function mulberry32(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 15), z | 1);
    z ^= z + Math.imul(z ^ (z >>> 7), z | 61);
    return ((z ^ (z >>> 14)) >>> 0) / 4294967296;
  };
}

/** `n` standard normal values from `seed` (Box-Muller; both outputs of each pair are used). */
export function seededNormal(seed: number, n: number): Float32Array {
  const next = mulberry32(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const u1 = 1 - next(); // (0, 1]: log stays finite
    const u2 = next();
    const r = Math.sqrt(-2 * Math.log(u1));
    out[i] = r * Math.cos(2 * Math.PI * u2);
    if (i + 1 < n) out[i + 1] = r * Math.sin(2 * Math.PI * u2);
  }
  return out;
}
