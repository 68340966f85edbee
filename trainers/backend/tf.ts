/**
 * @file The only module that imports TensorFlow.js: a leaf that every layer above may use.
 * Which backend runs is chosen in ./index.ts (initBackend), which records it here so that kernels
 * can ask `currentBackend()` without importing the chooser (no import circle).
 * `@tensorflow/tfjs` is loaded (not just tfjs-core) because in Node only it registers the
 * gradients that training needs.
 */
import * as tf from '@tensorflow/tfjs';

export { tf };
export type Tensor = tf.Tensor;
export type Variable = tf.Variable;

// The CPU backend's first-use banner ("install tfjs-node") repeats what initBackend() says;
// silence it even when a tensor is made before the choice (TF.js then starts the CPU backend).
const cpuBackend = tf.engine().findBackend('cpu') as { firstUse?: boolean } | null;
if (cpuBackend && 'firstUse' in cpuBackend) cpuBackend.firstUse = false;

/**
 * Comparisons have zero gradient, but TF.js registers one only for GreaterEqual: a trained path
 * through tf.where(greater(...)) (hypernetwork activations such as mish, softplus) would fail.
 */
for (const kernelName of ['Greater', 'Less', 'LessEqual', 'Equal', 'NotEqual']) {
  if (!tf.getGradient(kernelName)) {
    tf.registerGradient({
      kernelName,
      inputsToSave: ['a', 'b'],
      gradFunc: (_dy, saved) => ({ a: () => tf.zerosLike(saved[0]!), b: () => tf.zerosLike(saved[1]!) }),
    });
  }
}

/** Backend names in the order they are preferred. */
export const BACKEND_ORDER = ['tensorflow-gpu', 'tensorflow', 'cpu-native', 'wasm', 'cpu'] as const;
export type BackendName = (typeof BACKEND_ORDER)[number];

export interface BackendChoice {
  name: BackendName;
  /** Why the better ones were not used (one line each), for `health` and logs. */
  skipped: string[];
}

let chosen: BackendChoice | undefined;

/** The backend in use, or undefined before initBackend(). */
export function currentBackend(): BackendChoice | undefined {
  return chosen;
}

/** Called once by ./index.ts initBackend() when a backend is set. */
export function recordBackend(choice: BackendChoice): BackendChoice {
  chosen = choice;
  return chosen;
}
