/**
 * @file Start the real sidetrain server on a random 127.0.0.1 port for tests: temp state and
 * output folders, the stub methods registry, a silent logger; plus small HTTP and WebSocket
 * helpers (`api()`, `events()` collecting messages, `waitFor`).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { pino } from 'pino';
import { WebSocket } from 'ws';
import type { ServerOptions } from '../../bridge/config.ts';
import { startServer, type RunningServer } from '../../bridge/main.ts';

export const STUB_METHODS = fileURLToPath(new URL('./methods-stub.ts', import.meta.url));

export interface TestDirs {
  root: string;
  state: string;
  embeddings: string;
  hypernetworks: string;
  checkpoints: string;
  lora: string;
  logs: string;
  images: string;
}

export function makeDirs(root = mkdtempSync(join(tmpdir(), 'sidetrain-api-'))): TestDirs {
  const d = (n: string) => {
    const p = join(root, n);
    mkdirSync(p, { recursive: true });
    return p;
  };
  const dirs = { root, state: d('state'), embeddings: d('embeddings'), hypernetworks: d('hypernetworks'), checkpoints: d('checkpoints'), lora: d('lora'), logs: d('logs'), images: d('images') };
  writeFileSync(join(dirs.images, 'a.png'), 'x');
  return dirs;
}

export interface TestServer {
  srv: RunningServer;
  dirs: TestDirs;
  base: string;
  api(path: string, init?: RequestInit & { json?: unknown }): Promise<{ status: number; body: any; headers: Headers }>;
  close(opts?: { keepDirs?: boolean }): Promise<void>;
}

export async function startTestServer(extra: Partial<ServerOptions> = {}, dirs = makeDirs()): Promise<TestServer> {
  const srv = await startServer(
    {
      port: 0,
      methodsModule: STUB_METHODS,
      stateDir: dirs.state,
      folders: { embeddings: dirs.embeddings, hypernetworks: dirs.hypernetworks, checkpoints: dirs.checkpoints, lora: dirs.lora, logs: dirs.logs },
      cancelGraceMs: 2000,
      killGraceMs: 1000,
      stepIntervalMs: 0,
      webuiRetryDelayMs: 20,
      webuiTimeoutMs: 1000,
      ...extra,
    },
    pino({ level: 'silent' }),
  );
  const api: TestServer['api'] = async (path, init = {}) => {
    const headers = new Headers(init.headers);
    if (extra.token && !headers.has('authorization')) headers.set('authorization', `Bearer ${extra.token}`);
    let body = init.body;
    if (init.json !== undefined) {
      headers.set('content-type', 'application/json');
      body = JSON.stringify(init.json);
    }
    const res = await fetch(srv.url + path, { ...init, headers, body });
    const text = await res.text();
    let parsed: unknown = text;
    try {
      parsed = JSON.parse(text);
    } catch {
      /* text body */
    }
    return { status: res.status, body: parsed, headers: res.headers };
  };
  return {
    srv,
    dirs,
    base: srv.url,
    api,
    close: async (o = {}) => {
      await srv.close();
      if (!o.keepDirs) rmSync(dirs.root, { recursive: true, force: true });
    },
  };
}

export interface EventStream {
  ws: WebSocket;
  messages: any[];
  waitFor(pred: (m: any) => boolean, timeoutMs?: number): Promise<any>;
  close(): void;
}

/** Connect to a job's (or all jobs') event stream and collect every message. */
export async function events(base: string, jobId?: string, headers: Record<string, string> = {}, protocols?: string[]): Promise<EventStream> {
  const url = `${base.replace(/^http/, 'ws')}${jobId ? `/api/jobs/${jobId}/events` : '/api/events'}`;
  const ws = new WebSocket(url, protocols ?? [], { headers });
  const messages: any[] = [];
  const waiters: { pred: (m: any) => boolean; resolve: (m: any) => void }[] = [];
  ws.on('message', (data) => {
    const m = JSON.parse(String(data));
    messages.push(m);
    for (const w of [...waiters]) if (w.pred(m)) {
      waiters.splice(waiters.indexOf(w), 1);
      w.resolve(m);
    }
  });
  await new Promise<void>((resolve, reject) => {
    ws.once('open', () => resolve());
    ws.once('error', reject);
    ws.once('unexpected-response', (_req, res) => reject(new Error(`ws refused: ${res.statusCode}`)));
  });
  return {
    ws,
    messages,
    waitFor: (pred, timeoutMs = 10_000) => {
      const found = messages.find(pred);
      if (found) return Promise.resolve(found);
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`timed out waiting; got types ${messages.map((m) => m.type).join(',')}`)), timeoutMs);
        waiters.push({ pred, resolve: (m) => (clearTimeout(t), resolve(m)) });
      });
    },
    close: () => ws.close(),
  };
}

/** Poll GET /api/jobs/:id until `pred(job)`. */
export async function waitJob(t: TestServer, id: string, pred: (job: any) => boolean, timeoutMs = 15_000): Promise<any> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const { body } = await t.api(`/api/jobs/${id}`);
    if (pred(body)) return body;
    if (Date.now() > end) throw new Error(`timed out; job is ${JSON.stringify(body).slice(0, 400)}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** `sidetrain serve …` as a real process on a free port (for kill/restart tests): the process and its base URL. */
export async function spawnServe(args: string[]): Promise<{ child: ChildProcess; base: string }> {
  const bin = fileURLToPath(new URL('../../bin/sidetrain.mjs', import.meta.url));
  const child = spawn(process.execPath, [bin, 'serve', '--port', '0', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (b) => (stderr += b));
  const base = await new Promise<string>((resolve, reject) => {
    let buf = '';
    child.stdout!.on('data', (b: Buffer) => {
      buf += b;
      const m = /"url":"(http:\/\/127\.0\.0\.1:\d+)"/.exec(buf);
      if (m) resolve(m[1]!);
    });
    child.on('exit', (code) => reject(new Error(`serve exited ${code}: ${stderr}`)));
  });
  return { child, base };
}
