/**
 * @file The `/sdapi/v1` routes each webui flavour registers, as its code does, for the stand-in
 * webuis (fake-webui.ts): a route missing here answers 404 there, as it would on that webui.
 * `protected` routes answer 401 without the credentials of `--api-auth` (A1111, Forge) or `--auth`
 * (SD.Next); `open` ones are added to the app directly by an extension, outside that check.
 *
 * - AUTOMATIC1111 v1.10.1: modules/api/api.py (`Api.__init__`: add_api_route → the auth
 *   dependency; server-kill/-restart/-stop exist only with --api-server-stop and are left out);
 *   extensions-builtin/Lora/scripts/lora_script.py (`api_networks`: `@app.get`/`@app.post`).
 * - Forge (lllyasviel/stable-diffusion-webui-forge, 2025-06): modules/api/api.py (no sd-vae, no
 *   train routes, adds sd-modules); extensions-builtin/sd_forge_lora/scripts/lora_script.py.
 * - SD.Next (vladmandic/sdnext, 2026-07): modules/api/api.py (`Api.register`; add_api_route puts
 *   auth on every route by default) and the modules it calls register_api on: options, caption,
 *   loras, autocomplete, gallery, nudenet, xyz_grid, civitai/api_civitai (its /sdapi/v1 routes;
 *   the /sdapi/v2 ones are left out), rembg, upload.
 * - Every flavour with our extension installed: `POST /sidetrain/refresh-hypernetworks`
 *   (extension/sidetrain_ext/routes.py: its own loopback/token check, not the webui's auth).
 */
import type { Flavour } from '../../bridge/webui-flavours.ts';

export interface RouteTable {
  /** `METHOD path` under /sdapi/v1/, behind the API credentials. */
  protected: string[];
  /** `METHOD /full/path` added outside the API's auth. */
  open: string[];
}

const LORA_EXTENSION = ['GET /sdapi/v1/loras', 'POST /sdapi/v1/refresh-loras'];
const SIDETRAIN_EXTENSION = ['POST /sidetrain/refresh-hypernetworks'];

/** A1111 1.10.1 modules/api/api.py. */
const A1111_API = [
  'POST txt2img', 'POST img2img', 'POST extra-single-image', 'POST extra-batch-images', 'POST png-info',
  'GET progress', 'POST interrogate', 'POST interrupt', 'POST skip', 'GET options', 'POST options',
  'GET cmd-flags', 'GET samplers', 'GET schedulers', 'GET upscalers', 'GET latent-upscale-modes',
  'GET sd-models', 'GET sd-vae', 'GET hypernetworks', 'GET face-restorers', 'GET realesrgan-models',
  'GET prompt-styles', 'GET embeddings', 'POST refresh-embeddings', 'POST refresh-checkpoints',
  'POST refresh-vae', 'POST create/embedding', 'POST create/hypernetwork', 'POST train/embedding',
  'POST train/hypernetwork', 'GET memory', 'POST unload-checkpoint', 'POST reload-checkpoint',
  'GET scripts', 'GET script-info', 'GET extensions',
];

/** Forge's modules/api/api.py: A1111's less `sd-vae` and the train routes, plus `sd-modules`. */
const FORGE_API = [...A1111_API.filter((r) => !['GET sd-vae', 'POST train/embedding', 'POST train/hypernetwork'].includes(r)), 'GET sd-modules'];

export const WEBUI_ROUTES: Record<Flavour, RouteTable> = {
  a1111: { protected: A1111_API, open: [...LORA_EXTENSION, ...SIDETRAIN_EXTENSION] },
  forge: { protected: FORGE_API, open: [...LORA_EXTENSION, ...SIDETRAIN_EXTENSION] },
  sdnext: {
    protected: [
      'GET motd', 'GET log', 'POST log', 'GET start', 'GET version', 'GET torch', 'GET status',
      'GET platform', 'GET progress', 'GET history', 'POST interrupt', 'POST skip', 'POST shutdown',
      'POST restart', 'GET memory', 'GET cmd-flags', 'GET gpu', 'GET gpu-smi', 'POST txt2img',
      'POST img2img', 'POST control', 'POST process', 'POST extra-single-image', 'POST process-batch',
      'POST extra-batch-images', 'POST preprocess', 'POST mask', 'POST detect', 'POST detail',
      'POST prompt-enhance', 'GET scripts', 'GET script-info', 'GET preprocessors', 'GET masking',
      'GET samplers', 'GET schedulers', 'GET upscalers', 'GET sd-models', 'GET controlnets',
      'GET control-models', 'GET control-modes', 'GET face-restorers', 'GET detailers', 'GET prompt-styles',
      'GET embeddings', 'GET ip-adapters', 'GET wildcards', 'GET sd-vae', 'GET extensions',
      'GET extra-networks', 'GET extra-network-detail', 'GET extra-network-details', 'GET unets', 'GET file',
      'DELETE delete-image', 'DELETE delete-file', 'GET png-info', 'POST png-info', 'GET checkpoint',
      'POST checkpoint', 'POST refresh-checkpoints', 'POST unload-checkpoint', 'POST reload-checkpoint',
      'POST lock-checkpoint', 'POST refresh-vae', 'POST refresh-unets', 'GET latents', 'POST latents',
      'GET modules', 'GET sampler', 'GET options', 'POST options', 'GET options-info', 'GET openclip',
      'POST caption', 'POST openclip', 'POST vqa', 'POST analyze', 'GET vqa/models', 'GET vqa/prompts',
      'POST tagger', 'GET tagger/models', 'GET lora', 'GET loras', 'POST refresh-loras', 'GET loaded-loras',
      'GET autocomplete', 'GET autocomplete/remote', 'GET autocomplete/{name}',
      'POST autocomplete/{name}/download', 'DELETE autocomplete/{name}', 'GET browser/folders',
      'GET browser/thumb', 'GET browser/files', 'POST nudenet', 'POST prompt-lang', 'POST image-guard',
      'POST prompt-banned', 'GET xyz-grid', 'GET civitai', 'POST civitai', 'POST rembg', 'POST upload',
      'PUT upload',
    ],
    open: SIDETRAIN_EXTENSION,
  },
};

export interface WebuiRoute {
  method: string;
  /** Express form: `{name}` path parameters as `:name`. */
  path: string;
  protected: boolean;
}

/** Every route `flavour` serves. */
export function routesOf(flavour: Flavour): WebuiRoute[] {
  const split = (r: string, prefix: string, prot: boolean): WebuiRoute => {
    const [method, path] = r.split(' ');
    return { method, path: (prefix + path).replace(/\{(\w+)\}/g, ':$1'), protected: prot };
  };
  const t = WEBUI_ROUTES[flavour];
  return [...t.protected.map((r) => split(r, '/sdapi/v1/', true)), ...t.open.map((r) => split(r, '', false))];
}
