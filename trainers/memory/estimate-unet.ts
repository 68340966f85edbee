/**
 * @file The UNet's cost per block for estimate.ts, from the checkpoint's key names and shapes
 * alone (openaimodel.py layout): forward intermediates (elements), the attention score tensors
 * of each attention op, FLOPs, and each block's output (what gradient checkpointing keeps).
 * Imports no TF.js.
 */

export type Shapes = Map<string, number[]>;

type Layer =
  | { kind: 'conv_in'; cin: number; cout: number }
  | { kind: 'res'; cin: number; cout: number }
  | { kind: 'attn'; ch: number; depth: number; ctx: number }
  | { kind: 'down' | 'up'; ch: number };

/** One attention op: heads × Tq × Tk scores over `width` channels; k and v read `ctx`-wide inputs. */
export interface AttentionOp { heads: number; tq: number; tk: number; width: number; ctx: number }

export interface BlockCost {
  name: string;
  /** Forward intermediates the tape keeps, elements (batch 1), without the attention scores. */
  dense: number;
  /** The block's output, elements: all that gradient checkpointing keeps of it. */
  output: number;
  /** Forward FLOPs: dense (conv, Linear) and attention (q·kᵀ and p·v). */
  denseFlop: number;
  attnFlop: number;
  attention: AttentionOp[];
  /** float32 bytes of the block's weights. */
  weightBytes: number;
}

const numel = (s: number[]) => s.reduce((a, b) => a * b, 1);

/** The UNet's blocks and their layers in forward order, read from the key names. */
function unetLayers(shapes: Shapes, pre = 'model.diffusion_model.'): { name: string; layers: Layer[] }[] {
  const count = (re: RegExp) => new Set([...shapes.keys()].map((k) => re.exec(k)?.[1]).filter(Boolean)).size;
  const blocks = [
    ...Array.from({ length: count(new RegExp(`^${pre}input_blocks\\.(\\d+)\\.`)) }, (_, i) => `input_blocks.${i}`),
    'middle_block',
    ...Array.from({ length: count(new RegExp(`^${pre}output_blocks\\.(\\d+)\\.`)) }, (_, i) => `output_blocks.${i}`),
  ];
  return blocks.map((name) => {
    const layers: Layer[] = [];
    for (let m = 0; ; m++) {
      const k = `${pre}${name}.${m}`;
      const s = (suffix: string) => shapes.get(`${k}.${suffix}`);
      if (s('in_layers.2.weight')) layers.push({ kind: 'res', cin: s('in_layers.2.weight')![1]!, cout: s('in_layers.2.weight')![0]! });
      else if (s('proj_in.weight')) {
        layers.push({ kind: 'attn', ch: s('proj_in.weight')![0]!, depth: count(new RegExp(`^${k}\\.transformer_blocks\\.(\\d+)\\.norm1\\.weight$`)), ctx: s('transformer_blocks.0.attn2.to_k.weight')![1]! });
      } else if (s('op.weight')) layers.push({ kind: 'down', ch: s('op.weight')![0]! });
      else if (s('conv.weight')) layers.push({ kind: 'up', ch: s('conv.weight')![0]! });
      else if (s('weight') && name === 'input_blocks.0') layers.push({ kind: 'conv_in', cin: s('weight')![1]!, cout: s('weight')![0]! });
      else break;
    }
    return { name, layers };
  });
}

interface LayerCost { dense: number; denseFlop: number; attnFlop: number; attention: AttentionOp[]; out: number }

/**
 * Elements the tape keeps per pixel·channel: the outputs of the ops a layer runs (nets/layers.ts,
 * nets/unet.ts). Composed from TF.js ops (WASM, pure CPU): GroupNorm ≈ 5 per input element, SiLU 2,
 * conv + bias 2, a transformer block 76 (head transposes, scores aside). With the native fused
 * kernels (cpu-native: nets/fused.ts GroupNorm+SiLU and LayerNorm keep their output and the
 * per-group statistics, the attention core its output): GroupNorm+SiLU 1, a transformer block 50.
 */
const KEPT = {
  ops: { normAct: 7, transformer: 76, transformerIo: 10, head: 7 },
  fused: { normAct: 1, transformer: 50, transformerIo: 6, head: 3 },
};

