/**
 * @file The frozen text encoder run once per prompt (issue 10's memory/time lever): while nothing
 * in the text encoder trains, its output for a prompt never changes, so each prompt's row
 * [1, T, W] is encoded once and reused by later steps (templates and captions repeat every epoch).
 * Keyed by the text weights' Params object; release it with the weights.
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { encodeText, type ClipTextConfig } from '../nets/clip.ts';
import type { Params } from '../nets/params.ts';

/** At most this many prompts kept per model (SD1.5: 77 × 768 floats = 236 KB each, 512 → 121 MB). */
const CAPACITY = 512;

const caches = new WeakMap<Params, Map<string, Tensor>>();

/**
 * encodeText for a frozen text encoder: [B, T, W] for the rows' token ids (a new tensor the caller
 * disposes); rows seen before come from the cache, the others are encoded together and kept.
 */
export function encodeFrozenText(params: Params, cfg: ClipTextConfig, ids: number[][]): Tensor {
  let cache = caches.get(params);
  if (!cache) caches.set(params, (cache = new Map()));
  const keys = ids.map((row) => row.join(','));
  const missing = [...new Set(keys.filter((k) => !cache.has(k)))];
  if (missing.length) {
    const rows = tf.tidy(() => tf.unstack(encodeText(params, cfg, missing.map((k) => ids[keys.indexOf(k)]!))));
    missing.forEach((k, i) => {
      if (cache.size >= CAPACITY) evictOldest(cache);
      cache.set(k, tf.keep(rows[i]!.expandDims(0)));
      rows[i]!.dispose();
    });
  }
  return tf.tidy(() => tf.concat(keys.map((k) => cache.get(k)!), 0));
}

function evictOldest(cache: Map<string, Tensor>): void {
  const [oldest] = cache.keys();
  cache.get(oldest!)?.dispose();
  cache.delete(oldest!);
}

/** Dispose the cached encodings of `params` (call when the text weights are released). */
export function releaseTextCache(params: Params): void {
  const cache = caches.get(params);
  if (cache) tf.dispose([...cache.values()]);
  caches.delete(params);
}
