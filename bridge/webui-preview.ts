/**
 * @file Previews through the webui while a job runs: after each snapshot, the webui renders it
 * with `POST /sdapi/v1/txt2img` (its own sampler and VAE: we send neither sampler_name nor
 * override_settings) and the PNG goes to `<logDir>/<name>/images/<name>-<step>-webui.png` as a
 * `preview` event. The method's own previews go on regardless, so a webui that is down, slow or
 * failing only costs a `log` event, never the job.
 *
 * The webui only sees files in its folders, so a snapshot outside the job's output folder (the
 * folder the webui is refreshed for) is copied in as `sidetrain-preview-<name>-<step>.<ext>` for
 * the one call: refresh, check the webui lists it, txt2img, delete, refresh again. The step is in the name because A1111
 * reuses a hypernetwork already loaded under the same name (hypernetwork.py load_hypernetworks),
 * which would render every preview with the first snapshot's weights. Leftovers of a server
 * killed mid-call are removed before the next preview of the same job name.
 */
import { copyFile, mkdir, readdir, rm, writeFile } from 'node:fs/promises';
import { basename, extname, join, resolve, sep } from 'node:path';
import type { JobEvent, OutputKind } from '../trainers/job.ts';
import type { WebuiClient } from './webui.ts';

/** Marks our temporary copies in the webui's folders. */
export const PREVIEW_PREFIX = 'sidetrain-preview-';

type Emit = (jobId: string, event: JobEvent) => void;

interface Target {
  kind: Extract<OutputKind, 'embedding' | 'hypernetwork'>;
  name: string;
  /** The job's output folder: the one the webui scans (and is refreshed for). */
  dir: string;
  images: string;
  spec: Record<string, unknown>;
}

interface Pending {
  running?: Promise<void>;
  /** Only the newest snapshot waits: a slow webui skips the ones in between. */
  next?: { step: number; path: string };
  closed: boolean;
  /** Aborts the txt2img in flight (job ended long ago, server shutting down). */
  abort: AbortController;
}

/** What the webui can preview for this spec, or undefined (LoRA, checkpoints, no logDir …). */
export function previewTarget(spec: Record<string, unknown>): Target | undefined {
  const str = (k: string) => (typeof spec[k] === 'string' && spec[k] ? (spec[k] as string) : undefined);
  const name = str('name');
  const logDir = str('logDir');
  const dir = str('embeddingsDir') ?? str('hypernetworkDir');
  if (!name || !logDir || !dir) return undefined;
  const kind = str('embeddingsDir') ? 'embedding' : 'hypernetwork';
  return { kind, name, dir: resolve(dir), images: join(logDir, name, 'images'), spec };
}

/** The preview prompt with `token` standing for what is being trained. */
export function previewPrompt(t: Target, token: string): string {
  const given = typeof t.spec.previewPrompt === 'string' ? t.spec.previewPrompt.trim() : '';
  if (t.kind === 'hypernetwork') return `${given || 'a photo'} <hypernet:${token}:1>`;
  if (!given) return `a photo of ${token}`;
  // The webui's preview prompts say the embedding's name (or the template's [name]).
  const named = given.replace(/\[name\]/g, token).replace(new RegExp(`(?<![\\w-])${escapeRe(t.name)}(?![\\w-])`, 'g'), token);
  return named === given ? `${given}, ${token}` : named;
}

const escapeRe = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** txt2img body: the spec's preview size/steps/scale/seed; sampler and VAE stay the user's. */
export function txt2imgPayload(t: Target, token: string): Record<string, unknown> {
  const num = (k: string, d: number) => (typeof t.spec[k] === 'number' ? (t.spec[k] as number) : d);
  return {
    prompt: previewPrompt(t, token),
    negative_prompt: '',
    steps: num('previewSteps', 20),
    cfg_scale: num('previewCfgScale', 7),
    seed: num('seed', 0),
    width: num('width', 512),
    height: num('height', 512),
    batch_size: 1,
    n_iter: 1,
    send_images: true,
    save_images: false,
    // Nothing of ours in the webui's outputs/ folder either.
    do_not_save_samples: true,
    do_not_save_grid: true,
  };
}

