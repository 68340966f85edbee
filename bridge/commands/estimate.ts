/**
 * @file `sidetrain estimate <method> [--config job.json] [flags as train] [--json]`: peak memory and
 * time per step of a job on this machine's backend, from the checkpoint's header and the job's
 * options, before anything loads (trainers/memory/estimate.ts). The job file may be a train job file
 * or an API body `{type, spec}`. `images` and `name` are not needed for an estimate.
 */
import { readFileSync } from 'node:fs';
import { freemem, totalmem } from 'node:os';
import { duration } from './progress.ts';
import { startSeconds, totalSeconds } from '../preflight.ts';
import { InvalidArgumentError, Option, type Command } from 'commander';
import { parse as parseYaml } from 'yaml';
import { getSchema, validate } from '../../schemas/index.ts';
import { addSchemaOptions, flagErrors, type Prop } from './flags.ts';
import { methods } from '../../trainers/methods/index.ts';
import { estimateJob, type JobEstimate } from '../../trainers/memory/estimate.ts';
import { headerFamily, nativeResolution } from '../../trainers/io/checkpoint.ts';

const ALIASES: Record<string, string> = { textual_inversion: 'ti', hypernetwork: 'hn' };

/** The job file (train job or `{type, spec}`) overlaid with the flags; schema defaults filled in. */
export function estimateSpec(schema: string, props: Record<string, Prop>, opts: Record<string, unknown>): Record<string, unknown> {
  let spec: Record<string, unknown> = {};
  if (typeof opts.config === 'string') {
    const text = readFileSync(opts.config, 'utf8');
    const doc = (/\.ya?ml$/i.test(opts.config) ? parseYaml(text) : JSON.parse(text)) as Record<string, unknown>;
    spec = { ...((doc.spec && typeof doc.spec === 'object' ? doc.spec : doc) as Record<string, unknown>) };
  }
  for (const [key, prop] of Object.entries(props)) {
    const value = opts[key] ?? (prop['x-cli-alias'] ? opts[prop['x-cli-alias']] : undefined);
    if (value !== undefined) spec[key] = value;
  }
  // not needed to estimate
  const filled = { images: '.', name: 'estimate', ...('instancePrompt' in props ? { instancePrompt: 'estimate' } : {}), ...spec };
  const errors = validate(schema, filled);
  if (errors.length) throw new Error(flagErrors(errors));
  return filled;
}

function parseLimit(raw: string): number {
  const gib = Number(raw);
  if (!(gib > 0) || !Number.isFinite(gib)) throw new InvalidArgumentError(`a number of GB above 0, got '${raw}'`);
  return gib;
}

const gb = (b: number) => `${(b / 2 ** 30).toFixed(2)} GB`;

/** The answer a user asks for first: how long, and whether it fits this machine now (with what else runs). */
export function verdict(spec: Record<string, unknown>, e: JobEstimate, mem = { free: freemem(), total: totalmem() }): string[] {
  const steps = typeof spec.steps === 'number' ? spec.steps : undefined;
  const time = steps
    ? `total time    ~${duration(totalSeconds(e, steps))} for ${steps} steps (~${duration(e.secondsPerStep * steps)} training, ~${duration(startSeconds(e))} starting and loading; plus caching latents)`
    : undefined;
  const fits = e.peakBytes <= mem.free
    ? `fits now: needs ${gb(e.peakBytes)}, ${gb(mem.free)} of ${gb(mem.total)} free`
    : e.peakBytes <= mem.total
      ? `does NOT fit now: needs ${gb(e.peakBytes)}, only ${gb(mem.free)} of ${gb(mem.total)} free (close the webui's model or other programs, or use the memory options)`
      : `does NOT fit this machine: needs ${gb(e.peakBytes)}, it has ${gb(mem.total)} (use --gradient-checkpointing on, --half-frozen-weights, a smaller size or batch)`;
  return [...(time ? [time] : []), `memory        ${fits}`];
}

/**
 * The size the run trains at, as the estimate assumes it: fine-tune's buckets of at most
 * resolution² pixels, else width × height, else the model's native size (SDXL 1024) as the run fills it in.
 */
