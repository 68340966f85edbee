/** @file The checks every optimizer's step() makes before it touches a weight. */
import { tf, type Tensor } from '../tf.ts';

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
