import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readdir, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openSafetensors, writeSafetensors } from '../trainers/io/safetensors.ts';
import { floatToBf16Bits, floatToHalfBits, halfBitsToFloat, bf16BitsToFloat, roundToHalf } from '../trainers/io/half.ts';
import { findDuplicateKey } from '../trainers/io/json-keys.ts';

const FIX = 'test/fixtures';
const tmp = () => mkdtemp(join(tmpdir(), 'sidetrain-io-'));

test('float16: every bit pattern decodes and re-encodes to itself', () => {
  for (let h = 0; h < 65536; h++) {
    const f = halfBitsToFloat(h);
    if (Number.isNaN(f)) assert.ok(Number.isNaN(halfBitsToFloat(floatToHalfBits(f))));
    else assert.equal(floatToHalfBits(f), h, `half 0x${h.toString(16)}`);
  }
});

test('float16 encode rounds to nearest even, overflows to Inf, underflows to 0', () => {
  assert.equal(floatToHalfBits(1 + 2 ** -11), 0x3c00); // tie → even (down)
  assert.equal(floatToHalfBits(1 + 3 * 2 ** -11), 0x3c02); // tie → even (up)
  assert.equal(floatToHalfBits(65520), 0x7c00);
  assert.equal(floatToHalfBits(65519), 0x7bff);
  assert.equal(floatToHalfBits(2 ** -25), 0); // half the smallest subnormal → even (0)
  assert.equal(floatToHalfBits(Math.fround(2 ** -25 * 1.0001)), 1);
  assert.equal(floatToHalfBits(-0), 0x8000);
  assert.equal(roundToHalf(0.1), 0.0999755859375);
});

test('bfloat16 round trip and rounding', () => {
  for (const h of [0, 0x3f80, 0xbf80, 0x7f7f, 0x0001, 0x8001]) assert.equal(floatToBf16Bits(bf16BitsToFloat(h)), h);
  assert.equal(floatToBf16Bits(Math.fround(1 + 2 ** -8)), 0x3f80); // tie → even
  assert.equal(floatToBf16Bits(Math.fround(1 + 3 * 2 ** -8)), 0x3f82);
  assert.ok(Number.isNaN(bf16BitsToFloat(floatToBf16Bits(NaN))));
});

for (const fixture of ['sd-tiny', 'sd2-tiny']) {
  test(`${fixture}: model-fp16.safetensors is exactly float16(model.safetensors)`, async () => {
    const f32 = await openSafetensors(`${FIX}/${fixture}/model.safetensors`);
    const f16 = await openSafetensors(`${FIX}/${fixture}/model-fp16.safetensors`);
    try {
      assert.deepEqual(f16.keys().sort(), f32.keys().sort());
      assert.deepEqual(f32.metadata(), { format: 'pt' });
      for (const key of f32.keys()) {
        const a = await f32.read(key);
        const b = await f16.read(key);
        assert.deepEqual(f16.info(key).shape, f32.info(key).shape);
        const isHalf = f16.info(key).dtype === 'F16';
        for (let i = 0; i < a.length; i++) {
          if ((isHalf ? roundToHalf(a[i]!) : a[i]) !== b[i]) assert.fail(`${key}[${i}]: ${b[i]} != float16(${a[i]})`);
        }
      }
    } finally {
      await f32.close();
      await f16.close();
    }
  });
}

test('sd-tiny: int64 position_ids upcast exactly', async () => {
  const f = await openSafetensors(`${FIX}/sd-tiny/model.safetensors`);
  const key = 'cond_stage_model.transformer.text_model.embeddings.position_ids';
  assert.deepEqual(f.info(key), { dtype: 'I64', shape: [1, 77] });
  assert.deepEqual(Array.from(await f.read(key)), Array.from({ length: 77 }, (_, i) => i));
  await assert.rejects(() => f.read('nope'), /model\.safetensors: no tensor 'nope'/);
  await f.close();
});

