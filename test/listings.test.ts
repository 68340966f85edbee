import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { listFolder } from '../bridge/listings.ts';

test('folder listings include symlinked models and skip dangling links', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'sidetrain-list-'));
  writeFileSync(join(dir, 'a.safetensors'), 'x');
  symlinkSync(resolve('test/fixtures/sd-tiny/model.safetensors'), join(dir, 'b.safetensors'));
  symlinkSync(join(dir, 'missing.safetensors'), join(dir, 'c.safetensors'));
  assert.deepEqual((await listFolder(dir, ['.safetensors'])).map((f) => f.name), ['a', 'b']);
});