export async function trainedSize(spec: Record<string, unknown>): Promise<string> {
  if (typeof spec.resolution === 'number') return `buckets of at most ${spec.resolution}² px`;
  if (typeof spec.width === 'number' && typeof spec.height === 'number') return `${spec.width}×${spec.height}`;
  const side = nativeResolution((typeof spec.model === 'string' ? await headerFamily(spec.model) : undefined) ?? 'sd1');
  return `${side}×${side} (the model's native size)`;
}

export function formatEstimate(type: string, spec: Record<string, unknown>, e: JobEstimate, size = `${spec.width}×${spec.height}`): string {
  const w = e.breakdown.weightBytes;
  return [
    `${type} on ${spec.model} at ${size}, batch ${spec.batchSize}, backend ${e.backend}`,
    ...verdict(spec, e),
    `peak memory   ${gb(e.peakBytes)}  (loading + caching latents ${gb(e.breakdown.prepPeakBytes)}, training ${gb(e.breakdown.trainPeakBytes)})`,
    `time per step ${e.secondsPerStep.toFixed(1)} s  (${e.breakdown.denseGflop} GFLOP dense + ${e.breakdown.attentionGflop} GFLOP attention)`,
    `weights       text ${gb(w.text)}, UNet ${gb(w.unet)}, VAE encoder ${gb(w.vaeEncoder)} (released after caching), decoder ${gb(w.vaeDecoder)}, trained ${gb(w.trainable)}`,
    `activations   UNet ${gb(e.breakdown.unetActivationBytes)}, attention scores ${gb(e.breakdown.attentionScoreBytes)}, text ${gb(e.breakdown.textActivationBytes)}`,
    ...e.notes.map((n) => `note: ${n}`),
    ...(e.fit ? [`memory levers against ${gb(e.fit.limitBytes)}:`, ...e.fit.combinations.map((c, i) =>
      `  ${i === e.fit!.pick ? '→' : ' '} ${c.fits ? 'fits ' : 'over '} ${gb(c.peakBytes).padStart(9)}  ${c.secondsPerStep.toFixed(1).padStart(7)} s/step  ${c.label}`),
    ...e.fit.skipped.map((s) => `    (not tried: ${s})`)] : []),
  ].join('\n');
}

export function registerEstimate(program: Command): void {
  const est = program.command('estimate').description('peak memory and time per step of a job, before anything loads');
  for (const [type, entry] of Object.entries(methods)) {
    const props = (getSchema(entry.schema)?.properties ?? {}) as Record<string, Prop>;
    const cmd = est.command(ALIASES[type] ?? type).aliases(ALIASES[type] ? [type] : []);
    cmd.description(`estimate a ${type.replace('_', ' ')} job; same flags / job file as train`);
    cmd.option('--config <file>', 'job file (JSON or YAML): a train job or an API body {type, spec}');
    cmd.option('--json', 'print the estimate as JSON');
    cmd.option('--backend <name>', 'estimate for this backend instead of the one this machine would pick');
    cmd.addOption(new Option('--memory-limit <GB>', 'Dreambooth / fine-tune: the memory the job must fit, for the lever ladder (default 85% of this machine\'s RAM)').argParser(parseLimit));
    addSchemaOptions(cmd, props, ['dryRun']);
    cmd.action(async (opts: Record<string, unknown>) => {
      const spec = estimateSpec(entry.schema, props, opts);
      const memoryLimit = typeof opts.memoryLimit === 'number' ? opts.memoryLimit * 2 ** 30 : undefined;
      const e = await estimateJob(type, spec, { backend: typeof opts.backend === 'string' ? opts.backend : undefined, memoryLimit });
      const steps = typeof spec.steps === 'number' ? spec.steps : undefined;
      const answer = { ...e, startSeconds: startSeconds(e), totalSeconds: steps ? totalSeconds(e, steps) : undefined, freeBytes: freemem(), totalBytes: totalmem(), fitsNow: e.peakBytes <= freemem() };
      console.log(opts.json ? JSON.stringify(answer, null, 2) : formatEstimate(type, spec, e, await trainedSize(spec)));
    });
  }
}
