/**
 * @file The server end to end on a random 127.0.0.1 port with the stub methods: lifecycle over
 * HTTP + WebSocket, cancel, resume, the queue, a worker killed mid-job, schema errors.
 */
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { events, startTestServer, waitJob, type TestServer } from './helpers/api-server.ts';

const start = (t: TestServer, spec: Record<string, unknown>, type = 'stub') => t.api('/api/jobs', { method: 'POST', json: { type, spec } });

describe('job lifecycle', () => {
  let t: TestServer;
  before(async () => {
    t = await startTestServer();
  });
  after(() => t.close());

  test('start → state first → step events → preview → finished → file in the embeddings dir', async () => {
    const res = await start(t, { name: 'pallas_cat', steps: 12, previewEvery: 6, images: t.dirs.images });
    assert.equal(res.status, 201);
    assert.equal(res.body.type, 'stub');
    assert.equal(res.body.spec.embeddingsDir, t.dirs.embeddings, 'output folder filled in from the config');
    assert.equal(res.body.spec.steps, 12);
    assert.equal(res.body.spec.saveEvery, 5, 'schema defaults filled in');
    const ev = await events(t.base, res.body.id);
    assert.equal(ev.messages[0]?.type, 'state', 'a late joiner gets the current state first');
    assert.equal(ev.messages[0].job.id, res.body.id);
    const finished = await ev.waitFor((m) => m.type === 'finished');
    ev.close();
    const steps = ev.messages.filter((m) => m.type === 'step');
    assert.ok(steps.length >= 1);
    for (const k of ['step', 'totalSteps', 'loss', 'learnRate', 'itPerSec', 'etaSeconds']) assert.equal(typeof steps[0][k], 'number', k);
    const seqs = ev.messages.filter((m) => m.type !== 'state').map((m) => m.seq);
    assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), 'events arrive in order');
    const preview = ev.messages.find((m) => m.type === 'preview');
    assert.match(preview.url, new RegExp(`^/api/jobs/${res.body.id}/previews/0$`));
    assert.equal(finished.output, join(t.dirs.embeddings, 'pallas_cat.pt'));
    assert.equal(finished.usage, 'pallas_cat');
    assert.ok(existsSync(finished.output));

    const job = await waitJob(t, res.body.id, (j) => j.state === 'finished');
    assert.equal(job.step, 12);
    assert.equal(job.backend, 'stub');
    assert.equal(job.previews.length, 2);
    const img = await fetch(t.base + job.previews[0].url);
    assert.equal(img.status, 200);
    assert.match(img.headers.get('content-type') ?? '', /image\/png/);
    const csv = await t.api(`/api/jobs/${job.id}/loss.csv`);
    // the loop's own file, served as written: every step once, however fast the steps came
    assert.equal(csv.body, readFileSync(job.lossLog, 'utf8'));
    assert.match(csv.body, /^step,epoch,epoch_step,loss,learn_rate\n1,0,2,1,0.005\n/);
    assert.deepEqual(csv.body.trim().split('\n').slice(1).map((l: string) => Number(l.split(',')[0])), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    const log = await t.api(`/api/jobs/${job.id}/log`);
    assert.match(log.body, /\[finished\]/);
    const list = await t.api('/api/jobs');
    assert.ok(list.body.jobs.some((j: { id: string }) => j.id === job.id));
    const health = await t.api('/api/health');
    assert.equal(health.body.backend, 'stub', 'backend reported by the worker');
    assert.equal((await t.api(`/api/jobs/${job.id}`, { method: 'DELETE' })).status, 204);
    assert.equal((await t.api(`/api/jobs/${job.id}`)).status, 404);
    assert.ok(existsSync(finished.output), 'deleting a job keeps its output');
  });

  test('cancel a running job: it stops after a step, saves, and is cancelled', async () => {
    const res = await start(t, { name: 'cancel_me', steps: 5000, stepMs: 5 });
    const ev = await events(t.base, res.body.id);
    await ev.waitFor((m) => m.type === 'step' && m.step >= 3);
    assert.equal((await t.api(`/api/jobs/${res.body.id}/cancel`, { method: 'POST' })).status, 200);
    await ev.waitFor((m) => m.type === 'cancelled');
    const job = await waitJob(t, res.body.id, (j) => j.state === 'cancelled');
    assert.ok(job.step < 5000);
    assert.ok(existsSync(join(t.dirs.embeddings, 'cancel_me.pt')), 'the method saved on cancel');
    assert.equal((await t.api(`/api/jobs/${res.body.id}/cancel`, { method: 'POST' })).status, 409);
    ev.close();

    // resume continues from the last snapshot with resume: true
    const r = await t.api(`/api/jobs/${res.body.id}/resume`, { method: 'POST' });
    assert.equal(r.status, 200);
    assert.equal(r.body.spec.resume, true);
    const ev2 = await events(t.base, res.body.id);
    const started = await ev2.waitFor((m) => m.type === 'started' && m.seq > job.step);
    assert.ok(started.startStep > 0, `resumed from step ${started.startStep}`);
    await t.api(`/api/jobs/${res.body.id}/cancel`, { method: 'POST' });
    const again = await waitJob(t, res.body.id, (j) => j.state === 'cancelled');
    assert.equal(again.attempts, 2);
    ev2.close();
  });

  test('two jobs: the second is queued, then runs after the first', async () => {
    const a = await start(t, { name: 'first', steps: 30, stepMs: 10 });
    const b = await start(t, { name: 'second', steps: 3 });
    assert.equal(b.body.state, 'queued');
    assert.equal(b.body.queuePosition, 0);
    const c = await start(t, { name: 'third', steps: 3 });
    assert.equal(c.body.queuePosition, 1);
    const cc = await t.api(`/api/jobs/${c.body.id}/cancel`, { method: 'POST' });
    assert.equal(cc.body.state, 'cancelled', 'a queued job is cancelled at once');
    const ja = await waitJob(t, a.body.id, (j) => j.state === 'finished');
    const jb = await waitJob(t, b.body.id, (j) => j.state === 'finished');
    assert.ok(jb.startedAt >= ja.endedAt, 'one job at a time');
    assert.ok(!existsSync(join(t.dirs.embeddings, 'third.pt')));
  });

  test('a worker killed with SIGKILL mid-job: the server keeps serving, the job fails, the snapshot survives, resume works', async () => {
    const res = await start(t, { name: 'killed', steps: 40, stepMs: 20, saveEvery: 5 });
    const ev = await events(t.base, res.body.id);
    await ev.waitFor((m) => m.type === 'snapshot' && m.step >= 5);
    const pid = t.srv.manager.workerPid(res.body.id);
    assert.ok(pid);
    process.kill(pid, 'SIGKILL');
    const failed = await ev.waitFor((m) => m.type === 'failed');
    assert.match(failed.message, /SIGKILL/);
    const job = await waitJob(t, res.body.id, (j) => j.state === 'failed');
    assert.ok(job.lastSnapshot);
    const snap = JSON.parse(readFileSync(job.lastSnapshot, 'utf8')) as { step: number };
    assert.ok(snap.step >= 5);
    assert.equal((await t.api('/api/health')).status, 200, 'the server is still up');
    await t.api(`/api/jobs/${res.body.id}/resume`, { method: 'POST' });
    const started = await ev.waitFor((m) => m.type === 'started' && m.startStep > 0);
    assert.equal(started.startStep, snap.step);
    const done = await waitJob(t, res.body.id, (j) => j.state === 'finished');
    assert.equal(done.step, 40);
    ev.close();
  });

  test('a method that throws fails the job with its message', async () => {
    const res = await start(t, { name: 'thrower', steps: 10, crashAt: 2 });
    const job = await waitJob(t, res.body.id, (j) => j.state === 'failed');
    assert.match(job.error, /stub crashed at step 2/);
  });
});

