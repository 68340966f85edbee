/**
 * @file The training page in headless Chromium against the real server (in-process, random port,
 * temp state and output folders, a token configured) and the real Textual Inversion trainer on
 * the tiny fixture model: the page asks for the token, the form comes from the schema, a bad
 * field shows the API's message next to it, a job runs with step events, loss chart and previews
 * and finishes with its prompt, another job is cancelled, resumed and cancelled again. The page
 * is also opened through a `/sidetrain/` prefix proxy (as the webui extension serves it) to prove
 * its URLs are relative. Screenshots of each state go to test-artifacts/.
 */
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { request as httpRequest, createServer } from 'node:http';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import type { Duplex } from 'node:stream';
import { pino } from 'pino';
import type { Page } from 'playwright-core';
import { startServer, type RunningServer } from '../bridge/main.ts';
import { launchBrowser, screenshot, type TestBrowser } from './helpers/browser.ts';

const REPO = fileURLToPath(new URL('..', import.meta.url));
const MODEL = join(REPO, 'test/fixtures/sd-tiny/model.safetensors');
const IMAGES = join(REPO, 'assets/demo-images');
const TOKEN = 'ui-test-token';

let root: string;
let srv: RunningServer;
let browser: TestBrowser;
let page: Page;
const pageErrors: string[] = [];

before(async () => {
  root = mkdtempSync(join(tmpdir(), 'sidetrain-ui-'));
  const dir = (n: string) => (mkdirSync(join(root, n), { recursive: true }), join(root, n));
  const checkpoints = dir('models/Stable-diffusion');
  // Copies (the folder listing skips symlinks); the tiny model's head counts are in config.json beside it.
  copyFileSync(MODEL, join(checkpoints, 'sd-tiny.safetensors'));
  copyFileSync(join(MODEL, '../config.json'), join(checkpoints, 'config.json'));
  srv = await startServer(
    {
      port: 0,
      token: TOKEN,
      stateDir: dir('state'),
      folders: { embeddings: dir('embeddings'), hypernetworks: dir('hypernetworks'), checkpoints, lora: dir('lora'), logs: dir('logs') },
      stepIntervalMs: 0,
      cancelGraceMs: 5000,
    },
    pino({ level: 'silent' }),
  );
  browser = await launchBrowser();
  page = browser.page;
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  await browser.context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: srv.url });
});

after(async () => {
  await browser?.close();
  await srv?.close();
  if (root) rmSync(root, { recursive: true, force: true });
});

const field = (key: string) => page.locator(`.schema-form:visible .field[data-field="${key}"]`);

/** Fill the TI form; `spec` values go into the field of the same name. */
async function fillForm(spec: Record<string, string>): Promise<void> {
  const advanced = page.locator('.schema-form:visible details.advanced');
  if (!(await advanced.evaluate((d) => (d as HTMLDetailsElement).open))) await advanced.locator('summary').click();
  for (const [key, value] of Object.entries(spec)) await field(key).locator('input').fill(value);
}

/** On failure: a screenshot and the server's view of the jobs, so the log says what the page saw. */
async function explain(name: string, err: unknown): Promise<never> {
  await screenshot(page, `${name}-failure`).catch(() => {});
  const jobs = srv.manager.list().map((j) => `${j.id} ${j.state} step ${j.step}/${j.totalSteps} ${j.error ?? ''}`);
  throw Object.assign(err as Error, { message: `${(err as Error).message}\njobs: ${jobs.join('; ')}\npage errors: ${pageErrors.join('; ')}` });
}

test('the page: token, schema form, field errors, a live TI job to the end, a job cancelled and resumed', { timeout: 120_000 }, () => mainFlow().catch((e) => explain('ui-main', e)));

