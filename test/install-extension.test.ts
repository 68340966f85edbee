/**
 * @file `sidetrain install-extension --webui-dir DIR` (issue 22): into a folder laid out like a
 * webui, the extension lands in extensions/sidetrain with this clone and autostart recorded, and
 * then the extension's own tests pass from that installed copy; a link follows the clone; a
 * foreign folder of that name is never replaced; a folder that is no webui is refused by name.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, lstatSync, readFileSync, realpathSync } from 'node:fs';
import { mkdir, mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { REPO_DIR } from '../bridge/config.ts';
import { installExtension, nodeProblem } from '../bridge/commands/install-extension.ts';

async function fakeWebui(): Promise<string> {
  const root = await mkdtemp(join(tmpdir(), 'sidetrain-webui-'));
  for (const d of ['embeddings', 'models/Stable-diffusion', 'models/Lora', 'models/hypernetworks']) await mkdir(join(root, d), { recursive: true });
  await writeFile(join(root, 'launch.py'), '# stand-in\n');
  return root;
}

/** Debian's python3 with the packages extension/tests/REQUIREMENTS.md lists, or undefined. */
function python(): string | undefined {
  for (const exe of ['/usr/bin/python3', 'python3']) {
    if (spawnSync(exe, ['-c', 'import fastapi, httpx, uvicorn, websockets'], { stdio: 'ignore' }).status === 0) return exe;
  }
  return undefined;
}

test('install-extension --copy into a webui folder, then the extension tests pass from the installed copy', async (t) => {
  const webui = await fakeWebui();
  const r = spawnSync(process.execPath, ['bin/sidetrain.mjs', 'install-extension', '--webui-dir', webui, '--copy'], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  const target = join(webui, 'extensions', 'sidetrain');
  assert.match(readFileSync(join(target, 'metadata.ini'), 'utf8'), /Name = sidetrain/);
  assert.deepEqual(JSON.parse(readFileSync(join(target, 'sidecar.json'), 'utf8')), { folder: realpathSync(REPO_DIR).replace(/\/$/, ''), autostart: true });
  assert.match(r.stdout, /restart the webui/);
  const py = python();
  if (!py) return t.skip('python3 with fastapi/httpx/uvicorn/websockets missing (extension/tests/REQUIREMENTS.md)');
  const tests = spawnSync(py, ['-m', 'unittest', 'discover', '-s', join(target, 'tests')], { encoding: 'utf8', env: { ...process.env, SIDETRAIN_INSTALLED_WEBUI: webui }, timeout: 300_000 });
  assert.equal(tests.status, 0, tests.stderr.slice(-3000));
  assert.match(tests.stderr, /\nOK/);
});

test('a link follows the clone and replaces an earlier install; a foreign folder is kept; no webui, no install', async () => {
  const webui = await fakeWebui();
  const clone = await mkdtemp(join(tmpdir(), 'sidetrain-clone-'));
  await mkdir(join(clone, 'extension'));
  await writeFile(join(clone, 'extension', 'metadata.ini'), '[Extension]\nName = sidetrain\n');
  await installExtension({ webuiDir: webui, copy: true, from: clone });
  const done = await installExtension({ webuiDir: webui, from: clone, autostart: false });
  const target = join(webui, 'extensions', 'sidetrain');
  assert.ok(lstatSync(target).isSymbolicLink());
  assert.equal(realpathSync(target), realpathSync(join(clone, 'extension')));
  assert.match(done.join('\n'), /replacing the earlier copy/);
  assert.equal(JSON.parse(readFileSync(join(target, 'sidecar.json'), 'utf8')).autostart, false);

  const other = await fakeWebui();
  await mkdir(join(other, 'extensions', 'sidetrain'), { recursive: true });
  await writeFile(join(other, 'extensions', 'sidetrain', 'mine.txt'), 'keep\n');
  await assert.rejects(installExtension({ webuiDir: other, from: clone }), /exists and is not sidetrain's extension/);
  assert.ok(existsSync(join(other, 'extensions', 'sidetrain', 'mine.txt')));

  await assert.rejects(installExtension({ webuiDir: join(clone, 'nope'), from: clone }), /--webui-dir '.*nope' does not exist/);
  await assert.rejects(installExtension({ webuiDir: clone, from: clone }), /--webui-dir '.*' does not look like a webui folder/);
});

test('Node older than 20.9 is named with what to install', () => {
  assert.match(nodeProblem('20.8.1')!, /Node 20\.8\.1 is too old: sidetrain needs Node 20\.9 or newer/);
  assert.equal(nodeProblem('20.9.0'), undefined);
  assert.equal(nodeProblem('22.1.0'), undefined);
});
