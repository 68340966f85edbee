/**
 * @file Explicit output folders: `serve --embeddings-dir/--hypernetwork-dir/--ckpt-dir/--lora-dir`
 * and SIDETRAIN_*_DIR win over `--webui-dir` and over a running webui's cmd-flags (SD.Next keeps
 * its folders in settings; A1111 may run with custom folder flags), and a job's output lands
 * there. The flags are parsed by the real `serve` command, and `serve --help` lists them the way
 * the webui extension's launcher probes them (extension/sidetrain_ext/launcher.py).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { Command } from 'commander';
import type { ServerOptions } from '../bridge/config.ts';
import { REPO_DIR } from '../bridge/config.ts';
import { registerServe, serveOptions } from '../bridge/commands/serve.ts';
import { startFakeWebui } from './helpers/fake-webui.ts';
import { makeDirs, startTestServer, waitJob, type TestServer } from './helpers/api-server.ts';

const FOLDER_FLAGS = ['--embeddings-dir', '--hypernetwork-dir', '--ckpt-dir', '--lora-dir'];

/** Parse `sidetrain serve ARGS` with the real command definition; returns the server options. */
async function parseServe(args: string[], env: NodeJS.ProcessEnv = {}): Promise<ServerOptions> {
  const program = new Command().exitOverride();
  registerServe(program);
  let parsed: Record<string, unknown> | undefined;
  program.commands.find((c) => c.name() === 'serve')!.action((o: Record<string, unknown>) => void (parsed = o));
  await program.parseAsync(['serve', ...args], { from: 'user' });
  return serveOptions(parsed!, env);
}

/** Run a stub job of `type` with no output folder in its spec; its output path. */
async function runJob(t: TestServer, type: string, name: string): Promise<string> {
  const res = await t.api('/api/jobs', { method: 'POST', json: { type, spec: { name, steps: 3, stepMs: 0 } } });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  const job = await waitJob(t, res.body.id, (j) => j.state === 'finished' || j.state === 'failed');
  assert.equal(job.state, 'finished', job.error);
  assert.ok(existsSync(job.output), job.output);
  return job.output;
}

/** Start the test server with the options `serve` produced (stub methods, temp state). */
const serverFrom = (opts: ServerOptions, dirs = makeDirs()) =>
  startTestServer({ webuiDir: opts.webuiDir, webuiUrl: opts.webuiUrl, folders: { logs: dirs.logs, ...opts.folders } }, dirs);

