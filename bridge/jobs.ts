/**
 * @file Jobs: create, queue (one at a time by default), run each in its own worker process, cancel,
 * resume, delete. Every event a worker sends updates the stored record, goes to the job's log
 * (and loss CSV for steps) and out through the hub. The webui side effects of a job (VRAM
 * hand-off, pause while it generates, refresh + check after an output) live in job-webui.ts.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import { getSchema, type JobRecord } from '../schemas/index.ts';
import type { JobEvent, MethodEntry } from '../trainers/job.ts';
import { EventHub, type ServerEvent } from './hub.ts';
import { JobStore } from './store.ts';
import { prepareSpec, RequestError, fieldError, type Folders } from './spec.ts';
import { WorkerProcess, type WorkerHostOptions, type WorkerOutcome } from './worker-host.ts';
import { JobWebui } from './job-webui.ts';
import { WebuiPreviews } from './webui-preview.ts';
import { LOCK_FILE, waitForWorkerExit } from './worker-lock.ts';
import { cleanStaleTemps } from '../trainers/io/atomic.ts';
import type { WebuiClient } from './webui.ts';
import type { FolderSource } from './config.ts';
import { checkedWebuiDir } from './job-folders.ts';

export interface JobManagerOptions {
  store: JobStore;
  methods: Record<string, MethodEntry>;
  /** Current output folders (may ask a running webui); a job's own webui folder stands in for the configured one. */
  folders: FolderSource;
  webui: WebuiClient;
  /** 'unload': free the webui's model during a job; 'pause': freeze the job while it generates. */
  vram?: 'off' | 'unload' | 'pause';
  pausePollMs?: number;
  /** Render each snapshot in the webui when one is up (default true; off with vram 'unload'). */
  webuiPreviews?: boolean;
  /** How long a job waits for a previous worker of it (a killed server's orphan) to exit. */
  lockWaitMs?: number;
  worker: WorkerHostOptions;
  concurrency?: number;
  log: Logger;
}

const TERMINAL = new Set(['finished', 'failed', 'cancelled']);
const ACTIVE = new Set(['queued', 'running']);
const PERSIST_EVERY_MS = 1000;

export class JobManager {
  readonly hub = new EventHub();
  readonly store: JobStore;
  /** The TF.js backend the last worker reported (`started` event). */
  backend: string | null = null;
  private readonly running = new Map<string, { worker: WorkerProcess; cancelling: boolean; done?: Promise<void> }>();
  private readonly queue: string[] = [];
  private readonly concurrency: number;
  private readonly webuiSide: JobWebui;
  private readonly previews: WebuiPreviews;
  /** The newest events.jsonl append per job (appends to one file are chained in the store). */
  private readonly lastEventWrite = new Map<string, Promise<void>>();
  private idleWaiters: (() => void)[] = [];

  constructor(private readonly opts: JobManagerOptions) {
    this.store = opts.store;
    this.concurrency = Math.max(1, opts.concurrency ?? 1);
    this.webuiSide = new JobWebui(opts.webui, opts.vram ?? 'off', (id, e) => this.publish(id, e), opts.pausePollMs);
    // With 'unload' the webui's model is out of VRAM on purpose: a txt2img would load it back.
    const previews = (opts.webuiPreviews ?? true) && opts.vram !== 'unload';
    this.previews = new WebuiPreviews(opts.webui, previews, (id, e) => this.previewEvent(id, e));
  }

  get methods(): Record<string, MethodEntry> {
    return this.opts.methods;
  }

  /** The module the workers load the methods from (the probe process loads it too). */
  get methodsModule(): string {
    return this.opts.worker.methodsModule;
  }

  /** Load jobs from disk (running ones become interrupted). */
  init(): JobRecord[] {
    const jobs = this.store.load();
    this.backend = jobs.find((j) => j.backend)?.backend ?? null;
    return jobs;
  }

  counts(): { running: number; queued: number; concurrency: number } {
    return { running: this.running.size, queued: this.queue.length, concurrency: this.concurrency };
  }

  /** Validate, resolve paths, store as queued and start when a slot is free. */
  async create(type: string, spec: Record<string, unknown>, webuiDir?: string): Promise<JobRecord> {
    const prepared = await prepareSpec(this.opts.methods, type, spec, await this.opts.folders(webuiDir));
    const job: JobRecord = {
      id: randomBytes(8).toString('hex'),
      type,
      spec: prepared,
      ...(webuiDir ? { webuiDir } : {}),
      state: 'queued',
      createdAt: new Date().toISOString(),
      attempts: 0,
      step: 0,
      totalSteps: typeof prepared.steps === 'number' ? prepared.steps : 0,
      outputs: [],
      previews: [],
      snapshots: [],
    };
    await this.enqueue(job);
    return job;
  }

