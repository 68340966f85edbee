/**
 * @file Ask the probe process (bridge/probe-worker.ts) for a job's estimate or dry-run report,
 * within limits: a V8 heap limit, an RSS watch (Linux /proc) and a deadline. Whatever the file a
 * request points at — a safetensors header of 99 MB grew the server from 90 MB to 1.5 GB and held
 * /api/health for 9.3 s when it was parsed in-process — the server only waits on a pipe. A bad
 * file is the request's fault: 422 with the file's error, never 500.
 */
import { fork } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { getPriority, setPriority } from 'node:os';
import { fileURLToPath } from 'node:url';
import type { ProbeReply, ProbeRequest } from './probe-worker.ts';

const PROBE_PATH = fileURLToPath(new URL('./probe-worker.ts', import.meta.url));

export interface ProbeLimits {
  /** Wall-clock deadline (ms). */
  timeoutMs?: number;
  /** Resident memory ceiling (MB); also the probe's V8 heap limit. */
  maxRssMb?: number;
}

export const DEFAULT_PROBE_LIMITS: Record<ProbeRequest['op'], Required<ProbeLimits>> = {
  estimate: { timeoutMs: 20_000, maxRssMb: 1024 },
  // a dry run decodes every image (sizes, buckets) and keeps them: slower and larger for a big
  // dataset; one huge image is refused from its header (data/images.ts)
  dryRun: { timeoutMs: 300_000, maxRssMb: 4096 },
};

/** The probe could not answer: the request's file or dataset is at fault (422), or it timed out. */
export class ProbeError extends Error {
  constructor(message: string, readonly status = 422) {
    super(message);
  }
}

const RSS_POLL_MS = 100;

/** Resident set size of `pid` in MB from /proc, or undefined where there is none. */
async function rssMb(pid: number): Promise<number | undefined> {
  try {
    const m = /VmRSS:\s*(\d+) kB/.exec(await readFile(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) / 1024 : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Probes at once; the rest wait their turn. Each is a Node process that loads the trainers: a
 * client sending estimates as fast as it can must not fill the CPUs the server answers from.
 */
const MAX_PROBES = 2;
let running = 0;
const waiting: (() => void)[] = [];

/** Run one probe; resolves with its result or rejects with a ProbeError saying why not. */
export async function probe(req: ProbeRequest, limits: ProbeLimits = {}): Promise<unknown> {
  if (running >= MAX_PROBES) await new Promise<void>((r) => waiting.push(r));
  running++;
  try {
    return await probeNow(req, limits);
  } finally {
    running--;
    waiting.shift()?.();
  }
}

function probeNow(req: ProbeRequest, limits: ProbeLimits): Promise<unknown> {
  const { timeoutMs, maxRssMb } = { ...DEFAULT_PROBE_LIMITS[req.op], ...limits };
  const what = req.op === 'estimate' ? `estimating this job (reading ${String(req.spec.model ?? 'its model')})` : 'the dry run (reading the dataset)';
  const child = fork(PROBE_PATH, [], {
    execArgv: ['--import', 'tsx', `--max-old-space-size=${maxRssMb}`],
    stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
    serialization: 'advanced',
  });
  // Below the server's priority: a probe's CPU must not slow the answers of the server itself.
  if (child.pid) {
    try {
      setPriority(child.pid, Math.min(19, getPriority() + 10));
    } catch { /* not permitted: runs at the server's priority */ }
  }
  let stderr = '';
  child.stderr?.on('data', (b: Buffer) => void (stderr = (stderr + b.toString()).slice(-2000)));
  return new Promise((resolve, reject) => {
    let reply: ProbeReply | undefined;
    let stopped: string | undefined;
    const stop = (why: string) => {
      stopped ??= why;
      child.kill('SIGKILL');
    };
    const deadline = setTimeout(() => stop(`${what} took longer than ${timeoutMs / 1000} s`), timeoutMs);
    const watch = setInterval(() => {
      if (!child.pid) return;
      void rssMb(child.pid).then((mb) => {
        if (mb !== undefined && mb > maxRssMb) stop(`${what} needed more than ${maxRssMb} MB of memory`);
      });
    }, RSS_POLL_MS);
    child.on('message', (msg: ProbeReply) => void (reply = msg));
    child.on('error', (err) => stop(`${what} could not start: ${err.message}`));
    child.on('exit', (code, signal) => {
      clearTimeout(deadline);
      clearInterval(watch);
      if (reply?.ok) return resolve(reply.result);
      if (reply) return reject(new ProbeError(reply.message));
      if (stopped) return reject(new ProbeError(`${stopped}: is it a real checkpoint / are these real images?`));
      const oom = /heap out of memory|Allocation failed/i.test(stderr);
      reject(new ProbeError(oom ? `${what} needed more than ${maxRssMb} MB of memory` : `${what} failed: the probe process exited (${signal ?? `code ${code}`})`));
    });
    child.send(req);
  });
}
