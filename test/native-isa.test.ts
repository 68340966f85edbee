/**
 * @file The native kernels' ISA variants (native/src/variant.h, dispatch.cc): every variant this
 * CPU runs — avx512, avx2, portable — computes what the best one does, within float32 rounding:
 * test/helpers/close.ts's tolerance, 4·k·eps of the output's scale for sums of k products (k ≥ 8,
 * so ≈ 4e-6 for the element-wise ops). The variants differ in FMA contraction and vector width,
 * not in summation order (measured on an AVX-512 Xeon: avx2 gives avx512's GEMMs, convs, norms and
 * element-wise ops bit for bit and its attention within 2.4e-7; portable, without FMA, within
 * 5.2e-6 at scale 27). Then SIDETRAIN_CPU_ISA in a child process: it caps the variant
 * (never above what the CPU runs), takes the bf16 and float16 paths down with it, and a bad value
 * fails the load naming the variable. Last, the built addon's disassembly: no AVX, BMI or other
 * post-SSE2 instruction outside the avx2/avx512 variants' own functions, so the portable path
 * runs on any x86-64 (skipped where objdump is missing).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { addonPath, loadAddon, type NativeAddon, type NativeIsa } from '../trainers/backend/native/addon.ts';
import { nativeStatus } from '../trainers/backend/native/index.ts';
import { assertClose } from './helpers/close.ts';
import { nativeSkip } from './helpers/native.ts';
import { values } from './helpers/values.ts';

const status = nativeStatus();
const skip = nativeSkip(status.available ? false : status.reason);

const f64 = (...v: number[]) => Float64Array.from(v);

/** One kernel call per case: its outputs, and the k of its longest float32 sum (1: element-wise). */
interface Case { name: string; k: number; run: (a: NativeAddon) => Float32Array[] }

function matmulCase(count: number, M: number, N: number, K: number, ta: boolean, tb: boolean): Case {
  const a = values(count * M * K, 1 + M), b = values(count * K * N, 2 + N);
  const aOff = Float64Array.from({ length: count }, (_, i) => i * M * K), bOff = Float64Array.from({ length: count }, (_, i) => i * K * N);
  return {
    name: `matmul ${count}×[${M},${K}]·[${K},${N}]${ta ? ' Aᵀ' : ''}${tb ? ' Bᵀ' : ''}`, k: K,
    run: (addon) => {
      const out = new Float32Array(count * M * N);
      addon.matmul(a, b, out, aOff, bOff, M, N, K, ta, tb);
      return [out];
    },
  };
}

function convCases(): Case[] {
  // [batch, inH, inW, inC, outH, outW, outC, fH, fW, sH, sW, dH, dW, padTop, padLeft]
  const shapes = [
    [2, 9, 11, 5, 9, 11, 7, 3, 3, 1, 1, 1, 1, 1, 1],
    [1, 9, 11, 6, 5, 6, 13, 3, 3, 2, 2, 1, 1, 1, 1],
    [1, 8, 8, 33, 8, 8, 40, 1, 1, 1, 1, 1, 1, 0, 0],
  ];
  return shapes.flatMap((p, i) => {
    const shape = Int32Array.from(p);
    const [b, ih, iw, ic, oh, ow, oc, fh, fw] = p as [number, number, number, number, number, number, number, number, number];
    const x = values(b * ih * iw * ic, 10 + i), w = values(fh * fw * ic * oc, 20 + i), dy = values(b * oh * ow * oc, 30 + i);
    const label = `conv ${fh}×${fw} ${ic}→${oc} stride ${p[9]}`;
    return [
      { name: label, k: fh * fw * ic, run: (a: NativeAddon) => { const y = new Float32Array(dy.length); a.conv2d(x, w, y, shape); return [y]; } },
      { name: `${label}, input gradient`, k: fh * fw * oc, run: (a: NativeAddon) => { const dx = new Float32Array(x.length); a.conv2dBackpropInput(dy, w, dx, shape); return [dx]; } },
      { name: `${label}, filter gradient`, k: b * oh * ow, run: (a: NativeAddon) => { const dw = new Float32Array(w.length); a.conv2dBackpropFilter(x, dy, dw, shape); return [dw]; } },
    ];
  });
}

function attentionCases(): Case[] {
  return ([[2, 19, 77, 40], [1, 33, 33, 64]] as const).flatMap(([heads, tq, tk, d], i) => {
    const q = values(tq * heads * d, 40 + i), k = values(tk * heads * d, 50 + i), v = values(tk * heads * d, 60 + i);
    const dout = values(q.length, 70 + i), scale = 1 / Math.sqrt(d);
    const forward = (a: NativeAddon) => {
      const out = new Float32Array(q.length), lse = new Float32Array(heads * tq);
      a.attentionForward!(q, k, v, out, lse, 1, heads, tq, tk, d, scale);
      return [out, lse];
    };
    return [
      { name: `attention ${heads}×[${tq},${tk}] d ${d}`, k: Math.max(tk, d), run: forward },
      {
        name: `attention ${heads}×[${tq},${tk}] d ${d}, backward`, k: Math.max(tk, tq, d),
        run: (a: NativeAddon) => {
          const [out, lse] = forward(a);
          const dq = new Float32Array(q.length), dk = new Float32Array(k.length), dv = new Float32Array(v.length);
          a.attentionBackward!(q, k, v, out!, dout, lse!, dq, dk, dv, 1, heads, tq, tk, d, scale);
          return [dq, dk, dv];
        },
      },
    ];
  });
}

