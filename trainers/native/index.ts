/**
 * @file Native CPU kernels (C++ N-API addon in native/) registered as TF.js CPU kernels.
 * Placeholder until the addon lands: it reports that it is not built.
 */
export function registerNativeKernels(): void {
  throw new Error('native kernels are not built');
}
