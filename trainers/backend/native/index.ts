/**
 * @file Native CPU kernels: the C++ addon in native/ (multi-threaded, vectorised for this CPU,
 * built by `npm install`) registered over the stock tfjs-backend-cpu kernels of the same names,
 * so the networks' code does not change. `trainers/backend/tf.ts` calls registerNativeKernels() for
 * the 'cpu-native' backend; it throws with the reason when the addon did not build.
 */
import { tf } from '../tf.ts';
import { loadAddon, describeNative, type NativeInfo } from './addon.ts';
import { nativeKernelFuncs } from './kernels.ts';
import { elementwiseKernelFuncs } from './elementwise.ts';
import { layoutKernelFuncs } from './layout.ts';
import { recycleOutputs, type RecyclingBackend } from './output.ts';

/** Stock CPU kernels that were replaced, by kernel name (to fall back and to restore). */
const stockKernels = new Map<string, tf.KernelConfig>();
let registered = false;

function stock(name: string): tf.KernelFunc {
  const k = stockKernels.get(name) ?? tf.getKernel(name, 'cpu');
  if (!k) throw new Error(`no stock CPU kernel '${name}'`);
  return k.kernelFunc;
}

/** Replaces the CPU backend's conv/matmul/softmax/binary/layout/reduction kernels with the native ones (idempotent). */
export function registerNativeKernels(): void {
  if (registered) return;
  const addon = loadAddon();
  const funcs = { ...nativeKernelFuncs(addon, stock), ...elementwiseKernelFuncs(addon, stock), ...layoutKernelFuncs(addon, stock) };
  for (const [kernelName, kernelFunc] of Object.entries(funcs)) {
    const current = tf.getKernel(kernelName, 'cpu');
    if (current) {
      stockKernels.set(kernelName, current);
      // registerKernel warns and keeps going on a duplicate; unregister so ours is the one
      tf.unregisterKernel(kernelName, 'cpu');
    }
    tf.registerKernel({ kernelName, backendName: 'cpu', kernelFunc });
  }
  recycleOutputs(tf.findBackend('cpu') as unknown as RecyclingBackend);
  registered = true;
}

/** Puts the stock pure-JS kernels back (tests compare against them). */
export function unregisterNativeKernels(): void {
  if (!registered) return;
  for (const [kernelName, config] of stockKernels) {
    tf.unregisterKernel(kernelName, 'cpu');
    tf.registerKernel(config);
  }
  stockKernels.clear();
  registered = false;
}

/** The kernels' one-line description for logs (the backend's adapter line; addon.ts describeNative). */
export function nativeDescription(): string {
  return describeNative(loadAddon());
}

/** Whether the addon loads, and if so its thread count, ISA variant and kernel paths; else why not. */
export function nativeStatus(): ({ available: true } & NativeInfo) | { available: false; reason: string } {
  try {
    return { available: true, ...loadAddon().info() };
  } catch (err) {
    return { available: false, reason: String(err instanceof Error ? err.message : err) };
  }
}
