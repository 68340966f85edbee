/**
 * @file One worker per job at a time, across server restarts: the worker writes its pid to
 * `<state>/jobs/<id>/worker.lock` and removes it on exit. A server killed with SIGKILL leaves its
 * worker finishing a step (it stops at the IPC disconnect, after its step, within 30 s); a resume
 * started meanwhile waits for that pid to exit before it starts a second trainer on the same
 * output. A lock whose pid is gone (a worker killed with SIGKILL) or belongs to some other
 * program by now (pid reuse) is stale and ignored.
 */
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';

export const LOCK_FILE = 'worker.lock';

const POLL_MS = 100;

/** In the worker: hold the lock until this process exits, however it exits (short of SIGKILL). */
export function holdLock(path: string): void {
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, JSON.stringify({ pid: process.pid, startedAt: new Date().toISOString() }));
  process.on('exit', () => {
    if (lockPid(path) === process.pid) rmSync(path, { force: true });
  });
}

/** The pid in a lock file, or undefined (no file, unreadable). */
export function lockPid(path: string): number | undefined {
  try {
    const pid = (JSON.parse(readFileSync(path, 'utf8')) as { pid?: unknown }).pid;
    return typeof pid === 'number' && Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** Is `pid` alive and, where /proc says, still a sidetrain worker (not a reused pid)? */
export function workerAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false; // ESRCH: gone; EPERM: someone else's process, so not our worker
  }
  try {
    // A zombie's cmdline is empty: exited, only not reaped yet.
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('worker');
  } catch {
    return true; // no /proc (macOS, Windows): trust the pid
  }
}

/**
 * Wait until the lock's worker has exited, up to `timeoutMs`; `onWait` is told once when there is
 * one to wait for. Resolves undefined when the way is clear, else the pid still running.
 */
export async function waitForWorkerExit(path: string, timeoutMs: number, onWait?: (pid: number) => void): Promise<number | undefined> {
  const pid = lockPid(path);
  if (pid === undefined || pid === process.pid || !workerAlive(pid)) return undefined;
  onWait?.(pid);
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    await new Promise((r) => setTimeout(r, POLL_MS));
    if (!workerAlive(pid)) return undefined;
  }
  return pid;
}