describe('explicit output folders', () => {
  test('`serve --help` lists the folder flags (what the extension launcher probes)', () => {
    const help = execFileSync(process.execPath, [join(REPO_DIR, 'bin', 'sidetrain.mjs'), 'serve', '--help'], { encoding: 'utf8' });
    // launcher.py supported_flags(): re.findall(r"--[a-z][a-z0-9-]*", stdout)
    const listed = new Set(help.match(/--[a-z][a-z0-9-]*/g));
    for (const flag of [...FOLDER_FLAGS, '--webui-dir', '--webui-url']) assert.ok(listed.has(flag), `${flag} in serve --help`);
  });

  test('flags win over --webui-dir; the A1111 layout fills the rest; outputs land in the flag folders', async () => {
    const dirs = makeDirs();
    const webuiDir = join(dirs.root, 'webui');
    const custom = { embeddings: join(dirs.root, 'my-embeddings'), hypernetworks: join(dirs.root, 'my-hypernets') };
    const opts = await parseServe(['--webui-dir', webuiDir, '--embeddings-dir', custom.embeddings, '--hypernetwork-dir', custom.hypernetworks]);
    assert.deepEqual(opts.folders, custom);
    const t = await serverFrom(opts, dirs);
    try {
      const { folders } = (await t.api('/api/health')).body;
      assert.equal(folders.embeddings, custom.embeddings);
      assert.equal(folders.hypernetworks, custom.hypernetworks);
      assert.equal(folders.checkpoints, join(webuiDir, 'models', 'Stable-diffusion'), 'not overridden: --webui-dir layout');
      assert.equal(folders.lora, join(webuiDir, 'models', 'Lora'));
      assert.equal(await runJob(t, 'stub', 'flag_emb'), join(custom.embeddings, 'flag_emb.pt'));
      assert.equal(await runJob(t, 'stub_hypernetwork', 'flag_hn'), join(custom.hypernetworks, 'flag_hn.pt'));
      assert.ok(!existsSync(join(webuiDir, 'embeddings', 'flag_emb.pt')));
    } finally {
      await t.close();
    }
  });

  test('flags win over a running webui’s cmd-flags (SD.Next keeps folders in settings), which still gets the refresh', async () => {
    const dirs = makeDirs();
    const webui = await startFakeWebui({ dirs: { embeddings: dirs.embeddings, hypernetworks: dirs.hypernetworks, checkpoints: dirs.checkpoints, lora: dirs.lora } });
    const settingsDir = join(dirs.root, 'sdnext', 'embeddings');
    mkdirSync(settingsDir, { recursive: true });
    const opts = await parseServe(['--webui-url', webui.url, '--embeddings-dir', settingsDir]);
    const t = await serverFrom(opts, dirs);
    try {
      const { folders } = (await t.api('/api/health')).body;
      assert.equal(folders.embeddings, settingsDir);
      assert.equal(folders.hypernetworks, dirs.hypernetworks, 'the rest still discovered from cmd-flags');
      assert.equal(await runJob(t, 'stub', 'sdnext_emb'), join(settingsDir, 'sdnext_emb.pt'));
      assert.ok(!existsSync(join(dirs.embeddings, 'sdnext_emb.pt')));
      // the refresh follows the 'finished' state: wait for it (bounded)
      const refreshed = () => webui.calls.some((c) => `${c.method} ${c.path}` === 'POST /sdapi/v1/refresh-embeddings');
      for (let i = 0; i < 100 && !refreshed(); i++) await new Promise((r) => setTimeout(r, 50));
      assert.ok(refreshed(), 'POST /sdapi/v1/refresh-embeddings');
    } finally {
      await t.close();
      await webui.close();
    }
  });

  test('SIDETRAIN_*_DIR set the folders; a flag wins over its variable', async () => {
    const env = {
      SIDETRAIN_EMBEDDINGS_DIR: '/env/emb',
      SIDETRAIN_HYPERNETWORK_DIR: '/env/hn',
      SIDETRAIN_CKPT_DIR: '/env/ckpt',
      SIDETRAIN_LORA_DIR: '/env/lora',
    };
    assert.deepEqual((await parseServe([], env)).folders, { embeddings: '/env/emb', hypernetworks: '/env/hn', checkpoints: '/env/ckpt', lora: '/env/lora' });
    const opts = await parseServe(['--lora-dir', '/flag/lora', '--ckpt-dir', '/flag/ckpt'], env);
    assert.deepEqual(opts.folders, { embeddings: '/env/emb', hypernetworks: '/env/hn', checkpoints: '/flag/ckpt', lora: '/flag/lora' });
    assert.equal((await parseServe([])).folders, undefined, 'nothing explicit: discovery decides');

    const dirs = makeDirs();
    const fromEnv = join(dirs.root, 'env-embeddings');
    const t = await serverFrom(await parseServe(['--webui-dir', join(dirs.root, 'webui')], { SIDETRAIN_EMBEDDINGS_DIR: fromEnv }), dirs);
    try {
      assert.equal(await runJob(t, 'stub', 'env_emb'), join(fromEnv, 'env_emb.pt'));
    } finally {
      await t.close();
    }
  });
});

