/**
 * @file Previews through the webui: each snapshot of a running (stub) job is copied into the
 * webui's folder under a temporary name, refreshed, rendered with `POST /sdapi/v1/txt2img`
 * (the user's sampler and VAE: neither is sent) and saved as `<name>-<step>-webui.png` with a
 * preview event; the copy is gone afterwards. A webui that is down or fails the generation only
 * costs a log event; `--webui-previews off` turns it off. A hypernetwork job on Forge or SD.Next
 * (which never apply one) is warned as it starts.
 */
import assert from 'node:assert/strict';
import { existsSync, readdirSync, rmSync } from 'node:fs';
import { basename, join } from 'node:path';
import { describe, test } from 'node:test';
import { Command } from 'commander';
import { registerServe, serveOptions } from '../bridge/commands/serve.ts';
import { PREVIEW_PREFIX, previewPrompt, previewTarget } from '../bridge/webui-preview.ts';
import type { Flavour } from '../bridge/webui-flavours.ts';
import { TINY_PNG, startFakeWebui, type FakeWebui } from './helpers/fake-webui.ts';
import { events, makeDirs, startTestServer, waitJob, type TestDirs, type TestServer } from './helpers/api-server.ts';
import type { ServerOptions } from '../bridge/config.ts';

const webuiDirs = (d: TestDirs) => ({ embeddings: d.embeddings, hypernetworks: d.hypernetworks, checkpoints: d.checkpoints, lora: d.lora });
const paths = (w: FakeWebui) => w.calls.map((c) => `${c.method} ${c.path}`);
const leftovers = (d: TestDirs) => [...readdirSync(d.embeddings), ...readdirSync(d.hypernetworks)].filter((f) => f.startsWith(PREVIEW_PREFIX));

async function withWebui(extra: Partial<ServerOptions>, fn: (t: TestServer, webui: FakeWebui, dirs: TestDirs) => Promise<void>, flavour?: Flavour): Promise<void> {
  const dirs = makeDirs();
  const webui = await startFakeWebui({ dirs: webuiDirs(dirs), flavour });
  const t = await startTestServer({ webuiUrl: webui.url, ...extra }, dirs);
  try {
    await fn(t, webui, dirs);
  } finally {
    await t.close();
    await webui.close();
  }
}

/** Run a stub job with snapshots every 5 steps to the end; its events and record. */
async function runJob(t: TestServer, type: string, name: string) {
  const r = await t.api('/api/jobs', { method: 'POST', json: { type, spec: { name, steps: 15, stepMs: 40, saveEvery: 5 } } });
  assert.equal(r.status, 201, JSON.stringify(r.body));
  const ev = await events(t.base, r.body.id);
  // job.webui is set once the webui has been told about the output: every webui call is done.
  const job = await waitJob(t, r.body.id, (j) => j.state !== 'queued' && j.state !== 'running' && j.webui);
  ev.close();
  return { job, messages: ev.messages };
}

