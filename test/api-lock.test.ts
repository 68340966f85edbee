/**
 * @file No double worker after a killed server: `sidetrain serve` (the real CLI, stub methods) is
 * killed with SIGKILL while its worker ignores the cancel and keeps training (an orphan, as a
 * worker finishing a long step would). A resume on a new server waits for the orphan's pid from
 * the job's lock file, or, past its wait, fails with a clear message; a stale lock (the orphan
 * killed with SIGKILL) is ignored.
 */
import assert from 'node:assert/strict';
import { existsSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { WorkerProcess } from '../bridge/worker-host.ts';
import { LOCK_FILE, lockPid, waitForWorkerExit, workerAlive } from '../bridge/worker-lock.ts';
import { STUB_METHODS, events, makeDirs, startTestServer, waitJob, type TestDirs, spawnServe } from './helpers/api-server.ts';


/** A real server with a stub job that ignores cancels; SIGKILL the server; the orphan's job id + pid. */
async function orphan(dirs: TestDirs, spec: Record<string, unknown>): Promise<{ id: string; pid: number }> {
  const { child, base } = await spawnServe(['--state-dir', dirs.state, '--methods', STUB_METHODS, '--embeddings-dir', dirs.embeddings]);
  const res = await fetch(`${base}/api/jobs`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ type: 'stub', spec }) });
  const { id } = (await res.json()) as { id: string };
  const ev = await events(base, id);
  await ev.waitFor((m) => m.type === 'snapshot');
  ev.close();
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGKILL');
  await exited;
  const pid = lockPid(join(dirs.state, 'jobs', id, LOCK_FILE));
  assert.ok(pid && workerAlive(pid), `the orphan worker holds the lock (pid ${pid})`);
  return { id, pid: pid! };
}

const serverOn = (dirs: TestDirs, lockWaitMs?: number) =>
  startTestServer({ lockWaitMs, folders: { embeddings: dirs.embeddings, hypernetworks: dirs.hypernetworks, checkpoints: dirs.checkpoints, lora: dirs.lora, logs: join(dirs.state, 'runs') } }, dirs);

test('a resume waits for the killed server’s orphan worker, then runs alone', async () => {
  const dirs = makeDirs();
  // ~2 s of steps left after the kill, cancel ignored: the orphan outlives the server.
  const { id, pid } = await orphan(dirs, { name: 'orph', steps: 250, stepMs: 10, saveEvery: 5, ignoreAbort: true });
  const t = await serverOn(dirs);
  try {
    const ev = await events(t.base, id);
    assert.equal((await t.api(`/api/jobs/${id}/resume`, { method: 'POST' })).status, 200);
    const waiting = await ev.waitFor((m) => m.type === 'log' && /waiting for an earlier worker/.test(m.message));
    assert.match(waiting.message, new RegExp(`pid ${pid}\\b`));
    await ev.waitFor((m) => m.type === 'started', 20_000);
    assert.equal(workerAlive(pid), false, 'the new worker started only after the orphan exited');
    const job = await waitJob(t, id, (j) => j.state === 'finished', 20_000);
    assert.equal(job.step, 250);
    assert.ok(existsSync(join(dirs.embeddings, 'orph.pt')));
    assert.equal(existsSync(join(dirs.state, 'jobs', id, LOCK_FILE)), false, 'the lock is released on exit');
    ev.close();
  } finally {
    await t.close();
  }
});

test('past the wait the resume fails with a clear message; a stale lock is ignored', async () => {
  const dirs = makeDirs();
  const { id, pid } = await orphan(dirs, { name: 'stuck', steps: 100000, stepMs: 10, saveEvery: 5, ignoreAbort: true });
  try {
    const t = await serverOn(dirs, 300);
    try {
      await t.api(`/api/jobs/${id}/resume`, { method: 'POST' });
      const job = await waitJob(t, id, (j) => j.state === 'failed');
      assert.match(job.error, new RegExp(`earlier worker of this job \\(pid ${pid}\\) is still running.*then resume`));
      process.kill(pid, 'SIGKILL'); // the orphan this test started; its lock stays behind, stale
      await new Promise((r) => setTimeout(r, 200));
      assert.equal(lockPid(join(dirs.state, 'jobs', id, LOCK_FILE)), pid);
      const ev = await events(t.base, id);
      await t.api(`/api/jobs/${id}/resume`, { method: 'POST' });
      const started = await ev.waitFor((m) => m.type === 'started');
      assert.ok(started.startStep >= 5, `resumed from its snapshot at ${started.startStep}`);
      assert.ok(!ev.messages.some((m) => m.type === 'log' && /waiting for an earlier worker/.test(m.message)), 'no wait for a dead pid');
      await t.api(`/api/jobs/${id}/cancel`, { method: 'POST' });
      await waitJob(t, id, (j) => j.state === 'cancelled' || j.state === 'finished');
      ev.close();
    } finally {
      await t.close();
    }
  } finally {
    if (workerAlive(pid)) process.kill(pid, 'SIGKILL');
  }
});

test('waitForWorkerExit: no lock, a dead pid, and a pid that is not a worker are all clear', async () => {
  const dirs = makeDirs();
  const lock = join(dirs.root, LOCK_FILE);
  assert.equal(await waitForWorkerExit(lock, 10), undefined);
  writeFileSync(lock, JSON.stringify({ pid: 2 ** 22 + 12345 }));
  assert.equal(await waitForWorkerExit(lock, 10), undefined);
  writeFileSync(lock, JSON.stringify({ pid: process.pid }));
  assert.equal(await waitForWorkerExit(lock, 10), undefined);
  writeFileSync(lock, 'garbage');
  assert.equal(await waitForWorkerExit(lock, 10), undefined);
  rmSync(dirs.root, { recursive: true, force: true });
});

test('a cancel that comes while the job waits (no worker yet) reaches the worker when it starts', async () => {
  const dirs = makeDirs();
  const worker = new WorkerProcess({ methodsModule: STUB_METHODS });
  worker.cancel();
  const spec = { name: 'early', steps: 100000, stepMs: 5, saveEvery: 5, previewEvery: 0, embeddingsDir: dirs.embeddings, logDir: dirs.logs, crash: 'throw', ignoreAbort: false, pausable: false, resume: false, overwrite: false };
  const lock = join(dirs.state, 'early', LOCK_FILE);
  const outcome = await worker.run('stub', spec, lock, { onEvent: () => {} });
  assert.equal(outcome.kind, 'result');
  assert.ok(outcome.kind === 'result' && outcome.result.cancelled && outcome.result.step < 100000);
  assert.equal(existsSync(lock), false, 'lock released');
  rmSync(dirs.root, { recursive: true, force: true });
});
