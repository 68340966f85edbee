/**
 * @file The event hub: per-job streams of events (JobEvent plus `queued`, `webui`, `state`) with a
 * per-job sequence number, delivered to WebSocket clients and anyone else who subscribes to one
 * job or to all (`*`).
 */
import type { JobEvent } from '../trainers/job.ts';
import type { QueuedEvent, StateEvent, WebuiEvent } from '../schemas/index.ts';

export type ServerEvent = JobEvent | QueuedEvent | WebuiEvent | StateEvent;

/** What goes over the wire: the event plus which job, its number and when. */
export type Envelope = ServerEvent & { jobId: string; seq: number; time: string };

export type Listener = (msg: Envelope) => void;

export class EventHub {
  private readonly listeners = new Map<string, Set<Listener>>();
  private readonly seqs = new Map<string, number>();
  /** Events delivered in total (bench + health). */
  delivered = 0;

  /** Subscribe to one job's events, or '*' for all jobs; returns the unsubscribe function. */
  subscribe(jobId: string, fn: Listener): () => void {
    let set = this.listeners.get(jobId);
    if (!set) this.listeners.set(jobId, (set = new Set()));
    set.add(fn);
    return () => {
      set.delete(fn);
      if (!set.size) this.listeners.delete(jobId);
    };
  }

  /** The latest sequence number of a job (0 before any event). */
  seq(jobId: string): number {
    return this.seqs.get(jobId) ?? 0;
  }

  /** Stamp and deliver; a listener that throws is dropped, never the publisher. */
  publish(jobId: string, event: ServerEvent): Envelope {
    const seq = this.seq(jobId) + (event.type === 'state' ? 0 : 1);
    this.seqs.set(jobId, seq);
    const msg = { ...event, jobId, seq, time: new Date().toISOString() } as Envelope;
    for (const key of [jobId, '*']) {
      for (const fn of this.listeners.get(key) ?? []) {
        try {
          fn(msg);
          this.delivered++;
        } catch {
          this.listeners.get(key)?.delete(fn);
        }
      }
    }
    return msg;
  }

  forget(jobId: string): void {
    this.seqs.delete(jobId);
  }
}
