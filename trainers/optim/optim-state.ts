/**
 * @file Between the optimizer's state (torch state_dict names) and the `.optim` file's records:
 * one conversion each way, so TI and hypernetwork saves share it.
 */
import type { AdamWStateDict } from './adamw.ts';
import type { AdamGroup, AdamParamState, OptimFile } from '../io/optim-file.ts';

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
