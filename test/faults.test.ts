/**
 * @file Faults, the fast half (the slow half — kill loops, a full tmpfs, floods — is `npm run
 * stress`): `dryRun` over the API writes nothing, estimates of bad model files are 4xx from a
 * probe process that cannot bloat or hold the server, a job larger than the machine is refused,
 * outputs land all together or not at all, killed writes' temps are cleaned, I/O errors name the
 * file, error messages never echo file content, and `output` is only reported when it exists.
 */
import assert from 'node:assert/strict';
import { copyFileSync, existsSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { atomicGroup, cleanStaleTemps, writeFileAtomic } from '../trainers/io/atomic.ts';
import { checkFits } from '../bridge/preflight.ts';
import { makeDirs, startTestServer, waitJob, type TestServer } from './helpers/api-server.ts';

const REAL_METHODS = fileURLToPath(new URL('../trainers/methods/index.ts', import.meta.url));
const MODEL = fileURLToPath(new URL('./fixtures/sd-tiny/model.safetensors', import.meta.url));
const IMAGES = fileURLToPath(new URL('../assets/demo-images', import.meta.url));

/** Every file under `dir`, relative paths. */
function filesUnder(dir: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).map((e) => join(e.parentPath ?? e.path, e.name).slice(dir.length + 1));
}

/** A safetensors file whose header is `headerBytes` of valid JSON (one long string). */
async function bigHeaderFile(path: string, headerBytes: number): Promise<void> {
  const fh = await open(path, 'w');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(headerBytes));
  await fh.write(len);
  await fh.write('{"a":"');
  const chunk = Buffer.alloc(1 << 20, 0x78);
  let left = headerBytes - 8;
  while (left > 0) {
    const n = Math.min(left, chunk.length);
    await fh.write(chunk, 0, n);
    left -= n;
  }
  await fh.write('"}');
  await fh.close();
}

/** A 4-step TI job on the tiny model at 64 px, with `extra` spec fields. */
const ti = (extra: Record<string, unknown> = {}) => ({
  type: 'textual_inversion',
  spec: { name: 'cat', model: MODEL, images: IMAGES, initText: 'cat', vectors: 1, width: 64, height: 64, steps: 4, previewEvery: 0, saveEvery: 2, ...extra },
});

