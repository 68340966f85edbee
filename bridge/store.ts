/**
 * @file The job store: one JSON file per job under `<stateDir>/jobs/<id>.json`, written atomically
 * (temp file + fsync + rename + fsync of the folder) so a crash or power cut leaves either the old
 * or the new record, never half of one. Beside it, `<id>/events.jsonl` (the log) and
 * `<id>/worker.log` are append-only (the loss log is the training loop's own file, job.lossLog). On load, a job that was running or queued when the server
 * stopped is marked `interrupted` (it can be resumed).
 */
import { mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { appendFile, mkdir, open, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { JobRecord } from '../schemas/index.ts';

/** Write `data` to `path` atomically: temp file in the same folder, fsync, rename, fsync folder. */
export async function writeFileAtomic(path: string, data: string): Promise<void> {
  const tmp = `${path}.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`;
  const fh = await open(tmp, 'w', 0o600);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
  try {
    await rename(tmp, path);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  const dir = await open(join(path, '..'), 'r');
  try {
    await dir.sync();
  } catch {
    /* some filesystems refuse fsync on a directory; the rename is still atomic */
  } finally {
    await dir.close();
  }
}

export class JobStore {
  readonly dir: string;
  private readonly jobs = new Map<string, JobRecord>();
  /** Serialises writes per job so an older record never lands after a newer one. */
  private readonly writes = new Map<string, Promise<void>>();
  /** Deleted ids: a late save from a finishing run must not bring a record back. */
  private readonly deleted = new Set<string>();
  private readonly appends = new Map<string, Promise<void>>();

  constructor(stateDir: string) {
    this.dir = join(stateDir, 'jobs');
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
  }

  /** Read every record; running/queued ones become interrupted (the server that ran them is gone). */
  load(): JobRecord[] {
    const changed: JobRecord[] = [];
    for (const file of readdirSync(this.dir)) {
      if (!/^[0-9a-f]+\.json$/.test(file)) continue;
      let job: JobRecord;
      try {
        job = JSON.parse(readFileSync(join(this.dir, file), 'utf8')) as JobRecord;
      } catch {
        continue; // a foreign or damaged file is not ours to fix
      }
      if (job.state === 'running' || job.state === 'queued') {
        job.error = job.state === 'running' ? 'the server stopped while this job was running' : 'the server stopped before this job started';
        job.state = 'interrupted';
        delete job.queuePosition;
        changed.push(job);
      }
      this.jobs.set(job.id, job);
    }
    for (const job of changed) void this.save(job);
    return this.list();
  }

  /** Newest first. */
  list(): JobRecord[] {
    return [...this.jobs.values()].sort((a, b) => b.createdAt.localeCompare(a.createdAt) || b.id.localeCompare(a.id));
  }

  get(id: string): JobRecord | undefined {
    return this.jobs.get(id);
  }

  /** Folder for a job's log, loss CSV and other server-side files. */
  jobDir(id: string): string {
    return join(this.dir, id);
  }

  async save(job: JobRecord): Promise<void> {
    if (this.deleted.has(job.id)) return;
    this.jobs.set(job.id, job);
    const data = JSON.stringify(job, null, 1);
    const prev = this.writes.get(job.id) ?? Promise.resolve();
    const next = prev.then(() => writeFileAtomic(join(this.dir, `${job.id}.json`), data)).catch(() => {});
    this.writes.set(job.id, next);
    await next;
  }

  /** Append to a job's log file; appends to one file are chained so lines keep their order. */
  append(id: string, file: 'events.jsonl' | 'worker.log', text: string): Promise<void> {
    const key = `${id}/${file}`;
    const dir = this.jobDir(id);
    const next = (this.appends.get(key) ?? Promise.resolve())
      .then(async () => {
        if (this.deleted.has(id)) return;
        await mkdir(dir, { recursive: true });
        await appendFile(join(dir, file), text);
      })
      .catch(() => {});
    this.appends.set(key, next);
    void next.then(() => this.appends.get(key) === next && this.appends.delete(key));
    return next;
  }

  async delete(id: string): Promise<void> {
    this.deleted.add(id);
    await Promise.all([this.writes.get(id), ...[...this.appends].filter(([k]) => k.startsWith(`${id}/`)).map(([, p]) => p)]);
    this.jobs.delete(id);
    this.writes.delete(id);
    await rm(join(this.dir, `${id}.json`), { force: true });
    await rm(this.jobDir(id), { recursive: true, force: true });
  }

  /** Wait for pending writes (tests, shutdown). */
  async flush(): Promise<void> {
    await Promise.all([...this.writes.values(), ...this.appends.values()]);
  }
}