  /** Start a failed/cancelled/interrupted job again, from its last snapshot when it had begun. */
  async resume(id: string): Promise<JobRecord> {
    const job = this.mustGet(id);
    if (!['failed', 'cancelled', 'interrupted'].includes(job.state)) {
      throw new RequestError([fieldError('/id', `job is ${job.state}; only failed, cancelled or interrupted jobs can be resumed`)], 409);
    }
    const spec = { ...job.spec };
    if (job.startedAt && 'resume' in (this.schemaProps(job.type) ?? {})) spec.resume = true;
    // the webui folder it was started with, checked again: it may have moved since
    const webuiDir = job.webuiDir ? await checkedWebuiDir(job.webuiDir, '/webuiDir') : undefined;
    job.spec = await prepareSpec(this.opts.methods, job.type, spec, await this.opts.folders(webuiDir));
    delete job.error;
    delete job.endedAt;
    await this.enqueue(job);
    return job;
  }

  async cancel(id: string): Promise<JobRecord> {
    const job = this.mustGet(id);
    if (job.state === 'queued') {
      this.queue.splice(this.queue.indexOf(id), 1);
      job.state = 'cancelled';
      job.endedAt = new Date().toISOString();
      delete job.queuePosition;
      this.publish(id, { type: 'cancelled', step: job.step });
      await this.persist(job);
      this.publishQueue();
    } else if (job.state === 'running') {
      const run = this.running.get(id);
      if (run && !run.cancelling) {
        run.cancelling = true;
        run.worker.cancel();
        this.publish(id, { type: 'log', level: 'info', message: 'cancel requested: stopping after the current step' });
      }
    } else {
      throw new RequestError([fieldError('/id', `job is already ${job.state}`)], 409);
    }
    return job;
  }

  async delete(id: string): Promise<void> {
    const job = this.mustGet(id);
    if (ACTIVE.has(job.state)) throw new RequestError([fieldError('/id', `job is ${job.state}; cancel it first`)], 409);
    // Ended but still telling the webui about its output: let that finish first.
    await this.running.get(id)?.done;
    await this.store.delete(id);
    this.hub.forget(id);
    this.lastEventWrite.delete(id);
  }

  get(id: string): JobRecord | undefined {
    return this.store.get(id);
  }

  list(): JobRecord[] {
    return this.store.list();
  }

  /** The worker of a running job (tests kill it to prove crash handling). */
  workerPid(id: string): number | undefined {
    return this.running.get(id)?.worker.pid;
  }

