import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, mkdir, writeFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { loadCaptionedSet, makeCaption, expandRepeats, folderRepeats, parseCsv, formatSkipped } from '../trainers/data/captioned.ts';
import { Rng } from '../trainers/random.ts';

let root: string;

async function png(path: string, width: number, height: number): Promise<void> {
  await sharp({ create: { width, height, channels: 3, background: { r: 10, g: 200, b: 30 } } }).png().toFile(path);
}

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'captioned-'));
  await mkdir(join(root, '3_cats', 'sub'), { recursive: true });
  await mkdir(join(root, 'dogs'), { recursive: true });
  await png(join(root, '3_cats', 'a.png'), 64, 32);
  await writeFile(join(root, '3_cats', 'a.txt'), 'cat, orange, sitting, sofa\n');
  await png(join(root, '3_cats', 'sub', 'b.png'), 32, 64);
  await png(join(root, 'dogs', 'c.png'), 48, 48);
  await writeFile(join(root, 'dogs', 'c.txt'), 'dog');
  await writeFile(join(root, 'dogs', 'broken.jpg'), 'not a jpeg at all');
  await writeFile(join(root, 'notes.md'), '# ignored');
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

test('folder tree: captions from .txt or the stem, repeats from N_ prefixes, broken images reported', async () => {
  const set = await loadCaptionedSet({ root, seed: 1 });
  assert.deepEqual(
    set.train.map((i) => [i.file, i.caption, i.repeats, i.width, i.height]),
    [
      ['3_cats/a.png', 'cat, orange, sitting, sofa', 3, 64, 32],
      ['3_cats/sub/b.png', 'b', 3, 32, 64],
      ['dogs/c.png', 'dog', 1, 48, 48],
    ],
  );
  assert.equal(set.skipped.length, 1);
  assert.equal(set.skipped[0]!.file, 'dogs/broken.jpg');
  assert.match(formatSkipped(set.skipped), /1 image\(s\) skipped:\n  dogs\/broken\.jpg: /);
  assert.deepEqual(expandRepeats(set.train), [0, 0, 0, 1, 1, 1, 2]);
  assert.equal(folderRepeats('10_x'), 10);
  assert.equal(folderRepeats('x_10'), 1);
});

test('manifests: JSON list, JSON object and CSV with quoted commas', async () => {
  await writeFile(join(root, 'm.json'), JSON.stringify([{ file: 'dogs/c.png', caption: 'a dog' }]));
  let set = await loadCaptionedSet({ root, seed: 1, manifest: join(root, 'm.json') });
  assert.deepEqual(set.train.map((i) => [i.file, i.caption]), [['dogs/c.png', 'a dog']]);
  await writeFile(join(root, 'o.json'), JSON.stringify({ '3_cats/a.png': 'x' }));
  set = await loadCaptionedSet({ root, seed: 1, manifest: join(root, 'o.json') });
  assert.deepEqual(set.train.map((i) => [i.file, i.caption]), [['3_cats/a.png', 'x']]);
  await writeFile(join(root, 'm.csv'), 'file,caption\r\n3_cats/sub/b.png,"tall, ""green"" thing"\r\ndogs/c.png,dog\r\n');
  set = await loadCaptionedSet({ root, seed: 1, manifest: join(root, 'm.csv') });
  assert.deepEqual(set.train.map((i) => [i.file, i.caption]), [['3_cats/sub/b.png', 'tall, "green" thing'], ['dogs/c.png', 'dog']]);
  assert.deepEqual(parseCsv('a,b\n1,"x\ny"'), [['a', 'b'], ['1', 'x\ny']]);
});

test('validation split is seeded, disjoint and keeps a training image', async () => {
  const a = await loadCaptionedSet({ root, seed: 7, validationSplit: 0.34 });
  const b = await loadCaptionedSet({ root, seed: 7, validationSplit: 0.34 });
  assert.equal(a.validation.length, 1);
  assert.equal(a.train.length, 2);
  assert.deepEqual(a.validation.map((i) => i.file), b.validation.map((i) => i.file));
  assert.ok(!a.train.some((t) => a.validation.some((v) => v.file === t.file)));
  const all = await loadCaptionedSet({ root, seed: 7, validationSplit: 1 });
  assert.equal(all.train.length, 1);
});

test('tag shuffling keeps the first N tags; drop-out empties the caption at its rate', () => {
  const caption = 'cat, orange, sitting, sofa, indoors, photo';
  const rng = Rng.derive(3, 'caps');
  const seen = new Set<string>();
  for (let i = 0; i < 50; i++) {
    const c = makeCaption(caption, { shuffleTags: true, keepTokens: 2 }, rng);
    const tags = c.split(', ');
    assert.deepEqual(tags.slice(0, 2), ['cat', 'orange']);
    assert.deepEqual([...tags].sort(), caption.split(', ').sort());
    seen.add(c);
  }
  assert.ok(seen.size > 5);
  assert.equal(makeCaption(caption, {}, rng), caption);
  let dropped = 0;
  for (let i = 0; i < 2000; i++) if (makeCaption(caption, { captionDropout: 0.25 }, rng) === '') dropped++;
  assert.ok(dropped > 400 && dropped < 600, String(dropped));
});
