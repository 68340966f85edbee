/**
 * @file The attention core on the 'webgpu' backend in WGSL: sidetrain's two attention kernels
 * (`SidetrainAttention`, `SidetrainAttentionGrad`, the ones nets/sliced-attention.ts runs under
 * its customGrad, with the same inputs, outputs and formulas as the native core in
 * native/src/attention.cc) as flash-style tiled shaders — the [B·heads, Tq, Tk] score matrix
 * never exists, in the forward or the backward (FlashAttention, Dao et al. 2022, §3.1 and App. B).
 *
 * One workgroup owns 64 rows (query rows, or key rows for dK/dV) of one (batch, head); tiles of
 * the other side's rows are staged in workgroup memory, sized to fit 16 KiB (WebGPU's default
 * maxComputeWorkgroupStorageSize). Each thread keeps its row and accumulator in registers.
 *   forward:  lse_i = log Σ_j exp(s_ij) (online max), then o_i = Σ_j exp(s_ij − lse_i)·v_j
 *   backward: D_i = do_i·o_i;  p_ij = exp(s_ij − lse_i);  ds_ij = p_ij (do_i·v_j − D_i)
 *             dq_i = scale Σ_j ds_ij k_j;  dk_j = scale Σ_i ds_ij q_i;  dv_j = Σ_i p_ij do_i
 * with s_ij = scale·q_i·k_j. Layouts: q [B, Tq, heads·d], k and v [B, Tk, heads·d] (channels as
 * (head, d)), lse [B·heads, Tq]. A WebGPU program has one output: dK and dV come out stacked.
 */
import { tf } from '../tf.ts';

type Info = tf.TensorInfo;
interface Uniform { type: 'int32' | 'float32'; data: number[] }
interface Backend {
  runWebGPUProgram(program: object, inputs: Info[], dtype: string, uniforms?: Uniform[]): Info;
  disposeData(dataId: object): void;
}
interface Attrs { heads: number; scale: number }

/**
 * float16 tiles and products (float32 accumulation and softmax statistics), set by ./index.ts
 * only where the device has 'shader-f16' and it was asked for (SIDETRAIN_WEBGPU_F16=1).
 */
let half = false;

/** Turns the float16 variant on or off (the device must have 'shader-f16'). */
export function setAttentionF16(on: boolean): void {
  half = on;
}

/** Threads (rows) per workgroup. */
const ROWS = 64;
/** Staged rows per tile: `perRow` floats each within 16 KiB of workgroup memory, at most 32. */
const tileRows = (perRow: number) => Math.max(1, Math.min(32, Math.floor(16384 / (half ? 2 : 4) / perRow)));

/** The sizes every program takes as uniforms, in the order of `UNIFORMS`. */
const UNIFORMS = 'tq : i32, tk : i32, heads : i32, rowBlocks : i32, groups : i32, scale : f32,';

/** WGSL shared by the programs: which (batch, head, row) this thread has; offsets of rows. */
function prelude(d: number): string {
  return `
  ${half ? 'enable f16;' : ''}
  alias T = ${half ? 'f16' : 'f32'};
  const D = ${d};
  const ROWS = ${ROWS};
  fn groupIndex() -> i32 {
    return i32((workgroupId.z * numWorkgroups.y + workgroupId.y) * numWorkgroups.x + workgroupId.x);
  }
  // element c of row t of head h in batch b of a [B, T, heads·D] tensor
  fn idx(b : i32, t : i32, T : i32, h : i32, c : i32) -> i32 {
    return ((b * T + t) * uniforms.heads + h) * D + c;
  }`;
}

/**
 * WGSL: this thread's (batch b, head h) and row `row` of `count` rows, and whether it is a real
 * row (`live`). No early return: barriers need every thread, and a dispatch reshaped to fit the
 * per-dimension limit has spare workgroups.
 */
const rowOf = (row: 'i' | 'j', count: 'tq' | 'tk') => `
    let g0 = groupIndex();
    let g = min(g0, uniforms.groups - 1);
    let bh = g / uniforms.rowBlocks;
    let b = bh / uniforms.heads;
    let h = bh % uniforms.heads;
    let ${row} = (g % uniforms.rowBlocks) * ROWS + i32(localId.x);
    let live = g0 < uniforms.groups && ${row} < uniforms.${count};`;

