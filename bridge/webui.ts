/**
 * @file The webui client (axios): where the webui keeps its files (`/sdapi/v1/cmd-flags`), what it
 * has loaded, telling it about new outputs (refresh + check it really registered them), and the
 * VRAM hand-off. A webui that is down or slow never fails a job: every call is retried a few
 * times with backoff and the outcome is returned as a message, never thrown.
 *
 * The flavour (A1111, Forge, SD.Next) is asked once and decides the routes (webui-flavours.ts):
 * what one cannot re-scan or cannot use is said plainly instead of checked. Credentials for a
 * webui started with `--api-auth` (A1111, Forge) or `--auth` (SD.Next) go as HTTP Basic on every
 * call and are never logged or shown.
 */
import axios, { type AxiosInstance } from 'axios';
import type { OutputKind } from '../trainers/job.ts';
import { embeddingLists, FLAVOUR_NAMES, FLAVOUR_PROBES, SUPPORT, type Flavour, type KindSupport, type SkippedEmbedding } from './webui-flavours.ts';

export interface WebuiOptions {
  /** e.g. http://127.0.0.1:7860; undefined = no webui. */
  url?: string;
  /** For a webui started with `--api-auth user:pass` (A1111, Forge) or `--auth user:pass` (SD.Next). */
  auth?: { username: string; password: string };
  timeoutMs?: number;
  /** Attempts per call (refresh, unload, reload). */
  retries?: number;
  /** First backoff delay; doubles each retry. */
  retryDelayMs?: number;
}

/** Folders as the webui reports them (cmd-flags). */
export interface WebuiDirs {
  embeddings?: string;
  hypernetworks?: string;
  checkpoints?: string;
  lora?: string;
  data?: string;
}

/** The outcome of one webui action, phrased for the job's events. */
export interface WebuiOutcome {
  ok: boolean;
  message: string;
  ready?: boolean;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function reason(err: unknown): string {
  if (axios.isAxiosError(err)) {
    if (err.response?.status === 401) {
      return 'HTTP 401: the webui wants API credentials (it runs with --api-auth or --auth): give them to sidetrain with --api-auth user:pass or SIDETRAIN_WEBUI_AUTH';
    }
    if (err.response) return `HTTP ${err.response.status} ${JSON.stringify(err.response.data).slice(0, 200)}`;
    return err.code ?? err.message;
  }
  return err instanceof Error ? err.message : String(err);
}

/** Stem of a file path (`/x/pallas_cat.pt` → `pallas_cat`). */
function stem(path: string): string {
  const base = path.split(/[\\/]/).pop() ?? path;
  const dot = base.lastIndexOf('.');
  return dot > 0 ? base.slice(0, dot) : base;
}

/**
 * `http://user:pass@host` → the URL without them (it is logged and shown on the page) and the
 * credentials as Basic auth, unless given separately.
 */
function splitCredentials(url: string | undefined, auth: WebuiOptions['auth']): { url: string | undefined; auth: WebuiOptions['auth'] } {
  if (!url) return { url, auth };
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new Error(`webui URL '${url}' is not a URL (expected e.g. http://127.0.0.1:7860)`);
  }
  if (!u.username && !u.password) return { url, auth };
  const found = { username: decodeURIComponent(u.username), password: decodeURIComponent(u.password) };
  u.username = '';
  u.password = '';
  return { url: u.href.replace(/\/+$/, ''), auth: auth ?? found };
}

export class WebuiClient {
  readonly url: string | undefined;
  private readonly http: AxiosInstance | undefined;
  private readonly retries: number;
  private readonly retryDelayMs: number;
  private detected: Promise<Flavour | undefined> | undefined;

  constructor(opts: WebuiOptions = {}) {
    const { url, auth } = splitCredentials(opts.url?.replace(/\/+$/, '') || undefined, opts.auth);
    this.url = url;
    this.retries = Math.max(1, opts.retries ?? 3);
    this.retryDelayMs = opts.retryDelayMs ?? 500;
    if (this.url) {
      this.http = axios.create({ baseURL: this.url, timeout: opts.timeoutMs ?? 10_000, auth, proxy: false });
    }
  }

  get configured(): boolean {
    return this.http !== undefined;
  }

