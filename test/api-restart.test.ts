/**
 * @file A server restart with jobs on disk: `sidetrain serve` (the real CLI, stub methods) is
 * killed with SIGKILL while a job runs; a new server lists the finished job, shows the running
 * one as interrupted, and resumes it from its last snapshot.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { STUB_METHODS, events, makeDirs, startTestServer, waitJob, spawnServe } from './helpers/api-server.ts';


test('server killed mid-job → restart lists finished + interrupted; resume continues', async () => {
  const dirs = makeDirs();
  const { child, base } = await spawnServe(['--state-dir', dirs.state, '--webui-dir', dirs.root, '--methods', STUB_METHODS]);
  const post = async (spec: Record<string, unknown>) =>
    (await (await fetch(`${base}/api/jobs`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ type: 'stub', spec }) })).json()) as { id: string; spec: Record<string, unknown> };
  const done = await post({ name: 'done', steps: 2 });
  assert.equal(done.spec.embeddingsDir, join(dirs.root, 'embeddings'), '--webui-dir gives the A1111 layout');
  const ev = await events(base);
  await ev.waitFor((m) => m.jobId === done.id && m.type === 'finished');
  const long = await post({ name: 'long', steps: 100000, stepMs: 10, saveEvery: 5 });
  await ev.waitFor((m) => m.jobId === long.id && m.type === 'snapshot');
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGKILL');
  await exited;
  ev.close();

  const t = await startTestServer(
    { folders: { embeddings: join(dirs.root, 'embeddings'), hypernetworks: dirs.hypernetworks, checkpoints: dirs.checkpoints, lora: dirs.lora, logs: join(dirs.state, 'runs') } },
    dirs,
  );
  try {
    const { body } = await t.api('/api/jobs');
    const byId = Object.fromEntries(body.jobs.map((j: { id: string; state: string }) => [j.id, j.state]));
    assert.equal(byId[done.id], 'finished');
    assert.equal(byId[long.id], 'interrupted');
    assert.ok(existsSync(join(dirs.root, 'embeddings', 'done.pt')));
    const resumed = await t.api(`/api/jobs/${long.id}/resume`, { method: 'POST' });
    assert.equal(resumed.status, 200);
    assert.equal(resumed.body.spec.resume, true);
    const ev2 = await events(t.base, long.id);
    const started = await ev2.waitFor((m) => m.type === 'started');
    assert.ok(started.startStep >= 5, `resumed at ${started.startStep}`);
    await t.api(`/api/jobs/${long.id}/cancel`, { method: 'POST' });
    await waitJob(t, long.id, (j) => j.state === 'cancelled');
    ev2.close();
  } finally {
    await t.close();
  }
});