/** Forward intermediates (elements) and FLOPs of one layer at N pixels. */
function layerCost(l: Layer, n: number, tokens: number, heads: (ch: number) => number, kept: typeof KEPT.ops): LayerCost {
  const conv = (cin: number, cout: number, k: number, nOut: number) => 2 * k * k * cin * cout * nOut;
  switch (l.kind) {
    case 'conv_in': return { dense: 2 * n * l.cout, denseFlop: conv(l.cin, l.cout, 3, n), attnFlop: 0, attention: [], out: n * l.cout };
    case 'res': {
      const skip = l.cin !== l.cout;
      // in_layers: norm+SiLU (cin), conv (2); + emb (1); out_layers: norm+SiLU, conv (2); + skip (1)
      return {
        dense: n * (kept.normAct * l.cin + (kept.normAct + 6) * l.cout + (skip ? 2 * l.cout : 0)), attnFlop: 0, attention: [], out: n * l.cout,
        denseFlop: conv(l.cin, l.cout, 3, n) + conv(l.cout, l.cout, 3, n) + (skip ? conv(l.cin, l.cout, 1, n) : 0),
      };
    }
    case 'attn': {
      const c = l.ch;
      const h = heads(c);
      const linearFlop = 2 * n * c * (c * 4 + 12 * c) + 2 * 2 * tokens * l.ctx * c; // q, out ×2, GEGLU 8c+4c; k/v of the context
      const attention: AttentionOp[] = [];
      for (let d = 0; d < l.depth; d++) attention.push({ heads: h, tq: n, tk: n, width: c, ctx: c }, { heads: h, tq: n, tk: tokens, width: c, ctx: l.ctx });
      return {
        dense: kept.transformerIo * n * c + l.depth * kept.transformer * n * c, attention, out: n * c,
        denseFlop: conv(c, c, 1, n) * 2 + l.depth * (linearFlop + 2 * n * c * 2 * c), // proj_in/out; attn1 k, v
        attnFlop: l.depth * 4 * n * c * (n + tokens),
      };
    }
    case 'down': return { dense: 2 * (n / 4) * l.ch, denseFlop: conv(l.ch, l.ch, 3, n / 4), attnFlop: 0, attention: [], out: (n / 4) * l.ch };
    case 'up': return { dense: 5.5 * 4 * n * l.ch, denseFlop: conv(l.ch, l.ch, 3, 4 * n), attnFlop: 0, attention: [], out: 4 * n * l.ch };
  }
}

function blockWeightBytes(shapes: Shapes, prefix: string): number {
  let n = 0;
  for (const [k, s] of shapes) if (k.startsWith(prefix)) n += numel(s);
  return 4 * n;
}

/** Every block of the UNet forward at a latent of `latentPixels` (batch 1), skip concatenations included. */
export function unetBlocks(shapes: Shapes, latentPixels: number, tokens: number, heads: (ch: number) => number, fused = false): BlockCost[] {
  const kept = fused ? KEPT.fused : KEPT.ops;
  const pre = 'model.diffusion_model.';
  const out: BlockCost[] = [];
  let n = latentPixels;
  for (const block of unetLayers(shapes, pre)) {
    const cost: BlockCost = { name: block.name, dense: 0, output: 0, denseFlop: 0, attnFlop: 0, attention: [], weightBytes: blockWeightBytes(shapes, `${pre}${block.name}.`) };
    if (block.name.startsWith('output_blocks.')) cost.dense += n * (block.layers[0] as { cin: number }).cin; // concat [h, skip]
    for (const l of block.layers) {
      const c = layerCost(l, n, tokens, heads, kept);
      cost.dense += c.dense; cost.denseFlop += c.denseFlop; cost.attnFlop += c.attnFlop;
      cost.attention.push(...c.attention);
      cost.output = c.out;
      if (l.kind === 'down') n /= 4;
      if (l.kind === 'up') n *= 4;
    }
    out.push(cost);
  }
  const outCh = shapes.get(`${pre}out.0.weight`)?.[0] ?? 0;
  out.push({ name: 'out', dense: kept.head * n * outCh, output: 0, denseFlop: 2 * 9 * outCh * 4 * n, attnFlop: 0, attention: [], weightBytes: 0 });
  return out;
}

/** Query rows per slice (nets/sliced-attention.ts sliceRows). */
const sliceRows = (op: AttentionOp, maxBytes: number) => Math.max(1, Math.min(op.tq, Math.floor(maxBytes / (op.heads * op.tk * 4))));
const isSliced = (op: AttentionOp, maxBytes: number) => maxBytes > 0 && op.heads * op.tq * op.tk * 4 > maxBytes;

/**
 * Attention score elements of a block: `kept` for the backward pass (scores, softmax and its
 * gradient's input: 3 tensors per whole op; nothing for a sliced op, which keeps q, k, v and its
 * output), and the largest `transient` slice (3 slice-sized tensors while one slice runs). The
 * native attention core (cpu-native) keeps neither: it works in cache-sized tiles.
 */
export function blockScores(b: BlockCost, sliceBytes: number, native = false): { kept: number; transient: number } {
  if (native) return { kept: 0, transient: 0 };
  let kept = 0;
  let transient = 0;
  for (const op of b.attention) {
    if (isSliced(op, sliceBytes)) transient = Math.max(transient, 3 * op.heads * sliceRows(op, sliceBytes) * op.tk);
    else kept += 3 * op.heads * op.tq * op.tk;
  }
  return { kept, transient };
}

/** FLOPs of recomputing q·kᵀ in the backward pass: the sliced ops', or every op's with the native core. */
export function slicedAttnFlop(blocks: BlockCost[], sliceBytes: number, native = false): number {
  let flop = 0;
  for (const b of blocks) for (const op of b.attention) if (native || isSliced(op, sliceBytes)) flop += 2 * op.tq * op.tk * op.width;
  return flop;
}
