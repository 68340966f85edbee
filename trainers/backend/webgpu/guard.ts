/**
 * @file Loud failures on the 'webgpu' backend. WebGPU reports a bad call (a binding over the
 * adapter's limit, an out-of-memory buffer) asynchronously and then runs nothing: tfjs-backend-webgpu
 * 4.22 never looks, so the tensor reads back as zeros and training goes on with them. Here:
 *  - each kernel records its name, so an error says which op failed;
 *  - every program's bindings are checked against `maxStorageBufferBindingSize` before dispatch
 *    and refused with a message naming the op, the tensor's shape and the limit;
 *  - every dispatch and queue submit runs inside validation/out-of-memory/internal error scopes;
 *    uncaptured errors and a lost device are caught too;
 *  - a read (`await t.data()`) first waits for the scopes and throws the first error, so it becomes
 *    the job's error instead of a wrong number.
 */
import { tf } from '../tf.ts';

interface TensorInfo { dataId: object; shape: number[]; dtype: string }
interface Program { constructor: { name: string }; outputShape: number[] }
interface GpuError { message: string }
interface Device {
  limits: Record<string, number>;
  pushErrorScope(filter: 'validation' | 'out-of-memory' | 'internal'): void;
  popErrorScope(): Promise<GpuError | null>;
  onuncapturederror: ((ev: { error: GpuError }) => void) | null;
  lost: Promise<{ reason: string; message: string }>;
}
/** The parts of tfjs-backend-webgpu's WebGPUBackend that are wrapped. */
export interface WebGpuBackendLike {
  device: Device;
  runWebGPUProgram(program: Program, inputs: TensorInfo[], outputDtype: string, ...rest: unknown[]): TensorInfo;
  submitQueue(): void;
  read(dataId: object): Promise<unknown>;
  readSync(dataId: object): unknown;
}

const FILTERS = ['validation', 'out-of-memory', 'internal'] as const;
const BYTES: Record<string, number> = { float32: 4, int32: 4, bool: 4, complex64: 8 };

let currentKernel = '(outside a kernel)';
const outstanding = new Set<Promise<void>>();
const errors: string[] = [];

/** The first GPU error seen so far, as an Error naming the op; clears it (tests provoke one on purpose). */
function takeError(): Error | undefined {
  const first = errors.shift();
  if (first === undefined) return undefined;
  const more = errors.length ? ` (and ${errors.length} more GPU error(s))` : '';
  errors.length = 0;
  return new Error(`${first}${more}`);
}

/** Waits for every pending error scope; throws the first GPU error. Loops call it through `data()`. */
export async function checkGpuErrors(): Promise<void> {
  while (outstanding.size) await Promise.all([...outstanding]);
  const err = takeError();
  if (err) throw err;
}

function mib(bytes: number): string {
  return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

/** Refuses a program whose input or output is bigger than one binding may be (Dawn would run nothing). */
export function checkBindings(limit: number, kernel: string, program: string, tensors: TensorInfo[]): void {
  for (const [i, t] of tensors.entries()) {
    const bytes = (BYTES[t.dtype] ?? 4) * t.shape.reduce((a, b) => a * b, 1);
    if (bytes > limit) {
      const which = i === tensors.length - 1 ? 'output' : `input ${i}`;
      throw new Error(
        `webgpu: ${kernel} (${program}) ${which} [${t.shape.join(', ')}] ${t.dtype} is ${mib(bytes)}, over this adapter's `
        + `storage binding limit of ${mib(limit)} (maxStorageBufferBindingSize); use a smaller batch or resolution, `
        + `or another backend (SIDETRAIN_BACKEND=cpu-native)`,
      );
    }
  }
}

/** Runs `fn` inside the three error scopes; a captured error is kept, tagged with `what`. */
function scoped<T>(device: Device, what: () => string, fn: () => T): T {
  for (const f of FILTERS) device.pushErrorScope(f);
  let result: T;
  try {
    result = fn();
  } finally {
    // scopes pop in reverse order of their push: internal, out-of-memory, validation
    const pops = [device.popErrorScope(), device.popErrorScope(), device.popErrorScope()];
    const p: Promise<void> = Promise.all(pops).then(
      (errs) => {
        for (const e of errs) if (e) errors.push(`webgpu: ${what()}: ${e.message.trim().split('\n')[0]}`);
      },
      (e: unknown) => { errors.push(`webgpu: ${what()}: error scope failed: ${String(e)}`); },
    ).finally(() => outstanding.delete(p));
    outstanding.add(p);
  }
  return result;
}

/** Installs the checks on a freshly made backend (once). */
export function guardBackend(backend: WebGpuBackendLike): void {
  const { device } = backend;
  // SIDETRAIN_WEBGPU_BINDING_CHECK=0 lets an oversized binding reach Dawn (the tests prove the error scopes catch it)
  const limit = process.env.SIDETRAIN_WEBGPU_BINDING_CHECK === '0' ? Infinity : device.limits.maxStorageBufferBindingSize ?? Infinity;
  device.onuncapturederror = (ev) => { errors.push(`webgpu: uncaptured GPU error near ${currentKernel}: ${ev.error.message}`); };
  void device.lost.then((info) => { errors.push(`webgpu: the GPU device was lost (${info.reason}): ${info.message}`); });

  const run = backend.runWebGPUProgram.bind(backend);
  backend.runWebGPUProgram = (program, inputs, outputDtype, ...rest) => {
    const kernel = currentKernel;
    const name = program.constructor.name;
    checkBindings(limit, kernel, name, [...inputs, { dataId: {}, shape: program.outputShape, dtype: outputDtype }]);
    const shapes = () => inputs.map((t) => `[${t.shape.join(',')}]`).join(' ') || 'none';
    return scoped(device, () => `${kernel} (${name}, inputs ${shapes()})`, () => run(program, inputs, outputDtype, ...rest));
  };
  const submit = backend.submitQueue.bind(backend);
  backend.submitQueue = () => {
    const kernel = currentKernel;
    scoped(device, () => `queue submit (last op ${kernel})`, submit);
  };
  const read = backend.read.bind(backend);
  backend.read = async (dataId) => {
    const values = await read(dataId);
    await checkGpuErrors();
    return values;
  };
  // a read of GPU data without await: tfjs-backend-webgpu draws through an OffscreenCanvas, which Node lacks
  const readSync = backend.readSync.bind(backend);
  backend.readSync = (dataId) => {
    try {
      return readSync(dataId);
    } catch (err) {
      if (!/OffscreenCanvas/.test(String(err))) throw err;
      throw new Error(`webgpu: a synchronous read of GPU data (dataSync/arraySync) in ${currentKernel} cannot work in Node; read with await data()`);
    }
  };
}

/** Wraps every kernel registered for 'webgpu' so that errors can name the op that ran. */
export function nameKernels(): void {
  for (const config of tf.getKernelsForBackend('webgpu')) {
    const { kernelName, kernelFunc } = config;
    if ((kernelFunc as { named?: boolean }).named) continue;
    const named: tf.KernelFunc = (args) => {
      const outer = currentKernel;
      currentKernel = kernelName;
      try {
        return kernelFunc(args);
      } finally {
        currentKernel = outer;
      }
    };
    (named as { named?: boolean }).named = true;
    tf.unregisterKernel(kernelName, 'webgpu');
    tf.registerKernel({ ...config, kernelFunc: named });
  }
}
