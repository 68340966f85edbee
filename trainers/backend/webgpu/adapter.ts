/**
 * @file The GPU adapter for the 'webgpu' backend: Dawn for Node (npm `webgpu`, its `dawn.node`
 * ships inside the package for linux/darwin/win32), which drives Vulkan, Metal or D3D12 — any
 * vendor's GPU. This module imports no TF.js, so `health` can ask which adapter there is without
 * starting a backend.
 *
 * A hardware adapter is taken on its own; a fallback/software one (Mesa's lavapipe, SwiftShader) only
 * when the backend is forced (`SIDETRAIN_BACKEND=webgpu`): on a CPU, sidetrain's native kernels
 * are faster than a CPU pretending to be a GPU.
 */

/** The few WebGPU types used here (the `@webgpu/types` globals come with the optional package). */
export interface GpuAdapterInfo {
  vendor: string;
  architecture: string;
  device: string;
  description: string;
  isFallbackAdapter?: boolean;
}
export interface GpuAdapter {
  readonly info: GpuAdapterInfo;
  readonly isFallbackAdapter?: boolean;
  readonly features: ReadonlySet<string>;
  readonly limits: Record<string, number>;
  requestDevice(desc?: { requiredFeatures?: string[]; requiredLimits?: Record<string, number> }): Promise<unknown>;
}
interface Gpu {
  requestAdapter(opts?: { powerPreference?: string; forceFallbackAdapter?: boolean }): Promise<GpuAdapter | null>;
}

/** What health, logs and the page say about the adapter. */
export interface AdapterSummary {
  vendor: string;
  architecture: string;
  device: string;
  description: string;
  fallback: boolean;
  shaderF16: boolean;
  /** Bytes. */
  maxBufferSize: number;
  maxStorageBufferBindingSize: number;
  /** Where float16 was asked for (SIDETRAIN_WEBGPU_F16=1): what the backend does about it. */
  f16?: string;
}

let dawn: { gpu: Gpu; globals: Record<string, unknown> } | undefined;

/** Loads dawn.node once (nothing global changes until installGpuGlobals()). */
async function loadDawn(): Promise<NonNullable<typeof dawn>> {
  if (dawn) return dawn;
  const pkg = 'webgpu'; // optional dependency: a variable keeps tsc from requiring its types
  let mod: { create(opts: string[]): Gpu; globals: Record<string, unknown> };
  try {
    mod = await import(pkg);
  } catch (err) {
    throw new Error(`the optional package 'webgpu' (Dawn) is not installed or does not load here: ${firstLine(err)}`);
  }
  dawn = { gpu: mod.create([]), globals: mod.globals };
  return dawn;
}

/**
 * Installs the WebGPU globals (GPUBufferUsage, …) and `navigator.gpu` that tfjs-backend-webgpu
 * reads — only once an adapter was accepted. Node 21+ has its own `navigator` (getter only): gpu
 * is added to it.
 */
export async function installGpuGlobals(): Promise<void> {
  const { gpu, globals } = await loadDawn();
  Object.assign(globalThis, globals);
  const g = globalThis as { navigator?: object };
  if (g.navigator) Object.defineProperty(g.navigator, 'gpu', { value: gpu, configurable: true });
  else Object.defineProperty(globalThis, 'navigator', { value: { gpu }, configurable: true, writable: true });
}

export function isFallback(adapter: GpuAdapter): boolean {
  // Dawn marks lavapipe/SwiftShader as fallback; 'software'/'cpu' architecture as a second signal
  return Boolean(adapter.isFallbackAdapter ?? adapter.info.isFallbackAdapter) || /^(software|cpu)$/i.test(adapter.info.architecture);
}

export function summarize(adapter: GpuAdapter): AdapterSummary {
  const { vendor, architecture, device, description } = adapter.info;
  return {
    vendor, architecture, device, description,
    fallback: isFallback(adapter),
    shaderF16: adapter.features.has('shader-f16'),
    maxBufferSize: adapter.limits.maxBufferSize ?? 0,
    maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize ?? 0,
  };
}

/** One line for logs and health: "nvidia ampere (NVIDIA GeForce RTX 3060), binding ≤ 2048 MiB, f16". */
export function describeAdapter(a: AdapterSummary): string {
  const name = a.description || a.device || 'unnamed';
  const mib = (b: number) => `${Math.round(b / 2 ** 20)} MiB`;
  return `${a.vendor || 'unknown vendor'} ${a.architecture || 'unknown architecture'} (${name})${a.fallback ? ' [software/fallback]' : ''}, `
    + `binding ≤ ${mib(a.maxStorageBufferBindingSize)}, buffer ≤ ${mib(a.maxBufferSize)}${a.shaderF16 ? ', shader-f16' : ''}${a.f16 ? `; ${a.f16}` : ''}`;
}

/**
 * The adapter to train on, or an Error whose first line says why there is none. `allowFallback`
 * (the backend was forced) accepts a software adapter.
 */
export async function findAdapter(allowFallback: boolean): Promise<GpuAdapter> {
  const { gpu } = await loadDawn();
  const adapter = await gpu.requestAdapter({ powerPreference: 'high-performance' });
  if (!adapter) {
    throw new Error('no WebGPU adapter (no Vulkan/Metal/D3D12 driver found by Dawn; for a software one set VK_ICD_FILENAMES to lavapipe)');
  }
  if (isFallback(adapter) && !allowFallback) {
    throw new Error(`only a software adapter (${adapter.info.description || adapter.info.device}); SIDETRAIN_BACKEND=webgpu uses it anyway`);
  }
  return adapter;
}

function firstLine(err: unknown): string {
  return String(err instanceof Error ? err.message : err).split('\n')[0]!;
}

let probe: Promise<AdapterSummary | string> | undefined;

/**
 * The adapter the webgpu backend would use (or is forced to, with SIDETRAIN_BACKEND=webgpu), or
 * why there is none. Asked once per process, given 10 s (a broken driver must not hang health).
 */
export function webgpuAdapter(forced = process.env.SIDETRAIN_BACKEND === 'webgpu'): Promise<AdapterSummary | string> {
  probe ??= Promise.race([
    findAdapter(forced).then(summarize, (err: unknown) => firstLine(err)),
    new Promise<string>((done) => setTimeout(() => done('no answer from Dawn within 10 s'), 10_000).unref()),
  ]);
  return probe;
}

/** For `health`: the adapter in one line, or "skipped: <reason>". */
export async function webgpuStatus(forced?: boolean): Promise<string> {
  const a = await webgpuAdapter(forced);
  return typeof a === 'string' ? `skipped: ${a}` : describeAdapter(a);
}
