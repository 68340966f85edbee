/**
 * @file The golden harness on every fixture copied into the project, on every backend the project
 * can pick here (each in its own process, as a user would run `npm run golden`). A tensor that
 * fails its atol or is not computed fails the test.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { nativeSkip } from './helpers/native.ts';

const FIXTURES = ['test/fixtures/sd-tiny', 'test/fixtures/sd2-tiny', 'test/fixtures/sdxl-tiny'];
const CANDIDATES = ['cpu-native', 'wasm', 'cpu'];

/** Each candidate backend: null when it loads in this install, else why not (the addon may not have built). */
function probeBackends(): Map<string, string | null> {
  return new Map(CANDIDATES.map((name) => {
    const probe = spawnSync(process.execPath, ['--import', 'tsx', '-e', `await (await import('./trainers/backend/index.ts')).initBackend('${name}')`], { encoding: 'utf8' });
    const why = probe.stderr.split('\n').find((l) => /Error/.test(l)) ?? `exit ${probe.status}`;
    return [name, probe.status === 0 ? null : why.trim()];
  }));
}

const probed = probeBackends();
const backends = CANDIDATES.filter((b) => probed.get(b) === null);
// a backend that is not here is a visible skip with its reason (cpu-native: a failure under SIDETRAIN_REQUIRE_NATIVE=1)
for (const [backend, why] of probed) {
  if (why === null) continue;
  const skip = backend === 'cpu-native' ? nativeSkip(why) : why;
  test(`golden harness on ${backend}`, { skip }, () => {});
}
// every backend as is, and with the memory levers on (gradient checkpointing; attention sliced on
// WASM, the native core on cpu-native) except the slow pure-JS one
const runs = [...backends.map((b) => [b]), ...backends.filter((b) => b !== 'cpu').map((b) => [b, '--low-memory']),
  // bf16 mixed precision (its own rule: trainers/golden.ts), native kernels only
  ...backends.filter((b) => b === 'cpu-native').map((b) => [b, '--precision', 'bf16'])];
for (const [backend, ...flags] of runs as [string, ...string[]][]) {
  test(`golden harness passes on ${FIXTURES.join(', ')} (${[backend, ...flags].join(' ')})`, () => {
    let output = '';
    try {
      output = execFileSync(process.execPath, ['bin/sidetrain.mjs', 'golden', '--backend', backend!, ...flags, ...FIXTURES], { encoding: 'utf8' });
    } catch (err) {
      const e = err as { stdout?: string; stderr?: string };
      assert.fail(`golden failed on ${backend}:\n${e.stdout ?? ''}${e.stderr ?? ''}`);
    }
    assert.match(output, new RegExp(`backend: ${backend}`));
    const summaries = output.match(/^\d+ passed, \d+ failed$/gm) ?? [];
    assert.equal(summaries.length, FIXTURES.length);
    for (const s of summaries) assert.match(s, / 0 failed$/);
    assert.doesNotMatch(output, /NOT COMPUTED|FAIL/);
  });
}