describe('the API with the real methods', () => {
  let t: TestServer;
  before(async () => {
    t = await startTestServer({ methodsModule: REAL_METHODS });
  });
  after(() => t.close());

  test('dryRun: true answers the dataset report and writes nothing, stores no job (it trained a real job)', async () => {
    const res = await t.api('/api/jobs', { method: 'POST', json: ti({ dryRun: true }) });
    assert.equal(res.status, 200);
    assert.equal(res.body.dryRun, true);
    assert.match(res.body.report, /5 images?/);
    assert.deepEqual((await t.api('/api/jobs')).body.jobs, []);
    assert.deepEqual(filesUnder(t.dirs.embeddings), []);
    assert.deepEqual(filesUnder(t.dirs.logs), []);
  });

  test('bad model files are 422 from the probe, naming the file, echoing none of it; the server stays small and answers', async () => {
    const secret = join(t.dirs.checkpoints, 'credentials.safetensors');
    writeFileSync(secret, 'TOPSECRET-PASSWORD-1234567890 and more text');
    const notJson = join(t.dirs.checkpoints, 'notjson.safetensors');
    const body = Buffer.from('{"SECRETKEY": oops}');
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(body.length));
    writeFileSync(notJson, Buffer.concat([len, body]));
    for (const file of [secret, notJson]) {
      const res = await t.api('/api/estimate', { method: 'POST', json: ti({ model: file }) });
      assert.equal(res.status, 422, res.body.error);
      assert.ok(res.body.error.includes(file), res.body.error);
      assert.doesNotMatch(res.body.error, /TOPSECRET|PASSWORD|SECRETKEY|544f5053|oops/i);
      const job = await t.api('/api/jobs', { method: 'POST', json: ti({ model: file }) });
      assert.equal(job.status, 422, 'a job on it is refused before it starts');
    }
    const big = join(t.dirs.checkpoints, 'big-header.safetensors');
    await bigHeaderFile(big, 99_000_000);
    const rss0 = process.memoryUsage().rss;
    const estimate = t.api('/api/estimate', { method: 'POST', json: ti({ model: big }) });
    let slowest = 0;
    let done = false;
    void estimate.finally(() => (done = true));
    while (!done) {
      const t0 = performance.now();
      assert.equal((await t.api('/api/health')).status, 200);
      slowest = Math.max(slowest, performance.now() - t0);
      await new Promise((r) => setTimeout(r, 20));
    }
    const res = await estimate;
    assert.equal(res.status, 422);
    assert.ok(res.body.error.includes(big));
    assert.ok(slowest < 1000, `/api/health took ${slowest.toFixed(0)} ms during the estimate (was 9.3 s)`);
    assert.ok(process.memoryUsage().rss - rss0 < 300 * 2 ** 20, 'the header was not parsed in the server');
  });

  test('a model copied without its config is refused before the job starts, naming the file to put beside it', async () => {
    const copy = join(t.dirs.checkpoints, 'tiny-copy.safetensors');
    copyFileSync(MODEL, copy);
    for (const route of ['/api/estimate', '/api/jobs']) {
      const res = await t.api(route, { method: 'POST', json: ti({ name: 'nocfg', model: copy }) });
      assert.equal(res.status, 422, JSON.stringify(res.body));
      assert.equal(res.body.errors[0].field, '/spec/model');
      assert.match(res.body.error, /cannot be trained as it is .*put the config it came with beside it as tiny-copy\.yaml \(ldm\/sgm\) or config\.json/);
    }
    assert.equal((await t.api('/api/jobs')).body.jobs.filter((j: { spec: { name: string } }) => j.spec.name === 'nocfg').length, 0, 'no job stored');
  });

  test('an estimate above the memory a job may use is refused with the numbers and the levers, unless forced', async () => {
    const spec = { ...ti().spec, model: MODEL, width: 512, height: 512, batchSize: 4, gradientCheckpointing: 'off' };
    await assert.rejects(checkFits('textual_inversion', spec, false, 1024), (err: Error & { status: number }) => {
      assert.equal(err.status, 422);
      assert.match(err.message, /^\/spec needs an estimated [\d.]+ GB at its peak, more than the 0\.0 GB this machine gives a job: try a smaller width × height \(now 512 × 512\), batchSize 1 .*gradientCheckpointing "on".*or send "force": true/);
      return true;
    });
    await checkFits('textual_inversion', spec, true, 1024);
    await checkFits('textual_inversion', spec, false);
    // through the API: hundreds of GB on sd-tiny at 2048² × 64 (it used to start anyway)
    const huge = ti({ name: 'huge', width: 2048, height: 2048, batchSize: 64, gradientCheckpointing: 'off' });
    const res = await t.api('/api/jobs', { method: 'POST', json: huge });
    assert.equal(res.status, 422);
    assert.match(res.body.error, /needs an estimated \d+\.\d GB at its peak, more than the [\d.]+ GB this machine gives a job/);
    assert.deepEqual((await t.api('/api/jobs')).body.jobs.filter((j: { spec: { name: string } }) => j.spec.name === 'huge'), []);
    const forced = await t.api('/api/jobs', { method: 'POST', json: { ...huge, force: true } });
    assert.equal(forced.status, 201, 'force starts it');
    await t.api(`/api/jobs/${forced.body.id}/cancel`, { method: 'POST' });
    await waitJob(t, forced.body.id, (j) => ['cancelled', 'failed', 'finished'].includes(j.state), 60_000);
  });

});

