/**
 * @file `--vram pause` with a method that calls ctx.waitIfPaused: while the (stand-in) webui
 * generates, the job waits between steps in a live worker (an IPC pause, not SIGSTOP), resumes
 * when the webui is idle, and a cancel ends the pause at once. The SIGSTOP fallback for methods
 * without waitIfPaused is covered in webui-client.test.ts.
 */
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { describe, test } from 'node:test';
import { startFakeWebui, type FakeWebui } from './helpers/fake-webui.ts';
import { events, makeDirs, startTestServer, waitJob, type TestServer } from './helpers/api-server.ts';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Linux process state letter ('T' = stopped by a signal); undefined elsewhere. */
function procState(pid: number): string | undefined {
  const stat = `/proc/${pid}/stat`;
  return existsSync(stat) ? readFileSync(stat, 'utf8').replace(/^.*\) /s, '')[0] : undefined;
}

async function withServer(fn: (t: TestServer, webui: FakeWebui) => Promise<void>): Promise<void> {
  const dirs = makeDirs();
  const webui = await startFakeWebui({ dirs: { embeddings: dirs.embeddings, hypernetworks: dirs.hypernetworks, checkpoints: dirs.checkpoints, lora: dirs.lora } });
  const t = await startTestServer({ webuiUrl: webui.url, vram: 'pause', pausePollMs: 30 }, dirs);
  try {
    await fn(t, webui);
  } finally {
    await t.close();
    await webui.close();
  }
}

/** Start a pausable stub job, let it step, then make the webui generate until the job holds. */
async function pausedJob(t: TestServer, webui: FakeWebui, name: string) {
  const r = await t.api('/api/jobs', { method: 'POST', json: { type: 'stub', spec: { name, steps: 100000, stepMs: 2, pausable: true } } });
  assert.equal(r.status, 201);
  const ev = await events(t.base, r.body.id);
  await ev.waitFor((m) => m.type === 'step' && m.step >= 3);
  webui.generating = true;
  const pause = await ev.waitFor((m) => m.type === 'webui' && m.action === 'pause');
  assert.match(pause.message, /after the current step/, 'paused between steps, not frozen');
  await ev.waitFor((m) => m.type === 'log' && m.message === 'paused between steps');
  return { id: r.body.id as string, ev };
}

describe('--vram pause with ctx.waitIfPaused', () => {
  test('the job waits between steps in a running worker while the webui generates, then resumes', async () => {
    await withServer(async (t, webui) => {
      const { id, ev } = await pausedJob(t, webui, 'polite');
      const held = (await t.api(`/api/jobs/${id}`)).body.step;
      await sleep(250);
      assert.equal((await t.api(`/api/jobs/${id}`)).body.step, held, 'no steps while paused');
      const pid = t.srv.manager.workerPid(id)!;
      const state = procState(pid);
      if (state !== undefined) assert.notEqual(state, 'T', 'worker not stopped by SIGSTOP');
      assert.equal((await t.api('/api/health')).status, 200);

      webui.generating = false;
      await ev.waitFor((m) => m.type === 'webui' && m.action === 'resume');
      await ev.waitFor((m) => m.type === 'log' && m.message === 'resumed');
      await ev.waitFor((m) => m.type === 'step' && m.step > held + 2);
      assert.equal((await t.api(`/api/jobs/${id}/cancel`, { method: 'POST' })).status, 200);
      const job = await waitJob(t, id, (j) => j.state === 'cancelled');
      assert.ok(existsSync(job.output), 'saved on cancel');
      ev.close();
    });
  });

  test('a cancel ends the pause at once: the job saves and stops', async () => {
    await withServer(async (t, webui) => {
      const { id, ev } = await pausedJob(t, webui, 'cancel_paused');
      const t0 = Date.now();
      assert.equal((await t.api(`/api/jobs/${id}/cancel`, { method: 'POST' })).status, 200);
      const job = await waitJob(t, id, (j) => j.state === 'cancelled');
      assert.ok(Date.now() - t0 < 1500, `cancelled in ${Date.now() - t0} ms, before the SIGTERM grace`);
      assert.ok(existsSync(job.output));
      const cancelled = await ev.waitFor((m) => m.type === 'cancelled');
      assert.equal(cancelled.output, job.output);
      ev.close();
    });
  });
});
