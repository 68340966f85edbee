/**
 * @file The CLIP tokenizer against every `golden.json → tokenizer.cases` entry of every fixture
 * (ids produced by openai's SimpleTokenizer), plus the padding/truncation rules and clean-up.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import {
  ClipTokenizer, cleanText, tokenizeWithEmbeddings, windowIds, BOS_ID, EOS_ID, DEFAULT_VOCAB_PATH,
} from '../trainers/text/tokenizer.ts';

const FIXTURES = ['test/fixtures/sd-tiny', 'test/fixtures/sd2-tiny'];

interface TokenCase {
  prompt: string;
  bpe: number[];
  ids_sd1: number[];
  ids_sd2: number[];
}

for (const dir of FIXTURES) {
  test(`tokenizer reproduces every golden case of ${dir}`, async () => {
    const golden = JSON.parse(readFileSync(`${dir}/golden.json`, 'utf8'));
    const tok = await ClipTokenizer.load(`${dir}/${golden.tokenizer.vocab_file}`);
    const cases = golden.tokenizer.cases as TokenCase[];
    assert.ok(cases.length > 0);
    for (const c of cases) {
      assert.deepEqual(tok.bpe(c.prompt), c.bpe, `bpe of ${JSON.stringify(c.prompt)}`);
      assert.deepEqual(tok.encode(c.prompt, 'eos'), c.ids_sd1, `SD1 ids of ${JSON.stringify(c.prompt)}`);
      assert.deepEqual(tok.encode(c.prompt, 'zero'), c.ids_sd2, `SD2 ids of ${JSON.stringify(c.prompt)}`);
    }
  });
}

test('the shipped vocab file is the default and loads', async () => {
  const tok = await ClipTokenizer.load();
  assert.match(DEFAULT_VOCAB_PATH, /trainers\/text\/bpe_simple_vocab_16e6\.txt\.gz$/);
  assert.deepEqual(tok.bpe('a photo of a cat'), [320, 1125, 539, 320, 2368]);
  assert.deepEqual(tok.bpe('<|startoftext|>a<|endoftext|>'), [BOS_ID, 320, EOS_ID]);
});

test('windows: at most 75 tokens, EOS forced last, padding by family', () => {
  const long = Array.from({ length: 100 }, (_, i) => i + 1);
  const sd1 = windowIds(long, 'eos');
  assert.equal(sd1.length, 77);
  assert.equal(sd1[0], BOS_ID);
  assert.deepEqual(sd1.slice(1, 76), long.slice(0, 75));
  assert.equal(sd1[76], EOS_ID);
  const empty = windowIds([], 'zero');
  assert.deepEqual(empty.slice(0, 3), [BOS_ID, EOS_ID, 0]);
  assert.equal(empty.length, 77);
});

test('clean-up: html entities, curly quotes, full-width forms, whitespace, case', async () => {
  assert.equal(cleanText('  A&amp;B &#39;x&#x27;  \t\n Y  '), "a&b 'x' y");
  assert.equal(cleanText('&amp;lt;'), '<'); // unescaped twice, like simple_tokenizer.py
  assert.equal(cleanText('Don\u2019t \u201cgo\u201d'), 'don\'t "go"');
  assert.equal(cleanText('\uff21\uff22\uff10'), 'ab0');
  assert.equal(cleanText('e\u0301'), '\u00e9'); // NFC
  const tok = await ClipTokenizer.load();
  assert.deepEqual(tok.bpe('don\u2019t'), tok.bpe("don't"));
});

for (const dir of FIXTURES) {
  test(`${dir}: Textual Inversion placeholders and vector positions as the webui makes them`, async () => {
    const golden = JSON.parse(readFileSync(`${dir}/golden.json`, 'utf8'));
    const ti = golden.textual_inversion;
    const tok = await ClipTokenizer.load(`${dir}/${golden.tokenizer.vocab_file}`);
    const padding = golden.family === 'sd1' ? 'eos' : 'zero';
    (ti.prompts as string[]).forEach((prompt, i) => {
      const got = tokenizeWithEmbeddings(tok, prompt, new Map([[ti.name, ti.num_vectors]]), padding);
      assert.deepEqual(got.ids, ti.ids[i]);
      assert.deepEqual(got.embeddings, [{ name: ti.name, positions: ti.vector_positions[i] }]);
    });
  });
}

test('embeddings: longest name wins, repeats, several names, truncation at 75 tokens', async () => {
  const tok = await ClipTokenizer.load();
  const emb = new Map([['cat', 1], ['pallas_cat', 3], ['dog', 2]]);
  const got = tokenizeWithEmbeddings(tok, 'pallas_cat and cat, dog pallas_cat', emb, 'eos');
  const and = tok.bpe('and')[0]!;
  const comma = tok.bpe(',')[0]!;
  assert.deepEqual(got.ids.slice(0, 13), [BOS_ID, 0, 0, 0, and, 0, comma, 0, 0, 0, 0, 0, EOS_ID]);
  assert.deepEqual(got.embeddings, [
    { name: 'pallas_cat', positions: [1, 2, 3] },
    { name: 'cat', positions: [5] },
    { name: 'dog', positions: [7, 8] },
    { name: 'pallas_cat', positions: [9, 10, 11] },
  ]);
  assert.equal(got.truncated, false);
  // 74 plain tokens, then a 2-vector embedding that does not fit in the 75-token window
  const long = tokenizeWithEmbeddings(tok, `${'a '.repeat(74)}dog`, emb, 'zero');
  assert.equal(long.truncated, true);
  assert.deepEqual(long.embeddings, []);
  assert.equal(long.ids[75], EOS_ID);
  assert.equal(long.ids[74], tok.bpe('a')[0]);
  const fits = tokenizeWithEmbeddings(tok, `${'a '.repeat(73)}dog`, emb, 'zero');
  assert.deepEqual(fits.embeddings, [{ name: 'dog', positions: [74, 75] }]);
  assert.equal(fits.ids[76], EOS_ID);
});
