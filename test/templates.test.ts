import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, writeFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { listTemplates, loadTemplate, createPrompt, samplePrompt, processTags, parseTemplate, templateWarnings } from '../trainers/text/templates.ts';
import { Rng } from '../trainers/random.ts';

test('the usual set of templates is shipped, each with [name]/[filewords] where its name says', async () => {
  assert.deepEqual(listTemplates(), ['hypernetwork', 'none', 'style', 'style_filewords', 'subject', 'subject_filewords']);
  for (const name of listTemplates()) {
    const t = await loadTemplate(name);
    assert.ok(t.lines.length >= 1, name);
    assert.equal(t.usesFilewords, name.endsWith('filewords') || name === 'hypernetwork', `${name} [filewords]`);
    assert.equal(t.usesName, name.startsWith('subject') || name.startsWith('style'), `${name} [name]`);
    for (const line of t.lines) assert.equal(line, line.trim());
  }
  assert.equal((await loadTemplate('style_filewords.txt')).name, 'style_filewords');
});

test('user templates by path; blank lines skipped; unknown names list the shipped ones', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'tpl-'));
  try {
    const path = join(dir, 'mine.txt');
    await writeFile(path, 'a [name] on a table\r\n\n  [filewords] by [name]  \n');
    const t = await loadTemplate(path);
    assert.deepEqual(t.lines, ['a [name] on a table', '[filewords] by [name]']);
    assert.equal(t.name, 'mine.txt');
    await writeFile(join(dir, 'empty.txt'), '\n \n');
    await assert.rejects(loadTemplate(join(dir, 'empty.txt')), /has no lines/);
    await assert.rejects(loadTemplate('no_such_template'), /not found: use one of hypernetwork, none, style/);
  } finally {
    await rm(dir, { recursive: true });
  }
  assert.deepEqual(parseTemplate('x\n\ny\n'), ['x', 'y']);
});

test('createPrompt replaces every [filewords] then [name] (webui create_text order)', () => {
  const rng = new Rng(1);
  assert.equal(createPrompt('a photo of a [name], [filewords]', 'pallas_cat', 'cat, grass', {}, rng), 'a photo of a pallas_cat, cat, grass');
  assert.equal(createPrompt('[name] and [name]', 'x', '', {}, rng), 'x and x');
  // filewords are substituted first, so a literal [name] in a caption also becomes the name
  assert.equal(createPrompt('[filewords]', 'tok', 'a [name] thing', {}, rng), 'a tok thing');
  assert.equal(createPrompt('image', 'tok', 'a, b', { shuffleTags: true, tagDropOut: 0.5 }, rng), 'image');
});

test('tag shuffling keeps every tag with its spacing; drop-out drops with probability p; both are seeded', () => {
  const caption = 'a, b, c, d, e, f, g, h';
  const tags = caption.split(',');
  const shuffled = processTags(caption, { shuffleTags: true }, new Rng(7));
  assert.deepEqual(shuffled.split(',').sort(), [...tags].sort());
  assert.notEqual(shuffled, caption);
  assert.equal(processTags(caption, { shuffleTags: true }, new Rng(7)), shuffled);
  assert.equal(processTags(caption, { tagDropOut: 0 }, new Rng(7)), caption);
  assert.equal(processTags(caption, { tagDropOut: 1 }, new Rng(7)), '');
  const rng = new Rng(3);
  let kept = 0;
  for (let i = 0; i < 2000; i++) kept += processTags(caption, { tagDropOut: 0.25 }, rng).split(',').filter((t) => t !== '').length;
  const rate = kept / (2000 * 8);
  assert.ok(Math.abs(rate - 0.75) < 0.02, `kept ${rate}`);
  const dropped = processTags(caption, { tagDropOut: 0.5 }, new Rng(11));
  for (const t of dropped.split(',')) assert.ok(tags.includes(t));
});

test('samplePrompt chooses lines uniformly from a seeded stream', async () => {
  const t = await loadTemplate('subject');
  const a = Array.from({ length: 20 }, (_, i) => samplePrompt(t, 'tok', '', {}, Rng.derive(5, i)));
  const b = Array.from({ length: 20 }, (_, i) => samplePrompt(t, 'tok', '', {}, Rng.derive(5, i)));
  assert.deepEqual(a, b);
  assert.ok(new Set(a).size > 5);
  for (const p of a) assert.ok(p.includes('tok') && !p.includes('['));
});

test('templateWarnings flags a TI template without [name]', async () => {
  assert.equal(templateWarnings(await loadTemplate('hypernetwork'), 'textual_inversion').length, 1);
  assert.deepEqual(templateWarnings(await loadTemplate('subject'), 'textual_inversion'), []);
  assert.deepEqual(templateWarnings(await loadTemplate('hypernetwork'), 'hypernetwork'), []);
});
