/**
 * @file Security and bad input against the real server: token on HTTP and WebSocket, foreign
 * Origin, DNS-rebinding Host, `../` names, output folders outside the configured ones, symlinks
 * out, NUL bytes, datasets that are not folders, oversized bodies; plus the path helpers.
 */
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { mkdirSync, mkdtempSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { validate } from '../schemas/index.ts';
import { PathError, safeJoin, sanitizeName } from '../trainers/io/paths.ts';
import { hostAllowed, originAllowed, tokenMatches } from '../bridge/security.ts';
import { events, startTestServer, type TestServer } from './helpers/api-server.ts';

/** A raw request (fetch will not let us forge Host). */
function raw(url: string, headers: Record<string, string>): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request(url, { headers }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('error', reject);
    req.end();
  });
}

describe('token, Host and Origin', () => {
  const TOKEN = 's3cret-token';
  let t: TestServer;
  before(async () => {
    t = await startTestServer({ token: TOKEN, webuiUrl: 'http://127.0.0.1:9', allowedHosts: ['sidetrain.local'] });
  });
  after(() => t.close());

  test('every API route needs the bearer token', async () => {
    assert.equal((await fetch(`${t.base}/api/health`)).status, 401, 'no token');
    assert.equal((await fetch(`${t.base}/api/jobs`, { headers: { authorization: 'Bearer nope' } })).status, 401, 'wrong token');
    assert.equal((await fetch(`${t.base}/openapi.json`)).status, 401);
    assert.equal((await fetch(`${t.base}/api/jobs`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{}' })).status, 401);
    assert.equal((await t.api('/api/jobs')).status, 200, 'right token');
    assert.equal((await fetch(`${t.base}/api/jobs?token=${TOKEN}`)).status, 200, '?token= on GET (img/ws URLs)');
    assert.equal((await fetch(`${t.base}/docs`)).status, 200, 'the docs page itself holds no data');
  });

  test('the WebSocket needs the token too', async () => {
    await assert.rejects(events(t.base), /401/);
    await assert.rejects(events(t.base, undefined, { authorization: 'Bearer wrong' }), /401/);
    const ok = await events(t.base, undefined, { authorization: `Bearer ${TOKEN}` });
    ok.close();
    const q = await events(t.base, undefined, {}, [`bearer.${TOKEN}`]);
    q.close();
  });

  test('a foreign Origin is refused (HTTP and WebSocket); own and webui origins are allowed', async () => {
    const auth = { authorization: `Bearer ${TOKEN}` };
    assert.equal((await fetch(`${t.base}/api/jobs`, { headers: { ...auth, origin: 'https://evil.example' } })).status, 403);
    assert.equal((await fetch(`${t.base}/api/jobs`, { headers: { ...auth, origin: 'null' } })).status, 403);
    assert.equal((await fetch(`${t.base}/api/jobs`, { headers: { ...auth, origin: t.base } })).status, 200);
    assert.equal((await fetch(`${t.base}/api/jobs`, { headers: { ...auth, origin: 'http://127.0.0.1:9' } })).status, 200, 'the webui');
    await assert.rejects(events(t.base, undefined, { ...auth, origin: 'https://evil.example' }), /403/);
  });

  test('a rebinding Host is refused; our own names are accepted', async () => {
    const port = t.srv.port;
    const auth = { authorization: `Bearer ${TOKEN}` };
    assert.equal(await raw(`${t.base}/api/jobs`, { ...auth, host: `evil.example:${port}` }), 421);
    assert.equal(await raw(`${t.base}/api/jobs`, { ...auth, host: `localhost:${port}` }), 200);
    assert.equal(await raw(`${t.base}/api/jobs`, { ...auth, host: `[::1]:${port}` }), 200);
    assert.equal(await raw(`${t.base}/api/jobs`, { ...auth, host: `sidetrain.local:${port}` }), 200);
    assert.equal(await raw(`${t.base}/docs`, { host: `evil.example:${port}` }), 421, 'even public pages');
  });

  test('helpers', () => {
    const o = { host: '127.0.0.1' };
    assert.ok(hostAllowed('127.0.0.1:7862', o));
    assert.ok(!hostAllowed('127.0.0.1.evil.com:7862', o));
    assert.ok(!hostAllowed('user@127.0.0.1', o));
    assert.ok(!hostAllowed(undefined, o));
    assert.ok(originAllowed(undefined, '127.0.0.1:1', o));
    assert.ok(!originAllowed('http://127.0.0.1:2', '127.0.0.1:1', o), 'another port is another origin');
    assert.ok(tokenMatches('a', 'a') && !tokenMatches('a', 'ab') && !tokenMatches(undefined, 'a'));
  });
});

describe('paths and bodies', () => {
  let t: TestServer;
  let outside: string;
  before(async () => {
    t = await startTestServer({ bodyLimit: '4kb' });
    outside = mkdtempSync(join(tmpdir(), 'sidetrain-outside-'));
    symlinkSync(outside, join(t.dirs.embeddings, 'link-out'));
    mkdirSync(join(t.dirs.embeddings, 'sub'));
  });
  after(() => t.close());

  const start = (spec: Record<string, unknown>) => t.api('/api/jobs', { method: 'POST', json: { type: 'stub', spec } });
  const fieldOf = (r: { body: { errors?: { field: string }[] } }) => r.body.errors?.map((e) => e.field);

  test('names are sanitised as the webui does: ../, slashes, NUL refused, naming the field', async () => {
    for (const name of ['../evil', 'a/b', 'a\\b', 'nul\0byte', '..', 'a\u202eb', 'a／b']) {
      const r = await start({ name });
      assert.equal(r.status, 400, name);
      assert.deepEqual(fieldOf(r), ['/spec/name'], name);
    }
    // letters of any alphabet are the webui's too (Python isalnum): issue 22
    assert.equal((await start({ name: 'café ü' })).status, 201);
    const r = await start({ name: '../evil' });
    assert.match(r.body.errors[0].message, /did you mean '..evil'/);
  });

  test('output folders must stay inside the configured ones (.., absolute, symlink out)', async () => {
    for (const dir of ['../x', outside, '/etc', join(t.dirs.embeddings, 'link-out'), 'link-out', 'sub/../../x', 'a\0b']) {
      const r = await start({ name: 'n', embeddingsDir: dir });
      assert.equal(r.status, 400, dir);
      assert.deepEqual(fieldOf(r), ['/spec/embeddingsDir'], dir);
    }
    const ok = await start({ name: 'inside', steps: 1, embeddingsDir: 'sub' });
    assert.equal(ok.status, 201);
    assert.equal(ok.body.spec.embeddingsDir, join(t.dirs.embeddings, 'sub'));
    await t.api(`/api/jobs/${ok.body.id}/cancel`, { method: 'POST' });
  });

  test('an output file that is a symlink out is refused', async () => {
    symlinkSync(join(outside, 'victim.pt'), join(t.dirs.embeddings, 'victim.pt'));
    const r = await start({ name: 'victim' });
    assert.equal(r.status, 400);
    assert.deepEqual(fieldOf(r), ['/spec/name']);
  });

  test('a dataset must be a readable folder', async () => {
    const file = join(t.dirs.root, 'file.txt');
    writeFileSync(file, 'x');
    for (const images of [file, join(t.dirs.root, 'missing')]) {
      const r = await start({ name: 'n', images });
      assert.equal(r.status, 400);
      assert.deepEqual(fieldOf(r), ['/spec/images']);
    }
  });

  test('oversized bodies are refused with 413', async () => {
    const r = await start({ name: 'x'.repeat(10_000) });
    assert.equal(r.status, 413);
  });

  test('safeJoin and sanitizeName', async () => {
    const root = t.dirs.embeddings;
    assert.equal(await safeJoin(root, 'a.pt'), join(root, 'a.pt'));
    for (const bad of ['../a', '/etc/passwd', 'x\0y', 'link-out/a.pt', 'sub/../../a']) {
      await assert.rejects(safeJoin(root, bad), PathError, bad);
    }
    assert.equal(sanitizeName('pallas cat!/..'), 'pallas cat..');
  });

  test('validate() names the field without a prefix', () => {
    const errors = validate('server#/definitions/StartJobRequest', { type: 3 });
    assert.deepEqual(errors.map((e) => e.text).sort(), ['/spec is required', '/type must be string']);
  });
});

describe('the real job schemas through prepareSpec', () => {
  test('textual_inversion: defaults filled, paths resolved, errors named', async () => {
    const { prepareSpec } = await import('../bridge/spec.ts');
    const dirs = (await import('./helpers/api-server.ts')).makeDirs();
    const folders = { embeddings: dirs.embeddings, hypernetworks: dirs.hypernetworks, checkpoints: dirs.checkpoints, lora: dirs.lora, logs: dirs.logs };
    const methods = { textual_inversion: { schema: 'textual-inversion', load: async () => { throw new Error('not loaded here'); } } };
    const model = fileURLToPath(new URL('./fixtures/sd-tiny/model.safetensors', import.meta.url));
    const spec = await prepareSpec(methods, 'textual_inversion', { model, images: dirs.images, name: 'pallas_cat' }, folders);
    assert.equal(spec.embeddingsDir, dirs.embeddings);
    assert.equal(spec.logDir, dirs.logs);
    assert.equal(typeof spec.steps, 'number', 'schema default');
    await assert.rejects(prepareSpec(methods, 'textual_inversion', { model, images: dirs.images, name: 'a/b', steps: 0 }, folders), (e: Error & { errors: { field: string }[] }) =>
      e.errors.some((x) => x.field === '/spec/steps') && e.errors.some((x) => x.field === '/spec/name'));
    await assert.rejects(prepareSpec(methods, 'textual_inversion', { model: '/nope.safetensors', images: dirs.images, name: 'x' }, folders), /\/spec\/model/);
  });
});
