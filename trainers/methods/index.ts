/**
 * @file The registry of training methods, by the job type the API and CLI use. Adding a method is
 * a schema in schemas/ and an entry here; nothing in bridge/ is special-cased. Methods load
 * lazily so that the server process never imports TF.js.
 */
import type { JobRunner, MethodEntry } from '../job.ts';

export const methods: Record<string, MethodEntry> = {
  textual_inversion: {
    schema: 'textual-inversion',
    load: async () => (await import('./textual-inversion.ts')).runTextualInversion as unknown as JobRunner,
  },
  hypernetwork: {
    schema: 'hypernetwork',
    load: async () => (await import('./hypernetwork.ts')).runHypernetwork as unknown as JobRunner,
  },
  dreambooth: {
    schema: 'dreambooth',
    load: async () => (await import('./dreambooth.ts')).runDreambooth as unknown as JobRunner,
    dryRun: async () => (await import('./dreambooth.ts')).dreamboothDryRun as (spec: Record<string, unknown>) => Promise<string>,
  },
  lora: {
    schema: 'lora',
    load: async () => (await import('./lora/lora.ts')).runLora as unknown as JobRunner,
    dryRun: async () => (await import('./lora/lora.ts')).loraDryRun as unknown as (spec: Record<string, unknown>) => Promise<string>,
  },
  finetune: {
    schema: 'finetune',
    load: async () => (await import('./finetune/finetune.ts')).runFinetune as unknown as JobRunner,
    dryRun: async () => (await import('./finetune/data.ts')).finetuneDryRun as unknown as (spec: Record<string, unknown>) => Promise<string>,
  },
};
