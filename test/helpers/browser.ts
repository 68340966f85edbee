/**
 * @file Headless Chromium for the page's browser tests (chromium-path.ts says which one: Debian's
 * when installed, else the one in the @sparticuz/chromium devDependency) driven by playwright-core,
 * with a fresh profile per launch and no background traffic (no updates, sync, QUIC or first-run
 * pages). Fails with a clear message when there is no browser.
 * Also a screenshot helper that writes into test-artifacts/ (gitignored).
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import { findChromium } from './chromium-path.ts';

export const ARTIFACTS = fileURLToPath(new URL('../../test-artifacts/', import.meta.url));

const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

export interface TestBrowser {
  context: BrowserContext;
  page: Page;
  close(): Promise<void>;
}

/** Launch chromium with a fresh --user-data-dir (Playwright passes it for a persistent context). */
export async function launchBrowser(): Promise<TestBrowser> {
  const browser = await findChromium();
  const profile = mkdtempSync(join(tmpdir(), 'sidetrain-chromium-'));
  let context: BrowserContext;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: browser.executablePath,
      env: { ...process.env, ...browser.env } as Record<string, string>,
      headless: true,
      chromiumSandbox: false,
      args: ARGS,
      viewport: { width: 1400, height: 1100 },
      // the bundled Chromium turns LANG=C into the tag 'en-US@posix', which Intl rejects
      locale: 'en-US',
      timeout: 30_000,
    });
  } catch (err) {
    rmSync(profile, { recursive: true, force: true });
    throw new Error(`could not start ${browser.source} (${browser.executablePath}): ${(err as Error).message}`);
  }
  const page = context.pages()[0] ?? (await context.newPage());
  return {
    context,
    page,
    close: async () => {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/**
 * Screenshot of the viewport into test-artifacts/<name>.png. Not full-page by default: Chromium
 * captures a full page by resizing the viewport, which resets scrolled panels.
 */
export async function screenshot(page: Page, name: string, fullPage = false): Promise<string> {
  mkdirSync(ARTIFACTS, { recursive: true });
  const path = join(ARTIFACTS, `${name}.png`);
  await page.screenshot({ path, fullPage });
  return path;
}
