/**
 * @file `sidetrain serve` (= `npm start`): the HTTP API, WebSocket progress and training page.
 * Flags override the environment (SIDETRAIN_HOST/PORT/TOKEN/WEBUI_URL/WEBUI_DIR/WEBUI_AUTH/
 * STATE_DIR/WEBUI_PREVIEWS/EMBEDDINGS_DIR/HYPERNETWORK_DIR/CKPT_DIR/LORA_DIR). The webui extension starts this
 * command and passes only the flags `serve --help` lists (extension/sidetrain_ext/launcher.py),
 * so a flag's name in the help text is part of the contract.
 */
import type { Command } from 'commander';
import { checkWebuiDir, fromEnv, onOff, DEFAULT_HOST, DEFAULT_PORT, FOLDER_SETTINGS, type ServerOptions } from '../config.ts';
import { parseAuth, startServer } from '../main.ts';

const list = (v: string, prev: string[] = []) => [...prev, ...v.split(',').map((s) => s.trim()).filter(Boolean)];

/** commander's camelCase key of a `--kebab-case` flag. */
const keyOf = (flag: string) => flag.slice(2).replace(/-([a-z])/g, (_m, c: string) => c.toUpperCase());

/** Parsed `serve` flags + environment → server options (flags win, folder by folder too). */
export function serveOptions(o: Record<string, unknown>, env: NodeJS.ProcessEnv = process.env): ServerOptions {
  const fromEnvironment = fromEnv(env);
  const folders: ServerOptions['folders'] = { ...fromEnvironment.folders };
  for (const { folder, flag } of FOLDER_SETTINGS) {
    const value = o[keyOf(flag)];
    if (typeof value === 'string' && value) folders[folder] = value;
  }
  const opts: ServerOptions = {
    ...fromEnvironment,
    ...(o.host ? { host: o.host as string } : {}),
    ...(o.port !== undefined ? { port: o.port as number } : {}),
    ...(o.stateDir ? { stateDir: o.stateDir as string } : {}),
    ...(o.webuiUrl ? { webuiUrl: o.webuiUrl as string } : {}),
    ...(o.webuiDir ? { webuiDir: o.webuiDir as string } : {}),
    ...(o.apiAuth ? { webuiAuth: o.apiAuth as string } : {}),
    ...(o.webuiPreviews !== undefined ? { webuiPreviews: onOff('--webui-previews', String(o.webuiPreviews)) } : {}),
    ...(Object.keys(folders).length ? { folders } : {}),
    vram: (o.vram ?? 'off') as ServerOptions['vram'],
    concurrency: (o.concurrency ?? 1) as number,
    allowedHosts: o.allowedHosts as string[] | undefined,
    allowedOrigins: o.allowedOrigins as string[] | undefined,
    methodsModule: o.methods as string | undefined,
    maxOldSpaceMb: o.maxMemory as number | undefined,
    logLevel: (o.logLevel ?? 'info') as string,
  };
  parseAuth(opts.webuiAuth); // a malformed value is refused here, not at the first webui call
  if (!['off', 'unload', 'pause'].includes(opts.vram!)) throw new Error(`--vram: expected off, unload or pause, got '${opts.vram}'`);
  return opts;
}

export function registerServe(program: Command): void {
  const serve = program
    .command('serve')
    .description(`serve the HTTP API and training page (default ${DEFAULT_HOST}:${DEFAULT_PORT})`)
    .option('--host <host>', 'address to bind (keep 127.0.0.1 unless you set a token)')
    .option('--port <port>', 'port', (v) => Number(v))
    .option('--state-dir <dir>', 'where jobs are stored (default ~/.sidetrain)')
    .option('--webui-url <url>', 'a running webui, e.g. http://127.0.0.1:7860 (folders and refreshes)')
    .option('--webui-dir <dir>', "the webui's folder (A1111/Forge: embeddings/, models/hypernetworks, ...; SD.Next: models/embeddings)");
  for (const { flag, env, what } of FOLDER_SETTINGS) {
    serve.option(`${flag} <dir>`, `where ${what} go (overrides the webui's folders; env ${env})`);
  }
  serve
    .option('--api-auth <user:pass>', "credentials of a webui started with --api-auth (SD.Next: --auth); other users can read a command line: SIDETRAIN_WEBUI_AUTH is safer")
    .option('--vram <mode>', "off | unload (free the webui's model during a job) | pause (pause while the webui generates)", 'off')
    .option('--webui-previews <on|off>', "render each snapshot with the webui's txt2img when it is up (default on; env SIDETRAIN_WEBUI_PREVIEWS)")
    .option('--concurrency <n>', 'jobs run at the same time', (v) => Number(v), 1)
    .option('--allowed-hosts <names>', 'more Host names to accept (comma-separated)', list)
    .option('--allowed-origins <origins>', 'more browser origins to accept (comma-separated)', list)
    .option('--max-memory <mb>', 'V8 heap limit of each job worker (MB)', (v) => Number(v))
    .option('--methods <module>', 'methods registry module (default trainers/methods/index.ts)')
    .option('--log-level <level>', 'pino log level', 'info')
    .action(async (o: Record<string, unknown>) => {
      const options = serveOptions(o);
      // a mistyped folder would send every output into a new, unseen folder: refused before the server starts
      if (options.webuiDir) options.webuiDir = await checkWebuiDir(options.webuiDir, o.webuiDir ? '--webui-dir' : 'SIDETRAIN_WEBUI_DIR');
      const running = await startServer(options);
      const stop = (signal: string) => {
        running.log.info({ signal }, 'shutting down');
        void running.close().then(() => process.exit(0));
      };
      process.once('SIGINT', () => stop('SIGINT'));
      process.once('SIGTERM', () => stop('SIGTERM'));
    });
}
