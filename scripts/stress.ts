/**
 * @file `npm run stress`: the slow half of the attack and fault suite, against `sidetrain serve`
 * run as a user runs it (its own process, a token set, the webui's folder layout in a temp dir):
 *   attacks  every route in many spellings without the token, the inputs that used to freeze the
 *            server or pass validation, bad model files — each must get its exact status;
 *   flood    clients sending the worst of those as fast as they can while /api/health is timed;
 *   kills    SIGKILL of the worker and of the server mid-run, then resume, until the job finishes;
 *   disk     a hypernetwork whose folder is a full tmpfs (when this user may mount one);
 * then every model file under the webui's folders and the runs is parsed, and temp files and
 * half outputs are counted. Prints one table; exits 1 when any check failed.
 *
 * Options: --seconds N (flood length, 10), --kills N (worker kills, 6), --keep (leave the dir).
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Worker } from 'node:worker_threads';
import { isTempName } from '../trainers/io/atomic.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { readEmbedding } from '../trainers/io/pt-embedding.ts';
import { readHypernetwork } from '../trainers/io/pt-hypernet.ts';
import { readOptim } from '../trainers/io/optim-file.ts';

const { values: args } = parseArgs({ options: { seconds: { type: 'string', default: '10' }, kills: { type: 'string', default: '6' }, keep: { type: 'boolean', default: false } } });
const REPO = fileURLToPath(new URL('..', import.meta.url));
const MODEL = join(REPO, 'test/fixtures/sd-tiny/model.safetensors');
const IMAGES = join(REPO, 'assets/demo-images');
const TOKEN = 'stress-token';
const root = mkdtempSync(join(tmpdir(), 'sidetrain-stress-'));
const webuiDir = join(root, 'webui');
const dirs = { emb: join(webuiDir, 'embeddings'), hn: join(webuiDir, 'models/hypernetworks'), ckpt: join(webuiDir, 'models/Stable-diffusion'), lora: join(webuiDir, 'models/Lora'), state: join(root, 'state') };
for (const d of Object.values(dirs)) mkdirSync(d, { recursive: true });

const counts = { attacks: 0, refused: 0, unexpected: [] as string[], workerKills: 0, serverKills: 0, resumedOk: 0, filesChecked: 0, filesInvalid: [] as string[], tempFiles: [] as string[], partial: [] as string[], health: [] as number[], baseline: [] as number[], flood: 0, disk: 'not run' };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function freePort(): Promise<number> {
  const s = createServer().listen(0, '127.0.0.1');
  await new Promise((r) => s.once('listening', r));
  const port = (s.address() as { port: number }).port;
  await new Promise((r) => s.close(r));
  return port;
}

let port = 0;
let server: ChildProcess | undefined;
const base = () => `http://127.0.0.1:${port}`;

async function startServer(): Promise<void> {
  port ||= await freePort();
  server = spawn(process.execPath, ['bin/sidetrain.mjs', 'serve', '--port', String(port), '--state-dir', dirs.state, '--webui-dir', webuiDir, '--log-level', 'warn'], {
    cwd: REPO, env: { ...process.env, SIDETRAIN_TOKEN: TOKEN, SIDETRAIN_WEBUI_URL: '' }, stdio: ['ignore', 'ignore', 'inherit'],
  });
  for (let i = 0; i < 300; i++) {
    if ((await api('/api/health').catch(() => ({ status: 0 }))).status === 200) return;
    await sleep(100);
  }
  throw new Error('the server did not come up');
}

async function api(path: string, init: RequestInit & { json?: unknown; token?: boolean } = {}): Promise<{ status: number; body: any }> {
  const headers = new Headers(init.headers);
  if (init.token !== false) headers.set('authorization', `Bearer ${TOKEN}`);
  let body = init.body;
  if (init.json !== undefined) {
    headers.set('content-type', 'application/json');
    body = JSON.stringify(init.json);
  }
  const res = await fetch(base() + path, { ...init, headers, body, redirect: 'manual' });
  const text = await res.text();
  try {
    return { status: res.status, body: JSON.parse(text) };
  } catch {
    return { status: res.status, body: text };
  }
}

/** One attack: it must get exactly `want`. */
async function expect(what: string, want: number, req: () => Promise<{ status: number }>): Promise<void> {
  counts.attacks++;
  const { status } = await req().catch((err: Error) => ({ status: -1, err }));
  if (status === want) counts.refused++;
  else counts.unexpected.push(`${what}: ${status} (want ${want})`);
}

