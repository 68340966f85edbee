/**
 * @file The fast half of the attack and fault regression suite (the slow half is `npm run
 * stress`, scripts/stress.ts). Each case asserts the exact status and that nothing was written:
 * the token on every route in every spelling, requests that used to hold the event loop for
 * minutes, JSON too deep to validate, `__proto__` as a method or pickle module, numbers and folder
 * names that passed validation only to fail later.
 */
import assert from 'node:assert/strict';
import { readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { filewordsFromFilename } from '../trainers/data/dataset.ts';
import { isAllowedGlobal, unpickle } from '../trainers/io/unpickle.ts';
import { jsonDepth } from '../bridge/json-depth.ts';
import { events, startTestServer, waitJob, type TestServer } from './helpers/api-server.ts';

const REAL_METHODS = fileURLToPath(new URL('../trainers/methods/index.ts', import.meta.url));
const TOKEN = 'attack-token';

/** Every spelling of `path` a router or static handler might take for it. */
function spellings(path: string): string[] {
  const upper = path.toUpperCase();
  const mixed = path.replace(/[a-z]/g, (c, i: number) => (i % 2 ? c.toUpperCase() : c));
  const encoded = path.replace(/\//g, (s, i: number) => (i > 0 ? '%2F' : s));
  const firstLetter = path.replace(/^\/(.)/, (_m, c: string) => `/%${c.charCodeAt(0).toString(16)}`);
  return [path, upper, mixed, `/${path}`, path.replace(/\//g, '//'), `${path}/`, `${path}.`, `${path}%2e`, encoded, firstLetter, `${path}?x=1`, `/./${path.slice(1)}`, `/x/..${path}`];
}

/** The routes of the OpenAPI document with their path parameters filled in. */
function concretePaths(doc: { paths: Record<string, Record<string, unknown>> }, id: string): { method: string; path: string }[] {
  const out: { method: string; path: string }[] = [];
  for (const [p, ops] of Object.entries(doc.paths)) {
    const path = p.replace('{id}', id).replace('{index}', '0');
    for (const method of Object.keys(ops)) out.push({ method: method.toUpperCase(), path });
  }
  return out;
}

describe('the token cannot be bypassed', () => {
  let t: TestServer;
  before(async () => {
    t = await startTestServer({ token: TOKEN });
  });
  after(() => t.close());

  test('every route of /openapi.json in every spelling answers 401 without the token', async () => {
    const job = await t.api('/api/jobs', { method: 'POST', json: { type: 'stub', spec: { name: 'tok', steps: 2, stepMs: 1, previewEvery: 1 } } });
    assert.equal(job.status, 201);
    const doc = await t.api('/openapi.json');
    assert.equal(doc.status, 200);
    const routes = [...concretePaths(doc.body, job.body.id), { method: 'GET', path: '/openapi.json' }, { method: 'GET', path: '/api/events' }];
    assert.ok(routes.length >= 15, `the document lists ${routes.length} routes`);
    const leaks: string[] = [];
    for (const { method, path } of routes) {
      for (const spelled of spellings(path)) {
        const res = await fetch(t.base + spelled, { method, headers: method === 'POST' ? { 'content-type': 'application/json' } : {}, body: method === 'POST' ? '{}' : undefined, redirect: 'manual' });
        await res.arrayBuffer();
        if (res.status !== 401) leaks.push(`${method} ${spelled} → ${res.status}`);
      }
    }
    assert.deepEqual(leaks, []);
  });

  test('WebSocket upgrades in any spelling need the token', async () => {
    for (const path of ['/api/events', '/API/events', '/Api/Events', '//api/events', '/api%2Fevents', '/nothing']) {
      await assert.rejects(events(t.base + path.replace('/api/events', '').replace(/^\/$/, '')), /ws refused: 401|401/);
    }
    const ws = await events(t.base, undefined, { authorization: `Bearer ${TOKEN}` });
    ws.close();
  });

  test('only the docs and the page are public', async () => {
    assert.equal((await fetch(`${t.base}/docs`)).status, 200);
    assert.equal((await fetch(`${t.base}/DOCS`)).status, 200, 'the docs page in any case: it holds no data');
    assert.equal((await fetch(`${t.base}/`)).status, 200);
    assert.equal((await fetch(`${t.base}/index.html`)).status, 200);
    assert.equal((await fetch(`${t.base}/no-such-file`)).status, 401, 'unknown paths are not public either');
  });
});

describe('no request holds the event loop', () => {
  let t: TestServer;
  before(async () => {
    t = await startTestServer({ methodsModule: REAL_METHODS });
    writeFileSync(join(t.dirs.checkpoints, 'm.safetensors'), 'x');
  });
  after(() => t.close());

  const spec = (extra: Record<string, unknown>) => ({ type: 'textual_inversion', spec: { name: 'a', model: 'm.safetensors', images: t.dirs.images, ...extra } });

  test('a 250 000-character lr schedule is refused at once (was 246 s)', async () => {
    const t0 = performance.now();
    const res = await t.api('/api/jobs', { method: 'POST', json: spec({ lr: `${'1'.repeat(250_000)}x` }) });
    const ms = performance.now() - t0;
    assert.equal(res.status, 400);
    assert.match(res.body.error, /\/spec\/lr must NOT have more than 1000 characters/);
    assert.ok(ms < 2000, `answered in ${ms.toFixed(0)} ms`);
    assert.deepEqual(readdirSync(t.dirs.embeddings), []);
  });

  test('a backtracking filename word regex runs in linear time; RE2-unsupported syntax is refused at submission', async () => {
    const t0 = performance.now();
    assert.equal(filewordsFromFilename(`${'a'.repeat(5000)}b.png`, '(a|a)+$'), '');
    assert.ok(performance.now() - t0 < 2000);
    const res = await t.api('/api/jobs', { method: 'POST', json: spec({ filenameWordRegex: '(?=a)\\w+' }) });
    assert.equal(res.status, 400);
    assert.match(res.body.error, /\/spec\/filenameWordRegex .*not valid RE2 syntax/);
  });

  test("lr '1e400' and a 300-character folder name are refused at submission", async () => {
    const lr = await t.api('/api/jobs', { method: 'POST', json: spec({ lr: '1e400' }) });
    assert.equal(lr.status, 400);
    assert.match(lr.body.error, /\/spec\/lr .*not a finite number/);
    const long = await t.api('/api/jobs', { method: 'POST', json: spec({ embeddingsDir: join(t.dirs.embeddings, 'd'.repeat(300)) }) });
    assert.equal(long.status, 400);
    assert.match(long.body.error, /\/spec\/embeddingsDir has a folder or file name of 300 bytes/);
    assert.deepEqual(readdirSync(t.dirs.embeddings), []);
  });

  test('JSON nested 100 000 deep is a 400, not a stack overflow (500)', async () => {
    const body = `{"type":"textual_inversion","spec":{"name":${'['.repeat(100_000)}${']'.repeat(100_000)}}}`;
    const res = await t.api('/api/jobs', { method: 'POST', body, headers: { 'content-type': 'application/json' } });
    assert.equal(res.status, 400);
    assert.match(res.body.error, /nested deeper than 32 levels/);
    assert.equal(jsonDepth(Buffer.from('{"a":"[[[[\\"[[","b":[[1]]}')), 3, 'brackets in strings do not count');
  });

  test("type '__proto__' / 'constructor' is a 400 naming /type, not 501 \"has no schema 'undefined'\"", async () => {
    for (const type of ['__proto__', 'constructor', 'toString', 'hasOwnProperty']) {
      const res = await t.api('/api/jobs', { method: 'POST', json: { type, spec: {} } });
      assert.equal(res.status, 400, type);
      assert.match(res.body.error, /^\/type must be one of: textual_inversion/);
      const est = await t.api('/api/estimate', { method: 'POST', json: { type, spec: {} } });
      assert.equal(est.status, 400, type);
    }
  });
});

describe('the worker honours SIGTERM', () => {
  test('within a second, even in a step that ignores the abort (cancel needed 26 s and SIGKILL)', async () => {
    const t = await startTestServer({ cancelGraceMs: 60_000, killGraceMs: 60_000 });
    try {
      const res = await t.api('/api/jobs', { method: 'POST', json: { type: 'stub', spec: { name: 'term', steps: 100_000, stepMs: 5, ignoreAbort: true } } });
      const ev = await events(t.base, res.body.id);
      await ev.waitFor((m) => m.type === 'step');
      const pid = t.srv.manager.workerPid(res.body.id)!;
      const t0 = performance.now();
      process.kill(pid, 'SIGTERM');
      const job = await waitJob(t, res.body.id, (j) => j.state !== 'running', 5000);
      const ms = performance.now() - t0;
      assert.equal(job.state, 'failed');
      assert.match(job.error, /SIGTERM/);
      assert.ok(ms < 1000, `the worker took ${ms.toFixed(0)} ms to stop`);
      ev.close();
    } finally {
      await t.close();
    }
  });
});

describe('the restricted unpickler', () => {
  test("a global whose module is '__proto__' fails closed, naming the file", () => {
    assert.equal(isAllowedGlobal('__proto__', 'constructor'), false);
    assert.equal(isAllowedGlobal('constructor', 'name'), false);
    // PROTO 2, GLOBAL '__proto__\nconstructor\n', STOP
    const pickle = Buffer.concat([Buffer.from([0x80, 2]), Buffer.from('c__proto__\nconstructor\n', 'latin1'), Buffer.from('.')]);
    assert.throws(() => unpickle(pickle, 'evil.pt'), /^Error: evil\.pt: pickle refers to global '__proto__\.constructor', which is not allowed/);
  });
});
