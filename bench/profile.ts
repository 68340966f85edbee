/**
 * @file Where an SD1.5 TI step's time goes: one step (text encoder with the vector spliced in,
 * UNet, loss, gradient to the vector) under `tf.profile`, its kernels summed by op kind — conv,
 * matmul (Linear layers: rank-2 MatMul), attention (rank-3 batched MatMul over heads + Softmax),
 * norm (the reductions of Group/LayerNorm: Mean/Sum/Max…), elementwise, layout (transpose,
 * concat, slice, reshape copies), other — so the next thing to attack is visible.
 * Called by bench/steps.ts in its own child process.
 */
import { tf, initBackend, type Tensor } from '../trainers/backend/index.ts';
import { loadSdModel, paddingFor } from '../trainers/nets/sd.ts';
import { ClipTokenizer, tokenizeWithEmbeddings } from '../trainers/text/tokenizer.ts';
import { textualInversionLoss, type TiModel } from '../trainers/methods/textual-inversion.ts';
import { disposeParams } from '../trainers/nets/params.ts';

const CONV = new Set(['Conv2D', 'Conv2DBackpropInput', 'Conv2DBackpropFilter', 'FusedConv2D', 'DepthwiseConv2dNative']);
const REDUCE = new Set(['Mean', 'Sum', 'Max', 'Min', 'Prod', 'SquaredDifference']);
const LAYOUT = new Set(['Transpose', 'Reshape', 'Concat', 'Slice', 'StridedSlice', 'Pack', 'Unpack', 'Tile', 'Pad', 'Identity', 'Cast', 'GatherV2', 'SplitV', 'MirrorPad', 'BroadcastTo', 'Reverse']);

/** The op kind a kernel counts under. */
export function opKind(name: string, inputShapes: number[][]): string {
  if (CONV.has(name)) return 'conv';
  if (name === 'BatchMatMul' || name === '_FusedMatMul') return (inputShapes[0]?.length ?? 2) > 2 && inputShapes[0]![0]! > 1 ? 'attention' : 'matmul';
  if (name === 'Softmax') return 'attention';
  if (REDUCE.has(name) || /^Sidetrain(GroupNorm|LayerNorm)/.test(name)) return 'norm';
  if (/^SidetrainAttention/.test(name)) return 'attention';
  if (LAYOUT.has(name)) return 'layout';
  return 'elementwise';
}

/** Profile one TI step on the SD1.5-shaped checkpoint at 256 px (32×32 latents), batch 1. */
export async function profileTiStep(checkpoint: string, _images: string, _out: string, px = 256): Promise<Record<string, unknown>> {
  const backend = await initBackend();
  const model = (await loadSdModel(checkpoint, ['text', 'unet'])) as TiModel & Awaited<ReturnType<typeof loadSdModel>>;
  const tokenizer = await ClipTokenizer.load();
  const prompt = tokenizeWithEmbeddings(tokenizer, 'a picture of bench_ti', new Map([['bench_ti', 1]]), paddingFor(model.family));
  const vectors = tf.variable(tf.randomNormal([1, model.text!.cfg.width], 0, 0.02, 'float32', 3), true, 'bench_ti');
  const lat = px / 8;
  const batch = {
    latents: tf.randomNormal([1, lat, lat, 4], 0, 1, 'float32', 4), noise: tf.randomNormal([1, lat, lat, 4], 0, 1, 'float32', 5),
    timesteps: [500], prompts: [prompt],
  };
  const vectorMap = new Map<string, Tensor>([['bench_ti', vectors]]);
  const step = async () => {
    const { value, grads } = tf.variableGrads(() => textualInversionLoss(model, vectorMap, batch), [vectors]);
    await value.data();
    tf.dispose([value, ...Object.values(grads)]);
  };
  await step(); // warm-up (first-touch page faults)
  const t0 = performance.now();
  const info = await tf.profile(step);
  const wallMs = performance.now() - t0;
  const byKind: Record<string, number> = {};
  const byKernel: Record<string, number> = {};
  for (const k of info.kernels) {
    const ms = typeof k.kernelTimeMs === 'number' ? k.kernelTimeMs : 0;
    const kind = opKind(k.name, k.inputShapes as number[][]);
    byKind[kind] = (byKind[kind] ?? 0) + ms;
    byKernel[k.name] = (byKernel[k.name] ?? 0) + ms;
  }
  const kernelMs = Object.values(byKind).reduce((a, b) => a + b, 0);
  const top = Object.entries(byKernel).sort((a, b) => b[1] - a[1]).slice(0, 8).map(([n, ms]) => `${n} ${(ms / 1000).toFixed(1)}s`);
  tf.dispose([vectors, batch.latents, batch.noise]);
  disposeParams(model.text!.params);
  disposeParams(model.unet!.params);
  await model.source.close();
  const sec = (ms: number) => +(ms / 1000).toFixed(2);
  return {
    bench: 'profile.textual_inversion', model: 'sd15-shaped', px, batch: 1, backend: backend.name,
    stepSec: sec(wallMs), kernelSec: sec(kernelMs), ...Object.fromEntries(Object.entries(byKind).sort((a, b) => b[1] - a[1]).map(([k, ms]) => [`${k}Sec`, sec(ms)])),
    kernels: info.kernels.length, topKernels: top.join(', '),
  };
}
