/**
 * @file `npm start` / `sidetrain serve`: build everything from options, bind (127.0.0.1:7862 by
 * default), attach the WebSocket, and shut down gracefully (running jobs are cancelled and
 * save; queued ones stay on disk as interrupted). Tests call startServer({port: 0, ...}).
 */
import { createServer, type Server } from 'node:http';
import { readFileSync } from 'node:fs';
import { isAbsolute, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { pino, type Logger } from 'pino';
import { addSchema } from '../schemas/index.ts';
import type { MethodEntry } from '../trainers/job.ts';
import { createApp } from './app.ts';
import { DEFAULT_HOST, DEFAULT_PORT, REPO_DIR, folderResolver, stateDirOf, type ServerOptions } from './config.ts';
import { JobManager } from './jobs.ts';
import type { ServerContext } from './routes.ts';
import type { SecurityOptions } from './security.ts';
import { JobStore } from './store.ts';
import { WebuiClient } from './webui.ts';
import { attachEvents } from './ws.ts';

export interface RunningServer {
  url: string;
  port: number;
  server: Server;
  manager: JobManager;
  log: Logger;
  close(): Promise<void>;
}

const VERSION = (JSON.parse(readFileSync(resolve(REPO_DIR, 'package.json'), 'utf8')) as { version: string }).version;

/**
 * Import the methods registry (never TF.js: entries load lazily). A registry may also export
 * `schemas` (name → JSON Schema) for schemas that are not files in schemas/ (test stubs).
 */
export async function loadMethods(modulePath: string): Promise<Record<string, MethodEntry>> {
  const mod = (await import(pathToFileURL(modulePath).href)) as { methods: Record<string, MethodEntry>; schemas?: Record<string, Record<string, unknown>> };
  for (const [name, schema] of Object.entries(mod.schemas ?? {})) addSchema(name, schema);
  return mod.methods;
}

/** `user:pass` (the webui's --api-auth / SD.Next --auth form) → Basic credentials; the value is never echoed. */
export function parseAuth(auth: string | undefined): { username: string; password: string } | undefined {
  if (!auth) return undefined;
  const i = auth.indexOf(':');
  if (i <= 0) throw new Error('--api-auth / SIDETRAIN_WEBUI_AUTH: expected user:pass, as given to the webui\'s --api-auth (SD.Next: --auth)');
  return { username: auth.slice(0, i), password: auth.slice(i + 1) };
}

export async function startServer(opts: ServerOptions = {}, logger?: Logger): Promise<RunningServer> {
  const log = logger ?? pino({ level: opts.logLevel ?? 'info', base: { name: 'sidetrain' } });
  const host = opts.host ?? DEFAULT_HOST;
  const methodsModule = resolve(REPO_DIR, opts.methodsModule ?? 'trainers/methods/index.ts');
  const methods = await loadMethods(isAbsolute(methodsModule) ? methodsModule : resolve(methodsModule));
  const webui = new WebuiClient({
    url: opts.webuiUrl, auth: parseAuth(opts.webuiAuth), retries: opts.webuiRetries, retryDelayMs: opts.webuiRetryDelayMs, timeoutMs: opts.webuiTimeoutMs,
  });
  const folders = folderResolver(opts, webui);
  const manager = new JobManager({
    store: new JobStore(stateDirOf(opts)), methods, folders, webui, vram: opts.vram, pausePollMs: opts.pausePollMs, concurrency: opts.concurrency, log,
    webuiPreviews: opts.webuiPreviews, lockWaitMs: opts.lockWaitMs,
    worker: {
      methodsModule, cancelGraceMs: opts.cancelGraceMs, killGraceMs: opts.killGraceMs, stepIntervalMs: opts.stepIntervalMs, maxOldSpaceMb: opts.maxOldSpaceMb,
    },
  });
  const restored = manager.init();
  const security: SecurityOptions = {
    token: opts.token || undefined, host, allowedHosts: opts.allowedHosts,
    allowedOrigins: [...(opts.allowedOrigins ?? []), ...(webui.origin ? [webui.origin] : [])],
  };
  const ctx: ServerContext = { manager, webui, folders, version: VERSION };
  const server = createServer(createApp(ctx, { security, bodyLimit: opts.bodyLimit, uiDir: opts.uiDir }));
  const wss = attachEvents(server, manager, security);
  await new Promise<void>((res, rej) => {
    server.once('error', rej);
    server.listen(opts.port ?? DEFAULT_PORT, host, () => res());
  });
  const port = (server.address() as { port: number }).port;
  const url = `http://${host.includes(':') ? `[${host}]` : host}:${port}`;
  if (!['127.0.0.1', 'localhost', '::1'].includes(host) && !security.token) {
    log.warn({ host }, 'listening beyond this machine without SIDETRAIN_TOKEN: anyone who can reach it can start jobs');
  }
  log.info({ url, jobs: restored.length, methods: Object.keys(methods), webui: webui.url ?? null }, 'sidetrain server listening');
  let closing: Promise<void> | undefined;
  const close = () =>
    (closing ??= (async () => {
      for (const c of wss.clients) c.terminate();
      wss.close();
      await manager.shutdown();
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
    })());
  return { url, port, server, manager, log, close };
}
