/**
 * @file The webui client against each flavour's stand-in (A1111 1.10.1, Forge, SD.Next), serving
 * exactly the routes that flavour registers (helpers/webui-routes.ts), with and without Basic
 * auth: the flavour is detected; each output kind is re-scanned through the route that flavour
 * has and checked, or what cannot be done there is said plainly; no call goes to a route the
 * flavour lacks; without credentials a protected route's 401 names the option to give them.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { serveOptions } from '../bridge/commands/serve.ts';
import { WebuiClient } from '../bridge/webui.ts';
import type { Flavour } from '../bridge/webui-flavours.ts';
import type { OutputKind } from '../trainers/job.ts';
import { startFakeWebui, type FakeWebui } from './helpers/fake-webui.ts';
import { routesOf } from './helpers/webui-routes.ts';
import { events, makeDirs, startTestServer, waitJob, type TestDirs } from './helpers/api-server.ts';

const webuiDirs = (d: TestDirs) => ({ embeddings: d.embeddings, hypernetworks: d.hypernetworks, checkpoints: d.checkpoints, lora: d.lora });

/** One output of each kind, written where the webui looks: kind → [file, usage]. */
function writeOutputs(d: TestDirs, tag: string): Record<OutputKind, [string, string]> {
  const out: Record<OutputKind, [string, string]> = {
    embedding: [join(d.embeddings, `emb_${tag}.pt`), `emb_${tag}`],
    hypernetwork: [join(d.hypernetworks, `hn_${tag}.pt`), `<hypernet:hn_${tag}:1>`],
    checkpoint: [join(d.checkpoints, `ckpt_${tag}.safetensors`), `ckpt_${tag}`],
    lora: [join(d.lora, `lora_${tag}.safetensors`), `<lora:lora_${tag}:1>`],
  };
  for (const [file] of Object.values(out)) writeFileSync(file, 'x');
  return out;
}

/** Calls that went to a route this flavour does not register (the flavour probes excepted). */
function strayCalls(webui: FakeWebui, flavour: Flavour): string[] {
  const served = new Set(routesOf(flavour).map((r) => `${r.method} ${r.path}`));
  const probes = ['GET /sdapi/v1/version', 'GET /sdapi/v1/sd-modules'];
  return webui.calls.map((c) => `${c.method} ${c.path}`).filter((c) => !served.has(c) && !probes.includes(c));
}

const EXPECTED: Record<Flavour, { name: string; ready: Record<OutputKind, RegExp> }> = {
  a1111: {
    name: 'AUTOMATIC1111',
    ready: { embedding: /^ready/, hypernetwork: /^ready/, checkpoint: /^ready/, lora: /^ready/ },
  },
  forge: {
    name: 'Forge',
    ready: { embedding: /^ready/, hypernetwork: /^not usable here: Forge lists hypernetworks but never applies them/, checkpoint: /^ready/, lora: /^ready/ },
  },
  sdnext: {
    name: 'SD.Next',
    ready: {
      embedding: /^not ready: the webui does not list embedding 'emb_\w+' yet — SD.Next has no route that re-scans embeddings: it reads them when it loads a model/,
      hypernetwork: /^not usable here: SD.Next does not support hypernetworks/,
      checkpoint: /^ready/,
      lora: /^ready/,
    },
  },
};