function normCases(): Case[] {
  const [B, HW, C, G] = [2, 37, 24, 4];
  const x = values(B * HW * C, 80), dy = values(x.length, 81), weight = values(C, 82), bias = values(C, 83);
  const group = (a: NativeAddon, silu: boolean) => {
    const y = new Float32Array(x.length), mean = new Float32Array(B * G), rstd = new Float32Array(B * G);
    a.groupNormForward!(x, weight, bias, y, mean, rstd, f64(B, HW, C, G), 1e-5, silu);
    const dx = new Float32Array(x.length), dw = new Float32Array(C), db = new Float32Array(C);
    a.groupNormBackward!(dy, x, mean, rstd, weight, bias, dx, dw, db, f64(B, HW, C, G), silu);
    return [y, mean, rstd, dx, dw, db];
  };
  const [rows, n] = [45, 77];
  const lx = values(rows * n, 84), ldy = values(rows * n, 85), lw = values(n, 86), lb = values(n, 87);
  return [
    { name: 'group norm forward + backward', k: B * HW, run: (a) => group(a, false) },
    { name: 'group norm + SiLU forward + backward', k: B * HW, run: (a) => group(a, true) },
    {
      name: 'layer norm forward + backward', k: rows,
      run: (a) => {
        const y = new Float32Array(lx.length), mean = new Float32Array(rows), rstd = new Float32Array(rows);
        a.layerNormForward!(lx, lw, lb, y, mean, rstd, rows, n, 1e-5);
        const dx = new Float32Array(lx.length), dw = new Float32Array(n), db = new Float32Array(n);
        a.layerNormBackward!(ldy, lx, mean, rstd, lw, dx, dw, db, rows, n);
        return [y, mean, rstd, dx, dw, db];
      },
    },
  ];
}

function elementwiseCases(): Case[] {
  const n = 1037, x = values(n * 3, 90), y = values(n * 3, 91);
  const k = Float32Array.from([1 - 1e-3 * 0.01, 0.9, 0.1, 0.999, 0.001, Math.sqrt(1 - 0.999), 1e-8, -1e-3 / (1 - 0.9)]);
  return [
    { name: 'softmax', k: 1, run: (a) => { const o = new Float32Array(x.length); a.softmax(x, o, 3, n); return [o]; } },
    ...[0, 1, 2, 3, 4].map((op): Case => ({ name: `unary ${op}`, k: 1, run: (a) => { const o = new Float32Array(x.length); a.unary(op, x, o); return [o]; } })),
    ...[0, 2, 3].map((op): Case => ({
      name: `binary ${op} (broadcast rows)`, k: 1,
      run: (a) => { const o = new Float32Array(x.length); a.binary(op, x, y, o, f64(3, n), f64(n, 1), f64(0, 1)); return [o]; },
    })),
    ...[0, 1].map((op): Case => ({
      name: `activation ${op} forward + backward`, k: 1,
      run: (a) => {
        const o = new Float32Array(x.length), dx = new Float32Array(x.length);
        a.activationForward!(op, x, o);
        a.activationBackward!(op, y, x, dx);
        return [o, dx];
      },
    })),
    {
      name: 'AdamW step', k: 1,
      run: (a) => {
        const m = values(n, 92).map((v) => v * 0.01), v = values(n, 93).map((u) => u * u * 1e-4);
        const outs = [new Float32Array(n), new Float32Array(n), new Float32Array(n)] as const;
        a.adamwStep!(x.subarray(0, n), y.subarray(0, n), m, v, ...outs, k);
        return [...outs];
      },
    },
  ];
}

const CASES = (): Case[] => [
  matmulCase(1, 37, 45, 70, false, false),
  matmulCase(1, 29, 61, 300, true, false),
  matmulCase(3, 20, 33, 40, false, true),
  matmulCase(2, 13, 77, 520, true, true),
  ...convCases(),
  ...attentionCases(),
  ...normCases(),
  ...elementwiseCases(),
];

/** The variants to compare: every one this CPU runs (the first, the best, is the reference). */
function variants(): NativeIsa[] {
  const addon = loadAddon();
  assert.ok(addon.isaVariants && addon.variant, `${addonPath} predates the ISA variants (native/src/dispatch.cc): rebuild it with \`node scripts/build-native.mjs\``);
  return addon.isaVariants;
}