const ti = (spec: Record<string, unknown> = {}) => ({ type: 'textual_inversion', spec: { name: 'st', model: MODEL, images: IMAGES, initText: 'cat', vectors: 1, width: 64, height: 64, steps: 4, previewEvery: 0, saveEvery: 2, ...spec } });
const deepJson = `{"type":"textual_inversion","spec":{"name":${'['.repeat(100_000)}${']'.repeat(100_000)}}}`;
const longLr = () => ti({ lr: `${'1'.repeat(250_000)}x` });

/** Bad model files: each must be a 422 from the estimate and from a job start, naming no content. */
function badModels(): string[] {
  const out: string[] = [];
  const file = (name: string, data: Buffer | string) => {
    const p = join(dirs.ckpt, name);
    writeFileSync(p, data);
    out.push(p);
  };
  const withHeader = (name: string, header: string, extra = 0) => {
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(Buffer.byteLength(header)));
    file(name, Buffer.concat([len, Buffer.from(header), Buffer.alloc(extra)]));
  };
  file('empty.safetensors', '');
  file('short.safetensors', 'abc');
  file('text.safetensors', 'PASSWORD=hunter2 this is no model at all');
  file('garbage.ckpt', Buffer.alloc(4096, 0x41));
  withHeader('notjson.safetensors', '{"a": nope}');
  withHeader('array.safetensors', '[1,2,3]');
  withHeader('badentry.safetensors', '{"w":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,4]}}', 4);
  withHeader('proto.safetensors', '{"__proto__":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4);
  withHeader('big-header.safetensors', `{"a":"${'x'.repeat(99_000_000)}"}`);
  // a zip whose pickle names os.system: refused at GLOBAL, nothing runs
  file('evil.ckpt', Buffer.concat([Buffer.from('PK\x03\x04'), Buffer.alloc(200)]));
  return out;
}

