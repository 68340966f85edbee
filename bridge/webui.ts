/**
 * @file The webui client (axios): where the webui keeps its files (`/sdapi/v1/cmd-flags`), what it
 * has loaded, telling it about new outputs (refresh + check it really registered them), and the
 * VRAM hand-off. A webui that is down or slow never fails a job: every call is retried a few
 * times with backoff and the outcome is returned as a message, never thrown.
 *
 * Routes are A1111's (modules/api/api.py); `/sidetrain/refresh-hypernetworks` is added by our
 * extension because the webui has no API route that reloads its hypernetwork list.
 */
import axios, { type AxiosInstance } from 'axios';
import type { OutputKind } from '../trainers/job.ts';

export interface WebuiOptions {
  /** e.g. http://127.0.0.1:7860; undefined = no webui. */
  url?: string;
  /** For a webui started with `--api-auth user:pass`. */
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

const REFRESH_ROUTE: Record<OutputKind, string> = {
  embedding: '/sdapi/v1/refresh-embeddings',
  hypernetwork: '/sidetrain/refresh-hypernetworks',
  checkpoint: '/sdapi/v1/refresh-checkpoints',
  lora: '/sdapi/v1/refresh-loras',
};

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function reason(err: unknown): string {
  if (axios.isAxiosError(err)) {
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

export class WebuiClient {
  readonly url: string | undefined;
  private readonly http: AxiosInstance | undefined;
  private readonly retries: number;
  private readonly retryDelayMs: number;

  constructor(opts: WebuiOptions = {}) {
    this.url = opts.url?.replace(/\/+$/, '') || undefined;
    this.retries = Math.max(1, opts.retries ?? 3);
    this.retryDelayMs = opts.retryDelayMs ?? 500;
    if (this.url) {
      this.http = axios.create({ baseURL: this.url, timeout: opts.timeoutMs ?? 10_000, auth: opts.auth, proxy: false });
    }
  }

  get configured(): boolean {
    return this.http !== undefined;
  }

  /** The webui's origin (scheme://host:port), allowed to call us from a browser. */
  get origin(): string | undefined {
    return this.url ? new URL(this.url).origin : undefined;
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

  async embeddings(): Promise<{ loaded: Record<string, unknown>; skipped: Record<string, unknown> }> {
    return this.get('/sdapi/v1/embeddings');
  }

  async hypernetworks(): Promise<{ name: string; path?: string }[]> {
    return this.get('/sdapi/v1/hypernetworks');
  }

  async loras(): Promise<{ name: string; alias?: string; path?: string }[]> {
    return this.get('/sdapi/v1/loras');
  }

  /** Ask the webui to rescan the folder an output of `kind` went to. */
  async refresh(kind: OutputKind): Promise<WebuiOutcome> {
    const route = REFRESH_ROUTE[kind];
    const err = await this.postRetried(route);
    return err
      ? { ok: false, message: `could not refresh the webui's ${kind} list (${route}): ${err}` }
      : { ok: true, message: `webui refreshed its ${kind} list` };
  }

  /** Check the webui lists `output` after the refresh; say how to use it, or why not. */
  async verify(kind: OutputKind, output: string, usage: string): Promise<WebuiOutcome> {
    const name = stem(output);
    try {
      const found = await this.lookup(kind, name);
      if (found === true) return { ok: true, ready: true, message: `ready: use \`${usage}\`` };
      const why = found === false ? `the webui does not list ${kind} '${name}'` : found;
      return { ok: true, ready: false, message: `not ready: ${why}` };
    } catch (err) {
      return { ok: false, ready: false, message: `could not check the webui's ${kind} list: ${reason(err)}` };
    }
  }

  /** true = registered; false = not listed; string = the webui's reason for skipping it. */
  private async lookup(kind: OutputKind, name: string): Promise<boolean | string> {
    if (kind === 'embedding') {
      const { loaded, skipped } = await this.embeddings();
      if (name in (loaded ?? {})) return true;
      const s = (skipped ?? {})[name] as { shape?: number } | undefined;
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
