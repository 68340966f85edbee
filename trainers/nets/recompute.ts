/**
 * @file Gradient checkpointing (Chen et al. 2016; torch.utils.checkpoint): a block runs forward
 * without keeping its intermediates, and the backward pass runs it again under a tape to get its
 * gradients. TF.js's tf.customGrad returns gradients only for the block's explicit inputs, but a
 * block also reads trained weights (Dreambooth's UNet, a hypernetwork's or a LoRA's modules), so
 * their gradients are collected on the side: `lossAndGrads` opens a collection for the trainable
 * variables, each recomputed block adds its weights' gradients to it, and the total per variable
 * is the tape's share (uses outside any block) plus the side share.
 *
 * The tape only runs a node's gradient when one of its inputs depends on a variable
 * (getFilteredNodesXToY in tfjs-core tape.js); a block whose inputs are all constants (a frozen
 * UNet's latents and timesteps, as for hypernetworks and LoRA) would be skipped. So every
 * checkpointed block also takes an `anchor`: 0 × one element of the smallest trainable variable.
 *
 * Fused backward (OneTrainer's fused_back_pass; torch's register_post_accumulate_grad_hook): with
 * `onGrad`, a variable's gradient is handed over — to the optimizer — the moment it is complete and
 * then freed, so no buffer of every gradient exists at once. "Complete" is counted, not assumed:
 * while the loss runs forward, every kernel's inputs are looked at, and each variable gets the
 * number of checkpointed blocks that read it; one read outside any block (the tape's share, e.g.
 * the time embedding, or the anchor below) makes it wait for the end. A block's recompute counts
 * its variables down; at zero the sum is final. A variable read by several blocks (a hypernetwork
 * module shared by every attention layer) is handed over after the last of them, so the result
 * is exactly what the unfused step computes. The caller must not keep the tensor it is handed.
 *
 * The reaches into TF.js internals: a gradient computation nested inside the outer backward pass
 * replaces `engine.state.activeTape` (engine.js startTape/gradients, tfjs-core 4.22) and the outer
 * pass still needs its own at the end, so it is put back; the fused census hooks the kernel entry
 * (kernel-hook.ts) for the forward pass only.
 *
 * Trained weights stored as bf16 (nets/bf16-store.ts) are released here: a block's float32 copies
 * after its forward and after its recompute (once its complete gradients were applied), the
 * tape's (`onTape`) at the end of the step.
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { hookKernelInputs } from './kernel-hook.ts';
import { activeBf16Store } from './bf16-store.ts';

interface Collection {
  vars: tf.Variable[];
  side: Map<tf.Variable, Tensor>;
  /** A scalar 0 that depends on a trainable variable (made on the tape when the loss starts). */
  anchor?: Tensor;
  fused?: Census;
  /** Each checkpointed block's kept results not yet replayed: disposed when the step ends, whatever happened. */
  kept: Set<Kept>;
}

/** The fused backward's bookkeeping (see the file comment). */
interface Census {
  onGrad: (v: tf.Variable, grad: Tensor) => void;
  known: Set<Tensor>;
  /** Checkpointed blocks still to run backward that read the variable. */
  pending: Map<tf.Variable, number>;
  /** Variables read outside every checkpointed block: their gradient is final only at the end. */
  onTape: Set<tf.Variable>;
  /** The variables the checkpointed block now running forward reads. */
  block?: Set<tf.Variable>;
  forward: boolean;
}

let collection: Collection | undefined;

/** What one checkpointed block's forward kept for its recompute (reuseInRecompute), in call order. */
interface Kept {
  items: Array<{ key: string; outs: Tensor[] }>;
}
/** The checkpointed block now running: its forward (record) or its recompute (replay). */
let reuse: { record: boolean; kept: Kept } | undefined;

function withReuse<T>(record: boolean, kept: Kept, f: () => T): T {
  const outer = reuse;
  reuse = { record, kept };
  try {
    return f();
  } finally {
    reuse = outer;
  }
}

