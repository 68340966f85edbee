/**
 * @file Hypernetwork training (webui modules/hypernetworks/hypernetwork.py train_hypernetwork):
 * only the (k, v) modules train; they transform the context of every attention of their size.
 */
import { tf, type Tensor } from './tf.ts';
import { hypernetHook, type HypernetworkSpec } from './nets/hypernet.ts';
import type { Params } from './nets/params.ts';
import { denoisingLoss, type Denoiser, type DiffusionBatch } from './diffusion-loss.ts';

export interface HnModel extends Denoiser {
  hypernetwork: { params: Params; spec: HypernetworkSpec };
}

/** The hypernetwork loss: p_losses with the modules hooked into every attention (train mode). */
export function hypernetworkLoss(model: HnModel, batch: DiffusionBatch, encoderHiddenStates: Tensor): tf.Scalar {
  const { params, spec } = model.hypernetwork;
  return tf.tidy(() => denoisingLoss(model, batch, encoderHiddenStates, { kv: hypernetHook(params, spec, { training: true }) }));
}
