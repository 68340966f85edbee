/**
 * @file What a job does to and with the webui, reported as `webui` events and never failing the
 * job: the VRAM hand-off (unload the webui's checkpoint before, reload it after, whatever the
 * outcome), the gentler mode (pause the job while the webui is generating: between steps when the
 * method calls ctx.waitIfPaused, else frozen with SIGSTOP; see WorkerProcess.pause), and after an
 * output: refresh the webui's list, then check it really registered the file ("ready: use
 * `pallas_cat`" or the webui's reason). A job whose output this webui cannot use at all (a
 * hypernetwork on Forge or SD.Next: webui-flavours.ts) is told so as it starts, not only after.
 */
import type { JobRecord, WebuiEvent } from '../schemas/index.ts';
import type { JobEvent, OutputKind } from '../trainers/job.ts';
import type { WebuiClient, WebuiOutcome } from './webui.ts';
import type { WorkerProcess } from './worker-host.ts';

type Publish = (jobId: string, event: WebuiEvent | Extract<JobEvent, { type: 'log' }>) => void;

const POLL_MS = 1000;

export class JobWebui {
  private readonly pollers = new Map<string, NodeJS.Timeout>();

  constructor(
    private readonly webui: WebuiClient,
    private readonly vram: 'off' | 'unload' | 'pause',
    private readonly publish: Publish,
    private readonly pollMs: number = POLL_MS,
  ) {}

  private report(jobId: string, action: WebuiEvent['action'], o: WebuiOutcome): void {
    this.publish(jobId, { type: 'webui', action, ok: o.ok, message: o.message, ...(o.ready === undefined ? {} : { ready: o.ready }) });
  }

  /** Before the worker starts (unload; a warning when the webui cannot use the output) or as it starts (pause poller). */
  async before(jobId: string, worker: WorkerProcess, kind?: OutputKind): Promise<void> {
    if (!this.webui.configured) return;
    // the flavour is known only while the webui answers; unknown (taken as A1111), nothing is claimed
    const unusable = kind ? await this.webui.unusable(kind) : undefined;
    if (unusable) this.publish(jobId, { type: 'log', level: 'warn', message: unusable });
    if (this.vram === 'unload') this.report(jobId, 'unload', await this.webui.unload());
    if (this.vram === 'pause') this.startPoller(jobId, worker);
  }

  private startPoller(jobId: string, worker: WorkerProcess): void {
    let busy = false;
    let inFlight = false;
    const timer = setInterval(async () => {
      if (inFlight) return;
      inFlight = true;
      try {
        const generating = await this.webui.generating();
        const how = generating && !busy ? worker.pause() : false;
        if (how) {
          busy = true;
          const message = how === 'step' ? 'pausing after the current step: the webui is generating' : 'paused: the webui is generating';
          this.report(jobId, 'pause', { ok: true, message });
        } else if (!generating && busy) {
          busy = false;
          worker.resume();
          this.report(jobId, 'resume', { ok: true, message: 'resumed: the webui is idle' });
        }
      } finally {
        inFlight = false;
      }
    }, this.pollMs);
    timer.unref();
    this.pollers.set(jobId, timer);
  }

  /**
   * After the worker has exited: refresh + verify an output, give the VRAM back. Returns what the
   * caller stores as `job.webui` once these events are logged (undefined: nothing to tell).
   */
  async after(job: JobRecord): Promise<JobRecord['webui'] | undefined> {
    const timer = this.pollers.get(job.id);
    if (timer) clearInterval(timer);
    this.pollers.delete(job.id);
    if (!this.webui.configured) return undefined;
    // The model back first: the check needs it loaded (the skipped-embedding test; SD.Next reads
    // new embeddings only when it loads a model).
    if (this.vram === 'unload') this.report(job.id, 'reload', await this.webui.reload());
    let result: JobRecord['webui'] | undefined;
    if (job.output && job.kind && (job.state === 'finished' || job.state === 'cancelled')) {
      const refreshed = await this.webui.refresh(job.kind);
      this.report(job.id, 'refresh', refreshed);
      const verified = refreshed.ok
        ? await this.webui.verify(job.kind, job.output, job.usage ?? job.output)
        : { ok: false, ready: false, message: `not confirmed: ${refreshed.message}` };
      this.report(job.id, 'verify', verified);
      result = { ready: verified.ready ?? false, message: verified.message };
    }
    return result;
  }

  stopAll(): void {
    for (const t of this.pollers.values()) clearInterval(t);
    this.pollers.clear();
  }
}