  /** The webui's origin (scheme://host:port), allowed to call us from a browser. */
  get origin(): string | undefined {
    return this.url ? new URL(this.url).origin : undefined;
  }

  /**
   * Which webui answers (asked once; undefined while it is down or none is configured): the
   * first probe route that exists (any status but 404) names it, else A1111.
   */
  async flavour(): Promise<Flavour | undefined> {
    if (!this.http) return undefined;
    this.detected ??= this.detect();
    const found = await this.detected;
    if (!found) this.detected = undefined; // down now: ask again next time
    return found;
  }

  private async detect(): Promise<Flavour | undefined> {
    for (const { flavour, route } of FLAVOUR_PROBES) {
      try {
        await this.http!.get(route, { timeout: 5000 });
        return flavour;
      } catch (err) {
        const status = axios.isAxiosError(err) ? err.response?.status : undefined;
        if (status === undefined) return undefined; // no answer at all: the webui is down
        if (status !== 404) return flavour;
      }
    }
    return 'a1111';
  }

  /** What this webui can do with an output of `kind` (A1111's routes while the flavour is unknown). */
  async support(kind: OutputKind): Promise<KindSupport & { webui: string }> {
    const f = (await this.flavour()) ?? 'a1111';
    return { ...SUPPORT[f][kind], webui: FLAVOUR_NAMES[f] };
  }

  /** Why this webui cannot use an output of `kind` at all (Forge/SD.Next and hypernetworks), else undefined. */
  async unusable(kind: OutputKind): Promise<string | undefined> {
    return (await this.support(kind)).unusable;
  }

  private async get<T>(path: string): Promise<T> {
    if (!this.http) throw new Error('no webui configured');
    return (await this.http.get<T>(path)).data;
  }

  /** POST with retries; returns the last error's reason or undefined on success. */
  private async postRetried(path: string): Promise<string | undefined> {
    if (!this.http) return 'no webui configured';
    let last = '';
    for (let attempt = 0; attempt < this.retries; attempt++) {
      if (attempt) await sleep(this.retryDelayMs * 2 ** (attempt - 1));
      try {
        await this.http.post(path, {});
        return undefined;
      } catch (err) {
        last = reason(err);
        // 404/401 will not change on retry.
        if (axios.isAxiosError(err) && [401, 403, 404].includes(err.response?.status ?? 0)) break;
      }
    }
    return last;
  }

  /** Is the webui answering? */
  async up(): Promise<boolean> {
    if (!this.http) return false;
    try {
      await this.http.get('/sdapi/v1/cmd-flags', { timeout: 2000 });
      return true;
    } catch {
      return false;
    }
  }

  /** Folders from `GET /sdapi/v1/cmd-flags`; undefined when the webui is not reachable. */
  async dirs(): Promise<WebuiDirs | undefined> {
    try {
      const f = await this.get<Record<string, unknown>>('/sdapi/v1/cmd-flags');
      const s = (k: string) => (typeof f[k] === 'string' && f[k] ? (f[k] as string) : undefined);
      return {
        embeddings: s('embeddings_dir'),
        hypernetworks: s('hypernetwork_dir'),
        checkpoints: s('ckpt_dir'),
        lora: s('lora_dir'),
        data: s('data_dir'),
      };
    } catch {
      return undefined;
    }
  }

  async sdModels(): Promise<{ title: string; model_name: string; filename: string; hash?: string | null }[]> {
    return this.get('/sdapi/v1/sd-models');
  }

  /** Loaded and skipped embeddings, whichever shape the flavour answers in. */
  async embeddings(): Promise<{ loaded: string[]; skipped: SkippedEmbedding[] }> {
    return embeddingLists(await this.get('/sdapi/v1/embeddings'));
  }

  async hypernetworks(): Promise<{ name: string; path?: string }[]> {
    return this.get('/sdapi/v1/hypernetworks');
  }

  async loras(): Promise<{ name: string; alias?: string; path?: string }[]> {
    return this.get('/sdapi/v1/loras');
  }

