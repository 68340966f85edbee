/**
 * @file The trigger word cannot be silently wrong (issue 22): Dreambooth and LoRA require an
 * instance prompt; images whose caption file replaces it are named; captionMode prepends or
 * appends it; `--dry-run` shows each image's real prompt and the paths the run writes;
 * `dreambooth --lora` trains at LoRA's learn rate.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { copyFile, mkdtemp, readdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { jobSpec, validate } from '../schemas/index.ts';
import { dreamboothSpec } from '../trainers/methods/dreambooth.ts';
import { loraDryRun } from '../trainers/methods/lora/lora.ts';

const MODEL = 'test/fixtures/sd-tiny/model.safetensors';
const run = promisify(execFile);

/** The demo images, two of them with a caption file. */
async function captionedFolder(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'sidetrain-prompts-'));
  for (const f of await readdir('assets/demo-images')) if (f.endsWith('.png')) await copyFile(join('assets/demo-images', f), join(dir, f));
  await writeFile(join(dir, '02-gray cat on grass.txt'), 'a cat on grass\n');
  await writeFile(join(dir, '05-small orange cat.txt'), 'cute, fluffy\n');
  return dir;
}

test('dreambooth and lora jobs without an instance prompt are refused, naming it', () => {
  for (const schema of ['dreambooth', 'lora']) {
    const errors = validate(schema, { model: MODEL, images: 'x', name: 'n' });
    assert.deepEqual(errors.map((e) => e.text), ['/instancePrompt is required'], schema);
  }
});

test('CLI lora --dry-run: the warning names every image whose caption replaces the instance prompt; the report shows real prompts and paths', async () => {
  const images = await captionedFolder();
  const state = join(images, 'state');
  const args = ['bin/sidetrain.mjs', 'train', 'lora', '--model', MODEL, '--images', images, '--name', 'rex', '--instance-prompt', 'a photo of sks dog', '--width', '64', '--height', '64', '--dry-run'];
  const { stdout } = await run(process.execPath, args, { env: { ...process.env, SIDETRAIN_STATE_DIR: state } });
  assert.match(stdout, /Warning: 2 of 5 image\(s\) train with their own \.txt caption instead of the instance prompt 'a photo of sks dog': 02-gray cat on grass\.png, 05-small orange cat\.png/);
  assert.match(stdout, /01-orange cat sitting\.png .* prompt: "a photo of sks dog"/);
  assert.doesNotMatch(stdout, /Template none|example prompts:\n {2}image/);
  assert.match(stdout, new RegExp(`output: ${join(state, 'lora', 'rex.safetensors')}`));
  assert.match(stdout, new RegExp(`loss CSV: ${join(state, 'runs', 'rex')}`));
});

test('captionMode prepend/append put the instance prompt into each caption; ignore uses it alone', async () => {
  const images = await captionedFolder();
  const base = { model: MODEL, images, name: 'rex', instancePrompt: 'sks dog', width: 64, height: 64, logDir: images, loraDir: images } as Record<string, unknown>;
  const report = async (captionMode: string) => {
    const spec = { ...base, captionMode };
    assert.deepEqual(validate('lora', spec), []);
    return loraDryRun(jobSpec('lora', spec));
  };
  assert.match(await report('prepend'), /05-small orange cat\.png .*prompt: "sks dog, cute, fluffy"/);
  assert.match(await report('append'), /02-gray cat on grass\.png .*prompt: "a cat on grass, sks dog"/);
  const ignore = await report('ignore');
  assert.match(ignore, /02-gray cat on grass\.png .*prompt: "sks dog"/);
  assert.doesNotMatch(ignore, /Warning: .* own \.txt caption/);
});

test('dreambooth --lora trains at LoRA learn rate 1e-4 unless told otherwise; the whole model at 5e-6', () => {
  const spec = (extra: Record<string, unknown>) => {
    const s = { model: MODEL, images: 'x', name: 'n', instancePrompt: 'sks dog', ...extra };
    assert.deepEqual(validate('dreambooth', s), []);
    return dreamboothSpec(jobSpec('dreambooth', s));
  };
  assert.equal(spec({ lora: true }).lr, '1e-4');
  assert.equal(spec({ lora: true, trainTextEncoder: true }).textEncoderLr, '1e-4');
  assert.equal(spec({}).lr, '5e-6');
  assert.equal(spec({ lora: true, lr: '3e-4' }).lr, '3e-4');
});

test('CLI dreambooth --dry-run names the output and log folders the real run uses', async () => {
  const images = await captionedFolder();
  const state = join(images, 'state');
  const args = ['bin/sidetrain.mjs', 'train', 'dreambooth', '--model', MODEL, '--images', images, '--name', 'rex', '--instance-prompt', 'sks dog', '--class-prompt', 'a dog', '--dry-run'];
  const { stdout } = await run(process.execPath, args, { env: { ...process.env, SIDETRAIN_STATE_DIR: state } });
  assert.match(stdout, new RegExp(`output: ${join(state, 'checkpoints', 'rex.safetensors')}`));
  assert.match(stdout, new RegExp(`from ${join(state, 'runs', 'class-images')}/`));
  assert.match(stdout, /learn rate 5e-6/);
});
