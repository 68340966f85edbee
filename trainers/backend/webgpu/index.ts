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
import { attentionKernels, setAttentionF16 } from './attention.ts';
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

interface Device {
  features: ReadonlySet<string>;
  createShaderModule(desc: { code: string; label?: string }): unknown;
}

/** Features left unrequested, as if the adapter lacked them (SIDETRAIN_WEBGPU_HIDE_FEATURES=a,b: tests of the guards). */
const hidden = new Set((process.env.SIDETRAIN_WEBGPU_HIDE_FEATURES ?? '').split(',').filter(Boolean));

async function makeDevice(adapter: GpuAdapter): Promise<Device> {
  const requiredFeatures = ['timestamp-query', 'shader-f16'].filter((f) => adapter.features.has(f) && !hidden.has(f));
  const requiredLimits: Record<string, number> = {};
  for (const name of LIMITS) if (adapter.limits[name] !== undefined) requiredLimits[name] = adapter.limits[name]!;
  return adapter.requestDevice({ requiredFeatures, requiredLimits }) as Promise<Device>;
}

/**
 * The float16 attention core (SIDETRAIN_WEBGPU_F16=1) where the device has 'shader-f16'; without
 * the feature it stays float32 and the reason is returned. WGSL wants `enable f16;` before any
 * declaration, but tfjs-backend-webgpu puts a program's code after its own: the directive is moved
 * to the front of the module here.
 */
function enableF16(device: Device): string | undefined {
  if (process.env.SIDETRAIN_WEBGPU_F16 !== '1') return undefined;
  if (!device.features.has('shader-f16')) return "float16 attention asked for (SIDETRAIN_WEBGPU_F16=1), but this adapter has no 'shader-f16': float32";
  const create = device.createShaderModule.bind(device);
  device.createShaderModule = (desc) =>
    create(desc.code.includes('enable f16;') ? { ...desc, code: `enable f16;\n${desc.code.replace('enable f16;', '')}` } : desc);
  setAttentionF16(true);
  return 'float16 attention (shader-f16)';
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
  const device = await makeDevice(adapter);
  const f16 = enableF16(device);
  const backend = new pkg.WebGPUBackend(device, adapter.info);
  guardBackend(backend);
  registerKernels();
  nameKernels();
  tf.removeBackend('webgpu'); // the package's own factory (any adapter, no checks)
  tf.registerBackend('webgpu', () => backend as unknown as tf.KernelBackend, 3);
  if (!(await tf.setBackend('webgpu'))) throw new Error("tf.setBackend('webgpu') failed");
  await tf.ready();
  loaded = { ...summarize(adapter), ...(f16 ? { f16 } : {}) };
  return loaded;
}
