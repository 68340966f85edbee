/**
 * @file Server configuration: defaults, environment (SIDETRAIN_HOST/PORT/TOKEN/WEBUI_URL/WEBUI_DIR/
 * WEBUI_AUTH/STATE_DIR/WEBUI_PREVIEWS and the folder variables of FOLDER_SETTINGS) and flags, and where outputs
 * go. Output folders come, in order, from explicit options (`--embeddings-dir` …), `--webui-dir`
 * (A1111 layout), a running webui's `/sdapi/v1/cmd-flags`, and finally one default root, the
 * state dir (`~/.sidetrain/{embeddings,hypernetworks,checkpoints,lora,runs}`), on every interface. Explicit folders exist because the other two
 * sources miss cases: A1111/Forge started with custom folder flags break the `--webui-dir` layout,
 * and SD.Next keeps its folders in its settings, not in cmd-flags.
 */
import { existsSync } from 'node:fs';
import { stat } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Folders } from './spec.ts';
import type { WebuiClient } from './webui.ts';

export const REPO_DIR = fileURLToPath(new URL('..', import.meta.url));

export interface ServerOptions {
  host?: string;
  /** 0 = a random free port (tests). */
  port?: number;
  token?: string;
  stateDir?: string;
  /** Module exporting `methods` (default trainers/methods/index.ts). */
  methodsModule?: string;
  concurrency?: number;
  webuiUrl?: string;
  webuiDir?: string;
  /** `user:pass` for a webui started with --api-auth. */
  webuiAuth?: string;
  webuiRetries?: number;
  webuiRetryDelayMs?: number;
  webuiTimeoutMs?: number;
  /** Explicit output folders (win over everything else). */
  folders?: Partial<Folders>;
  vram?: 'off' | 'unload' | 'pause';
  /** Render each snapshot through the webui's txt2img when it is up (default on). */
  webuiPreviews?: boolean;
  /** How long a resumed job waits for a killed server's orphan worker to exit. */
  lockWaitMs?: number;
  /** How often the 'pause' mode asks the webui whether it is generating. */
  pausePollMs?: number;
  allowedHosts?: string[];
  allowedOrigins?: string[];
  bodyLimit?: string;
  cancelGraceMs?: number;
  killGraceMs?: number;
  stepIntervalMs?: number;
  maxOldSpaceMb?: number;
  uiDir?: string;
  logLevel?: string;
}

/**
 * The explicit output folders: `serve` flag and environment variable per folder. The flag names
 * are the webui's own (A1111 `modules/cmd_args.py`), so the extension passes its values as they are.
 */
export const FOLDER_SETTINGS = [
  { folder: 'embeddings', flag: '--embeddings-dir', env: 'SIDETRAIN_EMBEDDINGS_DIR', what: 'Textual Inversion embeddings' },
  { folder: 'hypernetworks', flag: '--hypernetwork-dir', env: 'SIDETRAIN_HYPERNETWORK_DIR', what: 'hypernetworks' },
  { folder: 'checkpoints', flag: '--ckpt-dir', env: 'SIDETRAIN_CKPT_DIR', what: 'checkpoints' },
  { folder: 'lora', flag: '--lora-dir', env: 'SIDETRAIN_LORA_DIR', what: 'LoRAs' },
] as const satisfies readonly { folder: keyof Folders; flag: string; env: string; what: string }[];

export const DEFAULT_HOST = '127.0.0.1';
export const DEFAULT_PORT = 7862;

/** `on`/`off` (also true/false, 1/0) → boolean; anything else is an error naming the setting. */
export function onOff(setting: string, value: string): boolean {
  const v = value.trim().toLowerCase();
  if (['on', 'true', '1', 'yes'].includes(v)) return true;
  if (['off', 'false', '0', 'no'].includes(v)) return false;
  throw new Error(`${setting}: expected on or off, got '${value}'`);
}

/** Options from the environment; flags given on the command line override them. */
export function fromEnv(env: NodeJS.ProcessEnv = process.env): ServerOptions {
  const o: ServerOptions = {};
  if (env.SIDETRAIN_HOST) o.host = env.SIDETRAIN_HOST;
  if (env.SIDETRAIN_PORT) o.port = Number(env.SIDETRAIN_PORT);
  if (env.SIDETRAIN_TOKEN) o.token = env.SIDETRAIN_TOKEN;
  if (env.SIDETRAIN_WEBUI_URL) o.webuiUrl = env.SIDETRAIN_WEBUI_URL;
  if (env.SIDETRAIN_WEBUI_DIR) o.webuiDir = env.SIDETRAIN_WEBUI_DIR;
  if (env.SIDETRAIN_WEBUI_AUTH) o.webuiAuth = env.SIDETRAIN_WEBUI_AUTH;
  if (env.SIDETRAIN_STATE_DIR) o.stateDir = env.SIDETRAIN_STATE_DIR;
  if (env.SIDETRAIN_WEBUI_PREVIEWS) o.webuiPreviews = onOff('SIDETRAIN_WEBUI_PREVIEWS', env.SIDETRAIN_WEBUI_PREVIEWS);
  for (const { folder, env: name } of FOLDER_SETTINGS) {
    if (env[name]) (o.folders ??= {})[folder] = env[name];
  }
  return o;
}

