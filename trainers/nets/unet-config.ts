/**
 * @file The UNet's config, read from a checkpoint's key names and shapes, and the plan of which
 * layer sits at which key (openaimodel.py `UNetModel.__init__`, ldm for SD1/SD2 and sgm for
 * SDXL). sgm's UNet is ldm's plus a per-level `transformer_depth` (SDXL [0, 2, 10], middle = last)
 * and `label_emb` (Linear, SiLU, Linear of the `vector` conditioning, added to the time embedding;
 * sgm openaimodel.py `num_classes == "sequential"`). One plan drives the forward pass (unet.ts)
 * and the expected key list (`unetParamShapes`), so "every key consumed, none missing" is
 * checkable without running it. Only the head split is not in any shape.
 */

export interface UNetConfig {
  /** Key prefix of the UNet in the checkpoint (ldm `LatentDiffusion`: 'model.diffusion_model.'). */
  prefix: string;
  /** Latent channels in (4; 9 for inpainting models). */
  inChannels: number;
  /** Channels out (4: eps or v). */
  outChannels: number;
  /** Channels of the first level (320 in SD1/SD2). */
  modelChannels: number;
  /** Channel multiplier per level ([1, 2, 4, 4] in SD1/SD2). */
  channelMult: number[];
  /** ResBlocks per level in the encoder (decoder has one more). */
  numResBlocks: number;
  /** ldm attention_resolutions: downsampling factors 2^level whose levels have transformers ([4, 2, 1]). */
  attentionResolutions: number[];
  /** BasicTransformerBlocks per SpatialTransformer, per level (0 where the level has none; SD1/SD2 1, SDXL [0, 2, 10]). */
  transformerDepth: number[];
  /** BasicTransformerBlocks of the middle block's SpatialTransformer (sgm: the last level's). */
  middleDepth: number;
  /** sgm `adm_in_channels`: width of the `vector` conditioning fed to `label_emb` (SDXL 2816); 0 = no label_emb. */
  admInChannels: number;
  /** Width of the cross-attention context (768 SD1, 1024 SD2). */
  contextDim: number;
  /** SD2 `use_linear_in_transformer`: Linear proj_in/proj_out instead of 1×1 convs. */
  useLinearInTransformer: boolean;
  /** ldm num_heads (SD1: 8), used when numHeadChannels is -1. */
  numHeads: number;
  /** ldm num_head_channels (SD2: 64); -1 = split by numHeads. */
  numHeadChannels: number;
}

export const UNET_PREFIX = 'model.diffusion_model.';

/** Head split overrides, as a model's yaml / the fixture's config.json `unet.params` give them. */
export interface HeadOverrides {
  numHeads?: number;
  numHeadChannels?: number;
}

// ---------------------------------------------------------------------------------------------
// Config from the checkpoint

type Shapes = Map<string, number[]>;

function need(shapes: Shapes, key: string): number[] {
  const s = shapes.get(key);
  if (!s) throw new Error(`UNet: checkpoint has no '${key}'`);
  return s;
}

/** Walk input_blocks: channel multiplier, res blocks and attention per level. */
function scanLevels(shapes: Shapes, pre: string, mc: number) {
  const mult: number[] = [];
  const resPerLevel: number[] = [];
  const depth: number[] = [];
  let level = 0;
  for (let n = 1; ; n++) {
    const block = `${pre}input_blocks.${n}`;
    if (shapes.has(`${block}.0.op.weight`)) {
      level++;
      continue;
    }
    const conv = shapes.get(`${block}.0.in_layers.2.weight`);
    if (!conv) break;
    mult[level] = conv[0]! / mc;
    resPerLevel[level] = (resPerLevel[level] ?? 0) + 1;
    depth[level] = Math.max(depth[level] ?? 0, countBlocks(shapes, `${block}.1`));
  }
  if (mult.length === 0) throw new Error('UNet: no input_blocks ResBlocks found');
  if (new Set(resPerLevel).size !== 1) throw new Error(`UNet: uneven res blocks per level ${resPerLevel}`);
  return { mult, numResBlocks: resPerLevel[0]!, depth };
}

/** BasicTransformerBlocks of the SpatialTransformer at `name` (0: none there). */
function countBlocks(shapes: Shapes, name: string): number {
  let d = 0;
  while (shapes.has(`${name}.transformer_blocks.${d}.norm1.weight`)) d++;
  return d;
}

