/**
 * @file The contract between a training method and whoever runs it (the CLI in-process, or the
 * server's worker process). A method is a function of a validated job spec and a context; it
 * reports progress as events and returns where its output went. Nothing here imports TF.js.
 */

/** What a running job tells the world. `step` events are throttled by the emitter's caller. */
export type JobEvent =
  | { type: 'started'; totalSteps: number; startStep: number; backend: string; message?: string }
  | {
      type: 'step';
      step: number;
      totalSteps: number;
      epoch: number;
      loss: number;
      learnRate: number;
      itPerSec: number;
      etaSeconds: number;
    }
  | { type: 'preview'; step: number; path: string }
  | { type: 'snapshot'; step: number; path: string }
  /** The loss CSV the loop writes (train/loss-log.ts); the server serves it as written. */
  | { type: 'lossLog'; path: string }
  | { type: 'log'; level: 'info' | 'warn' | 'error'; message: string }
  | { type: 'finished'; step: number; output: string; outputs: string[]; kind: OutputKind; usage: string }
  | { type: 'failed'; step: number; message: string; lastSnapshot?: string }
  | { type: 'cancelled'; step: number; output?: string };

/** Which webui folder an output belongs to (decides the refresh call and the usage hint). */
export type OutputKind = 'embedding' | 'hypernetwork' | 'checkpoint' | 'lora';

export interface JobContext {
  /** Report progress; never throws. */
  emit(event: JobEvent): void;
  /** Aborted on cancel (Ctrl-C, SIGTERM, API cancel): the method stops after the current step and saves. */
  signal: AbortSignal;
  /**
   * Call between steps (`await ctx.waitIfPaused?.()` at the top of each): resolves at once unless
   * the runner has paused the job (the server's `--vram pause` while the webui generates), then on
   * resume or abort. Waiting here, not frozen mid-step by SIGSTOP, leaves no half-done GPU work
   * holding memory and lets a cancel through. The first call tells the runner the method supports it.
   */
  waitIfPaused?(): Promise<void>;
}

export interface JobResult {
  step: number;
  /** The main output file (e.g. embeddings/pallas_cat.pt). */
  output: string;
  /** Every file written (output, .optim side file, ...). */
  outputs: string[];
  kind: OutputKind;
  /** How to use the output in a prompt: `pallas_cat`, `<hypernet:name:1>`, `<lora:name:1>`. */
  usage: string;
  cancelled: boolean;
}

/** A training method: a validated spec (shape given by schemas/<method>.json) and a context. */
export type JobRunner = (spec: Record<string, unknown>, ctx: JobContext) => Promise<JobResult>;

export interface MethodEntry {
  /** schemas/<schema>.json validates the spec. */
  schema: string;
  /** Loaded lazily so that the server process never imports TF.js. */
  load(): Promise<JobRunner>;
  /** `--dry-run` report of the method's data (the dataset report, buckets, class images); loads no model. */
  dryRun?(): Promise<(spec: Record<string, unknown>) => Promise<string>>;
  /** What it writes when every job of it writes the same kind (the bridge warns before a run the webui cannot use). */
  outputKind?: OutputKind;
}