describe('outputs of failed and cancelled jobs', () => {
  let t: TestServer;
  before(async () => {
    t = await startTestServer({ methodsModule: REAL_METHODS });
  });
  after(() => t.close());

  test('a job cancelled while loading reports no output that does not exist', async () => {
    const res = await t.api('/api/jobs', { method: 'POST', json: ti({ name: 'early' }) });
    assert.equal(res.status, 201);
    await waitJob(t, res.body.id, (j) => j.state === 'running', 60_000); // its worker is starting: cancel while it loads
    await t.api(`/api/jobs/${res.body.id}/cancel`, { method: 'POST' });
    const job = await waitJob(t, res.body.id, (j) => ['cancelled', 'finished', 'failed'].includes(j.state), 60_000);
    if (job.output !== undefined) assert.ok(existsSync(job.output), `${job.output} is reported but does not exist`);
    for (const f of job.outputs) assert.ok(existsSync(f), f);
  });

  test('a method that reports an output it never wrote: the job shows none', async () => {
    const stub = await startTestServer();
    try {
      const res = await stub.api('/api/jobs', { method: 'POST', json: { type: 'stub', spec: { name: 'ghost', steps: 2, stepMs: 1, writeNothing: true } } });
      const job = await waitJob(stub, res.body.id, (j) => j.state === 'finished');
      assert.equal(job.output, undefined);
      assert.deepEqual(job.outputs, []);
    } finally {
      await stub.close();
    }
  });

  test('a hypernetwork whose .optim cannot be written leaves no .pt either (the retry said "already exists")', async () => {
    mkdirSync(join(t.dirs.hypernetworks, 'hn.pt.optim')); // a folder where the .optim must go
    const res = await t.api('/api/jobs', {
      method: 'POST',
      json: { type: 'hypernetwork', spec: { name: 'hn', model: MODEL, images: IMAGES, width: 64, height: 64, steps: 2, previewEvery: 0, saveEvery: 0, sizes: [32] } },
    });
    assert.equal(res.status, 201, JSON.stringify(res.body));
    const job = await waitJob(t, res.body.id, (j) => ['finished', 'failed'].includes(j.state), 120_000);
    assert.equal(job.state, 'failed');
    assert.match(job.error, /hn\.pt\.optim/);
    assert.equal(job.output, undefined);
    assert.deepEqual(filesUnder(t.dirs.hypernetworks), [], 'no .pt, no temp');
  });
});

describe('all-or-nothing writes', () => {
  test('a group lands together or not at all; the main file last; errors name the file', async () => {
    const dir = makeDirs().embeddings;
    const a = join(dir, 'a.pt');
    await assert.rejects(
      atomicGroup(async () => {
        await writeFileAtomic(`${a}.optim`, Buffer.from('optim'));
        await writeFileAtomic(a, async () => {
          throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
        });
      }),
      (err: NodeJS.ErrnoException) => err.code === 'ENOSPC' && err.message.startsWith(`${a}: ENOSPC`),
    );
    assert.deepEqual(readdirSync(dir), [], 'neither file, no temp');
    const order: string[] = [];
    await atomicGroup(async () => {
      await writeFileAtomic(a, Buffer.from('main'));
      await writeFileAtomic(`${a}.optim`, Buffer.from('optim'));
      order.push(...readdirSync(dir).filter((f) => !f.startsWith('.')));
      return [a, `${a}.optim`];
    }, (paths) => paths[0]);
    assert.deepEqual(order, [], 'nothing visible before the group ends');
    assert.deepEqual(readdirSync(dir).sort(), ['a.pt', 'a.pt.optim']);
  });

  test("a killed write's temp is removed by the next write into that folder; a live one's is kept", async () => {
    const dir = makeDirs().embeddings;
    const dead = '.x.pt.999999999.0123abcd.sidetrain-tmp'; // a pid above pid_max: never alive
    const live = `.y.pt.${process.ppid}.89abcdef.sidetrain-tmp`;
    writeFileSync(join(dir, dead), 'half');
    writeFileSync(join(dir, live), 'writing');
    await writeFileAtomic(join(dir, 'z.pt'), Buffer.from('z'));
    assert.deepEqual(readdirSync(dir).sort(), [live, 'z.pt'].sort());
    assert.deepEqual(await cleanStaleTemps(dir), [], 'once per folder');
  });
});