async function mainFlow(): Promise<void> {
  await page.goto(`${srv.url}/`);
  // 401 → the page asks for the token once.
  const dialog = page.locator('#token-dialog');
  await dialog.waitFor({ state: 'visible' });
  await screenshot(page, 'ui-01-token');
  await dialog.locator('input').fill(TOKEN);
  await dialog.locator('button[value=ok]').click();
  await page.locator('.live:not(.down)').waitFor();

  // The form is the schema's: required fields first, defaults and limits from it.
  const labels = await page.locator('.schema-form:visible > .field label').allTextContents();
  // labels are the schema's titles, words for people, not field names
  assert.deepEqual(labels.slice(0, 3).map((l) => l.replace(/\s*\*$/, '')), ['Base model', 'Training images', 'Name']);
  assert.equal(await field('steps').locator('input').inputValue(), '3000');
  assert.equal(await field('steps').locator('input').getAttribute('min'), '1');
  assert.match((await field('steps').locator('.help').textContent()) ?? '', /Max steps/);
  assert.deepEqual(await field('latentSampling').locator('option').allTextContents(), ['once', 'deterministic', 'random']);
  assert.equal(await field('useWeight').locator('input').getAttribute('type'), 'checkbox');
  assert.equal(await page.locator('.schema-form:visible details.advanced').evaluate((d) => (d as HTMLDetailsElement).open), false);
  // The checkpoint picker lists the checkpoints folder.
  const picked = await field('model').locator('select').inputValue();
  assert.match(picked, /sd-tiny\.safetensors$/);
  await page.locator('.estimate').filter({ hasText: /^Estimate: fill in/ }).waitFor();
  await screenshot(page, 'ui-02-form');

  // A bad field: the API's message appears next to it.
  await field('images').locator('input').fill(IMAGES);
  await field('name').locator('input').fill('pallas_cat');
  await field('steps').locator('input').fill('0');
  await page.locator('.train').click();
  await field('steps').locator('.field-error').filter({ hasText: 'must be >= 1' }).waitFor();
  assert.equal(await field('name').locator('.field-error').textContent(), '');
  await screenshot(page, 'ui-03-bad-field');

  // A real job on the tiny model: step events, loss chart, previews, finished with its prompt.
  await fillForm({ steps: '10', width: '64', height: '64', previewEvery: '5', previewSteps: '4', saveEvery: '5' });
  // Shown before Train: the server's estimate, or a note when this server has none (501).
  await page.locator('.estimate').filter({ hasText: /^Estimate: (peak memory|not available)/ }).waitFor();
  await page.locator('.train').click();
  assert.equal(await field('steps').locator('.field-error').textContent(), '');
  const watch = page.locator('.watch');
  await watch.locator('.watch-title', { hasText: 'pallas_cat' }).waitFor();
  await watch.locator('.log', { hasText: '[step] step' }).waitFor({ timeout: 60_000 });
  await watch.locator('.loss-chart canvas').waitFor();
  await watch.locator('.preview-latest img').waitFor();
  await screenshot(page, 'ui-04-running');
  await watch.locator('.badge.state-finished').waitFor({ timeout: 60_000 });
  await watch.locator('.preview-strip img').first().waitFor();
  assert.equal(await watch.locator('.watch-usage code').textContent(), 'a photo of pallas_cat');
  assert.equal(await page.locator('.job-row[data-state=finished] .prompt code').textContent(), 'a photo of pallas_cat');
  assert.match((await watch.locator('.progress-text').textContent()) ?? '', /^step 10 \/ 10/);
  assert.ok(Number(await watch.locator('.loss-chart').getAttribute('data-points')) >= 10, 'every step in the chart');
  assert.ok(await watch.locator('.preview-latest img').evaluate((i) => (i as HTMLImageElement).naturalWidth > 0), 'the preview image loads');
  assert.match((await watch.locator('.snapshots').textContent()) ?? '', /step 5 pallas_cat-5\.pt/);
  await watch.locator('.watch-usage .copy').click();
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), 'a photo of pallas_cat');
  await screenshot(page, 'ui-05-finished');

  // Another job, cancelled while it runs; then it can be resumed.
  await fillForm({ name: 'cancel_me', steps: '5000', previewEvery: '0', saveEvery: '0' });
  await page.locator('.train').click();
  await watch.locator('.watch-title', { hasText: 'cancel_me' }).waitFor();
  await watch.locator('.log', { hasText: '[step] step' }).waitFor({ timeout: 60_000 });
  await watch.locator('.cancel:enabled').click();
  await watch.locator('.badge.state-cancelled').waitFor({ timeout: 30_000 });
  assert.equal(await watch.locator('.resume').isEnabled(), true);
  assert.equal(await watch.locator('.cancel').isEnabled(), false);
  await screenshot(page, 'ui-06-cancelled');
  // Resume continues from the saved step; cancel it again.
  const stoppedAt = srv.manager.list().find((j) => j.spec.name === 'cancel_me')!.step;
  await watch.locator('.resume').click();
  await watch.locator('.log', { hasText: `[started] 5000 steps from ${stoppedAt}` }).waitFor({ timeout: 30_000 });
  await watch.locator('.cancel:enabled').click();
  await watch.locator('.badge.state-cancelled').waitFor({ timeout: 30_000 });
  await page.locator('.filter[data-filter=cancelled]').click();
  assert.equal(await page.locator('.job-row').count(), 1);
  await screenshot(page, 'ui-07-resumed-cancelled');
  assert.deepEqual(pageErrors, []);
}