describe('previews through the webui', () => {
  test('an embedding snapshot is rendered by txt2img, saved as -webui.png, announced, and its copy removed', async () => {
    await withWebui({}, async (t, webui, dirs) => {
      const { job, messages } = await runJob(t, 'stub', 'cat');
      assert.equal(job.state, 'finished', job.error);
      assert.ok(webui.txt2img.length >= 1, `txt2img calls: ${paths(webui).join(', ')}`);
      const first = webui.txt2img[0]!;
      const token = `${PREVIEW_PREFIX}cat-5`;
      assert.equal(first.payload.prompt, `a photo of ${token}`);
      assert.ok(first.files.includes(`${token}.json`), `copy present during the call: ${first.files}`);
      assert.ok(first.embeddings.includes(token), 'registered by the refresh before the call');
      assert.equal(first.payload.sampler_name, undefined, "the user's sampler");
      assert.equal(first.payload.override_settings, undefined, "the user's VAE");
      assert.equal(first.payload.steps, 20);
      assert.equal(first.payload.seed, 0);
      assert.equal(first.payload.do_not_save_samples, true);
      // refresh (copy in) → the webui lists it → txt2img → refresh (copy out)
      const seq = paths(webui).filter((p) => /refresh-embeddings|txt2img|GET \/sdapi\/v1\/embeddings/.test(p));
      assert.deepEqual(seq.slice(0, 4), ['POST /sdapi/v1/refresh-embeddings', 'GET /sdapi/v1/embeddings', 'POST /sdapi/v1/txt2img', 'POST /sdapi/v1/refresh-embeddings']);
      const preview = messages.find((m) => m.type === 'preview' && m.path.endsWith('-webui.png'));
      assert.ok(preview, `events: ${messages.map((m) => m.type)}`);
      assert.equal(basename(preview.path), 'cat-5-webui.png');
      assert.match(preview.url, new RegExp(`^/api/jobs/${job.id}/previews/\\d+$`));
      const png = await fetch(t.base + preview.url);
      assert.equal(png.status, 200);
      assert.deepEqual(Buffer.from(await png.arrayBuffer()), Buffer.from(TINY_PNG, 'base64'));
      assert.ok(job.previews.some((p: { path: string }) => p.path === preview.path), 'in the job record');
      assert.deepEqual(leftovers(dirs), [], 'no temporary copies left');
      assert.ok(existsSync(`${dirs.embeddings}/cat.pt`));
      assert.equal(job.webui.message, 'ready: use `cat`', 'the final output is still verified');
    });
  });

  test('a hypernetwork snapshot is used as <hypernet:…:1> after the extension refresh', async () => {
    await withWebui({}, async (t, webui, dirs) => {
      const { job, messages } = await runJob(t, 'stub_hypernetwork', 'hn');
      assert.equal(job.state, 'finished', job.error);
      assert.ok(webui.txt2img.length >= 1);
      assert.equal(webui.txt2img[0]!.payload.prompt, `a photo <hypernet:${PREVIEW_PREFIX}hn-5:1>`);
      assert.ok(paths(webui).includes('POST /sidetrain/refresh-hypernetworks'));
      assert.ok(!messages.some((m) => m.type === 'log' && m.level === 'warn'), 'AUTOMATIC1111 applies hypernetworks: no warning');
      assert.ok(!(await t.api('/api/methods')).body.methods.some((m: { webuiNote?: string }) => m.webuiNote));
      assert.deepEqual(leftovers(dirs), []);
    });
  });

  test('Forge and SD.Next ignore hypernetworks: no preview that would render without it, the reason said', async () => {
    for (const flavour of ['forge', 'sdnext'] as Flavour[]) {
      await withWebui({}, async (t, webui, dirs) => {
        const { job, messages } = await runJob(t, 'stub_hypernetwork', 'hn');
        assert.equal(job.state, 'finished', job.error);
        assert.equal(webui.txt2img.length, 0, flavour);
        assert.ok(messages.some((m) => m.type === 'log' && /webui preview at step 5 failed \((Forge lists hypernetworks|SD.Next does not support hypernetworks)/.test(m.message)), flavour);
        // said where the method is picked (GET /api/methods) and as the job starts, before its first step
        const picked = (await t.api('/api/methods')).body.methods as { type: string; webuiNote?: string }[];
        assert.match(picked.find((m) => m.type === 'stub_hypernetwork')?.webuiNote ?? '', /^(Forge lists hypernetworks|SD.Next does not support hypernetworks)/, flavour);
        assert.equal(picked.find((m) => m.type === 'stub')?.webuiNote, undefined, `${flavour}: embeddings are fine`);
        const warned = messages.findIndex((m) => m.type === 'log' && m.level === 'warn' && /^(Forge lists hypernetworks|SD.Next does not support hypernetworks)/.test(m.message));
        assert.ok(warned >= 0 && warned < messages.findIndex((m) => m.type === 'step'), `${flavour}: warned before the first step`);
        assert.match(job.webui.message, /^not usable here: /);
        assert.deepEqual(leftovers(dirs), []);
      }, flavour);
    }
  });

  test('a webui that fails the generation: a warning, the copy removed, the job finishes', async () => {
    await withWebui({}, async (t, webui, dirs) => {
      webui.failTxt2img = true;
      const { job, messages } = await runJob(t, 'stub', 'oom');
      assert.equal(job.state, 'finished', job.error);
      assert.ok(webui.txt2img.length >= 1);
      assert.ok(messages.some((m) => m.type === 'log' && m.level === 'warn' && /webui preview at step 5 failed.*500/.test(m.message)));
      assert.ok(!messages.some((m) => m.type === 'preview'));
      assert.deepEqual(leftovers(dirs), []);
    });
  });

  test('a webui that scans another folder (SD.Next settings): no txt2img that would ignore the snapshot', async () => {
    const dirs = makeDirs();
    const webui = await startFakeWebui({ dirs: { ...webuiDirs(dirs), embeddings: join(dirs.root, 'elsewhere') } });
    const t = await startTestServer({ webuiUrl: webui.url }, dirs);
    try {
      const { job, messages } = await runJob(t, 'stub', 'astray');
      assert.equal(job.state, 'finished', job.error);
      assert.equal(webui.txt2img.length, 0);
      assert.ok(messages.some((m) => m.type === 'log' && /webui preview at step 5 failed.*does not list embedding 'sidetrain-preview-astray-5'/.test(m.message)));
      assert.deepEqual(leftovers(dirs), []);
    } finally {
      await t.close();
      await webui.close();
    }
  });

  test('a server shutting down aborts a stuck txt2img and still removes the copy', async () => {
    const dirs = makeDirs();
    const webui = await startFakeWebui({ dirs: webuiDirs(dirs) });
    webui.hangTxt2img = true;
    const t = await startTestServer({ webuiUrl: webui.url }, dirs);
    try {
      await t.api('/api/jobs', { method: 'POST', json: { type: 'stub', spec: { name: 'stuck', steps: 1000, stepMs: 20, saveEvery: 5 } } });
      for (let i = 0; i < 400 && !webui.txt2img.length; i++) await new Promise((r) => setTimeout(r, 25));
      assert.equal(webui.txt2img.length, 1, 'one txt2img in flight');
      assert.equal(leftovers(dirs).length, 1, 'its copy is in the webui folder meanwhile');
      const t0 = Date.now();
      await t.close({ keepDirs: true });
      assert.ok(Date.now() - t0 < 4000, `shutdown took ${Date.now() - t0} ms`);
      assert.deepEqual(leftovers(dirs), []);
    } finally {
      await webui.close();
      rmSync(dirs.root, { recursive: true, force: true });
    }
  });

  test('--webui-previews off: no txt2img', async () => {
    await withWebui({ webuiPreviews: false }, async (t, webui) => {
      const { job } = await runJob(t, 'stub', 'quiet');
      assert.equal(job.state, 'finished');
      assert.equal(webui.txt2img.length, 0);
      assert.ok(paths(webui).includes('POST /sdapi/v1/refresh-embeddings'), 'the output refresh still happens');
    });
  });

  test('a webui that is down: the job finishes, a log event says why', async () => {
    const dirs = makeDirs();
    const t = await startTestServer({ webuiUrl: 'http://127.0.0.1:9', webuiRetries: 1 }, dirs);
    try {
      const { job, messages } = await runJob(t, 'stub', 'lonely');
      assert.equal(job.state, 'finished', job.error);
      assert.ok(messages.some((m) => m.type === 'log' && /webui preview at step 5 failed.*not answering/.test(m.message)));
      assert.deepEqual(leftovers(dirs), []);
    } finally {
      await t.close();
    }
  });
});

describe('preview prompt and flag', () => {
  const spec = (previewPrompt: string) => ({ name: 'cat', logDir: '/l', embeddingsDir: '/e', previewPrompt });
  test("the preview prompt names the copy where it named the embedding (or [name])", () => {
    const t = (p: string) => previewPrompt(previewTarget(spec(p))!, 'tmp-5');
    assert.equal(t('a painting of cat, cats'), 'a painting of tmp-5, cats');
    assert.equal(t('a [name] on a sofa'), 'a tmp-5 on a sofa');
    assert.equal(t('a sofa'), 'a sofa, tmp-5');
    assert.equal(previewTarget({ name: 'x', loraDir: '/l' }), undefined, 'LoRA: none');
  });

  test('`serve --webui-previews on|off` and SIDETRAIN_WEBUI_PREVIEWS', async () => {
    const parse = async (args: string[], env: NodeJS.ProcessEnv = {}) => {
      const program = new Command().exitOverride();
      registerServe(program);
      let parsed: Record<string, unknown> | undefined;
      program.commands.find((c) => c.name() === 'serve')!.action((o: Record<string, unknown>) => void (parsed = o));
      await program.parseAsync(['serve', ...args], { from: 'user' });
      return serveOptions(parsed!, env);
    };
    assert.equal((await parse(['--webui-previews', 'off'])).webuiPreviews, false);
    assert.equal((await parse([], { SIDETRAIN_WEBUI_PREVIEWS: 'off' })).webuiPreviews, false);
    assert.equal((await parse(['--webui-previews', 'on'], { SIDETRAIN_WEBUI_PREVIEWS: 'off' })).webuiPreviews, true);
    assert.equal((await parse([])).webuiPreviews, undefined, 'default: on when a webui is configured');
    await assert.rejects(parse(['--webui-previews', 'maybe']), /--webui-previews: expected on or off/);
  });
});