/** Head split: explicit overrides win (num_head_channels before num_heads, as in ldm); else family default. */
function headSplit(linear: boolean, o: HeadOverrides): Pick<UNetConfig, 'numHeads' | 'numHeadChannels'> {
  if (o.numHeadChannels !== undefined && o.numHeadChannels !== -1) return { numHeads: -1, numHeadChannels: o.numHeadChannels };
  if (o.numHeads !== undefined && o.numHeads !== -1) return { numHeads: o.numHeads, numHeadChannels: -1 };
  // v1-inference.yaml: num_heads 8; v2-inference(-v).yaml: num_head_channels 64
  return linear ? { numHeads: -1, numHeadChannels: 64 } : { numHeads: 8, numHeadChannels: -1 };
}

/** Infer the UNet config from checkpoint key → PyTorch shape (heads from `overrides` or the family default). */
export function unetConfigFromKeys(shapes: Shapes, overrides: HeadOverrides = {}, prefix = UNET_PREFIX): UNetConfig {
  const convIn = need(shapes, `${prefix}input_blocks.0.0.weight`); // [mc, in, 3, 3]
  const mc = convIn[0]!;
  const { mult, numResBlocks, depth } = scanLevels(shapes, prefix, mc);
  const attn = `${prefix}middle_block.1`;
  const projIn = need(shapes, `${attn}.proj_in.weight`);
  const useLinearInTransformer = projIn.length === 2;
  const label = shapes.get(`${prefix}label_emb.0.0.weight`); // [4·mc, adm_in]
  return {
    prefix,
    inChannels: convIn[1]!,
    outChannels: need(shapes, `${prefix}out.2.weight`)[0]!,
    modelChannels: mc,
    channelMult: mult,
    numResBlocks,
    attentionResolutions: depth.flatMap((d, l) => (d > 0 ? [2 ** l] : [])),
    transformerDepth: mult.map((_, l) => depth[l] ?? 0),
    middleDepth: countBlocks(shapes, attn),
    admInChannels: label?.[1] ?? 0,
    contextDim: need(shapes, `${attn}.transformer_blocks.0.attn2.to_k.weight`)[1]!,
    useLinearInTransformer,
    ...headSplit(useLinearInTransformer, overrides),
  };
}

// ---------------------------------------------------------------------------------------------
// The plan: which layer sits at which key (openaimodel.py UNetModel.__init__)

export type UNetLayer =
  | { kind: 'conv_in'; inCh: number; outCh: number }
  | { kind: 'res'; inCh: number; outCh: number }
  | { kind: 'attn'; ch: number; heads: number; dHead: number; depth: number }
  | { kind: 'down'; ch: number }
  | { kind: 'up'; ch: number };

/** Blocks by key (`input_blocks.3`, `middle_block`, …), each a list of layers `.0`, `.1`, … */
export interface UNetPlan {
  blocks: { name: string; layers: UNetLayer[] }[];
}

function attnLayer(cfg: UNetConfig, ch: number, depth: number): UNetLayer {
  // openaimodel.py: num_head_channels == -1 → dim_head = ch // num_heads, else heads = ch // num_head_channels
  const heads = cfg.numHeadChannels === -1 ? cfg.numHeads : ch / cfg.numHeadChannels;
  const dHead = ch / heads;
  if (!Number.isInteger(heads) || !Number.isInteger(dHead) || heads < 1) {
    throw new Error(
      `UNet: ${ch} channels cannot be split into heads (num_heads ${cfg.numHeads}, num_head_channels ${cfg.numHeadChannels})`
      + ' — the head split is in no tensor: it comes from the config beside the checkpoint (<name>.yaml or config.json), else the family\'s release config',
    );
  }
  return { kind: 'attn', ch, heads, dHead, depth };
}

