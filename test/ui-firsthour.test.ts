/**
 * @file The page as a new user meets it (issue 22), in headless Chromium against the real server:
 * labels are words; every id is unique (a label focuses its own field); a Dreambooth job cannot
 * be submitted without an instance prompt; the dataset panel shows every image with its caption
 * and the prompt it trains with, names the images whose caption replaces the trigger word, and
 * saves an edited caption as `<stem>.txt`; switching the method clears the old estimate at once.
 * Screenshots go to test-artifacts/ (docs/ has copies).
 */
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { pino } from 'pino';
import type { Page } from 'playwright-core';
import { startServer, type RunningServer } from '../bridge/main.ts';
import { launchBrowser, screenshot, type TestBrowser } from './helpers/browser.ts';

const REPO = fileURLToPath(new URL('..', import.meta.url));
const MODEL = join(REPO, 'test/fixtures/sd-tiny/model.safetensors');

let root: string;
let images: string;
let srv: RunningServer;
let browser: TestBrowser;
let page: Page;
const pageErrors: string[] = [];

before(async () => {
  root = mkdtempSync(join(tmpdir(), 'sidetrain-ui1-'));
  const dir = (n: string) => (mkdirSync(join(root, n), { recursive: true }), join(root, n));
  const checkpoints = dir('models/Stable-diffusion');
  copyFileSync(MODEL, join(checkpoints, 'sd-tiny.safetensors'));
  copyFileSync(join(MODEL, '../config.json'), join(checkpoints, 'config.json'));
  images = dir('photos');
  for (const f of readdirSync(join(REPO, 'assets/demo-images'))) if (f.endsWith('.png')) copyFileSync(join(REPO, 'assets/demo-images', f), join(images, f));
  copyFileSync(join(REPO, 'assets/demo-images/README.md'), join(images, 'notes.md'));
  srv = await startServer(
    { port: 0, stateDir: dir('state'), folders: { embeddings: dir('embeddings'), hypernetworks: dir('hypernetworks'), checkpoints, lora: dir('lora'), logs: dir('logs') } },
    pino({ level: 'silent' }),
  );
  browser = await launchBrowser();
  page = browser.page;
  page.on('pageerror', (e) => pageErrors.push(String(e)));
});

after(async () => {
  await browser?.close();
  await srv?.close();
  if (root) rmSync(root, { recursive: true, force: true });
});

const field = (key: string) => page.locator(`.schema-form:visible .field[data-field="${key}"]`);

test('labels are words, ids unique; Dreambooth needs an instance prompt; the dataset panel shows and edits captions; the estimate follows the method', { timeout: 120_000 }, async () => {
  try {
    await page.goto(`${srv.url}/`);
    await page.locator('.live:not(.down)').waitFor();
    const ids = await page.evaluate(() => Array.from(document.querySelectorAll('[id]'), (e) => e.id));
    assert.equal(new Set(ids).size, ids.length, `duplicate ids: ${ids.filter((id, i) => ids.indexOf(id) !== i).join(', ')}`);
    assert.equal(await page.locator('label', { hasText: /^batchSize|^lr$|^initText/ }).count(), 0, 'no field names as labels');

    // the estimate of the previous method is cleared the moment the tab changes
    await page.evaluate(() => (document.querySelector('.estimate')!.textContent = 'Estimate: OLD NUMBERS'));
    await page.locator('.method-tab', { hasText: 'Dreambooth' }).click();
    assert.doesNotMatch((await page.locator('.estimate').textContent()) ?? '', /OLD NUMBERS/);

    assert.equal(await field('instancePrompt').locator('label').textContent().then((t) => t?.replace(/\s*\*$/, '')), 'Instance prompt (trigger word)');
    assert.equal(await field('instancePrompt').locator('xpath=ancestor::details').count(), 0, 'the instance prompt is in the main form, not under Advanced');
    await field('images').locator('input').fill(images);
    await field('name').locator('input').fill('rex');
    await page.locator('.train').click();
    await field('instancePrompt').locator('.field-error', { hasText: 'is required' }).waitFor();
    assert.equal(srv.manager.list().length, 0, 'nothing was submitted');

    // the dataset panel: every image, its caption, the prompt it trains with; a caption edited in place
    await field('instancePrompt').locator('input').fill('a photo of sks cat');
    await field('captionMode').locator('select').selectOption('caption');
    const first = page.locator('.dataset-item[data-file="01-orange cat sitting.png"]');
    await first.locator('.final-prompt', { hasText: /^a photo of sks cat$/ }).waitFor();
    assert.equal(await page.locator('.dataset-item').count(), 5);
    assert.match((await page.locator('.dataset-skipped').textContent()) ?? '', /skipped notes\.md: not an image file/);
    assert.equal(await first.locator('textarea').inputValue(), 'orange cat sitting');
    await first.locator('textarea').fill('sks cat sitting on a chair');
    await first.locator('.save-caption').click();
    await first.locator('.final-prompt', { hasText: 'sks cat sitting on a chair' }).waitFor();
    assert.equal(readFileSync(join(images, '01-orange cat sitting.txt'), 'utf8'), 'sks cat sitting on a chair\n');
    await page.locator('.dataset-warnings li', { hasText: "1 of 5 image(s) train with their own .txt caption instead of the instance prompt 'a photo of sks cat': 01-orange cat sitting.png" }).waitFor();
    await page.locator('.dataset-panel').scrollIntoViewIfNeeded();
    await screenshot(page, 'ui-10-dataset-panel');
    assert.deepEqual(pageErrors, []);
  } catch (err) {
    await screenshot(page, 'ui-firsthour-failure').catch(() => {});
    throw Object.assign(err as Error, { message: `${(err as Error).message}\npage errors: ${pageErrors.join('; ')}` });
  }
});
