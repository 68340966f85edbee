/**
 * @file One hook on TF.js's kernel entry, for the two mechanisms that must see every kernel's
 * inputs: the fused backward's census (recompute.ts: which variables each checkpointed block
 * reads) and the bf16 weight store (bf16-store.ts: refill a weight before a kernel reads it).
 * Every op and customGrad goes through `engine.runKernelFunc` (engine.js, tfjs-core 4.22), so
 * wrapping it sees them all. Hooks stack: each restore puts back what it wrapped, in reverse order
 * of installing (the bf16 store for a whole job, the census inside it for one forward pass).
 */
import { tf, type Tensor } from '../backend/tf.ts';

interface EngineWithKernels { runKernelFunc(params: { inputs?: Record<string, unknown> }): unknown }

/**
 * Call `onKernel` with each kernel's input tensors before the kernel runs; what it returns (if
 * anything) runs after the kernel, even when it throws. Returns the function that removes the hook.
 */
export function hookKernelInputs(onKernel: (inputs: Tensor[]) => (() => void) | void): () => void {
  const engine = tf.engine() as unknown as EngineWithKernels;
  const original = engine.runKernelFunc;
  const own = Object.hasOwn(engine, 'runKernelFunc');
  engine.runKernelFunc = function (this: EngineWithKernels, params) {
    const inputs = params.inputs ? Object.values(params.inputs).flatMap((t) => (Array.isArray(t) ? t : [t])).filter(Boolean) as Tensor[] : [];
    const after = onKernel(inputs);
    try {
      return original.call(this, params);
    } finally {
      after?.();
    }
  };
  return () => {
    if (own) engine.runKernelFunc = original;
    else delete (engine as Partial<EngineWithKernels>).runKernelFunc; // the prototype's again
  };
}
