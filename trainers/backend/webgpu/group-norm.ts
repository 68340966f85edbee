/**
 * @file GroupNorm (+ SiLU) on the 'webgpu' backend in WGSL: sidetrain's `SidetrainGroupNorm` and
 * `SidetrainGroupNormGrad` kernels (the ones nets/fused.ts runs under its customGrad, with the
 * inputs, outputs and formulas of the native kernels in native/src/norm.cc), instead of the
 * moments/sub/div/mul/add/sigmoid chain and its autodiff (≈10 dispatches and as many full-size
 * intermediates each way). torch.nn.GroupNorm (biased variance), then SiLU when `silu`.
 *
 * On NHWC x [B, H, W, C], G groups of C/G channels, M = H·W·C/G elements per (batch, group):
 *   forward:  mean, rstd = 1/√(var + eps) per (b, g) — one workgroup each, two passes (mean, then
 *             the squared deviations: no E[x²] − E[x]² cancellation); z = x̂·w + b, y = z·σ(z)
 *   backward: dz = dy·σ(z)(1 + z(1 − σ(z))) (dy without SiLU), dx̂ = dz·w,
 *             dx = rstd (dx̂ − Σdx̂/M − x̂ Σ(dx̂·x̂)/M) — the two sums one workgroup per (b, g);
 *             dw = Σ dz·x̂, db = Σ dz over B·H·W — partial sums over 256-row chunks, then Sum.
 * A WebGPU program has one output: statistics and dw/db come out stacked and are sliced.
 */
import { tf } from '../tf.ts';

type Info = tf.TensorInfo;
interface Uniform { type: 'int32' | 'float32'; data: number[] }
interface Backend {
  runWebGPUProgram(program: object, inputs: Info[], dtype: string, uniforms?: Uniform[]): Info;
  disposeData(dataId: object): void;
}
interface Attrs { groups: number; eps: number; silu: boolean }

const THREADS = 256;
/** Rows (pixels) per partial sum of dw/db. */
const CHUNK = 256;
const UNIFORMS = 'pixels : i32, channels : i32, groups : i32, total : i32, workgroups : i32, eps : f32,';

class NormProgram {
  readonly dispatchLayout = { x: [0] };
  readonly workgroupSize: [number, number, number] = [THREADS, 1, 1];
  readonly uniforms = UNIFORMS;
  dispatch: [number, number, number];
  constructor(readonly variableNames: string[], readonly outputShape: number[], workgroups: number, readonly shaderKey: string, private readonly code: string) {
    this.dispatch = [workgroups, 1, 1];
  }
  getUserCode(): string {
    return this.code;
  }
}

/** WGSL shared by the programs: the workgroup's index, a tree sum, x̂ and dz of one element. */
const prelude = (silu: boolean) => `
  const THREADS = ${THREADS};
  var<workgroup> red : array<f32, ${THREADS}>;
  fn groupIndex() -> i32 {
    return i32((workgroupId.z * numWorkgroups.y + workgroupId.y) * numWorkgroups.x + workgroupId.x);
  }
  // the workgroup's sum of v (every thread calls it)
  fn workgroupSum(v : f32) -> f32 {
    red[localId.x] = v;
    workgroupBarrier();
    for (var s = THREADS / 2; s > 0; s = s / 2) {
      if (i32(localId.x) < s) { red[localId.x] += red[i32(localId.x) + s]; }
      workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
  }
  // element e (0 ≤ e < M) of group bg: its flat index in x
  fn member(bg : i32, e : i32) -> i32 {
    let per = uniforms.channels / uniforms.groups;
    let b = bg / uniforms.groups;
    let g = bg % uniforms.groups;
    return (b * uniforms.pixels + e / per) * uniforms.channels + g * per + e % per;
  }
  // (b, g) of flat index i of x
  fn groupOf(i : i32) -> i32 {
    let b = i / (uniforms.pixels * uniforms.channels);
    return b * uniforms.groups + (i % uniforms.channels) / (uniforms.channels / uniforms.groups);
  }
  // dz from dy at pre-activation z
  fn dzOf(dyv : f32, z : f32) -> f32 {
    ${silu ? 'let sg = 1.0 / (1.0 + exp(-z));\n    return dyv * sg * (1.0 + z * (1.0 - sg));' : 'return dyv;'}
  }`;

/** WGSL: this workgroup's (batch, group) `bg` (clamped: a reshaped dispatch has spare ones, g0 ≥ total) and its size m. */
const GROUP = `
    let g0 = groupIndex();
    let bg = min(g0, uniforms.total - 1);
    let m = uniforms.pixels * (uniforms.channels / uniforms.groups);`;

