/** @file The checks every optimizer's step() makes before it touches a weight. */
import { tf, type Tensor } from '../backend/tf.ts';
import { hostValues, optimKernels } from './native.ts';

/**
 * (name, param, grad) triples in parameter order, after checking the learn rate and that every
 * gradient belongs to a parameter of its shape; errors name the optimizer and the parameter.
 */
export function checkedUpdates(
  who: string, params: Map<string, tf.Variable>, grads: Map<string, Tensor>, lr: number,
): [string, tf.Variable, Tensor][] {
  if (!Number.isFinite(lr) || lr < 0) throw new Error(`${who}: learn rate must be a finite number ≥ 0, got ${lr}`);
  for (const name of grads.keys()) {
    if (!params.has(name)) throw new Error(`${who}: gradient for unknown parameter '${name}'`);
  }
  const out: [string, tf.Variable, Tensor][] = [];
  for (const [name, p] of params) {
    const g = grads.get(name);
    if (!g) continue;
    if (!tf.util.arraysEqual(g.shape, p.shape)) throw new Error(`${who}: gradient for '${name}' has shape [${g.shape}], parameter has [${p.shape}]`);
    out.push([name, p, g]);
  }
  return out;
}

/**
 * Every value of every variable finite and |x| ≤ maxAbs (NaN fails): the training loop's check
 * after each step. Natively one threaded pass per variable; else trainers/train/loop.ts's TF ops
 * (isFinite, abs, lessEqual, logicalAnd, all: five full-size passes and four temporaries).
 */
export async function allFiniteWithin(vars: Iterable<tf.Variable>, maxAbs: number): Promise<boolean> {
  const list = [...vars];
  const kernels = optimKernels();
  if (kernels) {
    const rest: tf.Variable[] = [];
    for (const v of list) {
      const values = hostValues(v);
      if (!values) rest.push(v);
      else if (!kernels.finiteWithin(values, maxAbs)) return false;
    }
    if (rest.length === 0) return true;
    return allFiniteWithinOps(rest, maxAbs);
  }
  return allFiniteWithinOps(list, maxAbs);
}

async function allFiniteWithinOps(vars: tf.Variable[], maxAbs: number): Promise<boolean> {
  if (vars.length === 0) return true;
  const flags = tf.tidy(() => tf.stack(vars.map((v) => tf.all(tf.isFinite(v).logicalAnd(tf.abs(v).lessEqual(maxAbs))))));
  const data = await flags.data();
  flags.dispose();
  return data.every((x) => x === 1);
}
