/**
 * @file The only module that imports TensorFlow.js. It picks the best backend present and says
 * which: tfjs-node-gpu → tfjs-node → CPU + sidetrain's native kernels → WASM → pure-JS CPU.
 * `@tensorflow/tfjs` is loaded (not just tfjs-core) because in Node only it registers the
 * gradients that training needs.
 */
import { createRequire } from 'node:module';
import * as tf from '@tensorflow/tfjs';

export { tf };
export type Tensor = tf.Tensor;
export type Variable = tf.Variable;

const require = createRequire(import.meta.url);

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

type Loader = () => Promise<void>;

/** Loaders per backend; each throws with a one-line reason when it is not available. */
const loaders: Record<BackendName, Loader> = {
  'tensorflow-gpu': async () => {
    require('@tensorflow/tfjs-node-gpu');
    await setOrThrow('tensorflow');
  },
  tensorflow: async () => {
    require('@tensorflow/tfjs-node');
    await setOrThrow('tensorflow');
  },
  'cpu-native': async () => {
    // trainers/native registers C++ kernels on the CPU backend; it throws when the addon did not build.
    const native = await import('./native/index.ts');
    native.registerNativeKernels();
    await setOrThrow('cpu');
  },
  wasm: async () => {
    const wasm = require('@tensorflow/tfjs-backend-wasm') as { setWasmPaths(p: string): void };
    const dist = require.resolve('@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm.wasm');
    wasm.setWasmPaths(dist.slice(0, dist.lastIndexOf('/') + 1));
    await setOrThrow('wasm');
    // Stock tfjs-backend-wasm 4.22 lacks Conv2DBackpropFilter and other gradient kernels.
    (await import('./wasm/kernels.ts')).registerWasmKernels();
  },
  cpu: async () => {
    await setOrThrow('cpu');
  },
};

async function setOrThrow(name: string): Promise<void> {
  if (!(await tf.setBackend(name))) throw new Error(`tf.setBackend('${name}') failed`);
  await tf.ready();
}

function firstLine(err: unknown): string {
  return String(err instanceof Error ? err.message : err).split('\n')[0]!;
}

/**
 * Initialise TF.js once. `preferred` (or env SIDETRAIN_BACKEND) forces one backend and fails
 * if it is not available; otherwise the first that loads in BACKEND_ORDER wins.
 */
export async function initBackend(preferred?: string): Promise<BackendChoice> {
  if (chosen) return chosen;
  const wanted = preferred ?? process.env.SIDETRAIN_BACKEND;
  if (wanted) {
    if (!(BACKEND_ORDER as readonly string[]).includes(wanted)) {
      throw new Error(`backend: unknown '${wanted}', expected one of ${BACKEND_ORDER.join(', ')}`);
    }
    await loaders[wanted as BackendName]();
    chosen = { name: wanted as BackendName, skipped: [] };
    return chosen;
  }
  const skipped: string[] = [];
  for (const name of BACKEND_ORDER) {
    try {
      await loaders[name]();
      chosen = { name, skipped };
      return chosen;
    } catch (err) {
      skipped.push(`${name}: ${firstLine(err)}`);
    }
  }
  throw new Error(`no TF.js backend could be loaded:\n${skipped.join('\n')}`);
}
