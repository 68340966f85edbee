/**
 * @file A stand-in webui for tests, one per flavour (A1111 1.10.1 by default, Forge, SD.Next): it
 * serves exactly the routes that flavour registers (webui-routes.ts; any other answers 404) and
 * models the ones sidetrain uses in that flavour's shapes, recording every call; the rest answer
 * an empty body. txt2img answers a 1×1 PNG and records its body with what was registered at that
 * moment. A refresh rescans its folders like the webui does (SD.Next has no embedding refresh: it
 * reads them when it loads a model, i.e. on reload-checkpoint); names in `skip` are reported under
 * `skipped`. With `auth`, protected routes answer 401 without those Basic credentials.
 */
import { readdirSync, existsSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import type { Server } from 'node:http';
import express from 'express';
import type { Flavour } from '../../bridge/webui-flavours.ts';
import { routesOf } from './webui-routes.ts';

export interface FakeWebuiOptions {
  dirs: { embeddings: string; hypernetworks: string; checkpoints: string; lora: string };
  /** Embedding names the webui "skips" (wrong vector size for the loaded model). */
  skip?: string[];
  /** Fail this many refresh calls with 500 before succeeding. */
  failRefreshes?: number;
  /** `user:pass` required on the protected routes (A1111/Forge --api-auth, SD.Next --auth). */
  auth?: string;
  /** Which webui to stand in for (default a1111). */
  flavour?: Flavour;
}

/** One txt2img call: its body and what the webui had registered at that moment. */
export interface Txt2imgCall {
  payload: Record<string, any>;
  embeddings: string[];
  hypernetworks: string[];
  /** Files in the embeddings and hypernetworks folders at that moment. */
  files: string[];
}

export interface FakeWebui {
  url: string;
  calls: { method: string; path: string }[];
  /** Make /sdapi/v1/progress report a running generation. */
  generating: boolean;
  txt2img: Txt2imgCall[];
  /** Answer txt2img with a 500 (a webui that fails a generation). */
  failTxt2img: boolean;
  /** Never answer txt2img (a webui stuck in a generation). */
  hangTxt2img: boolean;
  close(): Promise<void>;
}

/** 1×1 PNG: what txt2img returns. */
export const TINY_PNG = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==';

// The webui's own, plus .json: the stub methods' snapshots (copied in for webui previews).
const EMBEDDING_EXTS = ['.pt', '.safetensors', '.json'];
const HYPERNETWORK_EXTS = ['.pt', '.json'];
const ls = (dir: string) => (existsSync(dir) ? readdirSync(dir) : []);
const stems = (dir: string, exts: string[]) =>
  existsSync(dir) ? readdirSync(dir).filter((f) => exts.some((e) => f.endsWith(e))).map((f) => f.slice(0, f.lastIndexOf('.'))) : [];

export async function startFakeWebui(opts: FakeWebuiOptions): Promise<FakeWebui> {
  const app = express();
  const state = { embeddings: [] as string[], hypernetworks: [] as string[], loras: [] as string[], models: [] as string[] };
  let failures = opts.failRefreshes ?? 0;
  const fake: FakeWebui = { url: '', calls: [], generating: false, txt2img: [], failTxt2img: false, hangTxt2img: false, close: async () => {} };
  const flavour = opts.flavour ?? 'a1111';
  const sdnext = flavour === 'sdnext';
  app.use((req, _res, next) => {
    fake.calls.push({ method: req.method, path: req.path });
    next();
  });
  app.use(express.json({ limit: '1mb' }));
  const ok = (res: express.Response) => void (sdnext ? res.status(204).end() : res.json(null));
  const refresh = (fn: () => void) => (_req: express.Request, res: express.Response) => {
    if (failures > 0) {
      failures--;
      return void res.status(500).json({ error: 'busy' });
    }
    fn();
    ok(res);
  };
  const rescanEmbeddings = () => (state.embeddings = stems(opts.dirs.embeddings, EMBEDDING_EXTS));
  type Handler = (req: express.Request, res: express.Response) => void;
  const handlers: Record<string, Handler> = {
    'GET /sdapi/v1/cmd-flags': (_req, res) =>
      void res.json({ embeddings_dir: opts.dirs.embeddings, hypernetwork_dir: opts.dirs.hypernetworks, ckpt_dir: opts.dirs.checkpoints, lora_dir: opts.dirs.lora, data_dir: '/nonexistent' }),
    'POST /sdapi/v1/refresh-embeddings': refresh(rescanEmbeddings),
    'POST /sdapi/v1/refresh-checkpoints': refresh(() => (state.models = stems(opts.dirs.checkpoints, ['.safetensors', '.ckpt']))),
    'POST /sdapi/v1/refresh-loras': refresh(() => (state.loras = stems(opts.dirs.lora, ['.safetensors']))),
    'POST /sidetrain/refresh-hypernetworks': sdnext
      ? (_req, res) => void res.status(501).json({ error: 'this webui has no hypernetwork list to reload' })
      : refresh(() => (state.hypernetworks = stems(opts.dirs.hypernetworks, HYPERNETWORK_EXTS))),
    'GET /sdapi/v1/embeddings': (_req, res) => {
      const names = (skipped: boolean) => state.embeddings.filter((n) => (opts.skip?.includes(n) ?? false) === skipped);
      // SD.Next (modules/api/endpoints.py get_embeddings): name lists; A1111/Forge: name → details
      if (sdnext) return void res.json({ loaded: names(false), skipped: names(true) });
      const detail = { step: 1, sd_checkpoint: null, sd_checkpoint_name: null, shape: 768, vectors: 1 };
      res.json({ loaded: Object.fromEntries(names(false).map((n) => [n, detail])), skipped: Object.fromEntries(names(true).map((n) => [n, detail])) });
    },
    'GET /sdapi/v1/hypernetworks': (_req, res) => void res.json(state.hypernetworks.map((name) => ({ name, path: `${opts.dirs.hypernetworks}/${name}.pt` }))),
    'GET /sdapi/v1/loras': (_req, res) => void res.json(state.loras.map((name) => ({ name, alias: name, path: `${opts.dirs.lora}/${name}.safetensors` }))),
    'GET /sdapi/v1/sd-models': (_req, res) =>
      void res.json(state.models.map((m) => ({ title: `${m}.safetensors [0123456789]`, model_name: m, hash: '0123456789', filename: `${opts.dirs.checkpoints}/${m}.safetensors` }))),
    'POST /sdapi/v1/unload-checkpoint': (_req, res) => ok(res),
    // SD.Next loads the embeddings folder with the model (modules/sd_models.py load_diffuser)
    'POST /sdapi/v1/reload-checkpoint': (_req, res) => {
      if (sdnext) rescanEmbeddings();
      ok(res);
    },
    'POST /sdapi/v1/txt2img': (req, res) => {
      fake.txt2img.push({ payload: req.body, embeddings: [...state.embeddings], hypernetworks: [...state.hypernetworks], files: ls(opts.dirs.embeddings).concat(ls(opts.dirs.hypernetworks)) });
      if (fake.hangTxt2img) return;
      if (fake.failTxt2img) return void res.status(500).json({ error: 'OutOfMemoryError', detail: 'CUDA out of memory' });
      res.json({ images: [TINY_PNG], parameters: req.body, info: '{}' });
    },
    'GET /sdapi/v1/progress': (_req, res) =>
      void res.json({ progress: fake.generating ? 0.5 : 0, eta_relative: 0, state: { job: fake.generating ? 'txt2img' : '', job_count: fake.generating ? 1 : 0 } }),
  };
  const want = opts.auth ? `Basic ${Buffer.from(opts.auth).toString('base64')}` : undefined;
  for (const route of routesOf(flavour)) {
    const handle = handlers[`${route.method} ${route.path}`] ?? ((_req: express.Request, res: express.Response) => void res.json({}));
    app[route.method.toLowerCase() as 'get' | 'post' | 'put' | 'delete'](route.path, (req, res) => {
      // FastAPI's HTTPBasic dependency on the routes the webui's Api class adds
      if (route.protected && want && req.headers.authorization !== want) {
        return void res.status(401).set('WWW-Authenticate', 'Basic').json({ detail: 'Incorrect username or password' });
      }
      handle(req, res);
    });
  }
  app.use((_req, res) => void res.status(404).json({ detail: 'Not Found' }));
  const server: Server = await new Promise((r) => {
    const s = app.listen(0, '127.0.0.1', () => r(s));
  });
  fake.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  fake.close = () => new Promise((r) => {
    server.closeAllConnections();
    server.close(() => r());
  });
  return fake;
}
