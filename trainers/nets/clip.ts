/**
 * @file The CLIP text encoders of Stable Diffusion, SD1 and SD2, as one functional forward over
 * checkpoint-named parameters.
 *
 * SD1: openai's ViT-L/14 text tower stored under HF `CLIPTextModel` names
 * (`cond_stage_model.transformer.text_model.*`), QuickGELU, the UNet gets `last_hidden_state`
 * (webui "CLIP skip n": final LayerNorm of the output of block L-n). SD2: open_clip's ViT-H text
 * tower (`cond_stage_model.model.*`, fused `in_proj_weight` rows q;k;v), exact GELU, the UNet gets
 * `ln_final` of the output of block L-2 (ldm FrozenOpenCLIPEmbedder layer='penultimate').
 * Both: token + position embedding, pre-LN residual blocks, causal mask, LayerNorm eps 1e-5.
 * SDXL has one of each under other prefixes (sdxl-text.ts); both give the output of block L-2
 * WITHOUT the final LayerNorm (`contextNorm: false`).
 *
 * Textual Inversion vectors are spliced into the token-embedding rows before the position
 * embedding is added (webui modules/sd_hijack.py EmbeddingsWithFixes), with ops that have
 * gradients in TF.js, so the vectors (and every weight) can be trained.
 *
 * ```ts
 * const cfg = textConfigFromKeys(shapes);            // family, width, layers… from the checkpoint
 * const context = encodeText(params, cfg, [ids]);     // [1, 77, W], what the UNet attends to
 * ```
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { withPrecision } from '../backend/precision.ts';
import { param, type Params } from './params.ts';
import { attention, gelu, layerNorm, quickGelu } from './layers.ts';

export type TextFamily = 'sd1' | 'sd2';

export interface ClipTextConfig {
  /** 'sd1': HF CLIPTextModel key names, QuickGELU; 'sd2': open_clip key names, GELU (erf). */
  family: TextFamily;
  /** Key prefix of every text-encoder tensor in the checkpoint. */
  prefix: string;
  /** Residual width W (token_embedding columns). ViT-L 768, ViT-H 1024. */
  width: number;
  /** Number of residual attention blocks. ViT-L 12, ViT-H 24. */
  layers: number;
  /**
   * Attention heads. Not in any shape: openai clip/model.py and open_clip use
   * `heads = width / 64` (ViT-L 12, ViT-H 16); models with other head sizes must say so.
   */
  heads: number;
  /** Hidden width of the MLP (fc1 / c_fc rows), 4·W in every CLIP. */
  mlpWidth: number;
  /** Rows of the token-embedding table (49408). */
  vocabSize: number;
  /** Rows of the position embedding (77): the longest id sequence. */
  contextLength: number;
  /** MLP activation: openai CLIP QuickGELU x·σ(1.702x) (SD1) or exact erf GELU (SD2). */
  activation: 'quick_gelu' | 'gelu';
  /** Which block output is the UNet context by default. */
  contextLayer: 'last' | 'penultimate';
  /** Whether the final LayerNorm is applied to the context (SD1/SD2 yes; SDXL's two encoders no). */
  contextNorm: boolean;
  /** LayerNorm eps (1e-5 in both towers). */
  layerNormEps: number;
}

/** Shape lookup: a `{key → shape}` map or a function returning undefined for missing keys. */
export type ShapeLookup = Map<string, number[]> | ((key: string) => number[] | undefined);

const SD1_PREFIX = 'cond_stage_model.transformer.text_model.';
const SD2_PREFIX = 'cond_stage_model.model.';

/** Checkpoint key names of one block's tensors (without `.weight`/`.bias` for Linear/LN). */
export interface BlockKeys {
  ln1: string;
  ln2: string;
  fc1: string;
  fc2: string;
  outProj: string;
  /** SD1: separate q/k/v Linears; SD2: one fused `in_proj_weight`/`in_proj_bias` (rows q;k;v). */
  qkv: { q: string; k: string; v: string } | { fused: string };
}

