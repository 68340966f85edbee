/**
 * @file The 'webgpu' backend: @tensorflow/tfjs-backend-webgpu (162 kernels, every one SD training
 * uses) on Dawn for Node, with the adapter chosen here (./adapter.ts: hardware first, software only
 * when forced) and the checks of ./guard.ts installed before any tensor lives on it.
 *
 * Why not the package's own registration: it asks for any adapter (lavapipe included) and wants
 * neither shader-f16 nor error handling. The backend is registered under the same name, so the
 * package's kernels (registered for 'webgpu' when it is imported) run on it.
 */
import { createRequire } from 'node:module';
import { tf } from '../tf.ts';
import { findAdapter, installGpuGlobals, summarize, type AdapterSummary, type GpuAdapter } from './adapter.ts';
import { guardBackend, nameKernels, type WebGpuBackendLike } from './guard.ts';
import { convFilterGradByTaps } from './conv-filter-grad.ts';
import { attentionKernels } from './attention.ts';
import { groupNormKernels } from './group-norm.ts';

export { checkGpuErrors } from './guard.ts';
export { describeAdapter, type AdapterSummary } from './adapter.ts';

const require = createRequire(import.meta.url);

/** The limits tfjs-backend-webgpu raises to the adapter's own (its base.ts), plus the binding limit it checks. */
const LIMITS = [
  'maxComputeWorkgroupStorageSize', 'maxComputeWorkgroupsPerDimension', 'maxStorageBufferBindingSize',
  'maxBufferSize', 'maxComputeWorkgroupSizeX', 'maxComputeInvocationsPerWorkgroup',
] as const;

let loaded: AdapterSummary | undefined;

/** The package's kernels that sidetrain replaces, kept to call and to restore. */
const stock = new Map<string, tf.KernelFunc>();

/** sidetrain's kernels over the package's (SIDETRAIN_WEBGPU_KERNELS=0 keeps the stock ones, to compare). */
function registerKernels(): void {
  if (process.env.SIDETRAIN_WEBGPU_KERNELS === '0') return;
  const ours: Record<string, tf.KernelFunc> = { Conv2DBackpropFilter: convFilterGradByTaps(stock), ...attentionKernels, ...groupNormKernels };
  for (const [kernelName, kernelFunc] of Object.entries(ours)) {
    const current = tf.getKernel(kernelName, 'webgpu');
    if (current) {
      stock.set(kernelName, current.kernelFunc);
      tf.unregisterKernel(kernelName, 'webgpu');
    }
    tf.registerKernel({ kernelName, backendName: 'webgpu', kernelFunc });
  }
}

async function makeDevice(adapter: GpuAdapter): Promise<unknown> {
  const requiredFeatures = ['timestamp-query', 'shader-f16'].filter((f) => adapter.features.has(f));
  const requiredLimits: Record<string, number> = {};
  for (const name of LIMITS) if (adapter.limits[name] !== undefined) requiredLimits[name] = adapter.limits[name]!;
  return adapter.requestDevice({ requiredFeatures, requiredLimits });
}

/**
 * Registers and selects the 'webgpu' TF.js backend. `forced` (SIDETRAIN_BACKEND=webgpu) accepts a
 * software adapter. Throws a one-line reason when there is no adapter or the packages are missing.
 */
export async function loadWebgpu(forced: boolean): Promise<AdapterSummary> {
  if (loaded) {
    if (!(await tf.setBackend('webgpu'))) throw new Error("tf.setBackend('webgpu') failed");
    return loaded;
  }
  const adapter = await findAdapter(forced);
  await installGpuGlobals(); // navigator.gpu and GPUBufferUsage…, which the package reads
  let pkg: { WebGPUBackend: new (device: unknown, info: unknown) => WebGpuBackendLike };
  try {
    pkg = require('@tensorflow/tfjs-backend-webgpu');
  } catch (err) {
    throw new Error(`the optional package @tensorflow/tfjs-backend-webgpu does not load: ${String(err).split('\n')[0]}`);
  }
  const backend = new pkg.WebGPUBackend(await makeDevice(adapter), adapter.info);
  guardBackend(backend);
  registerKernels();
  nameKernels();
  tf.removeBackend('webgpu'); // the package's own factory (any adapter, no checks)
  tf.registerBackend('webgpu', () => backend as unknown as tf.KernelBackend, 3);
  if (!(await tf.setBackend('webgpu'))) throw new Error("tf.setBackend('webgpu') failed");
  await tf.ready();
  loaded = summarize(adapter);
  return loaded;
}
