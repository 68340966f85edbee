/**
 * @file `sidetrain serve` (= `npm start`): the HTTP API, WebSocket progress and training page.
 * Flags override the environment (SIDETRAIN_HOST/PORT/TOKEN/WEBUI_URL/WEBUI_DIR/STATE_DIR).
 */
import type { Command } from 'commander';
import { fromEnv, DEFAULT_HOST, DEFAULT_PORT, type ServerOptions } from '../config.ts';
import { startServer } from '../main.ts';

const list = (v: string, prev: string[] = []) => [...prev, ...v.split(',').map((s) => s.trim()).filter(Boolean)];

export function registerServe(program: Command): void {
  program
    .command('serve')
    .description(`serve the HTTP API and training page (default ${DEFAULT_HOST}:${DEFAULT_PORT})`)
    .option('--host <host>', 'address to bind (keep 127.0.0.1 unless you set a token)')
    .option('--port <port>', 'port', (v) => Number(v))
    .option('--state-dir <dir>', 'where jobs are stored (default ~/.sidetrain)')
    .option('--webui-url <url>', 'a running webui, e.g. http://127.0.0.1:7860 (folders and refreshes)')
    .option('--webui-dir <dir>', "the webui's folder (A1111 layout: embeddings/, models/hypernetworks, ...)")
    .option('--api-auth <user:pass>', "credentials of a webui started with --api-auth")
    .option('--vram <mode>', "off | unload (free the webui's model during a job) | pause (pause while the webui generates)", 'off')
    .option('--concurrency <n>', 'jobs run at the same time', (v) => Number(v), 1)
    .option('--allowed-hosts <names>', 'more Host names to accept (comma-separated)', list)
    .option('--allowed-origins <origins>', 'more browser origins to accept (comma-separated)', list)
    .option('--max-memory <mb>', 'V8 heap limit of each job worker (MB)', (v) => Number(v))
    .option('--methods <module>', 'methods registry module (default trainers/methods.ts)')
    .option('--log-level <level>', 'pino log level', 'info')
    .action(async (o: Record<string, unknown>) => {
      const env = fromEnv();
      const opts: ServerOptions = {
        ...env,
        ...(o.host ? { host: o.host as string } : {}),
        ...(o.port !== undefined ? { port: o.port as number } : {}),
        ...(o.stateDir ? { stateDir: o.stateDir as string } : {}),
        ...(o.webuiUrl ? { webuiUrl: o.webuiUrl as string } : {}),
        ...(o.webuiDir ? { webuiDir: o.webuiDir as string } : {}),
        ...(o.apiAuth ? { webuiAuth: o.apiAuth as string } : {}),
        vram: o.vram as ServerOptions['vram'],
        concurrency: o.concurrency as number,
        allowedHosts: o.allowedHosts as string[] | undefined,
        allowedOrigins: o.allowedOrigins as string[] | undefined,
        methodsModule: o.methods as string | undefined,
        maxOldSpaceMb: o.maxMemory as number | undefined,
        logLevel: o.logLevel as string,
      };
      if (!['off', 'unload', 'pause'].includes(opts.vram!)) throw new Error(`--vram: expected off, unload or pause, got '${opts.vram}'`);
      const running = await startServer(opts);
      const stop = (signal: string) => {
        running.log.info({ signal }, 'shutting down');
        void running.close().then(() => process.exit(0));
      };
      process.once('SIGINT', () => stop('SIGINT'));
      process.once('SIGTERM', () => stop('SIGTERM'));
    });
}
