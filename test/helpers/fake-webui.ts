/**
 * @file A stand-in webui for tests: the `/sdapi/v1/*` routes sidetrain uses (A1111 shapes), plus
 * the extension's `/sidetrain/refresh-hypernetworks`, recording every call; txt2img answers a 1×1
 * PNG and records its body with what was registered at that moment. A refresh rescans its
 * folders like the webui does; names in `skip` are reported under `skipped`.
 */
import { readdirSync, existsSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import type { Server } from 'node:http';
import express from 'express';

export interface FakeWebuiOptions {
  dirs: { embeddings: string; hypernetworks: string; checkpoints: string; lora: string };
  /** Embedding names the webui "skips" (wrong vector size for the loaded model). */
  skip?: string[];
  /** Fail this many refresh calls with 500 before succeeding. */
  failRefreshes?: number;
  /** `user:pass` required (webui --api-auth). */
  auth?: string;
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
  app.use((req, res, next) => {
    fake.calls.push({ method: req.method, path: req.path });
    if (opts.auth) {
      const want = `Basic ${Buffer.from(opts.auth).toString('base64')}`;
      if (req.headers.authorization !== want) return void res.status(401).json({ detail: 'Incorrect username or password' });
    }
    next();
  });
  app.use(express.json({ limit: '1mb' }));
  const refresh = (fn: () => void) => (_req: express.Request, res: express.Response) => {
    if (failures > 0) {
      failures--;
      return void res.status(500).json({ error: 'busy' });
    }
    fn();
    res.json(null);
  };
  app.get('/sdapi/v1/cmd-flags', (_req, res) =>
    void res.json({ embeddings_dir: opts.dirs.embeddings, hypernetwork_dir: opts.dirs.hypernetworks, ckpt_dir: opts.dirs.checkpoints, lora_dir: opts.dirs.lora, data_dir: '/nonexistent' }),
  );
  app.post('/sdapi/v1/refresh-embeddings', refresh(() => (state.embeddings = stems(opts.dirs.embeddings, EMBEDDING_EXTS))));
  app.post('/sdapi/v1/refresh-checkpoints', refresh(() => (state.models = stems(opts.dirs.checkpoints, ['.safetensors', '.ckpt']))));
  app.post('/sdapi/v1/refresh-loras', refresh(() => (state.loras = stems(opts.dirs.lora, ['.safetensors']))));
  app.post('/sidetrain/refresh-hypernetworks', refresh(() => (state.hypernetworks = stems(opts.dirs.hypernetworks, HYPERNETWORK_EXTS))));
  app.get('/sdapi/v1/embeddings', (_req, res) => {
    const loaded: Record<string, unknown> = {};
    const skipped: Record<string, unknown> = {};
    for (const n of state.embeddings) (opts.skip?.includes(n) ? skipped : loaded)[n] = { step: 1, sd_checkpoint: null, sd_checkpoint_name: null, shape: 768, vectors: 1 };
    res.json({ loaded, skipped });
  });
  app.get('/sdapi/v1/hypernetworks', (_req, res) => void res.json(state.hypernetworks.map((name) => ({ name, path: `${opts.dirs.hypernetworks}/${name}.pt` }))));
  app.get('/sdapi/v1/loras', (_req, res) => void res.json(state.loras.map((name) => ({ name, alias: name, path: `${opts.dirs.lora}/${name}.safetensors` }))));
  app.get('/sdapi/v1/sd-models', (_req, res) =>
    void res.json(state.models.map((m) => ({ title: `${m}.safetensors [0123456789]`, model_name: m, hash: '0123456789', filename: `${opts.dirs.checkpoints}/${m}.safetensors` }))),
  );
  app.post('/sdapi/v1/unload-checkpoint', (_req, res) => void res.json(null));
  app.post('/sdapi/v1/reload-checkpoint', (_req, res) => void res.json(null));
  app.post('/sdapi/v1/txt2img', (req, res) => {
    fake.txt2img.push({ payload: req.body, embeddings: [...state.embeddings], hypernetworks: [...state.hypernetworks], files: ls(opts.dirs.embeddings).concat(ls(opts.dirs.hypernetworks)) });
    if (fake.hangTxt2img) return;
    if (fake.failTxt2img) return void res.status(500).json({ error: 'OutOfMemoryError', detail: 'CUDA out of memory' });
    res.json({ images: [TINY_PNG], parameters: req.body, info: '{}' });
  });
  app.get('/sdapi/v1/progress', (_req, res) =>
    void res.json({ progress: fake.generating ? 0.5 : 0, eta_relative: 0, state: { job: fake.generating ? 'txt2img' : '', job_count: fake.generating ? 1 : 0 } }),
  );
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
