/**
 * @file `sidetrain demo` (`npm run demo`, the README's first command): a Textual Inversion run on
 * the bundled tiny model (test/fixtures/sd-tiny; its config.json beside gives the head counts)
 * with the sample photos in assets/demo-images, at 64 px, in about a minute on a CPU. It writes
 * `embeddings/demo_pallas_cat.pt` of the project — replacing only an earlier demo's output of
 * that name — and logs snapshots, previews and the loss CSV to `runs/demo_pallas_cat/`.
 */
import { join, relative } from 'node:path';
import type { Command } from 'commander';
import { REPO_DIR } from '../config.ts';
import { runJobInProcess } from './train.ts';
import { progressReporter } from './progress.ts';

export const DEMO_NAME = 'demo_pallas_cat';

/** The demo's job, as `sidetrain train ti --config` would take it. ~0.1 s/step at 64 px on 2 cores. */
export function demoSpec(steps = 400): Record<string, unknown> {
  return {
    model: join(REPO_DIR, 'test/fixtures/sd-tiny/model.safetensors'),
    images: join(REPO_DIR, 'assets/demo-images'),
    name: DEMO_NAME,
    initText: 'cat',
    vectors: 2,
    steps,
    lr: '0.005',
    template: 'subject_filewords',
    width: 64,
    height: 64,
    previewEvery: Math.max(1, Math.floor(steps / 4)),
    saveEvery: Math.max(1, Math.floor(steps / 4)),
    previewPrompt: `a photo of ${DEMO_NAME}`,
    seed: 0,
    embeddingsDir: join(REPO_DIR, 'embeddings'),
    logDir: join(REPO_DIR, 'runs'),
    overwrite: true, // only ever this demo's own file name
  };
}

export function registerDemo(program: Command): void {
  program
    .command('demo')
    .description(`train a Textual Inversion embedding '${DEMO_NAME}' on the bundled tiny model and sample photos (about a minute on a CPU)`)
    .option('--steps <n>', 'training steps', (raw: string) => Number(raw), 400)
    .action(async (opts: { steps: number }) => {
      const spec = demoSpec(opts.steps);
      const rel = (p: string) => relative(process.cwd(), p) || '.';
      console.log(`Training '${DEMO_NAME}' for ${opts.steps} steps: ${rel(spec.images as string)} on ${rel(spec.model as string)}, 64×64 px`);
      const started = Date.now();
      const report = progressReporter();
      const result = await runJobInProcess('textual_inversion', spec, report);
      report({ type: 'finished', step: result.step, output: result.output, outputs: result.outputs, kind: result.kind, usage: result.usage });
      if (result.outputs.length === 0) return console.log('\nStopped before the first step: nothing written.');
      const runDir = join(spec.logDir as string, DEMO_NAME);
      console.log(`\n${result.cancelled ? 'Stopped' : 'Done'} at step ${result.step} in ${((Date.now() - started) / 1000).toFixed(0)} s.`);
      console.log(`  embedding  ${result.output}  (+ .optim, to resume with --resume)`);
      console.log(`  previews   ${join(runDir, 'images')}`);
      console.log(`  snapshots  ${join(runDir, 'embeddings')}`);
      console.log(`  loss log   ${join(runDir, 'loss.csv')}`);
      console.log(`\nUse it: put the .pt in the webui's embeddings folder and write '${result.usage}' in a prompt.`);
      console.log(`This one was trained against a tiny test model (${DEMO_NAME}'s vectors are 32 wide), so a real SD1.x/2.x`);
      console.log('webui lists it as skipped. Train your own with your checkpoint and photos:');
      console.log('  npx sidetrain train ti --model <checkpoint.safetensors> --images <folder> --name <name> --init-text "<what it is>"');
    });
}
