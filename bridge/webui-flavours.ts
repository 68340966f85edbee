/**
 * @file What each webui flavour's API lets sidetrain do with an output, read from the routes each
 * one registers (the stand-ins in test/helpers/webui-routes.ts serve exactly these tables):
 *
 * - AUTOMATIC1111 1.10.1: `modules/api/api.py` (`Api.__init__`) has refresh-embeddings and
 *   refresh-checkpoints; LoRAs come from `extensions-builtin/Lora/scripts/lora_script.py`
 *   (`/sdapi/v1/loras`, `/sdapi/v1/refresh-loras`). It has no route that reloads its hypernetwork
 *   list: our extension adds `/sidetrain/refresh-hypernetworks` (extension/sidetrain_ext/routes.py).
 * - Forge: the same `api.py` routes less `sd-vae` and the train routes, plus `/sdapi/v1/sd-modules`;
 *   LoRAs from `extensions-builtin/sd_forge_lora`. It still lists hypernetworks, but the code that
 *   applies them is commented out (`modules/sd_hijack_optimizations.py`): a hypernetwork trains and
 *   is written, but Forge ignores `<hypernet:…>`.
 * - SD.Next: `modules/api/api.py` (`Api.register`) + `modules/api/loras.py`; adds
 *   `/sdapi/v1/version` and `/sdapi/v1/platform`; has no refresh-embeddings (it reads the
 *   embeddings folder when it loads a model: `modules/sd_models.py`, so a reload-checkpoint
 *   re-scans them) and no hypernetworks at all; `/sdapi/v1/embeddings` answers name lists.
 *
 * Detection asks for a route only one flavour registers: any answer but 404 (401 included: the
 * route exists behind Basic auth) means it is there. A webui folder alone (the CLI's `--webui-dir`)
 * tells Forge by its `modules_forge/` package; A1111 and SD.Next are not told apart that way.
 */
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { OutputKind } from '../trainers/job.ts';

export type Flavour = 'a1111' | 'forge' | 'sdnext';

export const FLAVOUR_NAMES: Record<Flavour, string> = { a1111: 'AUTOMATIC1111', forge: 'Forge', sdnext: 'SD.Next' };

/** In order: the first probe route that exists names the flavour; none → A1111. */
export const FLAVOUR_PROBES: { flavour: Flavour; route: string }[] = [
  { flavour: 'sdnext', route: '/sdapi/v1/version' },
  { flavour: 'forge', route: '/sdapi/v1/sd-modules' },
];

export interface KindSupport {
  /** POST this to make the webui re-scan the kind's folder. */
  refresh?: string;
  /** No refresh route: what happens instead and what the user can do (said with the check). */
  noRefresh?: string;
  /** The flavour cannot use this kind at all: why, said plainly instead of a check. */
  unusable?: string;
}

const A1111: Record<OutputKind, KindSupport> = {
  embedding: { refresh: '/sdapi/v1/refresh-embeddings' },
  hypernetwork: { refresh: '/sidetrain/refresh-hypernetworks' },
  checkpoint: { refresh: '/sdapi/v1/refresh-checkpoints' },
  lora: { refresh: '/sdapi/v1/refresh-loras' },
};

export const SUPPORT: Record<Flavour, Record<OutputKind, KindSupport>> = {
  a1111: A1111,
  forge: {
    ...A1111,
    hypernetwork: {
      unusable: 'Forge lists hypernetworks but never applies them (its hypernetwork code is disabled): the file is written, use it in AUTOMATIC1111',
    },
  },
  sdnext: {
    ...A1111,
    embedding: {
      noRefresh: 'SD.Next has no route that re-scans embeddings: it reads them when it loads a model (reload the model, or refresh its Networks panel)',
    },
    hypernetwork: { unusable: 'SD.Next does not support hypernetworks: the file is written, use it in AUTOMATIC1111' },
  },
};

/** A skipped embedding and, where the flavour says it, its vector size. */
export interface SkippedEmbedding {
  name: string;
  shape?: number;
}

/**
 * `/sdapi/v1/embeddings` in either shape: A1111/Forge map names to details
 * (`{loaded: {name: {shape…}}, skipped: {…}}`), SD.Next lists names (`{loaded: [..], skipped: [..]}`).
 */
export function embeddingLists(body: unknown): { loaded: string[]; skipped: SkippedEmbedding[] } {
  const b = (body ?? {}) as { loaded?: unknown; skipped?: unknown };
  const names = (v: unknown): string[] => (Array.isArray(v) ? v.map(String) : Object.keys((v as object) ?? {}));
  const skipped = names(b.skipped).map((name) => {
    const detail = Array.isArray(b.skipped) ? undefined : ((b.skipped as Record<string, { shape?: unknown }>)[name] ?? undefined);
    return typeof detail?.shape === 'number' ? { name, shape: detail.shape } : { name };
  });
  return { loaded: names(b.loaded), skipped };
}

/** The flavour a webui folder shows by its files: Forge (its `modules_forge/` package), else unknown. */
export async function flavourOfDir(dir: string): Promise<Flavour | undefined> {
  const forge = await stat(join(dir, 'modules_forge')).then((st) => st.isDirectory(), () => false);
  return forge ? 'forge' : undefined;
}

/** Why the webui in `dir` cannot use an output of `kind` at all (a hypernetwork on Forge), as far as its folder tells. */
export async function unusableInDir(dir: string, kind: OutputKind): Promise<string | undefined> {
  const flavour = await flavourOfDir(dir);
  return flavour ? SUPPORT[flavour][kind].unusable : undefined;
}
