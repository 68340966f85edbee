/**
 * @file `.optim` side files (webui "save optimizer state"): `{hash, optimizer_state_dict}`
 * (+ `optimizer_name` for hypernetworks), the state dict in torch 1.13 `AdamW` layout
 * (`step` a 0-dim float tensor per parameter; newer torch adds fields the webui does not need).
 */
import { PyFloat, PyTuple, TensorRef, asMap } from './pyobjects.ts';
import { openTorchZip } from './torchzip.ts';
import { SaveTensor } from './pickle-write.ts';

/** AdamW state of one parameter (torch 1.13 layout: `step` is a 0-dim float tensor). */
export interface AdamParamState {
  step: number;
  expAvg: Float32Array;
  expAvgSq: Float32Array;
  shape: number[];
}

export interface AdamGroup {
  lr: number;
  betas: [number, number];
  eps: number;
  weightDecay: number;
}

/** torch 1.13 `AdamW.state_dict()` as a Python value. */
export function adamwStateDict(states: AdamParamState[], group: AdamGroup): Map<unknown, unknown> {
  const state = new Map<unknown, unknown>(states.map((s, i) => [i, new Map<unknown, unknown>([
    ['step', new SaveTensor('F32', [], Float32Array.of(s.step))],
    ['exp_avg', new SaveTensor('F32', s.shape, s.expAvg)],
    ['exp_avg_sq', new SaveTensor('F32', s.shape, s.expAvgSq)],
  ])]));
  const g = new Map<unknown, unknown>([
    ['lr', new PyFloat(group.lr)], ['betas', new PyTuple(group.betas.map((b) => new PyFloat(b)))],
    ['eps', new PyFloat(group.eps)], ['weight_decay', new PyFloat(group.weightDecay)],
    ['amsgrad', false], ['foreach', null], ['maximize', false], ['capturable', false],
    ['params', states.map((_, i) => i)],
  ]);
  return new Map<unknown, unknown>([['state', state], ['param_groups', [g]]]);
}

export interface OptimFile {
  hash?: string;
  optimizerName?: string;
  states: AdamParamState[];
  group: AdamGroup;
}

/** Read a `.optim` side file (embedding or hypernetwork). */
export async function readOptim(path: string): Promise<OptimFile> {
  const zip = await openTorchZip(path);
  try {
    const data = zip.value instanceof Map ? zip.value : undefined;
    const osd = asMap(data?.get('optimizer_state_dict'));
    const groups = osd?.get('param_groups');
    const state = asMap(osd?.get('state'));
    if (!data || !osd || !Array.isArray(groups) || !state) throw new Error(`${path}: not an optimizer file (needs optimizer_state_dict with state and param_groups)`);
    const g = groups[0] as Map<string, unknown>;
    const num = (x: unknown) => (x instanceof PyFloat ? x.value : Number(x));
    const betas = (g.get('betas') as PyTuple).items.map(num) as [number, number];
    const states: AdamParamState[] = [];
    for (const [, s] of [...state].sort((a, b) => Number(a[0]) - Number(b[0]))) {
      const m = s as Map<string, unknown>;
      const t = (k: string) => m.get(k) as TensorRef;
      const stepT = m.get('step');
      const step = stepT instanceof TensorRef ? (await zip.readTensor(stepT))[0]! : Number(stepT);
      states.push({ step, expAvg: await zip.readTensor(t('exp_avg')), expAvgSq: await zip.readTensor(t('exp_avg_sq')), shape: [...t('exp_avg').shape] });
    }
    const hash = data.get('hash');
    const name = data.get('optimizer_name');
    return {
      hash: typeof hash === 'string' ? hash : undefined, optimizerName: typeof name === 'string' ? name : undefined, states,
      group: { lr: num(g.get('lr')), betas, eps: num(g.get('eps')), weightDecay: num(g.get('weight_decay')) },
    };
  } finally {
    await zip.close();
  }
}