/** mean and rstd per (b, g), stacked: [2, B, G]. */
const statsProgram = (shape: number[], workgroups: number) => new NormProgram(['x'], shape, workgroups, 'sidetrainGnStats', `
  ${prelude(false)}
  fn main(index : i32) {
    ${GROUP}
    var s = 0.0;
    for (var e = i32(localId.x); e < m; e += THREADS) { s += x[member(bg, e)]; }
    let mean = workgroupSum(s) / f32(m);
    var v = 0.0;
    for (var e = i32(localId.x); e < m; e += THREADS) { let d = x[member(bg, e)] - mean; v += d * d; }
    let variance = workgroupSum(v) / f32(m);
    if (localId.x == 0u && g0 < uniforms.total) {
      result[bg] = mean;
      result[uniforms.total + bg] = inverseSqrt(variance + uniforms.eps);
    }
  }`);

/** y = act(x̂·w + b), elementwise. */
const applyProgram = (shape: number[], workgroups: number, silu: boolean) => new NormProgram(['x', 'mean', 'rstd', 'weight', 'bias'], shape, workgroups, `sidetrainGnApply_${silu}`, `
  ${prelude(silu)}
  fn main(index : i32) {
    if (index >= uniforms.total) { return; }
    let bg = groupOf(index);
    let c = index % uniforms.channels;
    let z = (x[index] - mean[bg]) * rstd[bg] * weight[c] + bias[c];
    result[index] = ${silu ? 'z / (1.0 + exp(-z))' : 'z'};
  }`);

/** Σ dx̂ and Σ dx̂·x̂ per (b, g), stacked: [2, B, G]. */
const groupSumsProgram = (shape: number[], workgroups: number, silu: boolean) => new NormProgram(['dy', 'x', 'mean', 'rstd', 'weight', 'bias'], shape, workgroups, `sidetrainGnSums_${silu}`, `
  ${prelude(silu)}
  fn main(index : i32) {
    ${GROUP}
    var s1 = 0.0;
    var s2 = 0.0;
    for (var e = i32(localId.x); e < m; e += THREADS) {
      let i = member(bg, e);
      let c = i % uniforms.channels;
      let xh = (x[i] - mean[bg]) * rstd[bg];
      let dxh = dzOf(dy[i], xh * weight[c] + bias[c]) * weight[c];
      s1 += dxh;
      s2 += dxh * xh;
    }
    let t1 = workgroupSum(s1);
    let t2 = workgroupSum(s2);
    if (localId.x == 0u && g0 < uniforms.total) {
      result[bg] = t1;
      result[uniforms.total + bg] = t2;
    }
  }`);

/** dx, elementwise, from the group sums. */
const dxProgram = (shape: number[], workgroups: number, silu: boolean) => new NormProgram(['dy', 'x', 'mean', 'rstd', 'weight', 'bias', 'sums'], shape, workgroups, `sidetrainGnDx_${silu}`, `
  ${prelude(silu)}
  fn main(index : i32) {
    if (index >= uniforms.total) { return; }
    let bg = groupOf(index);
    let c = index % uniforms.channels;
    let groupsAll = uniforms.total / (uniforms.pixels * uniforms.channels / uniforms.groups);
    let m = f32(uniforms.pixels * (uniforms.channels / uniforms.groups));
    let xh = (x[index] - mean[bg]) * rstd[bg];
    let dxh = dzOf(dy[index], xh * weight[c] + bias[c]) * weight[c];
    result[index] = rstd[bg] * (dxh - sums[bg] / m - xh * sums[groupsAll + bg] / m);
  }`);

/** Partial Σ dz·x̂ and Σ dz per channel over chunks of CHUNK rows: [chunks, 2, C]. */
const dwdbProgram = (shape: number[], workgroups: number, silu: boolean) => new NormProgram(['dy', 'x', 'mean', 'rstd', 'weight', 'bias'], shape, workgroups, `sidetrainGnDwDb_${silu}`, `
  ${prelude(silu)}
  fn main(index : i32) {
    let g0 = groupIndex();
    let cBlocks = (uniforms.channels + THREADS - 1) / THREADS;
    let chunk = g0 / cBlocks;
    let c = (g0 % cBlocks) * THREADS + i32(localId.x);
    let rows = uniforms.total / uniforms.channels;
    if (g0 >= uniforms.workgroups || c >= uniforms.channels) { return; }
    let per = uniforms.channels / uniforms.groups;
    var dw = 0.0;
    var db = 0.0;
    for (var r = chunk * ${CHUNK}; r < min(rows, (chunk + 1) * ${CHUNK}); r++) {
      let i = r * uniforms.channels + c;
      let bg = (r / uniforms.pixels) * uniforms.groups + c / per;
      let xh = (x[i] - mean[bg]) * rstd[bg];
      let dz = dzOf(dy[i], xh * weight[c] + bias[c]);
      dw += dz * xh;
      db += dz;
    }
    result[(chunk * 2) * uniforms.channels + c] = dw;
    result[(chunk * 2 + 1) * uniforms.channels + c] = db;
  }`);