export function unetPlan(cfg: UNetConfig): UNetPlan {
  const mc = cfg.modelChannels;
  const levels = cfg.channelMult.length;
  const hasAttn = (level: number) => cfg.attentionResolutions.includes(2 ** level);
  const input: UNetLayer[][] = [[{ kind: 'conv_in', inCh: cfg.inChannels, outCh: mc }]];
  const skips = [mc];
  let ch = mc;
  for (let level = 0; level < levels; level++) {
    for (let i = 0; i < cfg.numResBlocks; i++) {
      const out = mc * cfg.channelMult[level]!;
      input.push([{ kind: 'res', inCh: ch, outCh: out }, ...(hasAttn(level) ? [attnLayer(cfg, out, cfg.transformerDepth[level]!)] : [])]);
      ch = out;
      skips.push(ch);
    }
    if (level !== levels - 1) {
      input.push([{ kind: 'down', ch }]);
      skips.push(ch);
    }
  }
  const middle: UNetLayer[] = [{ kind: 'res', inCh: ch, outCh: ch }, attnLayer(cfg, ch, cfg.middleDepth), { kind: 'res', inCh: ch, outCh: ch }];
  const output: UNetLayer[][] = [];
  for (let level = levels - 1; level >= 0; level--) {
    for (let i = 0; i <= cfg.numResBlocks; i++) {
      const out = mc * cfg.channelMult[level]!;
      const block: UNetLayer[] = [{ kind: 'res', inCh: ch + skips.pop()!, outCh: out }];
      ch = out;
      // sgm: the decoder's transformers have the same depth as the encoder's at that level
      if (hasAttn(level)) block.push(attnLayer(cfg, ch, cfg.transformerDepth[level]!));
      if (level > 0 && i === cfg.numResBlocks) block.push({ kind: 'up', ch });
      output.push(block);
    }
  }
  return {
    blocks: [
      ...input.map((layers, n) => ({ name: `input_blocks.${n}`, layers })),
      { name: 'middle_block', layers: middle },
      ...output.map((layers, n) => ({ name: `output_blocks.${n}`, layers })),
    ],
  };
}

// ---------------------------------------------------------------------------------------------
// Expected keys and PyTorch shapes (the load check, the key-consumption test, random weights for bench)

function resShapes(l: { inCh: number; outCh: number }, embDim: number): [string, number[]][] {
  const { inCh: i, outCh: o } = l;
  const s: [string, number[]][] = [
    ['in_layers.0.weight', [i]], ['in_layers.0.bias', [i]], ['in_layers.2.weight', [o, i, 3, 3]], ['in_layers.2.bias', [o]],
    ['emb_layers.1.weight', [o, embDim]], ['emb_layers.1.bias', [o]],
    ['out_layers.0.weight', [o]], ['out_layers.0.bias', [o]], ['out_layers.3.weight', [o, o, 3, 3]], ['out_layers.3.bias', [o]],
  ];
  if (i !== o) s.push(['skip_connection.weight', [o, i, 1, 1]], ['skip_connection.bias', [o]]);
  return s;
}

function attnShapes(cfg: UNetConfig, ch: number, depth: number): [string, number[]][] {
  const proj = (o: number, i: number) => (cfg.useLinearInTransformer ? [o, i] : [o, i, 1, 1]);
  const s: [string, number[]][] = [['norm.weight', [ch]], ['norm.bias', [ch]], ['proj_in.weight', proj(ch, ch)], ['proj_in.bias', [ch]]];
  for (let d = 0; d < depth; d++) {
    const t = `transformer_blocks.${d}`;
    for (const [a, ctx] of [['attn1', ch], ['attn2', cfg.contextDim]] as const) {
      s.push([`${t}.${a}.to_q.weight`, [ch, ch]], [`${t}.${a}.to_k.weight`, [ch, ctx]], [`${t}.${a}.to_v.weight`, [ch, ctx]]);
      s.push([`${t}.${a}.to_out.0.weight`, [ch, ch]], [`${t}.${a}.to_out.0.bias`, [ch]]);
    }
    for (const n of ['norm1', 'norm2', 'norm3']) s.push([`${t}.${n}.weight`, [ch]], [`${t}.${n}.bias`, [ch]]);
    s.push([`${t}.ff.net.0.proj.weight`, [8 * ch, ch]], [`${t}.ff.net.0.proj.bias`, [8 * ch]]);
    s.push([`${t}.ff.net.2.weight`, [ch, 4 * ch]], [`${t}.ff.net.2.bias`, [ch]]);
  }
  s.push(['proj_out.weight', proj(ch, ch)], ['proj_out.bias', [ch]]);
  return s;
}