interface TextKeys {
  tokenEmbedding: string;
  positionEmbedding: string;
  finalLn: string;
  block(i: number): BlockKeys;
  /** Tensors real checkpoints carry that the text forward does not use. */
  unused: string[];
}

/** The key names of a family (HF CLIPTextModel names for SD1, open_clip names for SD2). */
export function textKeyNames(family: TextFamily, prefix = family === 'sd1' ? SD1_PREFIX : SD2_PREFIX): TextKeys {
  if (family === 'sd1') {
    return {
      tokenEmbedding: `${prefix}embeddings.token_embedding.weight`,
      positionEmbedding: `${prefix}embeddings.position_embedding.weight`,
      finalLn: `${prefix}final_layer_norm`,
      block: (i) => {
        const b = `${prefix}encoder.layers.${i}.`;
        const qkv = { q: `${b}self_attn.q_proj`, k: `${b}self_attn.k_proj`, v: `${b}self_attn.v_proj` };
        return { ln1: `${b}layer_norm1`, ln2: `${b}layer_norm2`, fc1: `${b}mlp.fc1`, fc2: `${b}mlp.fc2`, outProj: `${b}self_attn.out_proj`, qkv };
      },
      unused: [`${prefix}embeddings.position_ids`], // int64 buffer of older transformers
    };
  }
  return {
    tokenEmbedding: `${prefix}token_embedding.weight`,
    positionEmbedding: `${prefix}positional_embedding`,
    finalLn: `${prefix}ln_final`,
    block: (i) => {
      const b = `${prefix}transformer.resblocks.${i}.`;
      return { ln1: `${b}ln_1`, ln2: `${b}ln_2`, fc1: `${b}mlp.c_fc`, fc2: `${b}mlp.c_proj`, outProj: `${b}attn.out_proj`, qkv: { fused: `${b}attn.in_proj_` } };
    },
    unused: [`${prefix}text_projection`, `${prefix}logit_scale`], // image-text contrastive head
  };
}

function shapeOf(lookup: ShapeLookup, key: string): number[] | undefined {
  return typeof lookup === 'function' ? lookup(key) : lookup.get(key);
}

/**
 * Infer the text-encoder config from a checkpoint's key names and shapes. The family comes from
 * which token-embedding key exists; width/vocab/context from the embedding shapes; layers by
 * counting blocks; the MLP width from fc1/c_fc. `heads` defaults to width/64 (see the config).
 */
export function textConfigFromKeys(
  lookup: ShapeLookup, opts: { heads?: number; family?: TextFamily; prefix?: string } = {},
): ClipTextConfig {
  const family: TextFamily | undefined = opts.family ?? (shapeOf(lookup, textKeyNames('sd1').tokenEmbedding)
    ? 'sd1'
    : shapeOf(lookup, textKeyNames('sd2').tokenEmbedding) ? 'sd2' : undefined);
  if (!family) {
    throw new Error(`text encoder: found neither '${textKeyNames('sd1').tokenEmbedding}' (SD1) nor '${textKeyNames('sd2').tokenEmbedding}' (SD2)`);
  }
  const prefix = opts.prefix ?? (family === 'sd1' ? SD1_PREFIX : SD2_PREFIX);
  const names = textKeyNames(family, prefix);
  if (!shapeOf(lookup, names.tokenEmbedding)) throw new Error(`text encoder: missing '${names.tokenEmbedding}'`);
  const [vocabSize, width] = shapeOf(lookup, names.tokenEmbedding) as [number, number];
  const contextLength = must(lookup, names.positionEmbedding)[0]!;
  let layers = 0;
  while (shapeOf(lookup, `${names.block(layers).ln1}.weight`)) layers++;
  if (layers === 0) throw new Error(`text encoder: no blocks ('${names.block(0).ln1}.weight' missing)`);
  const mlpWidth = must(lookup, `${names.block(0).fc1}.weight`)[0]!;
  const heads = opts.heads ?? width / 64;
  if (!Number.isInteger(heads) || heads < 1 || width % heads !== 0) {
    // every SD1/SD2 release has 64-wide heads (12 of 768, 16 of 1024); anything else needs the config it came with
    throw new Error(opts.heads === undefined
      ? `text encoder: width ${width} is not a known SD1/SD2 text encoder (64-wide heads): put the config it came with (<name>.yaml, or config.json) beside the checkpoint`
      : `text encoder: width ${width} does not split into ${opts.heads} heads (from the config beside the checkpoint)`);
  }
  const sd1 = family === 'sd1';
  return {
    family, prefix, width, layers, heads, mlpWidth, vocabSize, contextLength,
    activation: sd1 ? 'quick_gelu' : 'gelu', contextLayer: sd1 ? 'last' : 'penultimate', contextNorm: true, layerNormEps: 1e-5,
  };
}