function uniforms(pixels: number, channels: number, groups: number, total: number, workgroups: number, eps: number): Uniform[] {
  return [
    ...[pixels, channels, groups, total, workgroups].map((n): Uniform => ({ type: 'int32', data: [n] })),
    { type: 'float32', data: [eps] },
  ];
}

function check(name: string, x: Info, weight: Info, groups: number): [number, number, number, number] {
  const [b, h, w, c] = x.shape as [number, number, number, number];
  if (x.shape.length !== 4 || x.dtype !== 'float32' || c % groups !== 0 || weight.shape[0] !== c) {
    throw new Error(`webgpu ${name}: float32 NHWC x with channels divisible by ${groups} groups and weight [C] expected, got x [${x.shape}] ${x.dtype}, weight [${weight.shape}]`);
  }
  return [b, h, w, c];
}

/** Runs stock kernels by name on the backend (Slice, Reshape, Sum), keeping the temporaries to dispose. */
function stockRunner(backend: unknown, temps: Info[]) {
  return (name: string, x: Info, attrs: Record<string, unknown>, keep = false) => {
    const out = tf.getKernel(name, 'webgpu')!.kernelFunc({ inputs: { x }, backend: backend as never, attrs: attrs as tf.NamedAttrMap }) as Info;
    if (!keep) temps.push(out);
    return out;
  };
}

/** Rows [start, start+1) of a stacked [2, …] tensor, as `shape`. */
function part(run: ReturnType<typeof stockRunner>, stacked: Info, start: number, shape: number[]): Info {
  const slice = run('Slice', stacked, { begin: [start, ...shape.map(() => 0)], size: [1, ...shape] });
  return run('Reshape', slice, { shape }, true);
}

/** The kernels, registered for 'webgpu' by ./index.ts. */
export const groupNormKernels: Record<string, tf.KernelFunc> = {
  SidetrainGroupNorm: ({ inputs, backend, attrs }) => {
    const be = backend as unknown as Backend, { x, weight, bias } = inputs as Record<string, Info>;
    const { groups, eps, silu } = attrs as unknown as Attrs;
    const [b, h, w, c] = check('SidetrainGroupNorm', x!, weight!, groups);
    const temps: Info[] = [];
    const run = stockRunner(backend, temps);
    try {
      const stats = be.runWebGPUProgram(statsProgram([2, b, groups], b * groups), [x!], 'float32', uniforms(h * w, c, groups, b * groups, b * groups, eps));
      temps.push(stats);
      const mean = part(run, stats, 0, [b, groups]), rstd = part(run, stats, 1, [b, groups]);
      const size = b * h * w * c, workgroups = Math.ceil(size / THREADS);
      const y = be.runWebGPUProgram(applyProgram([b, h, w, c], workgroups, silu), [x!, mean, rstd, weight!, bias!], 'float32', uniforms(h * w, c, groups, size, workgroups, eps));
      return [y, mean, rstd];
    } finally {
      for (const t of temps) be.disposeData(t.dataId);
    }
  },
  SidetrainGroupNormGrad: ({ inputs, backend, attrs }) => {
    const be = backend as unknown as Backend, { dy, x, mean, rstd, weight, bias } = inputs as Record<string, Info>;
    const { groups, silu } = attrs as unknown as Attrs;
    const [b, h, w, c] = check('SidetrainGroupNormGrad', x!, weight!, groups);
    const all = [dy!, x!, mean!, rstd!, weight!, bias!];
    const temps: Info[] = [];
    const run = stockRunner(backend, temps);
    try {
      const sums = be.runWebGPUProgram(groupSumsProgram([2, b, groups], b * groups, silu), all, 'float32', uniforms(h * w, c, groups, b * groups, b * groups, 0));
      temps.push(sums);
      const size = b * h * w * c, workgroups = Math.ceil(size / THREADS);
      const dx = be.runWebGPUProgram(dxProgram([b, h, w, c], workgroups, silu), [...all, sums], 'float32', uniforms(h * w, c, groups, size, workgroups, 0));
      const chunks = Math.ceil((b * h * w) / CHUNK), dwdbGroups = chunks * Math.ceil(c / THREADS);
      const partial = be.runWebGPUProgram(dwdbProgram([chunks, 2, c], dwdbGroups, silu), all, 'float32', uniforms(h * w, c, groups, size, dwdbGroups, 0));
      temps.push(partial);
      const total = run('Sum', partial, { axis: [0], keepDims: false }); // [2, C]
      return [dx, part(run, total, 0, [c]), part(run, total, 1, [c])];
    } finally {
      for (const t of temps) be.disposeData(t.dataId);
    }
  },
};