/** WGSL: the key/value rows t0 … t0+TILE of this (b, h) into the workgroup's kt and vt (zeros past Tk). */
const STAGE_KV = `
      for (var e = i32(localId.x); e < TILE * D; e += ROWS) {
        let j = t0 + e / D;
        let src = idx(b, min(j, uniforms.tk - 1), uniforms.tk, h, e % D);
        kt[e] = T(select(0.0, k[src], j < uniforms.tk));
        vt[e] = T(select(0.0, v[src], j < uniforms.tk));
      }`;

/**
 * A program for tfjs-backend-webgpu's runWebGPUProgram (its WebGPUProgram interface): `name`'s
 * shader for head width d and `tile` staged rows (the shader key: sizes are uniforms, so one
 * compiled shader serves every shape), `decls` at module scope, `body` as main's.
 */
class AttentionProgram {
  readonly dispatchLayout = { x: [0] };
  readonly workgroupSize: [number, number, number] = [ROWS, 1, 1];
  readonly uniforms = UNIFORMS;
  readonly dispatch: [number, number, number];
  readonly shaderKey: string;
  private readonly code: string;
  constructor(name: string, d: number, tile: number, readonly variableNames: string[], readonly outputShape: number[], groups: number, decls: string, body: string) {
    this.dispatch = [groups, 1, 1];
    this.shaderKey = `sidetrainAttn${name}_${d}_${tile}_${half ? 'f16' : 'f32'}`;
    this.code = `${prelude(d)}\n  const TILE = ${tile};\n${decls}\n  fn main(index : i32) {${body}\n  }`;
  }
  getUserCode(): string {
    return this.code;
  }
}

/** WGSL: workgroup tiles of `tile` key and value rows. */
const kvTiles = (tile: number, d: number) => `
  var<workgroup> kt : array<T, ${tile * d}>;
  var<workgroup> vt : array<T, ${tile * d}>;`;

/** The log-sum-exp of each query row's scores: [B·heads, Tq]. */
function lseProgram(d: number, shape: number[], groups: number): AttentionProgram {
  const tile = tileRows(d);
  return new AttentionProgram('Lse', d, tile, ['q', 'k'], shape, groups, `
  var<workgroup> kt : array<T, ${tile * d}>;`, `
    ${rowOf('i', 'tq')}
    var qi : array<T, D>;
    if (live) { for (var c = 0; c < D; c++) { qi[c] = T(q[idx(b, i, uniforms.tq, h, c)] * uniforms.scale); } }
    var m = -3.402823e+38f;
    var l = 0.0;
    for (var t0 = 0; t0 < uniforms.tk; t0 += TILE) {
      for (var e = i32(localId.x); e < TILE * D; e += ROWS) {
        let j = t0 + e / D;
        kt[e] = T(select(0.0, k[idx(b, min(j, uniforms.tk - 1), uniforms.tk, h, e % D)], j < uniforms.tk));
      }
      workgroupBarrier();
      if (live) {
        for (var jj = 0; jj < min(TILE, uniforms.tk - t0); jj++) {
          var s = 0.0;
          for (var c = 0; c < D; c++) { s += f32(qi[c] * kt[jj * D + c]); }
          if (s > m) { l = l * exp(m - s) + 1.0; m = s; } else { l += exp(s - m); }
        }
      }
      workgroupBarrier();
    }
    if (live) { result[bh * uniforms.tq + i] = m + log(l); }`);
}

/** o_i = Σ_j exp(s_ij − lse_i)·v_j: [B, Tq, heads·d]. */
function outProgram(d: number, shape: number[], groups: number): AttentionProgram {
  const tile = tileRows(2 * d);
  return new AttentionProgram('Out', d, tile, ['q', 'k', 'v', 'lse'], shape, groups, kvTiles(tile, d), `
    ${rowOf('i', 'tq')}
    var qi : array<T, D>;
    var acc : array<f32, D>;
    var li = 0.0;
    if (live) {
      for (var c = 0; c < D; c++) { qi[c] = T(q[idx(b, i, uniforms.tq, h, c)] * uniforms.scale); }
      li = lse[bh * uniforms.tq + i];
    }
    for (var t0 = 0; t0 < uniforms.tk; t0 += TILE) {
      ${STAGE_KV}
      workgroupBarrier();
      if (live) {
        for (var jj = 0; jj < min(TILE, uniforms.tk - t0); jj++) {
          var s = 0.0;
          for (var c = 0; c < D; c++) { s += f32(qi[c] * kt[jj * D + c]); }
          let p = exp(s - li);
          for (var c = 0; c < D; c++) { acc[c] += p * f32(vt[jj * D + c]); }
        }
      }
      workgroupBarrier();
    }
    if (live) { for (var c = 0; c < D; c++) { result[idx(b, i, uniforms.tq, h, c)] = acc[c]; } }`);
}

