/**
 * @file Whether a checkpoint can be trained as it is, said by `inspect` and checked before a job
 * is accepted (the probe's estimate, bridge/probe-worker.ts): the attention head split
 * is in no tensor shape, so it comes, as in training (nets/sd.ts `modelOverrides`) and in the
 * webui (modules/sd_models_config.py), from a config beside the file, else from the family's
 * release config. The UNet plan and the text encoder configs are built the way a job builds them,
 * so a file `inspect` accepts is one a job can load, and one it refuses gets the reason and the fix.
 */
import { basename, extname } from 'node:path';
import type { Family } from '../trainers/io/checkpoint.ts';
import { modelOverrides } from '../trainers/nets/sd.ts';
import { textConfigFromKeys } from '../trainers/nets/clip.ts';
import { sdxlTextConfigs } from '../trainers/nets/sdxl-conditioner.ts';
import { unetConfigFromKeys, unetPlan } from '../trainers/nets/unet-config.ts';

/** What applies without a config beside the file: the webui's config for the family. */
const RELEASE_CONFIG: Record<Family, string> = {
  sd1: 'v1-inference.yaml (UNet num_heads 8; text heads 64 wide)',
  sd2: 'v2-inference.yaml (UNet num_head_channels 64; text heads 64 wide)',
  sdxl: 'sd_xl_base.yaml (UNet num_head_channels 64; text heads 64 wide)',
};

export interface ModelConfigReport {
  /** The config file the head split came from, or which release defaults applied. */
  config: string;
  /** The split a job will use. */
  heads: Record<string, string | number>;
}

/** The head split a job would use for this checkpoint; throws why it cannot be trained, and the fix. */
export function modelConfig(path: string, family: Family, shapes: Map<string, number[]>): ModelConfigReport {
  const o = modelOverrides(path);
  const config = o.from ?? `none beside the file: the ${family.toUpperCase()} release defaults, ${RELEASE_CONFIG[family]}`;
  try {
    const unet = unetConfigFromKeys(shapes, o.unetHeads);
    unetPlan(unet);
    const unetHeads = unet.numHeadChannels === -1 ? `${unet.numHeads} heads` : `heads ${unet.numHeadChannels} wide`;
    if (family === 'sdxl') {
      const text = sdxlTextConfigs(shapes, { l: o.textHeads, g: o.textHeadsG });
      return { config, heads: { unet: unetHeads, textL: text.l.heads, textG: text.g.heads } };
    }
    return { config, heads: { unet: unetHeads, text: textConfigFromKeys(shapes, { heads: o.textHeads }).heads } };
  } catch (err) {
    // the nets' own advice is said once, below, with the file names
    const why = (err instanceof Error ? err.message : String(err)).replace(/: put the config it came with.*$/, '').replace(/ — the head split .*$/, '');
    const fix = o.from
      ? `the head split came from ${o.from}`
      : `no config is beside it, so ${RELEASE_CONFIG[family]} applies, which does not fit this model: put the config it came with beside it as ${basename(path, extname(path))}.yaml (ldm/sgm) or config.json`;
    throw new Error(`${path}: an ${family.toUpperCase()} checkpoint that cannot be trained as it is (${why}); ${fix}`);
  }
}
