/**
 * @file The webui client against a stand-in webui (test/helpers/fake-webui.ts): folders discovered
 * from cmd-flags, refresh + "ready: use `name`" after an output, skipped embeddings reported,
 * VRAM unload/reload (also after a failure), pause while it generates, --api-auth, retries,
 * and a webui that is down never failing the job. Each flavour's own routes: webui-flavours.test.ts.
 */
import assert from 'node:assert/strict';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { WebuiClient } from '../bridge/webui.ts';
import { startFakeWebui, type FakeWebui } from './helpers/fake-webui.ts';
import { events, makeDirs, startTestServer, waitJob, type TestDirs, type TestServer } from './helpers/api-server.ts';

const webuiDirs = (d: TestDirs) => ({ embeddings: d.embeddings, hypernetworks: d.hypernetworks, checkpoints: d.checkpoints, lora: d.lora });
const paths = (w: FakeWebui) => w.calls.map((c) => `${c.method} ${c.path}`);

describe('with a running webui', () => {
  let dirs: TestDirs;
  let webui: FakeWebui;
  let t: TestServer;
  before(async () => {
    dirs = makeDirs();
    webui = await startFakeWebui({ dirs: webuiDirs(dirs), skip: ['too_wide'], failRefreshes: 0, auth: 'me:pw' });
    // No explicit output folders: they come from the webui's cmd-flags.
    t = await startTestServer({ webuiUrl: webui.url, webuiAuth: 'me:pw', vram: 'unload', folders: { logs: dirs.logs } }, dirs);
  });
  after(async () => {
    await t.close();
    await webui.close();
  });

  test('folders come from cmd-flags; after the output: unload → refresh → verify "ready" → reload', async () => {
    webui.calls.length = 0;
    const r = await t.api('/api/jobs', { method: 'POST', json: { type: 'stub', spec: { name: 'pallas_cat', steps: 3 } } });
    assert.equal(r.status, 201);
    assert.equal(r.body.spec.embeddingsDir, dirs.embeddings, 'from /sdapi/v1/cmd-flags');
    const ev = await events(t.base, r.body.id);
    const verify = await ev.waitFor((m) => m.type === 'webui' && m.action === 'verify');
    assert.equal(verify.ready, true);
    assert.equal(verify.message, 'ready: use `pallas_cat`');
    await ev.waitFor((m) => m.type === 'webui' && m.action === 'reload');
    const job = await waitJob(t, r.body.id, (j) => j.state === 'finished' && j.webui);
    assert.deepEqual(job.webui, { ready: true, message: 'ready: use `pallas_cat`' });
    // the flavour probes (webui-flavours.ts) are asked once, by the first refresh
    const order = paths(webui).filter((p) => !p.includes('cmd-flags') && !p.endsWith('/version') && !p.endsWith('/sd-modules'));
    assert.deepEqual(order, [
      'POST /sdapi/v1/unload-checkpoint',
      'POST /sdapi/v1/reload-checkpoint',
      'POST /sdapi/v1/refresh-embeddings',
      'GET /sdapi/v1/embeddings',
    ], 'the model back first: the check needs it loaded');
    ev.close();
  });

  test('the webui skipping the embedding is reported with its reason', async () => {
    const r = await t.api('/api/jobs', { method: 'POST', json: { type: 'stub', spec: { name: 'too_wide', steps: 2 } } });
    const job = await waitJob(t, r.body.id, (j) => j.state === 'finished' && j.webui);
    assert.equal(job.webui.ready, false);
    assert.match(job.webui.message, /skipped embedding 'too_wide'.*768/);
  });

  test('a failed job still gives the webui its checkpoint back', async () => {
    webui.calls.length = 0;
    const r = await t.api('/api/jobs', { method: 'POST', json: { type: 'stub', spec: { name: 'crashy', steps: 10, crashAt: 2, crash: 'exit' } } });
    const ev = await events(t.base, r.body.id);
    await ev.waitFor((m) => m.type === 'failed');
    await ev.waitFor((m) => m.type === 'webui' && m.action === 'reload');
    ev.close();
    assert.ok(paths(webui).includes('POST /sdapi/v1/reload-checkpoint'));
    assert.ok(!paths(webui).includes('POST /sdapi/v1/refresh-embeddings'), 'nothing to refresh');
  });

  test('hypernetworks use the extension route; listings come from the webui', async () => {
    webui.calls.length = 0;
    const r = await t.api('/api/jobs', { method: 'POST', json: { type: 'stub_hypernetwork', spec: { name: 'hn', steps: 2 } } });
    const job = await waitJob(t, r.body.id, (j) => j.state === 'finished' && j.webui);
    assert.ok(paths(webui).includes('POST /sidetrain/refresh-hypernetworks'));
    assert.equal(job.webui.message, 'ready: use `<hypernet:hn:1>`');
    const hn = await t.api('/api/webui/hypernetworks');
    assert.equal(hn.body.webuiUp, true);
    assert.deepEqual(hn.body.items.map((i: { name: string }) => i.name), ['hn']);
    const emb = await t.api('/api/webui/embeddings');
    assert.ok(emb.body.items.some((i: { name: string; loaded: boolean }) => i.name === 'too_wide' && i.loaded === false));
    writeFileSync(join(dirs.checkpoints, 'tiny.safetensors'), 'x');
    await new WebuiClient({ url: webui.url, auth: { username: 'me', password: 'pw' } }).refresh('checkpoint');
    const models = await t.api('/api/webui/models');
    assert.deepEqual(models.body.items.map((m: { title: string }) => m.title), ['tiny.safetensors [0123456789]']);
    const health = await t.api('/api/health');
    assert.deepEqual(health.body.webui, { url: webui.url, up: true, flavour: 'AUTOMATIC1111' });
  });
});

