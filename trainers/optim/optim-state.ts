/**
 * @file The optimizer-state types every optimizer here shares — the exported state of AdamW,
 * 8-bit AdamW and Adafactor (the snapshot files of Dreambooth, LoRA and fine-tune,
 * optim/trainable.ts) — and between the AdamW state (torch state_dict names) and the webui's
 * `.optim` file records: one conversion each way, so the TI and hypernetwork .optim files share it.
 */
import type { Tensor } from '../backend/tf.ts';
import type { AdamWStateDict } from './adamw.ts';
import type { AdamGroup, AdamParamState, OptimFile } from '../io/optim-file.ts';

/** An optimizer's state as plain arrays, by parameter name (saved beside a snapshot). */
export interface ExportedOptimizerState {
  optimizer: string;
  hyper: Record<string, unknown>;
  params: Map<string, { step: number; buffers: Map<string, ExportedBuffer> }>;
}

export interface ExportedBuffer {
  dtype: 'F32' | 'U8';
  shape: number[];
  /** The values, or (a lazy export, for writing) a reader of them. */
  data: Float32Array | Uint8Array | (() => Promise<Float32Array | Uint8Array>);
}

/** What every trainer optimizer offers besides the loop's step(). */
export interface StatefulOptimizer {
  step(grads: Map<string, Tensor>, lr: number): void;
  /** `lazy`: buffers as readers, read one at a time by the writer (trainable.ts writeOptimizerState). */
  exportState(lazy?: boolean): Promise<ExportedOptimizerState>;
  importState(state: ExportedOptimizerState): void;
  dispose(): void;
}

export function toOptimRecords(sd: AdamWStateDict): { states: AdamParamState[]; group: AdamGroup } {
  const g = sd.param_groups[0]!;
  const states = [...sd.state.values()].map((s) => ({ step: s.step, expAvg: s.exp_avg, expAvgSq: s.exp_avg_sq, shape: s.shape }));
  return { states, group: { lr: g.lr, betas: g.betas, eps: g.eps, weightDecay: g.weight_decay } };
}

export function fromOptimFile(f: OptimFile): AdamWStateDict {
  const state = new Map(f.states.map((s, i) => [i, { step: s.step, exp_avg: s.expAvg, exp_avg_sq: s.expAvgSq, shape: s.shape }]));
  const g = f.group;
  return {
    state,
    param_groups: [{
      lr: g.lr, betas: g.betas, eps: g.eps, weight_decay: g.weightDecay, amsgrad: false, foreach: null,
      maximize: false, capturable: false, params: f.states.map((_, i) => i),
    }],
  };
}
