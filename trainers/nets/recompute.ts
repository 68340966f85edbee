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
 * The one reach into TF.js internals: a gradient computation nested inside the outer backward pass
 * replaces `engine.state.activeTape` (engine.js startTape/gradients, tfjs-core 4.22) and the outer
 * pass still needs its own at the end, so it is put back.
 */
import { tf, type Tensor } from '../backend/tf.ts';

interface Collection {
  vars: tf.Variable[];
  side: Map<tf.Variable, Tensor>;
  /** A scalar 0 that depends on a trainable variable (made on the tape when the loss starts). */
  anchor?: Tensor;
}

let collection: Collection | undefined;

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
  const run = tf.customGrad((...args) => {
    const xs = args.slice(0, inputs.length) as Tensor[];
    const value = tf.tidy(() => fn(...xs));
    (args[args.length - 1] as tf.GradSaveFunc)(xs);
    return { value, gradFunc: (dy, saved) => [...recompute(fn, saved, dy as Tensor, c), tf.zeros([])] };
  });
  return run(...inputs, c.anchor!);
}

/** 0 × the first element of the smallest variable: a scalar on the tape's path from the variables. */
function anchorOf(vars: tf.Variable[]): Tensor {
  const smallest = vars.reduce((a, b) => (b.size < a.size ? b : a));
  return smallest.reshape([-1]).slice([0], [1]).sum().mul(0);
}

/** The block again, under its own tape: gradients of its inputs (returned) and of the variables it read (collected). */
function recompute(fn: (...xs: Tensor[]) => Tensor, saved: Tensor[], dy: Tensor, c: Collection): Tensor[] {
  const state = engineState();
  const outerTape = state.activeTape;
  try {
    return tf.tidy(() => {
      const { grads } = tf.engine().gradients(() => fn(...saved), [...saved, ...c.vars], dy, true);
      c.vars.forEach((v, i) => {
        const g = grads[saved.length + i];
        if (!g) return;
        const prev = c.side.get(v);
        c.side.set(v, tf.keep(prev ? prev.add(g) : g));
        prev?.dispose();
      });
      return saved.map((x, i) => grads[i] ?? tf.zerosLike(x));
    });
  } finally {
    state.activeTape = outerTape;
  }
}

/**
 * The value of `f` (a scalar loss) and its gradient for each trainable variable, by the caller's
 * names, summing what the tape and the checkpointed blocks found. Variables the loss does not
 * reach get no entry (as tf.variableGrads).
 */
export function lossAndGrads(f: () => tf.Scalar, trainable: Map<string, tf.Variable>): { value: tf.Scalar; grads: Record<string, Tensor> } {
  if (collection) throw new Error('lossAndGrads: already taking gradients (nested calls are not supported)');
  const c: Collection = { vars: [...trainable.values()], side: new Map() };
  collection = c;
  try {
    const loss = () => {
      c.anchor = anchorOf(c.vars); // in the forward scope, so it lives as long as the loss's tensors
      return f();
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
    collection = undefined;
  }
}
