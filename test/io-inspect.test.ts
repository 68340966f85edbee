import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { inspectFile } from '../bridge/commands/inspect.ts';

const FIX = 'test/fixtures';

test('inspect reports checkpoints, embeddings, hypernetworks and .optim files', async () => {
  assert.deepEqual(
    { ...(await inspectFile(`${FIX}/sd-tiny/model.safetensors`)), metadata: undefined, predictionFrom: undefined },
    { file: `${FIX}/sd-tiny/model.safetensors`, format: 'safetensors', kind: 'checkpoint', family: 'sd1', prediction: 'eps', predictionFrom: undefined, tensors: 437, parameters: 3664792, dtypes: { F32: 436, I64: 1 }, metadata: undefined },
  );
  const sd2 = await inspectFile(`${FIX}/sd2-tiny/model.ckpt`);
  assert.equal(sd2.family, 'sd2');
  assert.equal(sd2.prediction, null);
  const emb = await inspectFile(`${FIX}/sd2-tiny/real-embedding.pt`);
  assert.equal(emb.kind, 'embedding');
  assert.deepEqual(emb.vectors, { '*': { vectors: 2, width: 48 } });
  const hn = await inspectFile(`${FIX}/sd-tiny/real-hypernetwork.pt`);
  assert.deepEqual([hn.kind, hn.sizes, hn.activation_func, hn.step], ['hypernetwork', [32], 'swish', 120]);
  const optim = await inspectFile(`${FIX}/sd-tiny/real-embedding.pt.optim`);
  assert.deepEqual([optim.kind, optim.hash], ['optimizer state', '282f']);
});

test('sidetrain inspect --json prints one object; errors exit non-zero with the reason', async () => {
  const run = promisify(execFile);
  const ok = await run(process.execPath, ['bin/sidetrain.mjs', 'inspect', '--json', `${FIX}/sdxl-tiny/real-embedding.safetensors`]);
  assert.equal(JSON.parse(ok.stdout).layout, 'sdxl');
  await assert.rejects(() => run(process.execPath, ['bin/sidetrain.mjs', 'inspect', `${FIX}/sd-tiny/README.md`]), (err: { code: number; stderr: string }) => {
    assert.equal(err.code, 1);
    assert.match(err.stderr, /README\.md: its first 8 bytes are not a header length that fits the file/);
    return true;
  });
});
