/**
 * @file The suite cannot pass by accident: with SIDETRAIN_REQUIRE_NATIVE=1 (as CI runs) a missing
 * native addon fails the native tests and every backend choice with a message naming the addon
 * file; without it the same tests are visible skips with the reason, not silent passes. And the
 * page's browser tests fail, naming what was tried, when no browser can be had.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { findChromium } from './helpers/chromium-path.ts';

const missing = join(mkdtempSync(join(tmpdir(), 'sidetrain-harness-')), 'missing', 'sidetrain_native.node');

/** `node --test files` in a child with `env` added (outside this runner's protocol). */
function runTests(files: string[], env: Record<string, string>, pattern?: string) {
  const childEnv: NodeJS.ProcessEnv = { ...process.env, ...env };
  delete childEnv.NODE_TEST_CONTEXT; // else the child speaks the runner's internal protocol, not TAP
  delete childEnv.SIDETRAIN_BACKEND;
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--test', '--test-reporter=tap', ...(pattern ? [`--test-name-pattern=${pattern}`] : []), ...files], { encoding: 'utf8', env: childEnv, timeout: 120_000 });
  return { status: r.status, output: `${r.stdout}${r.stderr}` };
}

test('SIDETRAIN_REQUIRE_NATIVE=1 with the addon missing: the native tests and backend choice fail, naming the addon', () => {
  const r = runTests(['test/native.test.ts', 'test/backend.test.ts', 'test/half-params.test.ts'], { SIDETRAIN_REQUIRE_NATIVE: '1', SIDETRAIN_NATIVE_ADDON: missing });
  assert.notEqual(r.status, 0, r.output);
  assert.match(r.output, /SIDETRAIN_REQUIRE_NATIVE=1 but the native addon \S*missing\/sidetrain_native\.node (did not load|is not usable)/);
  assert.match(r.output, /^# pass 0$/m, r.output);
  assert.doesNotMatch(r.output, /# SKIP/, 'nothing skipped: a required addon is a failure');
});

test('without SIDETRAIN_REQUIRE_NATIVE the same missing addon gives skips that say why, never silent passes', () => {
  const r = runTests(['test/native.test.ts', 'test/half-params.test.ts'], { SIDETRAIN_REQUIRE_NATIVE: '', SIDETRAIN_NATIVE_ADDON: missing }, '^native ');
  assert.equal(r.status, 0, r.output);
  assert.match(r.output, /^ok \d+ - native conv2d and its gradients match the stock CPU kernels # SKIP native kernels not built: no \S*missing\/sidetrain_native\.node/m);
  assert.match(r.output, /^ok \d+ - native and JS converters agree on large arrays .* # SKIP native half converters not available/m);
});

test('no browser at all: the browser tests fail with a message naming what was tried', async () => {
  const saved = process.env.SIDETRAIN_CHROMIUM;
  process.env.SIDETRAIN_CHROMIUM = join(tmpdir(), 'sidetrain-no-such-chromium');
  try {
    await assert.rejects(findChromium(), /SIDETRAIN_CHROMIUM=.*sidetrain-no-such-chromium: no such file/);
  } finally {
    if (saved === undefined) delete process.env.SIDETRAIN_CHROMIUM;
    else process.env.SIDETRAIN_CHROMIUM = saved;
  }
});