async function attacks(): Promise<void> {
  const first = await api('/api/jobs', { method: 'POST', json: ti({ name: 'tok', dryRun: true }) });
  if (first.status !== 200) counts.unexpected.push(`dry run: ${first.status} ${JSON.stringify(first.body).slice(0, 200)}`);
  const doc = (await api('/openapi.json')).body as { paths: Record<string, Record<string, unknown>> };
  const spellings = (p: string) => [p, p.toUpperCase(), p.replace(/[a-z]/g, (c, i: number) => (i % 2 ? c.toUpperCase() : c)), `/${p}`, p.replace(/\//g, '//'), `${p}/`, `${p}.`, `${p}%2e`, p.replace(/\//g, (s, i: number) => (i ? '%2F' : s)), p.replace(/^\/(.)/, (_m, c: string) => `/%${c.charCodeAt(0).toString(16)}`), `/./${p.slice(1)}`, `/x/..${p}`];
  for (const [p, ops] of Object.entries(doc.paths)) {
    const path = p.replace('{id}', '0123456789abcdef').replace('{index}', '0');
    for (const m of Object.keys(ops)) {
      for (const s of spellings(path)) await expect(`${m} ${s} without token`, 401, () => api(s, { method: m.toUpperCase(), token: false }));
    }
  }
  await expect('lr of 250 000 characters', 400, () => api('/api/jobs', { method: 'POST', json: longLr() }));
  await expect('filenameWordRegex with a look-ahead', 400, () => api('/api/jobs', { method: 'POST', json: ti({ filenameWordRegex: '(?=a)a' }) }));
  await expect('JSON 100 000 deep', 400, () => api('/api/jobs', { method: 'POST', body: deepJson, headers: { 'content-type': 'application/json' } }));
  for (const type of ['__proto__', 'constructor', 'toString']) await expect(`type ${type}`, 400, () => api('/api/jobs', { method: 'POST', json: { type, spec: {} } }));
  await expect("lr '1e400'", 400, () => api('/api/jobs', { method: 'POST', json: ti({ lr: '1e400' }) }));
  await expect('a 300-character folder name', 400, () => api('/api/jobs', { method: 'POST', json: ti({ embeddingsDir: join(dirs.emb, 'd'.repeat(300)) }) }));
  await expect('an output folder outside', 400, () => api('/api/jobs', { method: 'POST', json: ti({ embeddingsDir: '/etc' }) }));
  await expect('name with ../', 400, () => api('/api/jobs', { method: 'POST', json: ti({ name: '../x' }) }));
  await expect('a 300 GB job (2048 × 2048, batch 64)', 422, () => api('/api/jobs', { method: 'POST', json: ti({ name: 'huge', width: 2048, height: 2048, batchSize: 64, gradientCheckpointing: 'off' }) }));
  for (const m of badModels()) {
    await expect(`estimate of ${m.split('/').pop()}`, 422, () => api('/api/estimate', { method: 'POST', json: ti({ model: m }) }));
    await expect(`job on ${m.split('/').pop()}`, 422, () => api('/api/jobs', { method: 'POST', json: ti({ model: m, name: 'bad' }) }));
  }
}

/**
 * /api/health timed every 20 ms from a thread of its own, so the flood clients' own work (making
 * 250 kB bodies) does not count against the server. Resolves with the latencies in ms.
 */
function timeHealth(seconds: number): Promise<number[]> {
  const code = `
    const { parentPort, workerData: { url, token, seconds } } = require('node:worker_threads');
    (async () => {
      const out = [];
      const end = Date.now() + seconds * 1000;
      while (Date.now() < end) {
        const t0 = performance.now();
        const res = await fetch(url, { headers: { authorization: 'Bearer ' + token } });
        await res.arrayBuffer();
        out.push(res.status === 200 ? performance.now() - t0 : Infinity);
        await new Promise((r) => setTimeout(r, 20));
      }
      parentPort.postMessage(out);
    })();`;
  const worker = new Worker(code, { eval: true, workerData: { url: `${base()}/api/health`, token: TOKEN, seconds } });
  return new Promise((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });
}

/** The worst inputs from several clients while /api/health is timed. */
async function flood(seconds: number): Promise<void> {
  counts.baseline = await timeHealth(3);
  const big = join(dirs.ckpt, 'big-header.safetensors');
  const worst = [
    () => api('/api/jobs', { method: 'POST', json: longLr() }),
    () => api('/api/jobs', { method: 'POST', body: deepJson, headers: { 'content-type': 'application/json' } }),
    () => api('/api/jobs', { method: 'POST', json: { type: '__proto__', spec: {} } }),
    () => api('/API/JOBS', { token: false }),
    () => api('/api/jobs', { method: 'POST', json: ti({ filenameWordRegex: '(a|a)+$', dryRun: true }) }),
    () => api('/api/estimate', { method: 'POST', json: ti({ model: big }) }),
  ];
  const end = Date.now() + seconds * 1000;
  const clients = worst.map(async (send) => {
    while (Date.now() < end) {
      await send().catch(() => undefined);
      counts.flood++;
    }
  });
  const [health] = await Promise.all([timeHealth(seconds), ...clients]);
  counts.health = health;
}

function childPids(pid: number): number[] {
  const out: number[] = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, 'utf8');
      if (Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) === pid) out.push(Number(d));
    } catch { /* gone */ }
  }
  return out;
}

function workerPid(): number | undefined {
  return childPids(server!.pid!).find((p) => {
    try {
      return readFileSync(`/proc/${p}/cmdline`, 'utf8').includes('worker.ts');
    } catch {
      return false;
    }
  });
}

