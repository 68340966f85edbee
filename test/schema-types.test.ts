/**
 * @file schemas/types.ts is what scripts/schema-types.mjs generates from schemas/*.json now: the
 * job spec types cannot drift from the schemas that validate and default them.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { jobSpec } from '../schemas/index.ts';

test('schemas/types.ts is up to date with schemas/*.json (npm run schema-types)', async () => {
  // a checkout installed before json-schema-to-typescript (a devDependency) was added says so, not only "cannot find package"
  // @ts-expect-error -- a plain .mjs script without declarations
  const generator = await import('../scripts/schema-types.mjs').catch((err: Error) => {
    throw new Error(`${err.message}\nrun npm install: the generator of schemas/types.ts (json-schema-to-typescript) is a devDependency`);
  });
  const { schemaTypes } = generator as { schemaTypes(): Promise<string> };
  assert.equal(readFileSync(new URL('../schemas/types.ts', import.meta.url), 'utf8'), await schemaTypes(), 'schemas/types.ts is stale: run npm run schema-types');
});

test('jobSpec: defaults filled on a copy; a bad field is named', () => {
  const raw = { model: 'm.safetensors', images: 'imgs', name: 'x' };
  const spec = jobSpec('textual-inversion', raw);
  assert.equal(spec.latentSampling, 'once');
  assert.deepEqual(Object.keys(raw), ['model', 'images', 'name'], 'the input is not changed');
  assert.throws(() => jobSpec('lora', { ...raw, rank: 0 }), /\/rank must be >= 1/);
});