for (const flavour of ['a1111', 'forge', 'sdnext'] as Flavour[]) {
  const want = EXPECTED[flavour];
  for (const auth of [undefined, 'me:pw']) {
    describe(`${want.name} ${auth ? 'with' : 'without'} --api-auth/--auth`, () => {
      let dirs: TestDirs;
      let webui: FakeWebui;
      let client: WebuiClient;
      before(async () => {
        dirs = makeDirs();
        webui = await startFakeWebui({ dirs: webuiDirs(dirs), flavour, auth });
        client = new WebuiClient({ url: webui.url, retries: 1, ...(auth ? { auth: { username: 'me', password: 'pw' } } : {}) });
      });
      after(() => webui.close());

      test(`detected as ${want.name}`, async () => {
        assert.equal(await client.flavour(), flavour);
        // asked once
        const probes = webui.calls.length;
        await client.flavour();
        assert.equal(webui.calls.length, probes);
      });

      test('each kind: re-scanned through its own route and checked, or why not said plainly', async () => {
        webui.calls.length = 0;
        const outputs = writeOutputs(dirs, flavour);
        for (const [kind, [file, usage]] of Object.entries(outputs) as [OutputKind, [string, string]][]) {
          const refreshed = await client.refresh(kind);
          assert.equal(refreshed.ok, true, `${kind}: ${refreshed.message}`);
          const verified = await client.verify(kind, file, usage);
          assert.match(verified.message, want.ready[kind], kind);
          assert.equal(verified.ready, want.ready[kind].source.startsWith('^ready'), kind);
        }
        assert.deepEqual(strayCalls(webui, flavour), [], 'only routes this flavour registers');
        if (flavour !== 'a1111') {
          const asked = webui.calls.map((c) => c.path);
          assert.ok(!asked.some((p) => p.includes('hypernetwork')), 'no hypernetwork calls where they cannot be used');
        }
        if (flavour === 'sdnext') {
          assert.ok(!webui.calls.some((c) => c.path === '/sdapi/v1/refresh-embeddings'));
          // its way to read new embeddings: loading a model
          await client.reload();
          assert.equal((await client.verify('embedding', outputs.embedding[0], outputs.embedding[1])).ready, true);
        }
      });

      if (auth) {
        test('without the credentials: a protected route answers 401 and the message names the option', async () => {
          const stranger = new WebuiClient({ url: webui.url, retries: 1 });
          assert.equal(await stranger.flavour(), flavour, 'a 401 still shows the route exists');
          const r = await stranger.refresh('checkpoint');
          assert.equal(r.ok, false);
          assert.match(r.message, /HTTP 401.*--api-auth user:pass or SIDETRAIN_WEBUI_AUTH/);
          assert.equal(await stranger.up(), false);
          assert.ok(!r.message.includes('pw'));
          const wrong = new WebuiClient({ url: webui.url, retries: 1, auth: { username: 'me', password: 'nope' } });
          assert.match((await wrong.unload()).message, /HTTP 401/);
        });
      }
    });
  }
}

describe('credentials', () => {
  test('in the webui URL: used as Basic auth, never kept in the URL that is logged and shown', async () => {
    const dirs = makeDirs();
    const webui = await startFakeWebui({ dirs: webuiDirs(dirs), flavour: 'forge', auth: 'me:p@ss' });
    try {
      const client = new WebuiClient({ url: webui.url.replace('http://', 'http://me:p%40ss@') });
      assert.equal(client.url, webui.url);
      assert.equal(await client.up(), true);
    } finally {
      await webui.close();
    }
  });

  test('--api-auth / SIDETRAIN_WEBUI_AUTH must be user:pass; the error does not echo it', () => {
    assert.throws(() => serveOptions({ apiAuth: 'justasecret' }, {}), (e: Error) => /expected user:pass/.test(e.message) && !e.message.includes('justasecret'));
    assert.throws(() => serveOptions({}, { SIDETRAIN_WEBUI_AUTH: 'nocolon' }), /SIDETRAIN_WEBUI_AUTH: expected user:pass/);
    assert.equal(serveOptions({ apiAuth: 'me:a:b' }, {}).webuiAuth, 'me:a:b');
  });
});

describe('SD.Next in a job with --vram unload', () => {
  test('the model comes back before the check, so the new embedding is found', async () => {
    const dirs = makeDirs();
    const webui = await startFakeWebui({ dirs: webuiDirs(dirs), flavour: 'sdnext', auth: 'me:pw' });
    const t = await startTestServer({ webuiUrl: webui.url, webuiAuth: 'me:pw', vram: 'unload', folders: { logs: dirs.logs } }, dirs);
    try {
      const r = await t.api('/api/jobs', { method: 'POST', json: { type: 'stub', spec: { name: 'nextcat', steps: 2 } } });
      assert.equal(r.status, 201);
      const ev = await events(t.base, r.body.id);
      const verify = await ev.waitFor((m) => m.type === 'webui' && m.action === 'verify');
      ev.close();
      assert.equal(verify.message, 'ready: use `nextcat`');
      const job = await waitJob(t, r.body.id, (j) => j.state === 'finished' && j.webui);
      assert.equal(job.webui.ready, true);
      assert.deepEqual(strayCalls(webui, 'sdnext'), []);
      const health = await t.api('/api/health');
      assert.deepEqual(health.body.webui, { url: webui.url, up: true, flavour: 'SD.Next' });
    } finally {
      await t.close();
      await webui.close();
    }
  });
});
