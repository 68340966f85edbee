/**
 * @file The registry of training methods, by the job type the API and CLI use. Adding a method is
 * a schema in schemas/ and an entry here; nothing in bridge/ is special-cased. Methods load
 * lazily so that the server process never imports TF.js. The bridge hands over specs as plain
 * JSON; `jobSpec` (schemas/index.ts) checks each against its schema and gives it its type
 * (schemas/types.ts, generated from the same file), defaults filled in.
 */
import { jobSpec } from '../../schemas/index.ts';
import type { MethodEntry } from '../job.ts';

export const methods: Record<string, MethodEntry> = {
  textual_inversion: {
    schema: 'textual-inversion',
    load: async () => {
      const { runTextualInversion } = await import('./textual-inversion.ts');
      return (spec, ctx) => runTextualInversion(jobSpec('textual-inversion', spec), ctx);
    },
    dryRun: async () => {
      const { datasetDryRun } = await import('../train/prepare.ts');
      return (spec) => datasetDryRun(jobSpec('textual-inversion', spec));
    },
  },
  hypernetwork: {
    schema: 'hypernetwork',
    load: async () => {
      const { runHypernetwork } = await import('./hypernetwork.ts');
      return (spec, ctx) => runHypernetwork(jobSpec('hypernetwork', spec), ctx);
    },
    dryRun: async () => {
      const { datasetDryRun } = await import('../train/prepare.ts');
      return (spec) => datasetDryRun(jobSpec('hypernetwork', spec));
    },
  },
  dreambooth: {
    schema: 'dreambooth',
    load: async () => {
      const { runDreambooth } = await import('./dreambooth.ts');
      return (spec, ctx) => runDreambooth(jobSpec('dreambooth', spec), ctx);
    },
    dryRun: async () => {
      const { dreamboothDryRun } = await import('./dreambooth.ts');
      return (spec) => dreamboothDryRun(jobSpec('dreambooth', spec));
    },
  },
  lora: {
    schema: 'lora',
    load: async () => {
      const { runLora } = await import('./lora/lora.ts');
      return (spec, ctx) => runLora(jobSpec('lora', spec), ctx);
    },
    dryRun: async () => {
      const { loraDryRun } = await import('./lora/lora.ts');
      return (spec) => loraDryRun(jobSpec('lora', spec));
    },
  },
  finetune: {
    schema: 'finetune',
    load: async () => {
      const { runFinetune } = await import('./finetune/finetune.ts');
      return (spec, ctx) => runFinetune(jobSpec('finetune', spec), ctx);
    },
    dryRun: async () => {
      const { finetuneDryRun } = await import('./finetune/data.ts');
      return (spec) => finetuneDryRun(jobSpec('finetune', spec));
    },
  },
};
