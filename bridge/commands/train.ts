/**
 * @file `sidetrain train <method> …`: one sub-command per registered method, its flags generated
 * from the method's JSON Schema (flags.ts: names, placeholders, help, defaults, choices), or the
 * same as a job file (`--config job.json|yaml`). Outputs go where the server would put them
 * (`--webui-dir`: that webui's folders, checked before anything runs; else the configured ones).
 * The job runs in this process with progress (progress.ts) and ends with a summary of every path
 * it wrote; Ctrl-C or SIGTERM stops after the current step and saves.
 */
import { readFileSync } from 'node:fs';
import type { Command } from 'commander';
import { parse as parseYaml } from 'yaml';
import { getSchema, validate, type FieldError } from '../../schemas/index.ts';
import { PathError } from '../../trainers/io/paths.ts';
import { roleOf } from '../spec.ts';
import { checkWebuiDir, folderResolver, fromEnv } from '../config.ts';
import type { WebuiClient } from '../webui.ts';
import { unusableInDir } from '../webui-flavours.ts';
import { lrScheduleError } from '../../trainers/optim/lr.ts';
import { methods } from '../../trainers/methods/index.ts';
import type { JobEvent, JobResult } from '../../trainers/job.ts';
import { addSchemaOptions, flagErrors, flagOf, type Prop } from './flags.ts';
import { progressReporter, runSummary } from './progress.ts';

export { progressReporter } from './progress.ts';

/** Short names people type (`train ti`), besides the job type. */
const ALIASES: Record<string, string[]> = { textual_inversion: ['ti', 'textual-inversion'], hypernetwork: ['hn'] };

/** Job spec from the job file (if any) overlaid with the flags given on the command line; `webuiDir` is the CLI's, not the method's. */
export function specFrom(props: Record<string, Prop>, opts: Record<string, unknown>): Record<string, unknown> {
  const spec: Record<string, unknown> = {};
  if (typeof opts.config === 'string') {
    const text = readFileSync(opts.config, 'utf8');
    Object.assign(spec, /\.ya?ml$/i.test(opts.config) ? parseYaml(text) : JSON.parse(text));
  }
  for (const [key, prop] of Object.entries(props)) {
    const alias = prop['x-cli-alias'];
    const value = opts[key] ?? (alias ? opts[alias] : undefined);
    if (value !== undefined) spec[key] = value;
  }
  if (typeof opts.webuiDir === 'string') spec.webuiDir = opts.webuiDir;
  return spec;
}

/** Schema errors for a person, named by flag: a schedule string the pattern rejects gets the parser's reason and syntax. */
function validationMessage(schema: string, spec: Record<string, unknown>, errors: FieldError[]): string {
  const props = (getSchema(schema)?.properties ?? {}) as Record<string, Prop>;
  return flagErrors(errors, (e) => {
    const key = e.field.slice(1);
    const value = spec[key];
    const schedule = props[key]?.$ref?.endsWith('/lrSchedule') && typeof value === 'string';
    const why = schedule ? lrScheduleError(value, key === 'lr' ? 'learn rate' : key) : undefined;
    return why ? `: ${why}` : undefined;
  });
}

/**
 * Output folders neither the job file nor the flags gave, filled as the server fills them
 * (bridge/spec.ts prepareSpec): `--webui-dir` (checked first), else SIDETRAIN_WEBUI_DIR and the
 * folder variables, else sidetrain's own under the state dir. Takes `webuiDir` out of the spec.
 */
export async function fillOutputFolders(schema: string, spec: Record<string, unknown>): Promise<void> {
  const props = (getSchema(schema)?.properties ?? {}) as Record<string, Prop>;
  const options = fromEnv();
  if (spec.webuiDir !== undefined) options.webuiDir = await checkWebuiDir(String(spec.webuiDir), '--webui-dir');
  delete spec.webuiDir;
  const folders = await folderResolver(options, { configured: false } as WebuiClient)();
  for (const [key, prop] of Object.entries(props)) {
    const role = roleOf(key, prop as Record<string, unknown>);
    if (typeof role === 'object' && spec[key] === undefined && role.output.length === 1) spec[key] = folders[role.output[0]!];
  }
}

/** Run one job in-process; SIGINT/SIGTERM abort it (a second Ctrl-C exits at once). */
export async function runJobInProcess(type: string, spec: Record<string, unknown>, onEvent: (e: JobEvent) => void): Promise<JobResult> {
  const schema = methods[type]!.schema;
  const errors = validate(schema, spec);
  if (errors.length) throw new Error(validationMessage(schema, spec, errors));
  const abort = new AbortController();
  const stop = () => {
    if (abort.signal.aborted) process.exit(130);
    abort.abort();
    console.error('\nstopping after the current step and saving… (Ctrl-C again to quit now)');
  };
  process.on('SIGINT', stop).on('SIGTERM', stop);
  try {
    const runner = await methods[type]!.load();
    return await runner(spec, { emit: onEvent, signal: abort.signal });
  } catch (err) {
    // name the flag a path check refers to (`--model '…' is not a readable file`)
    if (err instanceof PathError) throw new Error(`${flagOf(err.field)} ${err.message}`);
    throw err;
  } finally {
    process.off('SIGINT', stop).off('SIGTERM', stop);
  }
}

export function registerTrain(program: Command): void {
  const train = program.command('train').description('train a model (one sub-command per method)');
  for (const [type, entry] of Object.entries(methods)) {
    const schema = getSchema(entry.schema);
    const props = (schema?.properties ?? {}) as Record<string, Prop>;
    const name = ALIASES[type]?.[0] ?? type;
    const cmd = train.command(name).aliases([type, ...(ALIASES[type]?.slice(1) ?? [])].filter((a) => a !== name));
    cmd.description(`${schema?.description ?? `${type} job`} (flags: schemas/${entry.schema}.json)`);
    cmd.option('--config <file>', 'job file (JSON or YAML) with the same fields; flags override it');
    cmd.option('--webui-dir <dir>', "the webui's folder (A1111, Forge or SD.Next): outputs go into its embeddings, models/Lora … folders unless a folder flag says otherwise");
    addSchemaOptions(cmd, props);
    cmd.action(async (opts: Record<string, unknown>) => {
      const spec = specFrom(props, opts);
      // a webui that cannot use the output at all (Forge ignores hypernetworks): said before anything runs
      const note = typeof spec.webuiDir === 'string' && entry.outputKind ? await unusableInDir(spec.webuiDir, entry.outputKind) : undefined;
      await fillOutputFolders(entry.schema, spec); // before a dry run too: it shows the paths the run uses
      if (note) console.error(`warning: ${note}`);
      if (spec.dryRun) return dryRun(type, spec);
      const report = progressReporter();
      const result = await runJobInProcess(type, spec, report);
      report({ type: 'finished', step: result.step, output: result.output, outputs: result.outputs, kind: result.kind, usage: result.usage });
      console.log(runSummary(result, spec, report));
    });
  }
}

/** `--dry-run`: the dataset report, without loading the model. */
async function dryRun(type: string, spec: Record<string, unknown>): Promise<void> {
  const entry = methods[type]!;
  const errors = validate(entry.schema, spec);
  if (errors.length) throw new Error(validationMessage(entry.schema, spec, errors));
  if (!entry.dryRun) throw new Error(`${type} jobs have no --dry-run`);
  const report = await entry.dryRun();
  console.log(await report(spec));
}