describe('webui trouble never fails a job', () => {
  test('a webui that is down: the job finishes, the refresh failure is an event', async () => {
    const dirs = makeDirs();
    const t = await startTestServer({ webuiUrl: 'http://127.0.0.1:9', webuiRetries: 2, vram: 'unload' }, dirs);
    try {
      const r = await t.api('/api/jobs', { method: 'POST', json: { type: 'stub', spec: { name: 'lonely', steps: 2 } } });
      const ev = await events(t.base, r.body.id);
      await ev.waitFor((m) => m.type === 'webui' && m.action === 'reload');
      ev.close();
      const job = await waitJob(t, r.body.id, (j) => j.state === 'finished' && j.webui);
      assert.equal(job.webui.ready, false);
      assert.ok(existsSync(join(dirs.embeddings, 'lonely.pt')));
      const log = await t.api(`/api/jobs/${r.body.id}/log?format=jsonl`);
      const webuiEvents = String(log.body).trim().split('\n').map((l) => JSON.parse(l)).filter((e) => e.type === 'webui');
      assert.deepEqual(webuiEvents.map((e) => `${e.action}:${e.ok}`), ['unload:false', 'reload:false', 'refresh:false', 'verify:false']);
      const listing = await t.api('/api/webui/embeddings');
      assert.equal(listing.body.webuiUp, false);
      assert.deepEqual(listing.body.items.map((i: { name: string }) => i.name), ['lonely'], 'from the folder');
    } finally {
      await t.close();
    }
  });

  test('refresh is retried with backoff until the webui answers', async () => {
    const dirs = makeDirs();
    const webui = await startFakeWebui({ dirs: webuiDirs(dirs), failRefreshes: 2 });
    const client = new WebuiClient({ url: webui.url, retries: 3, retryDelayMs: 5 });
    writeFileSync(join(dirs.embeddings, 'x.pt'), 'x');
    assert.equal((await client.refresh('embedding')).ok, true);
    assert.equal(paths(webui).filter((p) => p === 'POST /sdapi/v1/refresh-embeddings').length, 3);
    assert.equal((await client.verify('embedding', join(dirs.embeddings, 'x.pt'), 'x')).message, 'ready: use `x`');
    assert.equal((await client.verify('lora', '/a/nope.safetensors', '<lora:nope:1>')).ready, false);
    assert.deepEqual(await client.dirs(), { ...webuiDirs(dirs), data: '/nonexistent' });
    await webui.close();
  });

  test('pause mode freezes the worker while the webui generates', async () => {
    const dirs = makeDirs();
    const webui = await startFakeWebui({ dirs: webuiDirs(dirs) });
    const t = await startTestServer({ webuiUrl: webui.url, vram: 'pause', pausePollMs: 50 }, dirs);
    try {
      webui.generating = true;
      const r = await t.api('/api/jobs', { method: 'POST', json: { type: 'stub', spec: { name: 'polite', steps: 400, stepMs: 5 } } });
      const ev = await events(t.base, r.body.id);
      await ev.waitFor((m) => m.type === 'webui' && m.action === 'pause');
      await new Promise((res) => setTimeout(res, 150));
      const frozen = (await t.api(`/api/jobs/${r.body.id}`)).body.step;
      await new Promise((res) => setTimeout(res, 300));
      assert.equal((await t.api(`/api/jobs/${r.body.id}`)).body.step, frozen, 'no steps while paused');
      webui.generating = false;
      await ev.waitFor((m) => m.type === 'webui' && m.action === 'resume');
      await waitJob(t, r.body.id, (j) => j.state === 'finished');
      ev.close();
    } finally {
      await t.close();
      await webui.close();
    }
  });
});