async function waitState(id: string, states: string[], ms = 120_000): Promise<any> {
  const end = Date.now() + ms;
  for (;;) {
    const j = await api(`/api/jobs/${id}`).catch(() => ({ status: 0, body: {} as any }));
    if (j.status === 200 && states.includes(j.body.state)) return j.body;
    if (Date.now() > end) throw new Error(`job ${id} never reached ${states.join('/')}`);
    await sleep(100);
  }
}

/** Kill the worker (and twice the server) at random points of a TI run; resume until it finishes. */
async function kills(n: number): Promise<void> {
  const res = await api('/api/jobs', { method: 'POST', json: ti({ name: 'killed', steps: 60, saveEvery: 3 }) });
  if (res.status !== 201) throw new Error(`kill job: ${res.status} ${JSON.stringify(res.body)}`);
  const id = res.body.id as string;
  for (let k = 0; k < n + 2; k++) {
    await waitState(id, ['running']);
    const before = (await api(`/api/jobs/${id}`)).body.step as number;
    const t0 = Date.now();
    while (Date.now() - t0 < 20_000 && (await api(`/api/jobs/${id}`)).body.step < before + 1 + Math.floor(Math.random() * 4)) await sleep(20);
    if (k % 4 === 3) {
      server!.kill('SIGKILL');
      await new Promise((r) => server!.once('exit', r));
      const orphan = workerPid();
      counts.serverKills++;
      if (orphan) process.kill(orphan, 'SIGKILL');
      await startServer();
    } else {
      const pid = workerPid();
      if (!pid) break; // finished meanwhile
      process.kill(pid, 'SIGKILL');
      counts.workerKills++;
    }
    const j = await waitState(id, ['failed', 'interrupted', 'finished', 'cancelled']);
    if (j.state === 'finished') break;
    const r = await api(`/api/jobs/${id}/resume`, { method: 'POST' });
    if (r.status === 200) counts.resumedOk++;
    else counts.unexpected.push(`resume after kill ${k}: ${r.status} ${JSON.stringify(r.body).slice(0, 200)}`);
  }
  const done = await waitState(id, ['finished', 'failed'], 300_000);
  if (done.state !== 'finished' || done.step !== 60) counts.unexpected.push(`killed job ended ${done.state} at step ${done.step}: ${done.error ?? ''}`);
}

/** A hypernetwork into a full tmpfs: it fails naming the file and leaves nothing; with room, a resume finishes. */
async function fullDisk(): Promise<void> {
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=160k', 'tmpfs', dirs.hn], { stdio: 'ignore' });
  } catch {
    counts.disk = 'skipped (cannot mount a tmpfs here)';
    return;
  }
  try {
    writeFileSync(join(dirs.hn, 'filler'), Buffer.alloc(100 * 1024));
    const spec = { name: 'full', model: MODEL, images: IMAGES, width: 64, height: 64, steps: 2, previewEvery: 0, saveEvery: 0, sizes: [32] };
    const res = await api('/api/jobs', { method: 'POST', json: { type: 'hypernetwork', spec } });
    const j = await waitState(res.body.id, ['finished', 'failed']);
    const left = readdirSync(dirs.hn).filter((f) => f !== 'filler');
    const ok = j.state === 'failed' && /full\.pt/.test(j.error ?? '') && /ENOSPC|no space/i.test(j.error ?? '') && left.length === 0 && j.output === undefined;
    rmSync(join(dirs.hn, 'filler'));
    const again = await api(`/api/jobs/${res.body.id}/resume`, { method: 'POST' });
    const j2 = await waitState(again.body.id ?? res.body.id, ['finished', 'failed']);
    const both = existsSync(join(dirs.hn, 'full.pt')) && existsSync(join(dirs.hn, 'full.pt.optim'));
    counts.disk = ok && j2.state === 'finished' && both ? 'full disk: failed naming the file, nothing left; resumed with room: .pt + .optim' : `FAILED: ${j.state} '${j.error}', left ${left.join(',')}; then ${j2.state}`;
    if (!counts.disk.startsWith('full disk')) counts.unexpected.push(counts.disk);
    await checkTree(dirs.hn);
  } finally {
    try {
      execFileSync('umount', [dirs.hn], { stdio: 'ignore' });
    } catch { /* busy: left to the OS */ }
  }
}