function must(lookup: ShapeLookup, key: string): number[] {
  const s = shapeOf(lookup, key);
  if (!s) throw new Error(`text encoder: missing '${key}'`);
  return s;
}

/** Every key the forward reads, plus the ones real checkpoints carry and it ignores. */
export function textKeys(cfg: ClipTextConfig): { used: string[]; unused: string[] } {
  const names = textKeyNames(cfg.family, cfg.prefix);
  const used = [names.tokenEmbedding, names.positionEmbedding, `${names.finalLn}.weight`, `${names.finalLn}.bias`];
  for (let i = 0; i < cfg.layers; i++) used.push(...textBlockKeys(cfg, i));
  return { used, unused: names.unused };
}

/** The keys of transformer block `i`. */
export function textBlockKeys(cfg: Pick<ClipTextConfig, 'family' | 'prefix'>, i: number): string[] {
  const wb = (n: string) => [`${n}.weight`, `${n}.bias`];
  const b = textKeyNames(cfg.family, cfg.prefix).block(i);
  const qkv = 'fused' in b.qkv ? [`${b.qkv.fused}weight`, `${b.qkv.fused}bias`] : [...wb(b.qkv.q), ...wb(b.qkv.k), ...wb(b.qkv.v)];
  return [...wb(b.ln1), ...qkv, ...wb(b.outProj), ...wb(b.ln2), ...wb(b.fc1), ...wb(b.fc2)];
}