function disposeKept(c: Collection, kept: Kept): void {
  for (const item of kept.items) tf.dispose(item.outs);
  kept.items = [];
  c.kept.delete(kept);
}

/**
 * compute(), with its results kept by a checkpointed block's forward and taken by the block's
 * recompute instead of computing them again: for kernels whose outputs are small next to their
 * cost (the attention core: out [B, Tq, C] and the log-sum-exp [B·heads, Tq] for 2·Tq·Tk·C
 * multiply-adds; at 512 px the five level-1 self-attentions were ~0.6 s of every recompute). The
 * recompute runs the same deterministic kernels on the same inputs in the same order, so the kept
 * results are the ones it would compute; the inputs' shapes are checked as a guard, and on a
 * mismatch it computes. Outside a checkpointed block it just computes.
 */
export function reuseInRecompute(inputs: Tensor[], compute: () => Tensor[]): Tensor[] {
  const r = reuse;
  if (!r) return compute();
  const key = inputs.map((t) => t.shape.join('x')).join(',');
  if (r.record) {
    const outs = compute();
    r.kept.items.push({ key, outs: outs.map((t) => tf.keep(t.clone())) });
    return outs;
  }
  const item = r.kept.items.shift();
  if (!item) return compute();
  try {
    return item.key === key ? item.outs.map((t) => t.clone()) : compute();
  } finally {
    tf.dispose(item.outs);
  }
}

interface EngineState { activeTape: unknown }
const engineState = () => (tf.engine() as unknown as { state: EngineState }).state;

/**
 * `fn(...inputs)`, checkpointed when a gradient is being taken: only `inputs` are kept for the
 * backward pass. Every trained weight `fn` reads must be a trainable tf.Variable, read while `fn`
 * runs (a tensor computed from a variable before the call would lose its gradient).
 */
export function checkpointed(fn: (...xs: Tensor[]) => Tensor, inputs: Tensor[]): Tensor {
  if (!tf.engine().isTapeOn()) return fn(...inputs); // sampling, previews: nothing to recompute
  const c = collection;
  if (!c) throw new Error('gradient checkpointing: take gradients with lossAndGrads (trainers/nets/recompute.ts), not tf.variableGrads');
  const census = c.fused;
  if (census?.block) throw new Error('fused backward: checkpointed blocks cannot nest');
  const kept: Kept = { items: [] };
  c.kept.add(kept);
  const run = tf.customGrad((...args) => {
    const xs = args.slice(0, inputs.length) as Tensor[];
    const value = tf.tidy(() => withReuse(true, kept, () => fn(...xs)));
    (args[args.length - 1] as tf.GradSaveFunc)(xs);
    return { value, gradFunc: (dy, saved) => [...recompute(fn, saved, dy as Tensor, c, kept), tf.zeros([])] };
  });
  if (!census?.forward) return run(...inputs, c.anchor!);
  census.block = new Set();
  try {
    return run(...inputs, c.anchor!);
  } finally {
    for (const v of census.block) census.pending.set(v, (census.pending.get(v) ?? 0) + 1);
    census.block = undefined;
    activeBf16Store()?.release(census.onTape);
  }
}

/** 0 × the first element of the smallest variable: a scalar on the tape's path from the variables. */
function anchorOf(vars: tf.Variable[]): Tensor {
  const smallest = vars.reduce((a, b) => (b.size < a.size ? b : a));
  return smallest.reshape([-1]).slice([0], [1]).sum().mul(0);
}

