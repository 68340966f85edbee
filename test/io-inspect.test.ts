import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { copyFileSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { inspectFile } from '../bridge/commands/inspect.ts';

const FIX = 'test/fixtures';

test('inspect reports checkpoints, embeddings, hypernetworks and .optim files', async () => {
  assert.deepEqual(
    { ...(await inspectFile(`${FIX}/sd-tiny/model.safetensors`)), metadata: undefined, predictionFrom: undefined },
    {
      file: `${FIX}/sd-tiny/model.safetensors`, format: 'safetensors', kind: 'checkpoint', family: 'sd1', prediction: 'eps', predictionFrom: undefined,
      config: join(FIX, 'sd-tiny', 'config.json'), heads: { unet: '2 heads', text: 2 }, tensors: 437, parameters: 3664792, dtypes: { F32: 436, I64: 1 }, metadata: undefined,
    },
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

test('a checkpoint copied without its config: the head split a job would use is checked, the fix named', async () => {
  for (const fixture of ['sd-tiny', 'sd2-tiny', 'sdxl-tiny']) {
    const dir = mkdtempSync(join(tmpdir(), 'sidetrain-inspect-'));
    const copy = join(dir, 'tiny.safetensors');
    copyFileSync(`${FIX}/${fixture}/model.safetensors`, copy);
    // the tiny models' heads are not the releases' (SD1 8 heads, SD2/SDXL 64 wide): a job could not load them
    await assert.rejects(() => inspectFile(copy), (e: Error) => {
      assert.match(e.message, /checkpoint that cannot be trained as it is \((UNet|text encoder): .*\); no config is beside it, so (v1-inference|v2-inference|sd_xl_base)\.yaml .* applies, which does not fit this model: put the config it came with beside it as tiny\.yaml \(ldm\/sgm\) or config\.json$/);
      return true;
    }, fixture);
    copyFileSync(`${FIX}/${fixture}/config.json`, join(dir, 'config.json'));
    const ok = await inspectFile(copy);
    assert.equal(ok.config, join(dir, 'config.json'), fixture);
  }
});

test('a release-shaped checkpoint without a config: the release config is said, and it fits', async () => {
  // the real SD2's head-relevant shapes only (attention in/out, text embedding): heads 64 wide
  const { modelConfig } = await import('../bridge/model-config.ts');
  const shapes = new Map<string, number[]>();
  const pre = 'model.diffusion_model.';
  shapes.set(`${pre}input_blocks.0.0.weight`, [320, 4, 3, 3]);
  const mult = [1, 2, 4, 4];
  let n = 1;
  mult.forEach((m, level) => {
    for (let r = 0; r < 2; r++, n++) {
      shapes.set(`${pre}input_blocks.${n}.0.in_layers.2.weight`, [320 * m, 320 * m, 3, 3]);
      if (level < 3) shapes.set(`${pre}input_blocks.${n}.1.transformer_blocks.0.norm1.weight`, [320 * m]);
    }
    if (level < 3) shapes.set(`${pre}input_blocks.${n++}.0.op.weight`, [320 * m, 320 * m, 3, 3]);
  });
  shapes.set(`${pre}middle_block.1.proj_in.weight`, [1280, 1280]);
  shapes.set(`${pre}middle_block.1.transformer_blocks.0.norm1.weight`, [1280]);
  shapes.set(`${pre}middle_block.1.transformer_blocks.0.attn2.to_k.weight`, [1280, 1024]);
  shapes.set(`${pre}out.2.weight`, [4, 320, 3, 3]);
  const text = 'cond_stage_model.model.';
  shapes.set(`${text}token_embedding.weight`, [49408, 1024]);
  shapes.set(`${text}positional_embedding`, [77, 1024]);
  shapes.set(`${text}transformer.resblocks.0.ln_1.weight`, [1024]);
  shapes.set(`${text}transformer.resblocks.0.mlp.c_fc.weight`, [4096, 1024]);
  const dir = mkdtempSync(join(tmpdir(), 'sidetrain-inspect-'));
  writeFileSync(join(dir, 'unused'), '');
  const r = modelConfig(join(dir, 'v2-1_512.safetensors'), 'sd2', shapes);
  assert.match(r.config, /^none beside the file: the SD2 release defaults, v2-inference\.yaml/);
  assert.deepEqual(r.heads, { unet: 'heads 64 wide', text: 16 });
});
