/**
 * @file `sidetrain dataset DIR`: a training folder as a job will see it, before anything loads —
 * every image with its size and training size, its caption (`<stem>.txt` or the file name) and
 * the prompt it trains with; the files skipped and why; a warning naming the images whose caption
 * replaces the trigger word. The page's dataset panel shows the same (bridge/dataset-routes.ts).
 */
import type { Command } from 'commander';
import { methods } from '../../trainers/methods/index.ts';
import { datasetView, type DatasetView } from '../dataset-routes.ts';
import { RequestError } from '../spec.ts';
import { flagErrors } from './flags.ts';

const ALIASES: Record<string, string> = { ti: 'textual_inversion', hn: 'hypernetwork' };

export function formatDatasetView(v: DatasetView): string {
  const lines = [`${v.dir}: ${v.items.length} image(s), ${v.skipped.length} skipped`];
  for (const it of v.items) {
    const size = it.width === it.sourceWidth && it.height === it.sourceHeight ? `${it.width}×${it.height}` : `${it.sourceWidth}×${it.sourceHeight} → ${it.width}×${it.height}`;
    lines.push(`  ${it.file}  ${size}`, `    caption (${it.captionSource === 'txt' ? '.txt' : 'file name'}): ${JSON.stringify(it.caption)}`, `    trains with: ${JSON.stringify(it.prompt)}`);
  }
  for (const s of v.skipped) lines.push(`  skipped ${s.file}: ${s.reason}`);
  for (const w of v.warnings) lines.push(`Warning: ${w}`);
  return lines.join('\n');
}

export function registerDataset(program: Command): void {
  program
    .command('dataset')
    .argument('<dir>', 'the folder of training images')
    .description('show a training folder as a job will use it: sizes, captions, the prompt of each image, skipped files')
    .option('--for <method>', 'the method: ti, hn, lora, dreambooth or finetune', 'lora')
    .option('--instance-prompt <text>', 'Dreambooth/LoRA: the instance prompt (trigger word)')
    .option('--caption-mode <mode>', 'Dreambooth/LoRA: caption, prepend, append or ignore')
    .option('--template <name|file>', 'TI/hypernetwork: the prompt template')
    .option('--name <name>', 'what [name] becomes in a template')
    .option('--width <n>', 'training width', (v) => Number(v))
    .option('--height <n>', 'training height', (v) => Number(v))
    .option('--json', 'print it as JSON')
    .action(async (dir: string, o: Record<string, unknown>) => {
      const type = ALIASES[String(o.for)] ?? String(o.for);
      const spec = Object.fromEntries(Object.entries({ images: dir, instancePrompt: o.instancePrompt, captionMode: o.captionMode, template: o.template, name: o.name, width: o.width, height: o.height })
        .filter(([, v]) => v !== undefined));
      try {
        const view = await datasetView(methods, type, spec);
        console.log(o.json ? JSON.stringify(view, null, 2) : formatDatasetView(view));
      } catch (err) {
        if (err instanceof RequestError) throw new Error(flagErrors(err.errors.map((e) => ({ ...e, field: e.field.replace('/spec/images', 'DIR').replace('/type', '/for') }))));
        throw err;
      }
    });
}