  /** Ask the webui to rescan the folder an output of `kind` went to. */
  async refresh(kind: OutputKind): Promise<WebuiOutcome> {
    const support = await this.support(kind);
    if (support.unusable) return { ok: true, message: `nothing to refresh: ${support.unusable}` };
    if (!support.refresh) return { ok: true, message: `not refreshed: ${support.noRefresh}` };
    const route = support.refresh;
    const err = await this.postRetried(route);
    return err
      ? { ok: false, message: `could not refresh the webui's ${kind} list (${route}): ${err}` }
      : { ok: true, message: `webui refreshed its ${kind} list` };
  }

  /** Check the webui lists `output` after the refresh; say how to use it, or why not. */
  async verify(kind: OutputKind, output: string, usage: string): Promise<WebuiOutcome> {
    const name = stem(output);
    const support = await this.support(kind);
    if (support.unusable) return { ok: true, ready: false, message: `not usable here: ${support.unusable}` };
    try {
      const found = await this.lookup(kind, name);
      if (found === true) return { ok: true, ready: true, message: `ready: use \`${usage}\`` };
      const missing = `the webui does not list ${kind} '${name}'` + (support.noRefresh ? ` yet — ${support.noRefresh}` : '');
      const why = found === false ? missing : found;
      return { ok: true, ready: false, message: `not ready: ${why}` };
    } catch (err) {
      return { ok: false, ready: false, message: `could not check the webui's ${kind} list: ${reason(err)}` };
    }
  }

  /** true = registered; false = not listed; string = the webui's reason for skipping it. */
  private async lookup(kind: OutputKind, name: string): Promise<boolean | string> {
    if (kind === 'embedding') {
      const { loaded, skipped } = await this.embeddings();
      if (loaded.includes(name)) return true;
      const s = skipped.find((e) => e.name === name);
      if (s) {
        return `the webui skipped embedding '${name}'${s.shape ? ` (vector size ${s.shape})` : ''}: it does not fit the loaded checkpoint`;
      }
      return false;
    }
    if (kind === 'hypernetwork') return (await this.hypernetworks()).some((h) => h.name === name);
    if (kind === 'lora') return (await this.loras()).some((l) => l.name === name || l.alias === name);
    return (await this.sdModels()).some((m) => m.model_name === name || stem(m.filename) === name);
  }

  /** VRAM hand-off: free the webui's model before training. */
  async unload(): Promise<WebuiOutcome> {
    const err = await this.postRetried('/sdapi/v1/unload-checkpoint');
    return err ? { ok: false, message: `could not unload the webui's checkpoint: ${err}` } : { ok: true, message: "unloaded the webui's checkpoint" };
  }

  /** VRAM hand-off: give the webui its model back (also after a failed or cancelled job). */
  async reload(): Promise<WebuiOutcome> {
    const err = await this.postRetried('/sdapi/v1/reload-checkpoint');
    return err ? { ok: false, message: `could not reload the webui's checkpoint: ${err}` } : { ok: true, message: "reloaded the webui's checkpoint" };
  }

  /**
   * One txt2img (A1111 StableDiffusionTxt2ImgProcessingAPI): no retry, a long timeout (a real
   * generation takes seconds to minutes). Returns the first image's PNG bytes; throws on failure.
   */
  async txt2img(payload: Record<string, unknown>, signal?: AbortSignal, timeoutMs = 300_000): Promise<Buffer> {
    if (!this.http) throw new Error('no webui configured');
    try {
      const { data } = await this.http.post<{ images?: string[] }>('/sdapi/v1/txt2img', payload, { timeout: timeoutMs, signal });
      const b64 = data?.images?.[0];
      if (typeof b64 !== 'string' || !b64) throw new Error('the webui returned no image');
      // Some forks prefix a data URL.
      return Buffer.from(b64.replace(/^data:image\/\w+;base64,/, ''), 'base64');
    } catch (err) {
      throw new Error(reason(err));
    }
  }

  /** Is the webui generating right now (`/sdapi/v1/progress` job_count > 0)? false when down. */
  async generating(): Promise<boolean> {
    try {
      const p = await this.get<{ state?: { job_count?: number; job?: string } }>('/sdapi/v1/progress?skip_current_image=true');
      return (p.state?.job_count ?? 0) > 0;
    } catch {
      return false;
    }
  }
}
