/**
 * @file Runs one job in a child process (bridge/worker.ts, `child_process.fork` with
 * `--import tsx`) and turns whatever happens to it into one outcome: the method's result, its
 * error, or the process dying (crash, SIGKILL, out-of-memory). Cancel is an IPC message first
 * (the method stops after its step and saves), SIGTERM after both grace periods (the worker dies
 * at once), SIGKILL a second later. The worker holds the job's lock file (worker-lock.ts). Pause is an IPC message when the
 * method waits in ctx.waitIfPaused between steps (it says so with 'pausable'), SIGSTOP otherwise.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import type { JobEvent, JobResult } from '../trainers/job.ts';
import type { HostMessage, WorkerMessage } from './worker.ts';
import { TRAINING_NODE_FLAGS } from '../trainers/backend/process-flags.ts';

export const WORKER_PATH = fileURLToPath(new URL('./worker.ts', import.meta.url));

export interface WorkerHostOptions {
  /** Module exporting `methods` (default trainers/methods/index.ts). */
  methodsModule: string;
  /** After a cancel message, wait this long plus killGraceMs before SIGTERM. */
  cancelGraceMs?: number;
  /** Added to cancelGraceMs: the whole time a cancelled job has to finish its step and save. */
  killGraceMs?: number;
  /** Forward at most one step event per this many ms. */
  stepIntervalMs?: number;
  /** V8 heap limit for the worker (MB), so a runaway job dies alone. */
  maxOldSpaceMb?: number;
  env?: NodeJS.ProcessEnv;
}

export type WorkerOutcome =
  | { kind: 'result'; result: JobResult }
  | { kind: 'error'; message: string }
  | { kind: 'died'; message: string; code: number | null; signal: NodeJS.Signals | null };

export interface WorkerCallbacks {
  onEvent(event: JobEvent): void;
  /** Worker stdout/stderr (a method's stray prints, a native crash's last words). */
  onOutput?(text: string): void;
}

/** One worker process for one job. */
export class WorkerProcess {
  private child: ChildProcess | undefined;
  private timers: NodeJS.Timeout[] = [];
  /** How the worker is paused right now: between steps (IPC), frozen (SIGSTOP), or not. */
  private paused: 'step' | 'signal' | false = false;
  /** The method calls ctx.waitIfPaused, so a pause can wait for the end of its step. */
  private pausable = false;
  /** Cancelled before the process started (while waiting for a lock or the webui's unload). */
  private cancelPending = false;

  constructor(private readonly opts: WorkerHostOptions) {}

  get pid(): number | undefined {
    return this.child?.pid;
  }

  /** Start the job; resolves when the worker has exited, with what happened. */
  run(jobType: string, spec: Record<string, unknown>, lockFile: string | undefined, cb: WorkerCallbacks): Promise<WorkerOutcome> {
    const execArgv = [...TRAINING_NODE_FLAGS, '--import', 'tsx'];
    if (this.opts.maxOldSpaceMb) execArgv.push(`--max-old-space-size=${this.opts.maxOldSpaceMb}`);
    const child = fork(WORKER_PATH, [], {
      execArgv,
      env: { ...process.env, ...this.opts.env },
      stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
      serialization: 'advanced',
    });
    this.child = child;
    this.pausable = false;
    this.paused = false;
    const out = (b: Buffer) => cb.onOutput?.(b.toString());
    child.stdout?.on('data', out);
    child.stderr?.on('data', out);
    let reported: WorkerOutcome | undefined;
    child.on('message', (msg: WorkerMessage) => {
      if (msg.type === 'event') cb.onEvent(msg.event);
      else if (msg.type === 'result') reported = { kind: 'result', result: msg.result };
      else if (msg.type === 'error') reported = { kind: 'error', message: msg.message };
      else if (msg.type === 'pausable') this.pausable = true;
    });
    const start: HostMessage = {
      type: 'run',
      jobType,
      spec,
      methodsModule: this.opts.methodsModule,
      stepIntervalMs: this.opts.stepIntervalMs,
      lockFile,
    };
    child.send(start);
    if (this.cancelPending) this.cancel();
    return new Promise((resolve) => {
      const finish = (code: number | null, signal: NodeJS.Signals | null) => {
        for (const t of this.timers) clearTimeout(t);
        this.timers = [];
        this.child = undefined;
        resolve(reported ?? { kind: 'died', code, signal, message: deathMessage(code, signal) });
      };
      child.on('exit', finish);
      child.on('error', (err) => {
        if (child.exitCode === null && child.signalCode === null && !child.pid) finish(null, null);
        cb.onOutput?.(`worker error: ${err.message}\n`);
      });
    });
  }

  /** Ask the job to stop after its current step; escalate to SIGTERM, then SIGKILL. */
  cancel(): void {
    const child = this.child;
    if (!child) {
      this.cancelPending = true;
      return;
    }
    if (this.paused) this.resume();
    if (child.connected) child.send({ type: 'cancel' } satisfies HostMessage);
    const grace = this.opts.cancelGraceMs ?? 15_000;
    const killGrace = this.opts.killGraceMs ?? 10_000;
    // The worker dies at once on SIGTERM (worker.ts), so both graces go to the step and the save
    // the cancel asked for; SIGKILL a second later only if SIGTERM did not end it.
    this.timers.push(
      setTimeout(() => {
        child.kill('SIGTERM');
        this.timers.push(setTimeout(() => child.kill('SIGKILL'), 1000));
      }, grace + killGrace),
    );
  }

  kill(signal: NodeJS.Signals = 'SIGKILL'): void {
    this.child?.kill(signal);
  }

  /**
   * Pause the job while the webui generates: 'step' = it will wait after its current step (the
   * method supports ctx.waitIfPaused), 'signal' = frozen now with SIGSTOP (POSIX only; a frozen
   * step keeps its memory), false = could not pause.
   */
  pause(): 'step' | 'signal' | false {
    const child = this.child;
    if (!child || this.paused) return false;
    if (this.pausable && child.connected) {
      child.send({ type: 'pause' } satisfies HostMessage);
      this.paused = 'step';
    } else if (process.platform !== 'win32' && child.kill('SIGSTOP')) this.paused = 'signal';
    return this.paused;
  }

  resume(): boolean {
    const child = this.child;
    if (!child || !this.paused) return false;
    const how = this.paused;
    this.paused = false;
    if (how === 'signal') return child.kill('SIGCONT');
    if (child.connected) child.send({ type: 'resume' } satisfies HostMessage);
    return true;
  }
}

function deathMessage(code: number | null, signal: NodeJS.Signals | null): string {
  if (signal === 'SIGKILL') return 'the worker process was killed (SIGKILL; out of memory?)';
  if (signal) return `the worker process died from ${signal}`;
  if (code === 134) return 'the worker process aborted (out of memory?)';
  return `the worker process exited with code ${code} without a result`;
}
