/**
 * @file `sidetrain train <method> …`: one sub-command per registered method, its flags generated
 * from the method's JSON Schema (names, help, defaults, choices), or the same as a job file
 * (`--config job.json|yaml`). The job runs in this process with a progress bar; Ctrl-C or SIGTERM
 * stops after the current step and saves.
 */
import { readFileSync } from 'node:fs';
import { Command, Option } from 'commander';
import { parse as parseYaml } from 'yaml';
import { SingleBar, Presets } from 'cli-progress';
import { getSchema, validate, type FieldError } from '../../schemas/index.ts';
import { PathError } from '../../trainers/io/paths.ts';
import { roleOf } from '../spec.ts';
import { folderResolver, fromEnv } from '../config.ts';
import type { WebuiClient } from '../webui.ts';
import { lrScheduleError } from '../../trainers/optim/lr.ts';
import { methods } from '../../trainers/methods/index.ts';
import type { JobEvent, JobResult } from '../../trainers/job.ts';

type Prop = { type?: string; description?: string; default?: unknown; enum?: unknown[]; items?: { type?: string }; 'x-cli-alias'?: string; $ref?: string };

/** Short names people type (`train ti`), besides the job type. */
const ALIASES: Record<string, string[]> = { textual_inversion: ['ti', 'textual-inversion'], hypernetwork: ['hn'] };

const kebab = (s: string) => s.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);

function parseValue(prop: Prop, raw: string): unknown {
  if (prop.type === 'integer' || prop.type === 'number') return Number(raw);
  if (prop.type === 'array') return raw.split(',').map((x) => (prop.items?.type === 'string' ? x.trim() : Number(x)));
  return raw;
}

function addOptions(cmd: Command, props: Record<string, Prop>): void {
  for (const [key, prop] of Object.entries(props)) {
    const flag = kebab(key);
    const help = prop.description ?? '';
    const opt = prop.type === 'boolean'
      ? new Option(`--${flag}`, help)
      : new Option(`--${flag} <value>`, help).argParser((raw: string) => parseValue(prop, raw));
    if (prop.enum) opt.choices(prop.enum.map(String));
    // the schema fills defaults at validation; help only shows them
    if (prop.default !== undefined) opt.default(undefined, JSON.stringify(prop.default));
    cmd.addOption(opt);
    if (prop['x-cli-alias']) cmd.addOption(new Option(`--${prop['x-cli-alias']} <value>`, `same as --${flag}`).hideHelp().argParser((raw: string) => parseValue(prop, raw)));
  }
}

/** Job spec from the job file (if any) overlaid with the flags given on the command line. */
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
  return spec;
}

/** The terminal progress bar (loss, it/s, ETA) and log lines of a job run in this process. */
export function progressReporter(): (e: JobEvent) => void {
  const bar = new SingleBar({ format: '{bar} {value}/{total} | loss {loss} | {rate} it/s | ETA {eta_formatted}', hideCursor: true }, Presets.shades_classic);
  let started = false;
  return (e) => {
    if (e.type === 'started') {
      bar.start(e.totalSteps, e.startStep, { loss: '-', rate: '-' });
      started = true;
      console.error(`backend: ${e.backend}`);
    } else if (e.type === 'step' && started) {
      bar.update(e.step, { loss: e.loss.toFixed(5), rate: e.itPerSec.toFixed(2) });
    } else if (e.type === 'log') {
      if (started) bar.stop();
      console.error(`${e.level}: ${e.message}`);
      if (started) bar.start(bar.getTotal(), (bar as unknown as { value: number }).value ?? 0);
    } else if (e.type === 'snapshot' || e.type === 'preview') {
      /* shown in the final summary; the bar keeps its line */
    }
    if (e.type === 'finished' || e.type === 'failed' || e.type === 'cancelled') bar.stop();
  };
}

/** Schema errors for a person: a schedule string the pattern rejects gets the parser's reason and syntax. */
function validationMessage(schema: string, spec: Record<string, unknown>, errors: FieldError[]): string {
  const props = (getSchema(schema)?.properties ?? {}) as Record<string, Prop>;
  return errors.map((e) => {
    const key = e.field.slice(1);
    const value = spec[key];
    const schedule = props[key]?.$ref?.endsWith('/lrSchedule') && typeof value === 'string';
    const why = schedule ? lrScheduleError(value, key === 'lr' ? 'learn rate' : key) : undefined;
    return why ? `${e.field}: ${why}` : e.text;
  }).join('\n');
}

/**
 * Output folders neither the job file nor the flags gave: the configured ones, filled as the
 * server fills them (bridge/spec.ts prepareSpec; SIDETRAIN_WEBUI_DIR, else sidetrain's own).
 */
export async function fillOutputFolders(schema: string, spec: Record<string, unknown>): Promise<void> {
  const props = (getSchema(schema)?.properties ?? {}) as Record<string, Prop>;
  const folders = await folderResolver(fromEnv(), { configured: false } as WebuiClient)();
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
    // name the field a path check refers to, as the schema's messages do (`/model '…' is not a readable file`)
    if (err instanceof PathError) throw new Error(`${err.field} ${err.message}`);
    throw err;
  } finally {
    process.off('SIGINT', stop).off('SIGTERM', stop);
  }
}

export function registerTrain(program: Command): void {
  const train = program.command('train').description('train a model (one sub-command per method)');
  for (const [type, entry] of Object.entries(methods)) {
    const props = (getSchema(entry.schema)?.properties ?? {}) as Record<string, Prop>;
    const cmd = train.command(ALIASES[type]?.[0] ?? type).aliases([type, ...(ALIASES[type]?.slice(1) ?? [])].filter((a) => a !== (ALIASES[type]?.[0] ?? type)));
    cmd.description(`${type.replace('_', ' ')} job; flags as in schemas/${entry.schema}.json`);
    cmd.option('--config <file>', 'job file (JSON or YAML) with the same fields; flags override it');
    addOptions(cmd, props);
    cmd.action(async (opts: Record<string, unknown>) => {
      const spec = specFrom(props, opts);
      await fillOutputFolders(entry.schema, spec); // before a dry run too: it shows the paths the run uses
      if (spec.dryRun) return dryRun(type, spec);
      const report = progressReporter();
      const result = await runJobInProcess(type, spec, report);
      report({ type: 'finished', step: result.step, output: result.output, outputs: result.outputs, kind: result.kind, usage: result.usage });
      if (result.outputs.length === 0) return console.log(`stopped before the first step: nothing written`);
      console.log(`${result.cancelled ? 'stopped at' : 'finished at'} step ${result.step}: ${result.output}`);
      console.log(result.kind === 'checkpoint' ? `pick it in the webui's checkpoint list: ${result.usage}` : `use it in a prompt: ${result.usage}`);
    });
  }
}

/** `--dry-run`: the dataset report, without loading the model. */
async function dryRun(type: string, spec: Record<string, unknown>): Promise<void> {
  const entry = methods[type]!;
  const errors = validate(entry.schema, spec);
  if (errors.length) throw new Error(validationMessage(entry.schema, spec, errors));
  const report = entry.dryRun ? await entry.dryRun() : (await import('../../trainers/train/run.ts')).datasetDryRun;
  console.log(await report(spec as never));
}