/** dq_i = scale Σ_j p_ij (do_i·v_j − do_i·o_i) k_j: [B, Tq, heads·d]. */
function dqProgram(d: number, shape: number[], groups: number): AttentionProgram {
  const tile = tileRows(2 * d);
  return new AttentionProgram('Dq', d, tile, ['q', 'k', 'v', 'o', 'dout', 'lse'], shape, groups, kvTiles(tile, d), `
    ${rowOf('i', 'tq')}
    var qi : array<T, D>;
    var doi : array<T, D>;
    var acc : array<f32, D>;
    var li = 0.0;
    var di = 0.0;
    if (live) {
      for (var c = 0; c < D; c++) {
        let n = idx(b, i, uniforms.tq, h, c);
        qi[c] = T(q[n] * uniforms.scale);
        doi[c] = T(dout[n]);
        di += dout[n] * o[n];
      }
      li = lse[bh * uniforms.tq + i];
    }
    for (var t0 = 0; t0 < uniforms.tk; t0 += TILE) {
      ${STAGE_KV}
      workgroupBarrier();
      if (live) {
        for (var jj = 0; jj < min(TILE, uniforms.tk - t0); jj++) {
          var s = 0.0;
          var dp = 0.0;
          for (var c = 0; c < D; c++) { s += f32(qi[c] * kt[jj * D + c]); dp += f32(doi[c] * vt[jj * D + c]); }
          let ds = exp(s - li) * (dp - di);
          for (var c = 0; c < D; c++) { acc[c] += ds * f32(kt[jj * D + c]); }
        }
      }
      workgroupBarrier();
    }
    if (live) { for (var c = 0; c < D; c++) { result[idx(b, i, uniforms.tq, h, c)] = acc[c] * uniforms.scale; } }`);
}

/** dk_j and dv_j, one workgroup per 64 key rows, query tiles staged: [2, B, Tk, heads·d] (dK then dV). */
function dkvProgram(d: number, shape: number[], groups: number): AttentionProgram {
  const tile = tileRows(2 * d + (half ? 4 : 2)); // q and do rows (T), lse and D (f32)
  return new AttentionProgram('Dkv', d, tile, ['q', 'k', 'v', 'o', 'dout', 'lse'], shape, groups, `
  var<workgroup> qt : array<T, ${tile * d}>;
  var<workgroup> dot_t : array<T, ${tile * d}>;
  var<workgroup> lt : array<f32, ${tile}>;
  var<workgroup> dt : array<f32, ${tile}>;`, `
    ${rowOf('j', 'tk')}
    var kj : array<T, D>;
    var vj : array<T, D>;
    var dk : array<f32, D>;
    var dv : array<f32, D>;
    if (live) {
      for (var c = 0; c < D; c++) { let n = idx(b, j, uniforms.tk, h, c); kj[c] = T(k[n] * uniforms.scale); vj[c] = T(v[n]); }
    }
    for (var t0 = 0; t0 < uniforms.tq; t0 += TILE) {
      for (var e = i32(localId.x); e < TILE * D; e += ROWS) {
        let i = t0 + e / D;
        let src = idx(b, min(i, uniforms.tq - 1), uniforms.tq, h, e % D);
        qt[e] = T(select(0.0, q[src], i < uniforms.tq));
        dot_t[e] = T(select(0.0, dout[src], i < uniforms.tq));
      }
      // D_i = do_i·o_i and lse_i of the tile's query rows
      for (var r = i32(localId.x); r < TILE; r += ROWS) {
        let i = min(t0 + r, uniforms.tq - 1);
        var di = 0.0;
        for (var c = 0; c < D; c++) { let n = idx(b, i, uniforms.tq, h, c); di += dout[n] * o[n]; }
        dt[r] = di;
        lt[r] = lse[bh * uniforms.tq + i];
      }
      workgroupBarrier();
      if (live) {
        for (var ii = 0; ii < min(TILE, uniforms.tq - t0); ii++) {
          var s = 0.0;
          var dp = 0.0;
          for (var c = 0; c < D; c++) { s += f32(qt[ii * D + c] * kj[c]); dp += f32(dot_t[ii * D + c] * vj[c]); }
          let p = exp(s - lt[ii]);
          let ds = p * (dp - dt[ii]);
          for (var c = 0; c < D; c++) { dk[c] += ds * f32(qt[ii * D + c]); dv[c] += p * f32(dot_t[ii * D + c]); }
        }
      }
      workgroupBarrier();
    }
    if (live) {
      // where dV starts: B·heads·Tk·D (from the uniforms: a shader is reused across shapes)
      let second = (uniforms.groups / uniforms.rowBlocks) * uniforms.tk * D;
      for (var c = 0; c < D; c++) {
        let n = idx(b, j, uniforms.tk, h, c);
        result[n] = dk[c] * uniforms.scale;
        result[second + n] = dv[c];
      }
    }`);
}