describe('schema errors name the field', () => {
  let t: TestServer;
  before(async () => {
    t = await startTestServer();
  });
  after(() => t.close());

  test('bad spec fields', async () => {
    const r = await start(t, { name: 'x', steps: 0, bogus: 1 });
    assert.equal(r.status, 400);
    const texts = r.body.errors.map((e: { text: string }) => e.text);
    assert.ok(texts.includes('/spec/steps must be >= 1'), texts.join());
    assert.ok(texts.includes('/spec/bogus is not a known field'), texts.join());
    const missing = await start(t, { steps: 3 });
    assert.equal(missing.body.errors[0].field, '/spec/name');
    assert.equal(missing.body.errors[0].text, '/spec/name is required');
  });

  test('bad request bodies', async () => {
    const unknown = await start(t, { name: 'x' }, 'nope');
    assert.equal(unknown.status, 400);
    assert.equal(unknown.body.errors[0].field, '/type');
    assert.match(unknown.body.errors[0].message, /stub/);
    const noSpec = await t.api('/api/jobs', { method: 'POST', json: { type: 'stub' } });
    assert.equal(noSpec.body.errors[0].text, '/spec is required');
    const notJson = await t.api('/api/jobs', { method: 'POST', body: '{oops', headers: { 'content-type': 'application/json' } });
    assert.equal(notJson.status, 400);
    const noSchema = await start(t, { name: 'x' }, 'stub_no_schema');
    assert.equal(noSchema.status, 501);
    const badQuery = await t.api('/api/jobs?state=sleeping');
    assert.equal(badQuery.status, 400);
    assert.equal(badQuery.body.errors[0].field, '/state');
    assert.equal((await t.api('/api/jobs/0123456789abcdef')).status, 404);
  });

  test('the estimate route answers (no "not available" path); the OpenAPI document lists the routes', async () => {
    const est = await t.api('/api/estimate', { method: 'POST', json: { type: 'stub', spec: { name: 'x' } } });
    assert.notEqual(est.status, 501, JSON.stringify(est.body));
    const doc = await t.api('/openapi.json');
    assert.equal(doc.body.openapi, '3.1.0');
    assert.ok(doc.body.paths['/api/jobs'].post.requestBody);
    assert.ok(doc.body.paths['/api/jobs/{id}/cancel'].post);
    assert.ok(doc.body.components.schemas['stub-method']);
    assert.equal(doc.body.components.schemas.job.properties.state.$ref, '#/components/schemas/job/definitions/JobState');
    const docs = await t.api('/docs');
    assert.match(docs.body, /sidetrain API/);
    const methods = await t.api('/api/methods');
    assert.ok(methods.body.methods.find((m: { type: string }) => m.type === 'stub').jsonSchema.properties.steps);
  });
});

describe('a job that ignores cancel', () => {
  test('is stopped by SIGTERM then SIGKILL after the grace periods, and shown cancelled', async () => {
    const t = await startTestServer({ cancelGraceMs: 200, killGraceMs: 200 });
    try {
      const res = await start(t, { name: 'stubborn', steps: 100000, stepMs: 5, ignoreAbort: true });
      const ev = await events(t.base, res.body.id);
      await ev.waitFor((m) => m.type === 'step');
      await t.api(`/api/jobs/${res.body.id}/cancel`, { method: 'POST' });
      const job = await waitJob(t, res.body.id, (j) => j.state === 'cancelled', 5000);
      assert.ok(job.step < 100000);
      ev.close();
    } finally {
      await t.close();
    }
  });
});
