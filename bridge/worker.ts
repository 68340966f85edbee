/**
 * @file The worker process: runs ONE training job and exits. Forked by bridge/worker-host.ts with
 * `--import tsx`; it is the only process of the server that loads TF.js (through the method's
 * `load()`), so a crash, NaN or out-of-memory here never takes the API down.
 *
 * IPC in:  {type:'run', jobType, spec, methodsModule, stepIntervalMs, lockFile} · {type:'cancel'} ·
 *          {type:'pause'} · {type:'resume'}
 * IPC out: {type:'event', event: JobEvent} · {type:'result', result} · {type:'error', message} ·
 *          {type:'pausable'} (the method called ctx.waitIfPaused: pause it between steps, not with SIGSTOP)
 * A cancel message aborts (the method stops after its current step and saves). SIGTERM is the
 * host's "stop now" after that grace: the worker installs no handler for it, so the default action
 * ends the process at once even mid-step or inside a long native kernel, where a JS handler would
 * wait for the event loop (a cancel once needed 26 s and SIGKILL). A write it interrupts leaves only
 * a temp file, which the next write into that folder removes (io/atomic.ts). A pause holds the
 * method in ctx.waitIfPaused until resume or abort.
 */
import { pathToFileURL } from 'node:url';
import type { JobEvent, JobResult, MethodEntry } from '../trainers/job.ts';
import { holdLock } from './worker-lock.ts';

export type HostMessage =
  | { type: 'run'; jobType: string; spec: Record<string, unknown>; methodsModule: string; stepIntervalMs?: number; lockFile?: string }
  | { type: 'cancel' }
  | { type: 'pause' }
  | { type: 'resume' };

export type WorkerMessage =
  | { type: 'event'; event: JobEvent }
  | { type: 'result'; result: JobResult }
  | { type: 'error'; message: string }
  | { type: 'pausable' };

const controller = new AbortController();
let running = false;
/** Pause between steps: set by the host, held by waitIfPaused until resume or abort. */
const pause = { requested: false, announced: false, waiters: [] as (() => void)[] };

function release(): void {
  pause.requested = false;
  for (const wake of pause.waiters.splice(0)) wake();
}
controller.signal.addEventListener('abort', release);

/** JobContext.waitIfPaused for the running method; reports when it really holds and lets go. */
function makeWaitIfPaused(emit: (e: JobEvent) => void): () => Promise<void> {
  return () => {
    if (!pause.announced) {
      pause.announced = true;
      void send({ type: 'pausable' });
    }
    if (!pause.requested || controller.signal.aborted) return Promise.resolve();
    emit({ type: 'log', level: 'info', message: 'paused between steps' });
    return new Promise<void>((resolve) => pause.waiters.push(resolve)).then(() => {
      emit({ type: 'log', level: 'info', message: controller.signal.aborted ? 'pause ended by cancel' : 'resumed' });
    });
  };
}

function send(msg: WorkerMessage): Promise<void> {
  return new Promise((resolve) => {
    if (!process.connected) return resolve();
    process.send!(msg, undefined, {}, () => resolve());
  });
}

/**
 * Step events can come thousands a second from a tiny model; forward at most one per interval,
 * and always the latest one before any other event so the order stays true.
 */
function makeEmitter(intervalMs: number): { emit(e: JobEvent): void; flush(): void } {
  let last = 0;
  let pending: JobEvent | undefined;
  let timer: NodeJS.Timeout | undefined;
  const flush = () => {
    if (timer) clearTimeout(timer);
    timer = undefined;
    if (pending) void send({ type: 'event', event: pending });
    pending = undefined;
    last = Date.now();
  };
  const emit = (event: JobEvent) => {
    try {
      if (event.type !== 'step') {
        flush();
        void send({ type: 'event', event });
        return;
      }
      pending = event;
      if (Date.now() - last >= intervalMs) flush();
      else timer ??= setTimeout(flush, intervalMs - (Date.now() - last));
    } catch {
      /* emit never throws (JobContext contract) */
    }
  };
  return { emit, flush };
}

async function run(msg: Extract<HostMessage, { type: 'run' }>): Promise<void> {
  running = true;
  // Held until this process exits: a restarted server waits for it before a resume (worker-lock.ts).
  if (msg.lockFile) holdLock(msg.lockFile);
  const emitter = makeEmitter(msg.stepIntervalMs ?? 100);
  try {
    const mod = (await import(pathToFileURL(msg.methodsModule).href)) as { methods: Record<string, MethodEntry> };
    const entry = Object.hasOwn(mod.methods, msg.jobType) ? mod.methods[msg.jobType] : undefined;
    if (!entry) throw new Error(`unknown job type '${msg.jobType}'`);
    const runner = await entry.load();
    const waitIfPaused = makeWaitIfPaused(emitter.emit);
    const result = await runner(msg.spec, { emit: emitter.emit, signal: controller.signal, waitIfPaused });
    emitter.flush();
    await send({ type: 'result', result });
    process.exit(0);
  } catch (err) {
    emitter.flush();
    const message = err instanceof Error ? err.message : String(err);
    await send({ type: 'error', message });
    process.exit(1);
  }
}

async function die(err: unknown): Promise<void> {
  await send({ type: 'error', message: `worker crashed: ${err instanceof Error ? err.stack ?? err.message : String(err)}` });
  process.exit(1);
}

process.on('message', (msg: HostMessage) => {
  if (msg.type === 'cancel') controller.abort();
  else if (msg.type === 'pause') pause.requested = !controller.signal.aborted;
  else if (msg.type === 'resume') release();
  else if (msg.type === 'run' && !running) void run(msg);
});
// The server went away: stop after the current step rather than train for nobody.
process.on('disconnect', () => {
  controller.abort();
  setTimeout(() => process.exit(1), 30_000).unref();
});
process.on('uncaughtException', (err) => void die(err));
process.on('unhandledRejection', (err) => void die(err));