/** Sizes of q [B, Tq, heads·d] and k [B, Tk, heads·d], and the uniforms for rows of `rowsOf`. */
function sizes(q: Info, k: Info, { heads, scale }: Attrs, rowsOf: 'q' | 'k') {
  const [b, tq, c] = q.shape as [number, number, number];
  const tk = k.shape[1]!;
  const rowBlocks = Math.ceil((rowsOf === 'q' ? tq : tk) / ROWS);
  const groups = b * heads * rowBlocks;
  const uniforms: Uniform[] = [
    ...[tq, tk, heads, rowBlocks, groups].map((n): Uniform => ({ type: 'int32', data: [n] })),
    { type: 'float32', data: [scale] },
  ];
  return { b, tq, tk, c, d: c / heads, heads, groups, uniforms };
}

function check(name: string, q: Info, k: Info, v: Info, heads: number): void {
  const ok = (t: Info) => t.shape.length === 3 && t.dtype === 'float32' && t.shape[0] === q.shape[0] && t.shape[2] === q.shape[2];
  if (!ok(q) || !ok(k) || !ok(v) || k.shape[1] !== v.shape[1] || q.shape[2]! % heads !== 0) {
    throw new Error(`webgpu ${name}: float32 q [B, Tq, C], k and v [B, Tk, C] with C divisible by ${heads} heads expected, got [${q.shape}], [${k.shape}], [${v.shape}]`);
  }
}

/** The kernels, registered for 'webgpu' by ./index.ts. */
export const attentionKernels: Record<string, tf.KernelFunc> = {
  SidetrainAttention: ({ inputs, backend, attrs }) => {
    const be = backend as unknown as Backend, { q, k, v } = inputs as Record<string, Info>;
    const a = attrs as unknown as Attrs;
    check('SidetrainAttention', q!, k!, v!, a.heads);
    const s = sizes(q!, k!, a, 'q');
    const lse = be.runWebGPUProgram(lseProgram(s.d, [s.b * s.heads, s.tq], s.groups), [q!, k!], 'float32', s.uniforms);
    const out = be.runWebGPUProgram(outProgram(s.d, [...q!.shape], s.groups), [q!, k!, v!, lse], 'float32', s.uniforms);
    return [out, lse];
  },
  SidetrainAttentionGrad: ({ inputs, backend, attrs }) => {
    const be = backend as unknown as Backend, { q, k, v, out, dout, lse } = inputs as Record<string, Info>;
    const a = attrs as unknown as Attrs;
    check('SidetrainAttentionGrad', q!, k!, v!, a.heads);
    const all = [q!, k!, v!, out!, dout!, lse!];
    const sq = sizes(q!, k!, a, 'q');
    const dq = be.runWebGPUProgram(dqProgram(sq.d, [...q!.shape], sq.groups), all, 'float32', sq.uniforms);
    const sk = sizes(q!, k!, a, 'k');
    const stacked = be.runWebGPUProgram(dkvProgram(sk.d, [2, ...k!.shape], sk.groups), all, 'float32', sk.uniforms);
    const run = (name: string, x: Info, attrs: Record<string, unknown>) =>
      tf.getKernel(name, 'webgpu')!.kernelFunc({ inputs: { x }, backend, attrs: attrs as tf.NamedAttrMap }) as Info;
    const temps: Info[] = [];
    try {
      const part = (start: number) => {
        const slice = run('Slice', stacked, { begin: [start, 0, 0, 0], size: [1, ...k!.shape] });
        temps.push(slice);
        return run('Reshape', slice, { shape: k!.shape });
      };
      return [dq, part(0), part(1)];
    } finally {
      for (const t of [stacked, ...temps]) be.disposeData(t.dataId);
    }
  },
};