/** The block again, under its own tape: gradients of its inputs (returned) and of the variables it read (collected). */
function recompute(fn: (...xs: Tensor[]) => Tensor, saved: Tensor[], dy: Tensor, c: Collection, kept: Kept): Tensor[] {
  const state = engineState();
  const complete: tf.Variable[] = [];
  const outerTape = state.activeTape;
  let inputGrads: Tensor[];
  try {
    inputGrads = tf.tidy(() => {
      const { grads } = tf.engine().gradients(() => withReuse(false, kept, () => fn(...saved)), [...saved, ...c.vars], dy, true);
      c.vars.forEach((v, i) => {
        const g = grads[saved.length + i];
        if (!g) return;
        const prev = c.side.get(v);
        c.side.set(v, tf.keep(prev ? prev.add(g) : g));
        prev?.dispose();
        if (c.fused) complete.push(v);
      });
      return saved.map((x, i) => grads[i] ?? tf.zerosLike(x));
    });
  } finally {
    state.activeTape = outerTape;
    disposeKept(c, kept);
  }
  if (c.fused) handOver(c, c.fused, complete);
  activeBf16Store()?.release(c.fused?.onTape ?? new Set(c.vars));
  return inputGrads;
}

/** Count the block's variables down; hand over (and free) those no other reader waits on. */
function handOver(c: Collection, census: Census, seen: tf.Variable[]): void {
  for (const v of seen) {
    const left = (census.pending.get(v) ?? 0) - 1;
    census.pending.set(v, left);
    if (left !== 0 || census.onTape.has(v)) continue; // unknown readers (left < 0) wait for the end too
    const g = c.side.get(v)!;
    c.side.delete(v);
    try {
      census.onGrad(v, g);
    } finally {
      g.dispose();
    }
  }
}

/** Watch every kernel's inputs while `f` runs forward: which variables each checkpointed block reads. */
function withCensus<T>(census: Census, f: () => T): T {
  const unhook = hookKernelInputs((inputs) => {
    if (!census.forward) return;
    for (const x of inputs) if (census.known.has(x)) (census.block ?? census.onTape).add(x as tf.Variable);
  });
  census.forward = true;
  try {
    return f();
  } finally {
    census.forward = false;
    unhook();
  }
}

/**
 * The value of `f` (a scalar loss) and its gradient for each trainable variable, by the caller's
 * names, summing what the tape and the checkpointed blocks found. Variables the loss does not
 * reach get no entry (as tf.variableGrads). With `onGrad` (fused backward), the gradients that are
 * complete inside the backward pass go to it there instead (and are freed after it returns);
 * `grads` holds the rest.
 */
export function lossAndGrads(
  f: () => tf.Scalar, trainable: Map<string, tf.Variable>, onGrad?: (name: string, grad: Tensor) => void,
): { value: tf.Scalar; grads: Record<string, Tensor> } {
  if (collection) throw new Error('lossAndGrads: already taking gradients (nested calls are not supported)');
  const c: Collection = { vars: [...trainable.values()], side: new Map(), kept: new Set() };
  if (onGrad) {
    const names = new Map([...trainable].map(([name, v]) => [v, name]));
    c.fused = { onGrad: (v, g) => onGrad(names.get(v)!, g), known: new Set(c.vars), pending: new Map(), onTape: new Set(), forward: false };
  }
  collection = c;
  const store = activeBf16Store();
  if (store) store.sticky = true; // float32 copies stay until released at block ends (the file comment)
  try {
    const loss = () => {
      const run = () => {
        c.anchor = anchorOf(c.vars); // in the forward scope, so it lives as long as the loss's tensors
        return f();
      };
      return c.fused ? withCensus(c.fused, run) : run();
    };
    const { value, grads } = tf.engine().gradients(loss, c.vars, undefined, true);
    const out: Record<string, Tensor> = {};
    [...trainable.keys()].forEach((name, i) => {
      const tape = grads[i];
      const side = c.side.get(c.vars[i]!);
      if (tape && side) {
        out[name] = tape.add(side);
        tape.dispose();
      } else if (tape ?? side) out[name] = (tape ?? side)!;
      if (side && tape) side.dispose();
      c.side.delete(c.vars[i]!);
    });
    return { value: value as tf.Scalar, grads: out };
  } finally {
    tf.dispose([...c.side.values()]);
    for (const kept of c.kept) disposeKept(c, kept);
    collection = undefined;
    if (store) {
      store.sticky = false;
      store.release();
    }
  }
}