function layerShapes(cfg: UNetConfig, l: UNetLayer, embDim: number): [string, number[]][] {
  switch (l.kind) {
    case 'conv_in': return [['weight', [l.outCh, l.inCh, 3, 3]], ['bias', [l.outCh]]];
    case 'res': return resShapes(l, embDim);
    case 'attn': return attnShapes(cfg, l.ch, l.depth);
    case 'down': return [['op.weight', [l.ch, l.ch, 3, 3]], ['op.bias', [l.ch]]];
    case 'up': return [['conv.weight', [l.ch, l.ch, 3, 3]], ['conv.bias', [l.ch]]];
  }
}

/** Every UNet key (with prefix) and its PyTorch shape, in the forward's order. */
export function unetParamShapes(cfg: UNetConfig): Map<string, number[]> {
  const mc = cfg.modelChannels;
  const embDim = 4 * mc;
  const out = new Map<string, number[]>();
  const add = (key: string, shape: number[]) => out.set(cfg.prefix + key, shape);
  add('time_embed.0.weight', [embDim, mc]);
  add('time_embed.0.bias', [embDim]);
  add('time_embed.2.weight', [embDim, embDim]);
  add('time_embed.2.bias', [embDim]);
  if (cfg.admInChannels > 0) {
    add('label_emb.0.0.weight', [embDim, cfg.admInChannels]);
    add('label_emb.0.0.bias', [embDim]);
    add('label_emb.0.2.weight', [embDim, embDim]);
    add('label_emb.0.2.bias', [embDim]);
  }
  for (const block of unetPlan(cfg).blocks) {
    block.layers.forEach((l, i) => {
      for (const [k, s] of layerShapes(cfg, l, embDim)) add(`${block.name}.${i}.${k}`, s);
    });
  }
  add('out.0.weight', [mc]);
  add('out.0.bias', [mc]);
  add('out.2.weight', [cfg.outChannels, mc, 3, 3]);
  add('out.2.bias', [cfg.outChannels]);
  return out;
}

/** Compare a checkpoint's UNet keys/shapes with the plan; throws naming every missing, extra or misshapen key. */
export function checkUnetKeys(shapes: Shapes, cfg: UNetConfig): void {
  const expected = unetParamShapes(cfg);
  const problems: string[] = [];
  for (const [k, s] of expected) {
    const got = shapes.get(k);
    if (!got) problems.push(`missing ${k} ${JSON.stringify(s)}`);
    else if (got.join() !== s.join()) problems.push(`${k}: checkpoint ${JSON.stringify(got)}, expected ${JSON.stringify(s)}`);
  }
  for (const k of shapes.keys()) if (k.startsWith(cfg.prefix) && !expected.has(k)) problems.push(`unexpected ${k}`);
  if (problems.length) throw new Error(`UNet keys do not match the inferred config:\n  ${problems.slice(0, 20).join('\n  ')}`);
}


/** Frozen full-size configs (the yaml's values), for checks and benches. */
export const SD15_UNET: Readonly<UNetConfig> = Object.freeze({
  prefix: UNET_PREFIX, inChannels: 4, outChannels: 4, modelChannels: 320, channelMult: [1, 2, 4, 4], numResBlocks: 2,
  attentionResolutions: [1, 2, 4], transformerDepth: [1, 1, 1, 0], middleDepth: 1, admInChannels: 0, contextDim: 768,
  useLinearInTransformer: false, numHeads: 8, numHeadChannels: -1,
});
export const SD21_UNET: Readonly<UNetConfig> = Object.freeze({
  ...SD15_UNET, contextDim: 1024, useLinearInTransformer: true, numHeads: -1, numHeadChannels: 64,
});
/** sgm configs/inference/sd_xl_base.yaml. */
export const SDXL_UNET: Readonly<UNetConfig> = Object.freeze({
  prefix: UNET_PREFIX, inChannels: 4, outChannels: 4, modelChannels: 320, channelMult: [1, 2, 4], numResBlocks: 2,
  attentionResolutions: [2, 4], transformerDepth: [0, 2, 10], middleDepth: 10, admInChannels: 2816, contextDim: 2048,
  useLinearInTransformer: true, numHeads: -1, numHeadChannels: 64,
});