test('writer: round trip of every dtype, metadata, 8-byte aligned header, atomic and no overwrite', async () => {
  const dir = await tmp();
  const path = join(dir, 'out.safetensors');
  const vals = Float32Array.from([1.5, -2, 0.1, 65504, 3.25, -0]);
  const tensors = [
    { name: 'a.half', dtype: 'F16' as const, shape: [2, 3], data: vals },
    { name: 'b.float', dtype: 'F32' as const, shape: [6], data: async () => vals },
    { name: 'c.bf16', dtype: 'BF16' as const, shape: [3, 2], data: vals },
    { name: 'd.long', dtype: 'I64' as const, shape: [3], data: Float32Array.from([0, 76, -5]) },
    { name: 'e.empty', dtype: 'F32' as const, shape: [0, 4], data: new Float32Array(0) },
  ];
  await writeSafetensors(path, tensors, { format: 'pt', note: 'x' }, { order: 'widest-first' });
  const bytes = await readFile(path);
  assert.equal(Number(bytes.readBigUInt64LE(0)) % 8, 0);
  const f = await openSafetensors(path);
  assert.deepEqual(f.keys(), ['d.long', 'b.float', 'e.empty', 'a.half', 'c.bf16']);
  assert.deepEqual(f.metadata(), { format: 'pt', note: 'x' });
  assert.deepEqual(Array.from(await f.read('b.float')), Array.from(vals));
  assert.deepEqual(Array.from(await f.read('a.half')), Array.from(vals, roundToHalf));
  assert.deepEqual(Array.from(await f.read('d.long')), [0, 76, -5]);
  assert.equal((await f.read('e.empty')).length, 0);
  await f.close();
  await assert.rejects(() => writeSafetensors(path, tensors), /already exists/);
  await writeSafetensors(path, tensors.slice(0, 1), undefined, { overwrite: true });
  await assert.rejects(() => writeSafetensors(join(dir, 'bad.safetensors'), [{ name: 'x', dtype: 'F32', shape: [3], data: vals }]), /needs 12/);
  assert.deepEqual((await readdir(dir)).sort(), ['out.safetensors']); // temp files cleaned up
});

test('findDuplicateKey sees duplicates per object only', () => {
  assert.equal(findDuplicateKey('{"a":1,"b":{"a":2},"c":[{"a":1},{"a":2}]}'), undefined);
  assert.equal(findDuplicateKey('{"a":1,"b":{"x":"\\"a","x":2}}'), 'x');
  assert.equal(findDuplicateKey('{"k\\u0061":1,"ka":2}'), 'ka');
});

/** Build a raw safetensors file from a header object/string and a data length. */
async function rawFile(dir: string, name: string, header: string | object, dataLen: number, lenOverride?: number): Promise<string> {
  const json = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(lenOverride ?? json.length));
  const path = join(dir, name);
  await writeFile(path, Buffer.concat([len, json, Buffer.alloc(dataLen)]));
  return path;
}

test('bad safetensors inputs fail with an error naming the file and the problem', async () => {
  const dir = await tmp();
  const t = (shape: number[], offs: number[], dtype = 'F32') => ({ dtype, shape, data_offsets: offs });
  const cases: [string, Promise<string>, RegExp][] = [
    ['empty', (async () => { const p = join(dir, 'empty.safetensors'); await writeFile(p, ''); return p; })(), /empty file/],
    ['past-end', rawFile(dir, 'past-end.safetensors', { a: t([1], [0, 4]) }, 4, 1 << 20), /its first 8 bytes are not a header length that fits the file/],
    ['non-json', rawFile(dir, 'non-json.safetensors', 'PK\u0003\u0004 not json', 0), /not valid JSON/],
    ['dtype', rawFile(dir, 'dtype.safetensors', { a: t([1], [0, 4], 'F8_E4M3X') }, 4), /tensor 'a': unknown dtype "F8_E4M3X"/],
    ['shape', rawFile(dir, 'shape.safetensors', { a: t([2, 3], [0, 20]) }, 20), /tensor 'a': shape \[2, 3\] × F32 is 24 bytes but data_offsets span 20/],
    ['range', rawFile(dir, 'range.safetensors', { a: t([2], [0, 8]), b: t([2], [8, 16]) }, 12), /tensor 'b': data_offsets \[8, 16\] run past the end/],
    ['overlap', rawFile(dir, 'overlap.safetensors', { a: t([2], [0, 8]), b: t([2], [4, 12]) }, 12), /tensor 'b' \[4, 12\] overlaps 'a'/],
    ['gap', rawFile(dir, 'gap.safetensors', { a: t([1], [0, 4]), b: t([1], [8, 12]) }, 12), /gap of 4 bytes before tensor 'b'/],
    ['dup', rawFile(dir, 'dup.safetensors', '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4), /names 'a' twice/],
    ['meta', rawFile(dir, 'meta.safetensors', { __metadata__: { n: 1 } }, 0), /__metadata__\['n'\] is not a string/],
  ];
  for (const [name, pathP, re] of cases) {
    const path = await pathP;
    await assert.rejects(() => openSafetensors(path), (err: Error) => {
      assert.match(err.message, re, name);
      assert.ok(err.message.startsWith(path), `${name}: message names the file: ${err.message}`);
      return true;
    });
  }
  await assert.rejects(() => openSafetensors(dir), /is a directory/);
  // truncated: a real file cut short
  const whole = await readFile(`${FIX}/sd-tiny/model-fp16.safetensors`);
  const cut = join(dir, 'cut.safetensors');
  await writeFile(cut, whole.subarray(0, whole.length - 1000));
  await assert.rejects(() => openSafetensors(cut), /cut\.safetensors: tensor '.*': data_offsets .* run past the end/);
});