export class WebuiPreviews {
  private readonly jobs = new Map<string, Pending>();

  constructor(
    private readonly webui: WebuiClient,
    private readonly enabled: boolean,
    private readonly emit: Emit,
  ) {}

  get active(): boolean {
    return this.enabled && this.webui.configured;
  }

  /** A snapshot was written: render it in the webui (in the background, one call at a time). */
  snapshot(jobId: string, spec: Record<string, unknown>, step: number, path: string): void {
    if (!this.active) return;
    const target = previewTarget(spec);
    if (!target) return;
    let p = this.jobs.get(jobId);
    if (!p) this.jobs.set(jobId, (p = { closed: false, abort: new AbortController() }));
    if (p.closed) return;
    p.next = { step, path };
    if (!p.running) p.running = this.drain(jobId, target, p);
  }

  private async drain(jobId: string, target: Target, p: Pending): Promise<void> {
    while (p.next && !p.closed) {
      const { step, path } = p.next;
      p.next = undefined;
      try {
        const png = await this.render(target, step, path, p.abort.signal);
        this.emit(jobId, { type: 'preview', step, path: png });
      } catch (err) {
        const why = err instanceof Error ? err.message : String(err);
        this.emit(jobId, { type: 'log', level: 'warn', message: `webui preview at step ${step} failed (${why}); the method's own previews go on` });
      }
    }
    p.running = undefined;
  }

  /** Refresh, check the webui sees it, txt2img, clean up; the PNG's path. Throws why not. */
  private async render(t: Target, step: number, snapshot: string, signal: AbortSignal): Promise<string> {
    if (!(await this.webui.up())) throw new Error(`the webui at ${this.webui.url} is not answering`);
    // Forge and SD.Next would render the prompt without the hypernetwork: no misleading preview.
    const unusable = await this.webui.unusable(t.kind);
    if (unusable) throw new Error(unusable);
    await removeLeftovers(t);
    const inside = resolve(snapshot).startsWith(t.dir + sep);
    const copy = inside ? undefined : join(t.dir, `${PREVIEW_PREFIX}${t.name}-${step}${extname(snapshot)}`);
    const token = copy ? stem(copy) : stem(snapshot);
    try {
      if (copy) await copyFile(snapshot, copy);
      const refreshed = await this.webui.refresh(t.kind);
      if (!refreshed.ok) throw new Error(refreshed.message);
      // A webui scanning another folder (SD.Next, custom flags) would render the prompt without it.
      const seen = await this.webui.verify(t.kind, copy ?? snapshot, token);
      if (!seen.ready) throw new Error(seen.message);
      const image = await this.webui.txt2img(txt2imgPayload(t, token), signal);
      await mkdir(t.images, { recursive: true });
      const out = join(t.images, `${t.name}-${step}-webui.png`);
      await writeFile(out, image);
      return out;
    } finally {
      if (copy) {
        await rm(copy, { force: true });
        await this.webui.refresh(t.kind);
      }
    }
  }

  /**
   * The job ended: no new previews; the one being rendered gets `graceMs` to finish, then its
   * txt2img is aborted. Either way its copy is removed before this resolves.
   */
  async close(jobId: string, graceMs = 30_000): Promise<void> {
    const p = this.jobs.get(jobId);
    if (!p) return;
    p.closed = true;
    p.next = undefined;
    const timer = setTimeout(() => p.abort.abort(), graceMs);
    await p.running;
    clearTimeout(timer);
    this.jobs.delete(jobId);
  }

  /** Server shutdown: abort every render now. */
  async closeAll(): Promise<void> {
    await Promise.all([...this.jobs.keys()].map((id) => this.close(id, 0)));
  }
}

const stem = (path: string) => basename(path, extname(path));

/** Copies a killed server left behind (only ours: prefix + this job's name + a step). */
async function removeLeftovers(t: Target): Promise<void> {
  const mine = new RegExp(`^${escapeRe(PREVIEW_PREFIX + t.name)}-\\d+\\.[\\w]+$`);
  const files = await readdir(t.dir).catch(() => [] as string[]);
  await Promise.all(files.filter((f) => mine.test(f)).map((f) => rm(join(t.dir, f), { force: true })));
}
