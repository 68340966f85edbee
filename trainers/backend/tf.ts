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

/**
 * Backend names in the order they are preferred. 'webgpu' (Dawn: Vulkan/Metal/D3D12) comes after
 * tfjs-node-gpu (CUDA, where a user managed to install it) and before every CPU path; it is taken
 * only with a hardware adapter unless forced.
 */
export const BACKEND_ORDER = ['tensorflow-gpu', 'webgpu', 'tensorflow', 'cpu-native', 'wasm', 'cpu'] as const;
export type BackendName = (typeof BACKEND_ORDER)[number];

export interface BackendChoice {
  name: BackendName;
  /** Why the better ones were not used (one line each), for `health` and logs. */
  skipped: string[];
  /** 'webgpu': the adapter, one line (vendor, architecture, name, limits); 'cpu-native': the kernels' ISA paths and threads. */
  adapter?: string;
}

/** One line for logs: the backend, its adapter, and why each better one was skipped. */
export function describeBackend(choice: BackendChoice): string {
  const skipped = choice.skipped.length ? `; skipped ${choice.skipped.join('; ')}` : '';
  return `backend ${choice.name}${choice.adapter ? ` on ${choice.adapter}` : ''}${skipped}`;
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
