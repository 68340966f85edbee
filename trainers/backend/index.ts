/**
 * @file Backend selection: picks the best TF.js backend present and says which —
 * tfjs-node-gpu → WebGPU (./webgpu) → tfjs-node → CPU + sidetrain's native kernels → WASM → pure-JS CPU — and
 * registers sidetrain's own kernels on it (./native, ./wasm). Re-exports ./tf.ts so that a caller
 * that starts TF.js imports one module.
 */
import { createRequire } from 'node:module';
import { tf, currentBackend, recordBackend, BACKEND_ORDER, type BackendName, type BackendChoice } from './tf.ts';
import { choosePrecision, type PrecisionOption } from './precision.ts';
import type { JobContext } from '../job.ts';

export * from './tf.ts';
export * from './precision.ts';

const require = createRequire(import.meta.url);

/** Each returns the adapter line where there is one; `forced`: the user named this backend. */
type Loader = (forced: boolean) => Promise<string | void>;

/** Loaders per backend; each throws with a one-line reason when it is not available. */
const loaders: Record<BackendName, Loader> = {
  'tensorflow-gpu': async () => {
    require('@tensorflow/tfjs-node-gpu');
    await setOrThrow('tensorflow');
  },
  webgpu: async (forced) => {
    const webgpu = await import('./webgpu/index.ts');
    return webgpu.describeAdapter(await webgpu.loadWebgpu(forced));
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
    return native.nativeDescription();
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
 * if it is not available; otherwise the first that loads in BACKEND_ORDER wins. Under
 * SIDETRAIN_REQUIRE_NATIVE=1 a native addon that does not load is an error whatever the choice.
 */
export async function initBackend(preferred?: string): Promise<BackendChoice> {
  const done = currentBackend();
  if (done) return done;
  (await import('./native/addon.ts')).checkRequiredAddon();
  const wanted = preferred ?? process.env.SIDETRAIN_BACKEND;
  if (wanted) {
    if (!(BACKEND_ORDER as readonly string[]).includes(wanted)) {
      throw new Error(`backend: unknown '${wanted}', expected one of ${BACKEND_ORDER.join(', ')}`);
    }
    const adapter = await loaders[wanted as BackendName](true);
    return recordBackend({ name: wanted as BackendName, skipped: [], ...(adapter ? { adapter } : {}) });
  }
  const skipped: string[] = [];
  for (const name of BACKEND_ORDER) {
    try {
      const adapter = await loaders[name](false);
      return recordBackend({ name, skipped, ...(adapter ? { adapter } : {}) });
    } catch (err) {
      skipped.push(`${name}: ${firstLine(err)}`);
    }
  }
  throw new Error(`no TF.js backend could be loaded:\n${skipped.join('\n')}`);
}

/**
 * initBackend for a job, then its `precision` (fp32 / bf16 / auto, ./precision.ts) made the one the
 * kernels compute in, with a log line saying what auto chose and why.
 */
export async function initJobBackend(spec: { precision?: PrecisionOption }, ctx?: Pick<JobContext, 'emit'>): Promise<BackendChoice> {
  const backend = await initBackend();
  const chosen = choosePrecision(spec.precision ?? 'fp32');
  if (spec.precision && spec.precision !== 'fp32') ctx?.emit({ type: 'log', level: 'info', message: `${chosen.why}${chosen.kernel ? ` (kernel ${chosen.kernel})` : ''}` });
  return backend;
}