test('the hypernetwork form: lists as comma-separated fields, enums as selects, an item error on its field', { timeout: 30_000 }, async () => {
  await page.locator('.method-tab[data-method=hypernetwork]').click();
  assert.equal(await field('sizes').locator('input').inputValue(), '768, 320, 640, 1280');
  assert.equal(await field('layerStructure').locator('input').inputValue(), '1, 2, 1');
  assert.equal(await field('activation').locator('select').inputValue(), 'linear');
  await field('images').locator('input').fill(IMAGES);
  await field('name').locator('input').fill('hn_bad');
  await field('layerStructure').locator('input').fill('1, 0, 1');
  await page.locator('.train').click();
  await field('layerStructure').locator('.field-error').filter({ hasText: 'must be > 0' }).waitFor();
  await screenshot(page, 'ui-08-hypernetwork-form');
  assert.equal(srv.manager.list().filter((j) => j.type === 'hypernetwork').length, 0, 'nothing started');
  assert.deepEqual(pageErrors, []);
});

/** A stand-in for the extension's reverse proxy: /sidetrain/… → the sidecar, HTTP and WebSocket, adding the token. */
async function prefixProxy(target: URL): Promise<{ port: number; close(): Promise<void> }> {
  const strip = (url = '/') => (url.startsWith('/sidetrain/') ? url.slice('/sidetrain'.length) : undefined);
  const proxy = createServer((req, res) => {
    const path = strip(req.url);
    if (!path) return void res.writeHead(404).end('outside /sidetrain/');
    const headers = { ...req.headers, host: target.host, authorization: `Bearer ${TOKEN}` };
    delete headers.origin;
    const up = httpRequest({ host: target.hostname, port: target.port, path, method: req.method, headers }, (r) => {
      res.writeHead(r.statusCode ?? 502, r.headers);
      r.pipe(res);
    });
    req.pipe(up);
  });
  const tunnels = new Set<Duplex>();
  proxy.on('upgrade', (req, socket, head) => {
    const path = strip(req.url);
    if (!path) return void socket.destroy();
    tunnels.add(socket);
    const upstream = connect(Number(target.port), target.hostname, () => {
      const lines = Object.entries(req.headers)
        .filter(([k]) => !['host', 'origin', 'authorization'].includes(k))
        .map(([k, v]) => `${k}: ${String(v)}`);
      upstream.write([`GET ${path} HTTP/1.1`, `host: ${target.host}`, `authorization: Bearer ${TOKEN}`, ...lines, '', ''].join('\r\n'));
      upstream.write(head);
      upstream.pipe(socket).pipe(upstream);
    });
    upstream.on('error', () => socket.destroy());
    tunnels.add(upstream);
  });
  await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
  return {
    port: (proxy.address() as { port: number }).port,
    close: async () => {
      for (const s of tunnels) s.destroy(); // upgraded sockets are no longer the server's connections
      proxy.closeAllConnections();
      await new Promise((r) => proxy.close(r));
    },
  };
}

test('the page works under the webui proxy prefix /sidetrain/ (relative URLs, live WebSocket)', { timeout: 60_000 }, async () => {
  const proxy = await prefixProxy(new URL(srv.url));
  const port = proxy.port;
  try {
    const requested: string[] = [];
    page.on('request', (r) => requested.push(new URL(r.url()).pathname));
    await page.evaluate(() => sessionStorage.clear());
    await page.goto(`http://127.0.0.1:${port}/sidetrain/`);
    await page.locator('.live:not(.down)').waitFor();
    await page.locator('.job-row[data-state=finished]').waitFor();
    await page.locator('.preview-latest img, .loss-chart canvas').first().waitFor();
    assert.equal(await page.locator('#token-dialog').isVisible(), false, 'the proxy adds the token');
    const outside = requested.filter((p) => !p.startsWith('/sidetrain/'));
    assert.deepEqual(outside, [], 'every request stays under /sidetrain/');
    await screenshot(page, 'ui-09-proxied');
  } catch (err) {
    await explain('ui-proxied', err);
  } finally {
    await proxy.close();
  }
  assert.deepEqual(pageErrors, []);
});