test('every ISA variant this CPU runs computes what the best one does, within float32 rounding', { skip }, () => {
  const addon = loadAddon();
  const [best, ...lower] = variants();
  assert.ok(best, 'at least the portable variant');
  assert.ok(variants().includes('portable'), 'the portable variant always runs');
  const reference = addon.variant!(best!);
  assert.equal(reference.info().isa, best);
  for (const isa of lower) {
    const other = addon.variant!(isa);
    assert.equal(other.info().isa, isa);
    for (const c of CASES()) {
      const want = c.run(reference), got = c.run(other);
      want.forEach((w, i) => assertClose(`${isa} vs ${best}: ${c.name} output ${i}`, got[i]!, w, Math.max(c.k, 8)));
    }
  }
});

test('the default kernels are the best variant unless SIDETRAIN_CPU_ISA caps them', { skip }, () => {
  const addon = loadAddon();
  const info = addon.info();
  const expected = process.env.SIDETRAIN_CPU_ISA ? variants().find((v) => rank(v) >= rank(process.env.SIDETRAIN_CPU_ISA as NativeIsa)) : variants()[0];
  assert.equal(info.isa, expected);
  for (const cls of ['gemm', 'conv', 'attention', 'norm', 'elementwise', 'optim']) assert.equal(info.kernels?.[cls], info.isa, cls);
  assert.throws(() => addon.variant!('sse9' as NativeIsa), /variant: 'sse9' is not avx512, avx2 or portable/);
});

const rank = (isa: NativeIsa) => ['avx512', 'avx2', 'portable'].indexOf(isa);

/** info() and the variant list of the addon loaded in a child process with SIDETRAIN_CPU_ISA = cap. */
function childInfo(cap: string): { info?: { isa: string; kernels: Record<string, string> }; isaCap?: string; error?: string } {
  const script = `try { const a = require(${JSON.stringify(addonPath)}); console.log(JSON.stringify({ info: a.info(), isaCap: a.isaCap })); }
    catch (e) { console.log(JSON.stringify({ error: e.message })); }`;
  const res = spawnSync(process.execPath, ['-e', script], { env: { ...process.env, SIDETRAIN_CPU_ISA: cap }, encoding: 'utf8' });
  assert.equal(res.status, 0, res.stderr);
  return JSON.parse(res.stdout);
}

test('SIDETRAIN_CPU_ISA caps the variant, never above what the CPU runs; a bad value names the variable', { skip }, () => {
  const supported = variants();
  for (const cap of ['avx512', 'avx2', 'portable'] as const) {
    const r = childInfo(cap);
    const want = supported.find((v) => rank(v) >= rank(cap));
    assert.equal(r.info?.isa, want, `SIDETRAIN_CPU_ISA=${cap}`);
    assert.equal(r.isaCap, cap);
    if (want !== 'avx512') {
      // no AVX-512 anywhere below the avx512 variant: the bf16 GEMMs and float16 conversion follow
      assert.equal(r.info?.kernels.bf16, 'portable', `SIDETRAIN_CPU_ISA=${cap}: bf16 kernel`);
      assert.equal(r.info?.kernels.half, want === 'portable' ? 'portable' : 'f16c', `SIDETRAIN_CPU_ISA=${cap}: float16 conversion`);
    }
  }
  assert.match(childInfo('avx9').error ?? '', /SIDETRAIN_CPU_ISA='avx9' is not avx512, avx2 or portable/);
});

/** post-SSE2 x86 instructions: VEX/EVEX (v…, ymm/zmm/k registers), BMI1/2, LZCNT, MOVBE, POPCNT. */
const POST_SSE2 = /^\s*[0-9a-f]+:\s+(v(?!er[rw]|m[a-z])[a-z0-9]+|andn|bextr|blsi|blsmsk|blsr|bzhi|mulx|pdep|pext|rorx|sarx|shlx|shrx|lzcnt|movbe|popcnt)\b|%[yz]mm\d|%k[0-7]\b/;

test('the portable code of the built addon has no AVX, BMI or later instruction (x86-64)', { skip: skip || (process.arch !== 'x64' ? 'x86-64 only' : false) }, (t) => {
  const dump = spawnSync('objdump', ['-d', '-C', '--no-show-raw-insn', addonPath], { encoding: 'utf8', maxBuffer: 256 << 20 });
  if (dump.error || dump.status !== 0) return t.skip(`objdump not usable: ${dump.error?.message ?? dump.stderr.split('\n')[0]}`);
  let fn = '', variantCode = false, checked = 0;
  const leaks = new Set<string>();
  for (const line of dump.stdout.split('\n')) {
    const head = /^[0-9a-f]+ <(.*)>:$/.exec(line);
    if (head) {
      fn = head[1]!;
      variantCode = /\bisa_avx(2|512)::/.test(fn);
      if (!variantCode) checked++;
    } else if (!variantCode && POST_SSE2.test(line)) {
      leaks.add(`${fn}: ${line.trim()}`);
    }
  }
  assert.ok(checked > 100, `disassembly parsed (${checked} functions outside the avx2/avx512 variants)`);
  assert.deepEqual([...leaks].slice(0, 20), [], 'functions outside st::isa_avx2/isa_avx512 with post-SSE2 instructions');
});
