/**
 * @file The registry of training methods, by the job type the API and CLI use. Adding a method is
 * a schema in schemas/ and an entry here; nothing in bridge/ is special-cased. Methods load
 * lazily so that the server process never imports TF.js. The bridge hands over specs as plain
 * JSON; `jobSpec` (schemas/index.ts) checks each against its schema and gives it its type
 * (schemas/types.ts, generated from the same file), defaults filled in.
 */
import { jobSpec, type JobSpecs } from '../../schemas/index.ts';
import type { JobContext, JobResult, MethodEntry, OutputKind } from '../job.ts';

/** A method's entry: its runner and `--dry-run` report, each given the spec typed by its schema. */
function entry<K extends keyof JobSpecs>(
  schema: K,
  run: () => Promise<(spec: JobSpecs[K], ctx: JobContext) => Promise<JobResult>>,
  dryRun: () => Promise<(spec: JobSpecs[K]) => Promise<string>>,
  outputKind?: OutputKind,
): MethodEntry {
  return {
    schema,
    outputKind,
    load: async () => {
      const runner = await run();
      return (spec, ctx) => runner(jobSpec(schema, spec), ctx);
    },
    dryRun: async () => {
      const report = await dryRun();
      return (spec) => report(jobSpec(schema, spec));
    },
  };
}

const datasetDryRun = async () => (await import('../train/prepare.ts')).datasetDryRun;

export const methods: Record<string, MethodEntry> = {
  textual_inversion: entry('textual-inversion', async () => (await import('./textual-inversion.ts')).runTextualInversion, datasetDryRun, 'embedding'),
  hypernetwork: entry('hypernetwork', async () => (await import('./hypernetwork.ts')).runHypernetwork, datasetDryRun, 'hypernetwork'),
  dreambooth: entry(
    'dreambooth',
    async () => (await import('./dreambooth.ts')).runDreambooth,
    async () => (await import('./dreambooth.ts')).dreamboothDryRun,
  ),
  lora: entry('lora', async () => (await import('./lora/lora.ts')).runLora, async () => (await import('./lora/lora.ts')).loraDryRun),
  finetune: entry(
    'finetune',
    async () => (await import('./finetune/finetune.ts')).runFinetune,
    async () => (await import('./finetune/data.ts')).finetuneDryRun,
  ),
};
