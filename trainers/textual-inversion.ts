/**
 * @file Textual Inversion (webui modules/textual_inversion/textual_inversion.py train_embedding):
 * only the name's vectors train; they replace the name's tokens in the text encoder's input.
 */
import { tf, type Tensor } from './tf.ts';
import { encodeText, splicesFor, type ClipTextConfig } from './nets/clip.ts';
import type { Params } from './nets/params.ts';
import { denoisingLoss, type Denoiser, type DiffusionBatch } from './diffusion-loss.ts';

/** A prompt tokenized with the embedding names it contains (text/clip.ts tokenizeWithEmbeddings). */
export interface TokenizedPrompt {
  ids: number[];
  embeddings: { name: string; positions: number[] }[];
}

export interface TiBatch extends DiffusionBatch {
  prompts: TokenizedPrompt[];
}

export interface TiModel extends Denoiser {
  text: { params: Params; cfg: ClipTextConfig };
}

/** The TI loss: the text encoder runs every step (the vectors change), then p_losses. */
export function textualInversionLoss(model: TiModel, vectors: Map<string, Tensor>, batch: TiBatch): tf.Scalar {
  return tf.tidy(() => {
    const encoderHiddenStates = encodeText(model.text.params, model.text.cfg, batch.prompts.map((p) => p.ids), {
      splices: splicesFor(batch.prompts, vectors),
    }); // [B, 77, W]
    return denoisingLoss(model, batch, encoderHiddenStates);
  });
}
