/**
 * @file The golden harness on every fixture copied into the project and on a second, differently
 * shaped one built here (helpers/golden-fixture.ts: a hypernetwork of two sizes, one of them no
 * width of the model's contexts), on every backend the project can pick here (each in its own
 * process, as a user would run `npm run golden`). A tensor that fails its atol or is not computed
 * fails the test.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { nativeSkip } from './helpers/native.ts';
import { buildTwoSizeFixture, referenceModule } from './helpers/golden-fixture.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';

const SHIPPED = ['test/fixtures/sd-tiny', 'test/fixtures/sd2-tiny', 'test/fixtures/sdxl-tiny'];
const SOURCE = 'test/fixtures/sd-tiny';
// 48: neither sd-tiny's context width (32) nor a channel count of its UNet (32, 64)
const BUILT = mkdtempSync(join(tmpdir(), 'sidetrain-golden-two-sizes-'));
await buildTwoSizeFixture(SOURCE, BUILT, 48);
after(() => rmSync(BUILT, { recursive: true, force: true }));
const FIXTURES = [...SHIPPED, BUILT];

test("the built fixture's reference module reproduces sd-tiny's PyTorch hypernetwork goldens (size 32, x = unet.context)", async () => {
  const f = await openSafetensors(join(SOURCE, 'golden.safetensors'));
  const g = JSON.parse(readFileSync(join(SOURCE, 'golden.json'), 'utf8'));
  try {
    const size = g.hypernetwork.enable_sizes[0] as number;
    const x = await f.read('unet.context');
    for (const kv of ['k', 'v']) {
      const [w1, b1, w2, b2] = await Promise.all((g.hypernetwork.state_tensors as string[]).filter((n) => n.startsWith(`hn.${size}.${kv}.`)).map((n) => f.read(n)));
      const ours = referenceModule(x, size, w1!, b1!, w2!, b2!);
      const want = await f.read(`hn.${kv}_out.${size}`);
      const atol = g.tensors[`hn.${kv}_out.${size}`].atol as number;
      let max = 0;
      for (let i = 0; i < want.length; i++) max = Math.max(max, Math.abs(ours[i]! - want[i]!));
      assert.ok(max <= atol, `hn.${kv}_out.${size}: max |reference − golden| ${max} > atol ${atol}`);
    }
  } finally {
    await f.close();
  }
  const built = JSON.parse(readFileSync(join(BUILT, 'golden.json'), 'utf8'));
  assert.deepEqual(built.hypernetwork.enable_sizes, [48, 32]);
  assert.match(built.tensors['hn.k_out.48'].desc, /x = hn\.in\.48$/);
});
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
  test(`golden harness passes on ${SHIPPED.join(', ')} and a two-size hypernetwork fixture (${[backend, ...flags].join(' ')})`, () => {
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
    assert.match(output, /^hn\.k_out\.48 .* pass$/m, 'the built fixture ran');
    for (const s of summaries) assert.match(s, / 0 failed$/);
    assert.doesNotMatch(output, /NOT COMPUTED|FAIL/);
  });
}