/** PyTorch shape of every key the forward reads (the load check and the key-consumption tests). */
export function textParamShapes(cfg: ClipTextConfig): Map<string, number[]> {
  const names = textKeyNames(cfg.family, cfg.prefix);
  const [w, m] = [cfg.width, cfg.mlpWidth];
  const out = new Map<string, number[]>([[names.tokenEmbedding, [cfg.vocabSize, w]], [names.positionEmbedding, [cfg.contextLength, w]]]);
  const lin = (n: string, o: number, i: number) => out.set(`${n}.weight`, [o, i]).set(`${n}.bias`, [o]);
  const ln = (n: string) => out.set(`${n}.weight`, [w]).set(`${n}.bias`, [w]);
  ln(names.finalLn);
  for (let i = 0; i < cfg.layers; i++) {
    const b = names.block(i);
    ln(b.ln1);
    ln(b.ln2);
    if ('fused' in b.qkv) out.set(`${b.qkv.fused}weight`, [3 * w, w]).set(`${b.qkv.fused}bias`, [3 * w]);
    else for (const n of [b.qkv.q, b.qkv.k, b.qkv.v]) lin(n, w, w);
    lin(b.outProj, w, w);
    lin(b.fc1, m, w);
    lin(b.fc2, w, m);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Forward

/** Textual Inversion vectors that replace token-embedding rows of one prompt of the batch. */
export interface TextSplice {
  /** Row of the batch (index into `ids`). */
  batch: number;
  /** Positions in the id sequence (BOS = 0) that get vectors[0], vectors[1], …. */
  positions: number[];
  /** [n, W] with n ≥ positions.length; may be a tf.Variable being trained. */
  vectors: Tensor;
}

export interface EncodeOptions {
  /** SD1 only: webui "CLIP skip" (1 = last layer, 2 = penultimate, …). SD2 ignores it, as the webui does. */
  clipSkip?: number;
  /** Textual Inversion vectors spliced in before the position embedding. */
  splices?: TextSplice[];
}

/**
 * The UNet context for `ids` ([B][T], T ≤ contextLength): [B, T, W]. The forward is float32
 * whatever the job's precision (backend/precision.ts): it is a few % of a step, and bf16 takes
 * the sd2-tiny hidden states to 1.4% of their range (the UNet's outputs stay within 0.5%); a
 * backward through it (TI, a text LoRA) runs in the job's precision.
 */
export function encodeText(p: Params, cfg: ClipTextConfig, ids: number[][], opts: EncodeOptions = {}): Tensor {
  return withPrecision('fp32', () => tf.tidy(() => {
    const run = contextBlocks(cfg, opts.clipSkip);
    const names = textKeyNames(cfg.family, cfg.prefix);
    let h = embed(p, cfg, ids, opts.splices);
    const mask = causalMask(h.shape[1]!);
    for (let i = 0; i < run; i++) h = block(p, cfg, names.block(i), h, mask);
    return cfg.contextNorm ? layerNorm(p, names.finalLn, h, cfg.layerNormEps) : h;
  }));
}

/** Every intermediate, for goldens and inspection (runs all blocks). */
export interface TextHidden {
  /** token + position embedding (input of block 0), [B, T, W] */
  embeddings: Tensor;
  /** hidden[i] = output of block i (no final LayerNorm), [B, T, W] each */
  hidden: Tensor[];
  /** final LayerNorm(output of the last block) */
  lastHiddenState: Tensor;
  /** final LayerNorm(output of the second-to-last block) (SD2 context, SD1 CLIP skip 2) */
  penultimateLn: Tensor;
  /** what `encodeText` returns with the same options */
  context: Tensor;
}

/** Float32 forward, as encodeText. */
export function encodeTextHidden(p: Params, cfg: ClipTextConfig, ids: number[][], opts: EncodeOptions = {}): TextHidden {
  return withPrecision('fp32', () => tf.tidy(() => {
    const names = textKeyNames(cfg.family, cfg.prefix);
    const embeddings = embed(p, cfg, ids, opts.splices);
    const mask = causalMask(embeddings.shape[1]!);
    const hidden: Tensor[] = [];
    for (let i = 0; i < cfg.layers; i++) hidden.push(block(p, cfg, names.block(i), hidden[i - 1] ?? embeddings, mask));
    const finalLn = (h: Tensor) => layerNorm(p, names.finalLn, h, cfg.layerNormEps);
    const after = (n: number) => (n === 0 ? embeddings : hidden[n - 1]!);
    return {
      embeddings,
      hidden,
      lastHiddenState: finalLn(after(cfg.layers)),
      penultimateLn: finalLn(after(Math.max(cfg.layers - 1, 0))),
      context: cfg.contextNorm ? finalLn(after(contextBlocks(cfg, opts.clipSkip))) : after(contextBlocks(cfg, opts.clipSkip)),
    };
  }));
}

/** Golden-file names of the intermediates: text.embeddings, text.hidden.N (1-based), …. */
export function namedTextOutputs(h: TextHidden): Map<string, Tensor> {
  const named = new Map<string, Tensor>([['text.embeddings', h.embeddings]]);
  h.hidden.forEach((t, i) => named.set(`text.hidden.${i + 1}`, t));
  named.set('text.last_hidden_state', h.lastHiddenState);
  named.set('text.penultimate_ln', h.penultimateLn);
  return named;
}

/** How many blocks run before the final LayerNorm gives the context. */
export function contextBlocks(cfg: ClipTextConfig, clipSkip = 1): number {
  // ldm FrozenOpenCLIPEmbedder(layer='penultimate'): stop before the last block; webui
  // sd_hijack_open_clip.py does not apply CLIP skip to SD2.
  if (cfg.contextLayer === 'penultimate') return Math.max(cfg.layers - 1, 0);
  // webui sd_hijack_clip.py: final_layer_norm(hidden_states[-clipSkip]); hidden_states[0] is the
  // embedding output, so hidden_states[-n] is the output of block L-n (0-based: after L+1-n blocks).
  if (!Number.isInteger(clipSkip) || clipSkip < 1 || clipSkip > cfg.layers) {
    throw new Error(`clipSkip: expected an integer 1..${cfg.layers}, got ${clipSkip}`);
  }
  return cfg.layers + 1 - clipSkip;
}

/** Token embedding (TI rows spliced in) + position embedding: [B, T, W]. */
export function embed(p: Params, cfg: ClipTextConfig, ids: number[][], splices: TextSplice[] = []): Tensor {
  const names = textKeyNames(cfg.family, cfg.prefix);
  const t = ids[0]?.length ?? 0;
  if (t === 0 || t > cfg.contextLength || ids.some((row) => row.length !== t)) {
    throw new Error(`text ids: expected rows of equal length 1..${cfg.contextLength}, got ${ids.map((r) => r.length).join(', ')}`);
  }
  let tokens = lookupRows(param(p, names.tokenEmbedding), ids); // [B, T, W]
  if (splices.length > 0) tokens = spliceRows(tokens, splices);
  const positions = tf.slice(param(p, names.positionEmbedding), [0, 0], [t, cfg.width]); // [T, W]
  return tokens.add(positions);
}

/**
 * tf.gather of token rows, with its table gradient written out: TF.js differentiates gather with
 * UnsortedSegmentSum, which the WASM backend lacks. Here d(table) = one-hot(ids)ᵀ·dy summed per
 * distinct id ([U, W], U ≤ B·T), placed at its rows between zero blocks with concat. Only runs
 * when the table itself is trained (full fine-tune).
 */
function lookupRows(table: Tensor, ids: number[][]): Tensor {
  const [b, t] = [ids.length, ids[0]!.length];
  const flatIds = ids.flat();
  const lookup = tf.customGrad((...inputs: (Tensor | tf.GradSaveFunc)[]) => {
    const tbl = inputs[0] as Tensor; // [vocab, W]
    return {
      value: tf.gather(tbl, tf.tensor2d(ids, [b, t], 'int32')), // [B, T, W]
      gradFunc: (dy: Tensor | Tensor[]) => tableGrad(dy as Tensor, flatIds, tbl.shape as [number, number]),
    };
  });
  return lookup(table);
}

function tableGrad(dy: Tensor, flatIds: number[], [vocab, w]: [number, number]): Tensor {
  const unique = [...new Set(flatIds)].sort((x, y) => x - y);
  const slot = new Map(unique.map((id, j) => [id, j]));
  const oneHot = new Float32Array(unique.length * flatIds.length); // [U, B·T]
  flatIds.forEach((id, n) => (oneHot[slot.get(id)! * flatIds.length + n] = 1));
  const rows = tf.matMul(tf.tensor2d(oneHot, [unique.length, flatIds.length]), dy.reshape([-1, w])); // [U, W]
  const pieces: Tensor[] = [];
  let next = 0; // first table row not yet covered
  unique.forEach((id, j) => {
    if (id > next) pieces.push(tf.zeros([id - next, w]));
    pieces.push(tf.slice(rows, [j, 0], [1, w]));
    next = id + 1;
  });
  if (vocab > next) pieces.push(tf.zeros([vocab - next, w]));
  return tf.concat(pieces, 0); // [vocab, W]
}

/**
 * Replace rows of the token embeddings by TI vectors: out = E·(1 − m) + S·V, with S a one-hot
 * [B·T, N] selection matrix, m its row sums and V all splices' vectors stacked [N, W]. Exact in
 * float32 (1·v + 0·… and E·0 + v), and only matMul/mul/concat on the trained path, whose TF.js
 * gradients exist (unlike scatterND/stridedSlice).
 */
function spliceRows(tokens: Tensor, splices: TextSplice[]): Tensor {
  const [b, t, w] = tokens.shape as [number, number, number];
  const parts: Tensor[] = [];
  const picks: [row: number, col: number][] = [];
  for (const s of splices) {
    if (s.batch < 0 || s.batch >= b) throw new Error(`splice: batch ${s.batch} outside 0..${b - 1}`);
    if (s.positions.length > s.vectors.shape[0]!) throw new Error(`splice: ${s.positions.length} positions but ${s.vectors.shape[0]} vectors`);
    s.positions.forEach((pos, i) => {
      if (pos < 0 || pos >= t) throw new Error(`splice: position ${pos} outside 0..${t - 1}`);
      picks.push([s.batch * t + pos, parts.reduce((n, v) => n + v.shape[0]!, 0) + i]);
    });
    parts.push(s.vectors);
  }
  const n = parts.reduce((acc, v) => acc + v.shape[0]!, 0);
  const select = new Float32Array(b * t * n);
  const keep = new Float32Array(b * t).fill(1);
  for (const [row, col] of picks) {
    select[row * n + col] = 1;
    keep[row] = 0;
  }
  const vectors = parts.length === 1 ? parts[0]! : tf.concat(parts, 0); // [N, W]
  const flat = tokens.reshape([b * t, w]).mul(tf.tensor2d(keep, [b * t, 1])); // [B·T, W]
  return flat.add(tf.matMul(tf.tensor2d(select, [b * t, n]), vectors)).reshape([b, t, w]);
}

/** openai CLIP build_attention_mask: token i attends to 0..i (a large negative above the diagonal). */
export function causalMask(t: number): Tensor {
  const mask = new Float32Array(t * t);
  for (let i = 0; i < t; i++) for (let j = i + 1; j < t; j++) mask[i * t + j] = -1e30; // exp → exactly 0, no inf arithmetic
  return tf.tensor2d(mask, [t, t]);
}

/** y = x·Wᵀ + b for a weight/bias pair given by full key names. */
function affine(p: Params, weightKey: string, biasKey: string, x: Tensor): Tensor {
  const [b, t, c] = x.shape as [number, number, number];
  const w = param(p, weightKey); // [out, in]
  return tf.matMul(x.reshape([b * t, c]), w, false, true).add(param(p, biasKey)).reshape([b, t, w.shape[0]!]);
}

/** Pre-LN residual block: x + attn(ln_1 x), then + mlp(ln_2 x) (openai ResidualAttentionBlock). */
export function block(p: Params, cfg: ClipTextConfig, k: BlockKeys, x: Tensor, mask: Tensor): Tensor {
  const lin = (name: string, h: Tensor) => affine(p, `${name}.weight`, `${name}.bias`, h);
  const a = layerNorm(p, k.ln1, x, cfg.layerNormEps);
  let q: Tensor, key: Tensor, v: Tensor;
  if ('fused' in k.qkv) {
    // nn.MultiheadAttention: in_proj_weight [3W, W], rows [0:W] q, [W:2W] k, [2W:3W] v
    const qkv = affine(p, `${k.qkv.fused}weight`, `${k.qkv.fused}bias`, a); // [B, T, 3W]
    [q, key, v] = tf.split(qkv, 3, 2) as [Tensor, Tensor, Tensor];
  } else {
    [q, key, v] = [lin(k.qkv.q, a), lin(k.qkv.k, a), lin(k.qkv.v, a)];
  }
  const h = x.add(lin(k.outProj, attention(q, key, v, cfg.heads, mask)));
  const act = cfg.activation === 'quick_gelu' ? quickGelu : gelu;
  return h.add(lin(k.fc2, act(lin(k.fc1, layerNorm(p, k.ln2, h, cfg.layerNormEps)))));
}

/** Splices for a batch from tokenized prompts and the vectors of each embedding by name. */
export function splicesFor(
  prompts: { embeddings: { name: string; positions: number[] }[] }[],
  vectors: Map<string, Tensor>,
): TextSplice[] {
  return prompts.flatMap((prompt, batch) =>
    prompt.embeddings.map(({ name, positions }) => {
      const v = vectors.get(name);
      if (!v) throw new Error(`splice: no vectors for embedding '${name}'`);
      return { batch, positions, vectors: v };
    }),
  );
}