export function stateDirOf(opts: ServerOptions): string {
  return resolve(opts.stateDir ?? join(homedir(), '.sidetrain'));
}

/**
 * SD.Next's root: its own installer beside the modules that define its settings (A1111 and Forge
 * have neither file).
 */
export function isSdNextDir(dir: string): boolean {
  return existsSync(join(dir, 'installer.py')) && existsSync(join(dir, 'modules', 'ui_definitions.py'));
}

/**
 * The webui's folder layout under its root: A1111's (Forge shares it), or SD.Next's, which keeps
 * embeddings under models/ too (modules/ui_definitions.py: `embeddings_dir` = models/embeddings).
 */
export function webuiLayout(dir: string): Partial<Folders> {
  return {
    embeddings: isSdNextDir(dir) ? join(dir, 'models', 'embeddings') : join(dir, 'embeddings'),
    hypernetworks: join(dir, 'models', 'hypernetworks'),
    checkpoints: join(dir, 'models', 'Stable-diffusion'),
    lora: join(dir, 'models', 'Lora'),
  };
}

/** Names that tell a webui's folder (A1111, Forge, SD.Next) from any other. */
const WEBUI_MARKS = ['webui.py', 'launch.py', 'webui.sh', 'webui.bat', 'webui-user.sh', 'webui-user.bat', 'models', 'extensions', 'embeddings'];

/**
 * `--webui-dir` checked before anything runs: it must exist and look like a webui, else an error
 * naming `flag` (a typo would otherwise send every output into a new, unseen folder). Returns it absolute.
 */
export async function checkWebuiDir(dir: string, flag: string): Promise<string> {
  const abs = resolve(dir);
  const st = await stat(abs).catch(() => undefined);
  if (!st) throw new Error(`${flag} '${dir}' does not exist: give the folder the webui is installed in`);
  if (!st.isDirectory()) throw new Error(`${flag} '${dir}' is not a folder`);
  const marks = await Promise.all(WEBUI_MARKS.map((m) => stat(join(abs, m)).then(() => true, () => false)));
  if (!marks.some(Boolean)) throw new Error(`${flag} '${dir}' does not look like a webui folder (none of ${WEBUI_MARKS.slice(0, 2).join(', ')}, models/, extensions/ in it)`);
  return abs;
}

const DISCOVERY_TTL_MS = 30_000;

/** Output folders now; `webuiDir` (a job's own, already checked) stands in for the configured one. */
export type FolderSource = (webuiDir?: string) => Promise<Folders>;

/** Folders now: explicit → --webui-dir (or the job's) → running webui (cached 30 s) → sidetrain's defaults. */
export function folderResolver(opts: ServerOptions, webui: WebuiClient): FolderSource {
  const state = stateDirOf(opts);
  // one root for everything when no webui is known: the clone's folders are no place for a user's outputs
  const defaults: Folders = {
    embeddings: join(state, 'embeddings'),
    hypernetworks: join(state, 'hypernetworks'),
    checkpoints: join(state, 'checkpoints'),
    lora: join(state, 'lora'),
    logs: join(state, 'runs'),
  };
  let cached: { at: number; dirs: Partial<Folders> } | undefined;
  const discover = async (): Promise<Partial<Folders>> => {
    if (!webui.configured || opts.webuiDir) return {};
    if (cached && Date.now() - cached.at < DISCOVERY_TTL_MS) return cached.dirs;
    const d = await webui.dirs();
    const dirs: Partial<Folders> = {};
    for (const [k, v] of Object.entries({ embeddings: d?.embeddings, hypernetworks: d?.hypernetworks, checkpoints: d?.checkpoints, lora: d?.lora })) {
      if (v) dirs[k as keyof Folders] = v;
    }
    // Only cache an answer: a webui that is down now may be up at the next job.
    if (d) cached = { at: Date.now(), dirs };
    return dirs;
  };
  return async (jobWebuiDir?: string) => {
    const webuiDir = jobWebuiDir ?? opts.webuiDir;
    const merged = { ...defaults, ...(jobWebuiDir ? {} : await discover()), ...(webuiDir ? webuiLayout(webuiDir) : {}), ...opts.folders };
    return Object.fromEntries(Object.entries(merged).map(([k, v]) => [k, resolve(v!)])) as unknown as Folders;
  };
}
