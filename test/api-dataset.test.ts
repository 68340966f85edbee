/**
 * @file The dataset panel's routes (issue 22): a folder as the job will use it — each image with
 * its size, caption and the prompt it trains with, the skipped files with why, the images whose
 * caption replaces the trigger word named — a thumbnail per image, and a caption edited in place
 * as `<stem>.txt` (atomic; only an image's caption, only in that folder). `sidetrain dataset DIR`
 * prints the same.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { copyFile, mkdir, mkdtemp, readdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startTestServer } from './helpers/api-server.ts';

async function folder(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'sidetrain-ds-'));
  for (const f of await readdir('assets/demo-images')) if (f.endsWith('.png')) await copyFile(join('assets/demo-images', f), join(dir, f));
  await writeFile(join(dir, '02-gray cat on grass.txt'), 'a cat on grass\n');
  await writeFile(join(dir, 'notes.md'), 'not an image\n');
  await writeFile(join(dir, '09-broken.png'), 'not a png');
  return dir;
}

test('POST /api/dataset: every image with size, caption and prompt; skipped files with why; caption overrides named', async () => {
  const t = await startTestServer({ methodsModule: 'trainers/methods/index.ts' });
  try {
    const dir = await folder();
    const r = await t.api('/api/dataset', { method: 'POST', json: { type: 'lora', spec: { images: dir, instancePrompt: 'sks cat', width: 64, height: 64 } } });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.items.length, 5);
    const byFile = Object.fromEntries(r.body.items.map((i: { file: string }) => [i.file, i]));
    assert.deepEqual(byFile['01-orange cat sitting.png'], {
      file: '01-orange cat sitting.png', sourceWidth: 128, sourceHeight: 128, width: 64, height: 64, caption: 'orange cat sitting', captionSource: 'filename', prompt: 'sks cat',
    });
    assert.equal(byFile['02-gray cat on grass.png'].prompt, 'a cat on grass');
    assert.deepEqual(r.body.skipped.map((s: { file: string }) => s.file), ['09-broken.png', 'notes.md']);
    assert.match(r.body.skipped[1].reason, /not an image file \(\.md\)/);
    assert.ok(r.body.warnings.some((w: string) => /1 of 5 image\(s\) train with their own \.txt caption instead of the instance prompt 'sks cat': 02-gray cat on grass\.png/.test(w)), r.body.warnings);

    const prepend = await t.api('/api/dataset', { method: 'POST', json: { type: 'dreambooth', spec: { images: dir, instancePrompt: 'sks cat', captionMode: 'prepend' } } });
    assert.equal(prepend.body.items.find((i: { file: string }) => i.file.startsWith('02-')).prompt, 'sks cat, a cat on grass');
    const ti = await t.api('/api/dataset', { method: 'POST', json: { type: 'textual_inversion', spec: { images: dir, name: 'kitty', template: 'subject' } } });
    assert.match(ti.body.items[0].prompt, /kitty/);

    const empty = join(dir, 'empty');
    await mkdir(empty);
    const none = await t.api('/api/dataset', { method: 'POST', json: { type: 'lora', spec: { images: empty, instancePrompt: 'x' } } });
    assert.ok(none.body.warnings.some((w: string) => /no usable image/.test(w)));
    const missing = await t.api('/api/dataset', { method: 'POST', json: { type: 'lora', spec: { images: join(dir, 'nope') } } });
    assert.equal(missing.status, 400);
    assert.equal(missing.body.errors[0].field, '/spec/images');
  } finally {
    await t.close();
  }
});

test('captions edited in place as <stem>.txt; thumbnails; nothing outside the folder or beside a non-image', async () => {
  const t = await startTestServer({ methodsModule: 'trainers/methods/index.ts' });
  try {
    const dir = await folder();
    const file = '01-orange cat sitting.png';
    const saved = await t.api('/api/dataset/caption', { method: 'POST', json: { dir, file, caption: '  sks cat, sitting  ' } });
    assert.equal(saved.status, 200, JSON.stringify(saved.body));
    assert.equal(readFileSync(join(dir, '01-orange cat sitting.txt'), 'utf8'), 'sks cat, sitting\n');
    assert.deepEqual(readdirSync(dir).filter((f) => f.includes('sidetrain-tmp')), [], 'no temp file left');
    const view = await t.api('/api/dataset', { method: 'POST', json: { type: 'lora', spec: { images: dir, instancePrompt: 'sks cat' } } });
    const item = view.body.items.find((i: { file: string }) => i.file === file);
    assert.deepEqual([item.caption, item.captionSource, item.prompt], ['sks cat, sitting', 'txt', 'sks cat, sitting']);

    for (const bad of ['../x.png', 'notes.md', 'sub/a.png']) {
      const r = await t.api('/api/dataset/caption', { method: 'POST', json: { dir, file: bad, caption: 'x' } });
      assert.equal(r.status, 400, bad);
      assert.equal(r.body.errors[0].field, '/file');
    }
    assert.ok(!existsSync(join(dir, '..', 'x.txt')));

    const thumb = await fetch(`${t.base}/api/dataset/thumbnail?dir=${encodeURIComponent(dir)}&file=${encodeURIComponent(file)}`);
    assert.equal(thumb.status, 200);
    assert.equal(thumb.headers.get('content-type'), 'image/jpeg');
    assert.deepEqual([...new Uint8Array(await thumb.arrayBuffer()).slice(0, 2)], [0xff, 0xd8]);
  } finally {
    await t.close();
  }
});

test('sidetrain dataset DIR prints each image, its caption and the prompt it trains with', async () => {
  const dir = await folder();
  const out = execFileSync(process.execPath, ['bin/sidetrain.mjs', 'dataset', dir, '--instance-prompt', 'sks cat', '--caption-mode', 'append'], { encoding: 'utf8' });
  assert.match(out, /5 image\(s\), 2 skipped/);
  assert.match(out, /02-gray cat on grass\.png {2}128×128 → 512×512\n {4}caption \(\.txt\): "a cat on grass"\n {4}trains with: "a cat on grass, sks cat"/);
  assert.match(out, /skipped notes\.md: not an image file/);
});

test('POST /api/dataset on an SDXL model: 1024² by default and each image in its aspect-ratio bucket, as the run cuts it', async () => {
  const t = await startTestServer({ methodsModule: 'trainers/methods/index.ts' });
  try {
    const dir = await mkdtemp(join(tmpdir(), 'sidetrain-ds-xl-'));
    const sharp = (await import('sharp')).default;
    await sharp({ create: { width: 1600, height: 900, channels: 3, background: { r: 1, g: 2, b: 3 } } }).png().toFile(join(dir, 'wide.png'));
    await sharp({ create: { width: 500, height: 500, channels: 3, background: { r: 1, g: 2, b: 3 } } }).png().toFile(join(dir, 'square.png'));
    const view = async (model: string, extra: Record<string, unknown> = {}) => {
      const r = await t.api('/api/dataset', { method: 'POST', json: { type: 'lora', spec: { images: dir, instancePrompt: 'sks cat', model, ...extra } } });
      assert.equal(r.status, 200, JSON.stringify(r.body));
      return Object.fromEntries(r.body.items.map((i: { file: string; width: number; height: number }) => [i.file, `${i.width}x${i.height}`]));
    };
    assert.deepEqual(await view('test/fixtures/sdxl-tiny/model.safetensors'), { 'square.png': '1024x1024', 'wide.png': '1344x768' });
    assert.deepEqual(await view('test/fixtures/sdxl-tiny/model.safetensors', { classPrompt: 'a cat', classImages: 4 }), { 'square.png': '1024x1024', 'wide.png': '1024x1024' });
    assert.deepEqual(await view('test/fixtures/sd-tiny/model.safetensors'), { 'square.png': '512x512', 'wide.png': '512x512' });
  } finally {
    await t.close();
  }
});