/** Parse every model file under `dir`; count temps and outputs without their side files. */
async function checkTree(dir: string): Promise<void> {
  for (const e of readdirSync(dir, { recursive: true, withFileTypes: true })) {
    if (!e.isFile()) continue;
    const p = join(e.parentPath ?? e.path, e.name);
    if (isTempName(e.name) || e.name.endsWith('.sidetrain-tmp')) counts.tempFiles.push(p);
    if (p.startsWith(dirs.ckpt)) continue; // the bad models we made
    try {
      if (e.name.endsWith('.optim')) await readOptim(p);
      else if (e.name.endsWith('.safetensors')) (await openSafetensors(p)).close?.();
      else if (e.name.endsWith('.pt')) await (p.startsWith(dirs.hn) || /hypernet/.test(p) ? readHypernetwork(p) : readEmbedding(p));
      else continue;
      counts.filesChecked++;
    } catch (err) {
      counts.filesInvalid.push(`${p}: ${(err as Error).message.slice(0, 120)}`);
    }
    if (e.name.endsWith('.pt') && !existsSync(`${p}.optim`) && (p.startsWith(dirs.emb) || p.startsWith(dirs.hn))) counts.partial.push(`${p} without its .optim`);
    if (e.name.endsWith('.optim') && !existsSync(p.slice(0, -'.optim'.length))) counts.partial.push(`${p} without its output`);
  }
}

const latencies = (xs: number[]) => `${xs.length} probes, p50 ${pct(xs, 0.5).toFixed(1)} ms, p99 ${pct(xs, 0.99).toFixed(1)} ms, max ${Math.max(...xs).toFixed(1)} ms`;
const pct = (xs: number[], q: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(q * xs.length))] ?? NaN;

async function main(): Promise<void> {
  await startServer();
  const t0 = Date.now();
  await attacks();
  await flood(Number(args.seconds));
  await kills(Number(args.kills));
  await fullDisk();
  for (const d of [dirs.emb, dirs.hn, dirs.lora, dirs.ckpt, dirs.state]) if (existsSync(d)) await checkTree(d);
  server!.kill('SIGTERM');
  const p99 = pct(counts.health, 0.99);
  const rows: [string, string][] = [
    ['attacks tried / refused as expected', `${counts.attacks} / ${counts.refused}`],
    ['flood requests (worst inputs)', String(counts.flood)],
    ['/api/health, idle (3 s)', latencies(counts.baseline)],
    [`/api/health during the flood (${args.seconds} s)`, latencies(counts.health)],
    ['worker kills / server kills survived', `${counts.workerKills} / ${counts.serverKills} (resumed ${counts.resumedOk})`],
    ['full disk', counts.disk],
    ['model files checked valid', `${counts.filesChecked} (invalid ${counts.filesInvalid.length})`],
    ['partial outputs', String(counts.partial.length)],
    ['temp files left', String(counts.tempFiles.length)],
    ['time', `${((Date.now() - t0) / 1000).toFixed(0)} s`],
  ];
  console.log(`\n| check | result |\n|---|---|\n${rows.map(([a, b]) => `| ${a} | ${b} |`).join('\n')}`);
  const problems = [...counts.unexpected, ...counts.filesInvalid, ...counts.partial, ...counts.tempFiles.map((f) => `temp left: ${f}`), ...(p99 > 50 ? [`/api/health p99 ${p99.toFixed(1)} ms > 50 ms`] : [])];
  for (const p of problems) console.log(`FAIL ${p}`);
  if (!args.keep) rmSync(root, { recursive: true, force: true });
  process.exit(problems.length ? 1 : 0);
}

main().catch((err) => {
  console.error(err);
  server?.kill('SIGKILL');
  process.exit(1);
});
