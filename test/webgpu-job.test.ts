/**
 * @file A binding over the adapter's limit inside a real job (issue 21, Proof): a Textual
 * Inversion job through the API on webgpu (lavapipe, .cache/lavapipe from
 * scripts/fetch-lavapipe.sh) at a resolution whose first VAE conv output is bigger than one
 * storage binding may be. The job ends with a `failed` event naming the op, the tensor's shape and
 * the limit, refused before dispatch — never a job that trains on zeros — and writes nothing to
 * the embeddings folder. (With that check off, Dawn's own validation error is caught by the error
 * scopes: test/webgpu.test.ts; in a job it would surface only at the step's first read, after
 * the rest of a 1088 px step had run on lavapipe — too slow for CI.)
 *
 * Its own file: the worker processes inherit this process's environment (backend, Vulkan ICD).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { startTestServer, waitJob, type TestServer } from './helpers/api-server.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';

const LAVAPIPE = resolve('.cache/lavapipe');
const skip = existsSync(join(LAVAPIPE, 'icd.json')) ? false : 'no software GPU: run scripts/fetch-lavapipe.sh (Debian/Ubuntu) to test the webgpu backend on lavapipe';
const REAL_METHODS = fileURLToPath(new URL('../trainers/methods/index.ts', import.meta.url));
const MODEL = fileURLToPath(new URL('./fixtures/sd-tiny/model.safetensors', import.meta.url));
const IMAGES = fileURLToPath(new URL('../assets/demo-images', import.meta.url));

let t: TestServer;
let side = 0;

before(async () => {
  if (skip) return;
  Object.assign(process.env, {
    SIDETRAIN_BACKEND: 'webgpu',
    VK_ICD_FILENAMES: join(LAVAPIPE, 'icd.json'),
    LD_LIBRARY_PATH: [join(LAVAPIPE, 'root/usr/lib/x86_64-linux-gnu'), process.env.LD_LIBRARY_PATH].filter(Boolean).join(':'),
  });
  // The adapter's binding limit, asked in a child (Dawn reads the ICD at process start).
  const probe = await promisify(execFile)(process.execPath, ['--import', 'tsx', 'test/webgpu/child.ts', 'probe'], { env: process.env });
  const limit = Number(/binding ≤ (\d+) MiB/.exec(JSON.parse(probe.stdout.trim().split('\n').pop()!).adapter)?.[1]) * 2 ** 20;
  assert.ok(limit > 0, probe.stdout);
  // The VAE's first conv writes [1, side, side, ch] float32: the smallest multiple of 64 over the limit.
  const model = await openSafetensors(MODEL);
  const ch = model.info('first_stage_model.encoder.conv_in.weight').shape[0]!;
  await model.close();
  side = Math.ceil(Math.sqrt(limit / (4 * ch)) / 64 + 1e-9) * 64;
  t = await startTestServer({ methodsModule: REAL_METHODS });
});
after(() => t?.close());

test('an oversized binding in a job: refused before dispatch, the failed event names the op, shape and limit', { skip }, async () => {
  const spec = { name: 'big', model: MODEL, images: IMAGES, initText: 'cat', vectors: 1, width: side, height: side, steps: 2, previewEvery: 0, saveEvery: 0 };
  // force: past the memory preflight (it estimates host memory, not GPU bindings)
  const res = await t.api('/api/jobs', { method: 'POST', json: { type: 'textual_inversion', spec, force: true } });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  const job = await waitJob(t, res.body.id, (j) => ['failed', 'finished', 'cancelled'].includes(j.state), 120_000);
  assert.equal(job.state, 'failed', JSON.stringify(job));
  // the job's own event log (what the page and the WebSocket got), not only its status
  const log = await t.api(`/api/jobs/${res.body.id}/log?format=jsonl`);
  const failed = String(log.body).trim().split('\n').map((l) => JSON.parse(l)).find((e) => e.type === 'failed');
  assert.ok(failed, String(log.body));
  assert.match(failed.message, new RegExp(`webgpu: Conv2D \\(\\w+\\) output \\[1, ${side}, ${side}, \\d+\\] float32 is [\\d.]+ MiB, over this adapter's storage binding limit of [\\d.]+ MiB \\(maxStorageBufferBindingSize\\)`));
  assert.deepEqual(readdirSync(t.dirs.embeddings), []);
});