  /** Resolve when nothing is running or queued. */
  idle(): Promise<void> {
    if (!this.running.size && !this.queue.length) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  /** Cancel everything (server shutdown): queued jobs stay interrupted on disk, running ones stop. */
  async shutdown(): Promise<void> {
    this.queue.length = 0;
    for (const run of this.running.values()) run.worker.cancel();
    const previews = this.previews.closeAll();
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([this.idle(), new Promise((r) => (timer = setTimeout(r, 5000)))]);
    clearTimeout(timer);
    for (const run of this.running.values()) run.worker.kill('SIGKILL');
    this.webuiSide.stopAll();
    await previews;
    await this.store.flush();
  }

  private schemaProps(type: string): Record<string, unknown> | undefined {
    const entry = this.opts.methods[type];
    return entry ? (getSchema(entry.schema)?.properties as Record<string, unknown> | undefined) : undefined;
  }

  private mustGet(id: string): JobRecord {
    const job = this.store.get(id);
    if (!job) throw new RequestError([fieldError('/id', `no job '${id}'`)], 404);
    return job;
  }

  private async enqueue(job: JobRecord): Promise<void> {
    job.state = 'queued';
    this.queue.push(job.id);
    job.queuePosition = this.queue.length - 1;
    await this.persist(job);
    this.publish(job.id, { type: 'queued', position: job.queuePosition });
    this.publishState(job);
    this.pump();
  }

  private publish(id: string, event: ServerEvent): void {
    const msg = this.hub.publish(id, event);
    if (event.type !== 'state') this.lastEventWrite.set(id, this.store.append(id, 'events.jsonl', `${JSON.stringify(msg)}\n`));
  }

  private publishState(job: JobRecord): void {
    this.hub.publish(job.id, { type: 'state', job });
  }

  private publishQueue(): void {
    this.queue.forEach((id, position) => {
      const job = this.store.get(id);
      if (!job || job.queuePosition === position) return;
      job.queuePosition = position;
      this.publish(id, { type: 'queued', position });
    });
  }

  /** A webui preview (or why there is none) for a job that may have ended meanwhile. */
  private previewEvent(id: string, e: JobEvent): void {
    const job = this.store.get(id);
    if (!job) return;
    this.apply(job, e);
    this.publish(id, withUrl(job, e));
    void this.persist(job);
  }

  private async persist(job: JobRecord): Promise<void> {
    await this.store.save(job);
  }

  private pump(): void {
    while (this.running.size < this.concurrency && this.queue.length) {
      const id = this.queue.shift()!;
      const job = this.store.get(id);
      if (!job) continue;
      const worker = new WorkerProcess(this.opts.worker);
      const slot: { worker: WorkerProcess; cancelling: boolean; done?: Promise<void> } = { worker, cancelling: false };
      this.running.set(id, slot);
      slot.done = this.run(job, worker).catch((err) => this.serverError(job, err)).finally(() => {
        this.running.delete(id);
        this.pump();
        if (!this.running.size && !this.queue.length) for (const w of this.idleWaiters.splice(0)) w();
      });
    }
    this.publishQueue();
  }

  private async run(job: JobRecord, worker: WorkerProcess): Promise<void> {
    const log = this.opts.log.child({ job: job.id, type: job.type });
    Object.assign(job, { state: 'running', startedAt: new Date().toISOString(), attempts: job.attempts + 1 });
    delete job.queuePosition;
    await this.persist(job);
    this.publishState(job);
    log.info({ attempt: job.attempts }, 'job started');
    const lockFile = join(this.store.jobDir(job.id), LOCK_FILE);
    if (!(await this.previousWorkerGone(job, lockFile))) return;
    await cleanOutputFolders(job.spec);
    await this.webuiSide.before(job.id, worker, this.opts.methods[job.type]?.outputKind);
    let lastPersist = Date.now();
    let terminal = false;
    const outcome = await worker.run(job.type, job.spec, lockFile, {
      onEvent: (raw) => {
        const event = withExistingOutput(raw);
        terminal ||= TERMINAL.has(event.type);
        this.apply(job, event);
        this.publish(job.id, withUrl(job, event));
        if (event.type === 'snapshot') this.previews.snapshot(job.id, job.spec, event.step, event.path);
        if (event.type === 'step' && Date.now() - lastPersist < PERSIST_EVERY_MS) return;
        lastPersist = Date.now();
        void this.persist(job);
      },
      onOutput: (text) => {
        void this.store.append(job.id, 'worker.log', text);
        log.debug({ worker: text.trimEnd() }, 'worker output');
      },
    });
    const cancelling = this.running.get(job.id)?.cancelling ?? false;
    // The log is complete by the time anyone sees the job ended (a busy disk lags).
    await this.lastEventWrite.get(job.id);
    this.lastEventWrite.delete(job.id);
    this.settle(job, outcome, cancelling, terminal);
    log.info({ state: job.state, error: job.error }, 'job ended');
    await this.persist(job);
    this.publishState(job);
    // A preview still rendering finishes (and removes its copy) before the output's refresh.
    await this.previews.close(job.id);
    const webui = await this.webuiSide.after(job);
    // job.webui appears once the webui events are in the job's log too.
    await this.lastEventWrite.get(job.id);
    if (webui) job.webui = webui;
    await this.persist(job);
    this.publishState(job);
  }

  /**
   * A server killed with SIGKILL leaves its worker finishing a step; two trainers on one output
   * would corrupt it. Wait for that worker (its pid is in the job's lock file) or fail clearly.
   */
  private async previousWorkerGone(job: JobRecord, lockFile: string): Promise<boolean> {
    const pid = await waitForWorkerExit(lockFile, this.opts.lockWaitMs ?? 30_000, (p) =>
      this.publish(job.id, { type: 'log', level: 'warn', message: `waiting for an earlier worker of this job (pid ${p}) to exit` }),
    );
    if (pid === undefined) return true;
    const message = `an earlier worker of this job (pid ${pid}) is still running, so a second one would train on the same output: wait for it to exit (or kill it), then resume`;
    Object.assign(job, { state: 'failed', error: message, endedAt: new Date().toISOString() });
    this.publish(job.id, { type: 'failed', step: job.step, message, lastSnapshot: job.lastSnapshot });
    await this.persist(job);
    this.publishState(job);
    return false;
  }

  /** A bug on the server side of a run must fail that job, never the server. */
  private async serverError(job: JobRecord, err: unknown): Promise<void> {
    const message = `server error while running the job: ${err instanceof Error ? err.message : String(err)}`;
    this.opts.log.error({ job: job.id, err }, message);
    if (job.state === 'running') Object.assign(job, { state: 'failed', error: message, endedAt: new Date().toISOString() });
    this.publish(job.id, { type: 'log', level: 'error', message });
    await this.persist(job).catch(() => {});
    this.publishState(job);
  }

  /** Fold one worker event into the record. */
  private apply(job: JobRecord, e: JobEvent): void {
    if (e.type === 'started') {
      Object.assign(job, { totalSteps: e.totalSteps, step: e.startStep, backend: e.backend });
      this.backend = e.backend;
    } else if (e.type === 'step') {
      const { type: _t, ...progress } = e;
      Object.assign(job, { step: e.step, totalSteps: e.totalSteps, progress });
    } else if (e.type === 'preview') job.previews.push({ step: e.step, path: e.path });
    else if (e.type === 'lossLog') job.lossLog = e.path;
    else if (e.type === 'snapshot') {
      job.snapshots.push({ step: e.step, path: e.path });
      job.lastSnapshot = e.path;
    } else if (e.type === 'finished') {
      Object.assign(job, { step: e.step, output: e.output, outputs: e.outputs, kind: e.kind, usage: e.usage });
    } else if (e.type === 'failed') {
      Object.assign(job, { step: e.step, error: e.message });
      if (e.lastSnapshot) job.lastSnapshot = e.lastSnapshot;
    } else if (e.type === 'cancelled' && e.output) job.output = e.output;
  }

  /** Turn the worker's outcome into the job's final state (and a terminal event if it sent none). */
  private settle(job: JobRecord, outcome: WorkerOutcome, cancelling: boolean, terminal: boolean): void {
    job.endedAt = new Date().toISOString();
    let event: JobEvent;
    if (outcome.kind === 'result') {
      const r = resultWithExistingOutput(outcome.result);
      Object.assign(job, { step: r.step, output: r.output, outputs: r.outputs, kind: r.kind, usage: r.usage });
      job.state = r.cancelled ? 'cancelled' : 'finished';
      event = r.cancelled
        ? { type: 'cancelled', step: r.step, output: r.output }
        : { type: 'finished', step: r.step, output: r.output, outputs: r.outputs, kind: r.kind, usage: r.usage };
    } else if (cancelling && outcome.kind === 'died') {
      job.state = 'cancelled';
      event = { type: 'cancelled', step: job.step };
    } else {
      job.state = 'failed';
      job.error = outcome.message;
      event = { type: 'failed', step: job.step, message: outcome.message, lastSnapshot: job.lastSnapshot };
    }
    if (!terminal || outcome.kind === 'died') this.publish(job.id, event);
  }
}

/**
 * A job reports as its output only a file that exists: a job cancelled while loading used to
 * report the path it would have written.
 */
function resultWithExistingOutput<R extends { output?: string; outputs?: string[] }>(r: R): R {
  const outputs = r.outputs?.filter((f) => existsSync(f));
  const output = r.output !== undefined && existsSync(r.output) ? r.output : undefined;
  return { ...r, output, ...(outputs ? { outputs } : {}) };
}

function withExistingOutput(e: JobEvent): JobEvent {
  return e.type === 'finished' || e.type === 'cancelled' ? resultWithExistingOutput(e) : e;
}

/**
 * Before a worker starts: remove the temps a killed write left in the job's output folders and
 * its run folder (io/atomic.ts names them by pid; those of live processes stay).
 */
async function cleanOutputFolders(spec: Record<string, unknown>): Promise<void> {
  const dirs = Object.entries(spec).filter(([k, v]) => /Dir$/.test(k) && typeof v === 'string').map(([, v]) => v as string);
  if (typeof spec.logDir === 'string' && typeof spec.name === 'string') dirs.push(join(spec.logDir, spec.name), join(spec.logDir, spec.name, 'snapshots'));
  for (const dir of dirs) await cleanStaleTemps(dir).catch(() => []);
}

/** Preview events carry a URL the API serves them from. */
function withUrl(job: JobRecord, e: JobEvent): ServerEvent {
  return e.type === 'preview' ? { ...e, url: `/api/jobs/${job.id}/previews/${job.previews.length - 1}` } as ServerEvent : e;
}