describe("a job's own webui folder (webuiDir in the request, as the CLI's --webui-dir)", () => {
  /** A folder laid out like an A1111/Forge install. */
  const makeWebui = (root: string) => {
    const dir = join(root, 'my webui');
    for (const sub of ['embeddings', 'models/hypernetworks', 'models/Lora', 'models/Stable-diffusion']) mkdirSync(join(dir, sub), { recursive: true });
    writeFileSync(join(dir, 'launch.py'), '');
    return dir;
  };

  test('outputs go into that webui; it is kept for a resume; bad folders and escaping paths are refused by field', async () => {
    const dirs = makeDirs();
    const webuiDir = makeWebui(dirs.root);
    const t = await startTestServer({ folders: { logs: dirs.logs } }, dirs);
    try {
      const res = await t.api('/api/jobs', { method: 'POST', json: { type: 'stub', webuiDir, spec: { name: 'mycat', steps: 5, stepMs: 0, crashAt: 2, crash: 'throw' } } });
      assert.equal(res.status, 201, JSON.stringify(res.body));
      assert.equal(res.body.webuiDir, webuiDir);
      assert.equal(res.body.spec.embeddingsDir, join(webuiDir, 'embeddings'));
      const failed = await waitJob(t, res.body.id, (j) => j.state === 'failed');
      assert.equal(failed.webuiDir, webuiDir);
      // resumed: the same webui folder, not the server's
      const again = await t.api(`/api/jobs/${res.body.id}/resume`, { method: 'POST', json: {} });
      assert.equal(again.status, 200, JSON.stringify(again.body));
      assert.equal(again.body.spec.embeddingsDir, join(webuiDir, 'embeddings'));

      // spec.webuiDir (a CLI job file sent as it is) means the same
      const hn = await t.api('/api/jobs', { method: 'POST', json: { type: 'stub_hypernetwork', spec: { name: 'fromfile', steps: 2, stepMs: 0, webuiDir } } });
      assert.equal(hn.status, 201, JSON.stringify(hn.body));
      const done = await waitJob(t, hn.body.id, (j) => j.state === 'finished' || j.state === 'failed');
      assert.equal(done.output, join(webuiDir, 'models', 'hypernetworks', 'fromfile.pt'));
      assert.ok(existsSync(done.output));
      assert.equal('webuiDir' in done.spec, false, 'not handed to the method');

      const refused = async (json: Record<string, unknown>, field: string, message: RegExp) => {
        const r = await t.api('/api/jobs', { method: 'POST', json });
        assert.equal(r.status, 400, JSON.stringify(r.body));
        assert.equal(r.body.errors[0].field, field, JSON.stringify(r.body));
        assert.match(r.body.errors[0].message, message);
      };
      await refused({ type: 'stub', webuiDir: join(dirs.root, 'nowhere'), spec: { name: 'x' } }, '/webuiDir', /does not exist: give the folder the webui is installed in/);
      await refused({ type: 'stub', webuiDir: dirs.logs, spec: { name: 'x' } }, '/webuiDir', /does not look like a webui folder/);
      await refused({ type: 'stub', spec: { name: 'x', webuiDir: 7 } }, '/spec/webuiDir', /must be the folder a webui is installed in/);
      // an output folder outside that webui's folders (and the server's explicit ones) stays refused
      await refused({ type: 'stub', webuiDir, spec: { name: 'x', embeddingsDir: join(dirs.root, 'elsewhere') } }, '/spec/embeddingsDir', /./);
      // SD.Next keeps its embeddings under models/
      const sdnext = join(dirs.root, 'sdnext');
      mkdirSync(join(sdnext, 'modules'), { recursive: true });
      for (const f of ['launch.py', 'installer.py']) writeFileSync(join(sdnext, f), '');
      writeFileSync(join(sdnext, 'modules', 'ui_definitions.py'), '');
      const next = await t.api('/api/jobs', { method: 'POST', json: { type: 'stub', webuiDir: sdnext, spec: { name: 'nextcat', steps: 1, stepMs: 0 } } });
      assert.equal(next.status, 201, JSON.stringify(next.body));
      assert.equal(next.body.spec.embeddingsDir, join(sdnext, 'models', 'embeddings'));
      await waitJob(t, next.body.id, (j) => j.state === 'finished' || j.state === 'failed');
      const est = await t.api('/api/estimate', { method: 'POST', json: { type: 'stub', webuiDir: join(dirs.root, 'nowhere'), spec: { name: 'x' } } });
      assert.equal(est.body.errors[0].field, '/webuiDir');
    } finally {
      await t.close();
    }
  });
});
