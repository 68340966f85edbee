/**
 * @file The one run every method goes through (the webui's train_embedding / train_hypernetwork
 * shape, which diffusers' and kohya's scripts share): checks that write nothing when they fail,
 * "already exists", the resume lookup, the backend, the started event, settings.json, the loop
 * (train/loop.ts: steps, snapshots, previews, cancel, NaN stop) and the final save. A method is a
 * {@link MethodDefinition}: its output layout, its own checks, and a `load` that returns its
 * trainable parameters, loss, per-step extras and writers. Adding a method is writing one.
 */
import { existsSync } from 'node:fs';
import { mkdir, readdir, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { initJobBackend } from '../backend/index.ts';
import { currentBackend, describeBackend } from '../backend/tf.ts';
import type { PrecisionOption } from '../backend/precision.ts';
import { atomicGroup } from '../io/atomic.ts';
import { headerFamily, nativeResolution } from '../io/checkpoint.ts';
import { checkName, checkReadableDir, checkReadableFile } from '../io/paths.ts';
import { makeClipper } from '../optim/clip-grad.ts';
import { parseLrSchedule, type LrSchedule } from '../optim/lr.ts';
import type { JobContext, JobResult, OutputKind } from '../job.ts';
import { trainLoop, type Optimizer, type TrainMethod } from './loop.ts';

/** The spec fields the run itself reads (every method's schema has them). */
export interface RunSpec {
  name: string;
  model: string;
  images: string;
  logDir: string;
  steps: number;
  saveEvery: number;
  seed: number;
  resume: boolean;
  overwrite: boolean;
  clipGrad?: 'disabled' | 'value' | 'norm';
  clipGradValue?: string;
  /** Apply each gradient as the backward pass completes it (train/loop.ts). */
  fusedBackward?: boolean;
  /** fp32, bf16 mixed precision, or auto (backend/precision.ts). */
  precision?: PrecisionOption;
}

export interface RunPaths {
  /** The webui-facing output (`embeddings/<name>.pt`, `Lora/<name>.safetensors`, …). */
  output: string;
  /** `<log-dir>/<name>`: snapshots, previews, loss CSV, settings. */
  runDir: string;
  snapshots: string;
  images: string;
  csv: string;
}

/** Where a method's files go and how its snapshots are named (`<snapshots>/<name>-<step><suffix>`). */
export interface OutputLayout {
  /** Folder of the output `<name><ext>`. */
  dir: string;
  ext: string;
  /** Folder under the run directory that holds the snapshots. */
  snapshots: string;
  snapshotSuffix: string;
  /**
   * The output itself continues a run (TI, hypernetwork, LoRA, Dreambooth). When not (a fine-tune
   * writes EMA weights without optimizer state), resume reads snapshots only, and a cancel between
   * snapshots writes one.
   */
  outputResumes: boolean;
}

/** What a resume continues: a snapshot (its step from the file name) or the output. */
export interface ResumePoint {
  path: string;
  /** The step in the snapshot's name; undefined for the output (its step is in the file). */
  step?: number;
}

/** What `load` gets: the checked spec, its paths, the resume point, and where to leave disposals. */
export interface LoadArgs<S> {
  spec: S;
  paths: RunPaths;
  from?: ResumePoint;
  /** The backend's name (the started event and settings). */
  backend: string;
  /** Register a release, run in reverse order when the run ends (also when `load` throws midway). */
  onRelease(release: () => unknown): void;
}

/** A loaded method, ready to train: the loop's method plus what the run needs around it. */
export interface Session<B> extends TrainMethod<B> {
  /** The step the loaded state is at (0 for a new run). */
  startStep: number;
  optimizer: Optimizer;
  /** Micro-batches summed per optimizer step. */
  gradAccum: number;
  /** Steps per epoch, for the loss CSV. */
  stepsPerEpoch: number;
  /** Preview (sample image) cadence in steps; 0 = none. */
  previewEvery: number;
  /** Written into settings.json beside the spec. */
  settings: object;
  /** After the started event and settings, before the first step (fine-tune: validation at step 0). */
  begin?(): Promise<void>;
}

/** A training method, as the one run drives it. */
export interface MethodDefinition<S extends RunSpec, B> {
  kind: OutputKind;
  /** How the output is used (`<lora:NAME:1>`, the embedding's name, the checkpoint's name). */
  usage(spec: S): string;
  layout(spec: S): OutputLayout;
  /** The learn-rate schedule of the loop from `startStep` (parsed before anything loads, too). */
  schedule(spec: S, startStep: number): LrSchedule;
  /** Method checks before anything loads; may complete the spec (e.g. a template it writes). */
  preflight?(spec: S, paths: RunPaths, from: ResumePoint | undefined, ctx: JobContext): Promise<S | void>;
  /**
   * The method trains at the spec's width × height: a size the job leaves out is the model
   * family's native one (SDXL 1024, SD1/SD2 512), filled in before anything else reads it.
   */
  sized?: boolean;
  /** What a resume with nothing to continue does instead (`starting a new embedding`). */
  freshStart(spec: S): string;
  load(args: LoadArgs<S>, ctx: JobContext): Promise<Session<B>>;
}

/**
 * Where outputs go when a spec names no folder (the bridge and the CLI fill them from the webui's
 * configured folders; a spec built in code may leave them out): the webui's own defaults.
 */
export const DEFAULT_FOLDERS = {
  logDir: 'textual_inversion', embeddingsDir: 'embeddings', hypernetworkDir: 'hypernetworks', loraDir: 'lora', checkpointDir: 'checkpoints',
} as const;

type FolderKey = keyof typeof DEFAULT_FOLDERS;

/** A spec whose folder fields `K` are set. */
export type WithFolders<S, K extends keyof S & FolderKey> = S & { [P in K]-?: string };

/** `spec` with each of its missing folder fields `keys` set to the webui's default. */
export function withFolders<S extends object, K extends keyof S & FolderKey>(spec: S, keys: readonly K[]): WithFolders<S, K> {
  const folders = Object.fromEntries(keys.map((k) => [k, (spec[k] as string | undefined) ?? DEFAULT_FOLDERS[k]]));
  return { ...spec, ...folders } as WithFolders<S, K>;
}

/** The run's folders for a layout. */
export function runPaths(spec: RunSpec, layout: OutputLayout): RunPaths {
  const runDir = resolve(spec.logDir, spec.name);
  return {
    output: resolve(layout.dir, `${spec.name}${layout.ext}`), runDir, snapshots: join(runDir, layout.snapshots),
    images: join(runDir, 'images'), csv: join(runDir, 'loss.csv'),
  };
}

/** `<snapshots>/<name>-<step><suffix>`. */
export function snapshotPath(paths: RunPaths, name: string, step: number, layout: Pick<OutputLayout, 'snapshotSuffix'>): string {
  return join(paths.snapshots, `${name}-${step}${layout.snapshotSuffix}`);
}

/** An existing output is never replaced silently. */
export function checkOutputFree(output: string, spec: Pick<RunSpec, 'overwrite' | 'resume'>): void {
  if (existsSync(output) && !spec.overwrite && !spec.resume) {
    throw new Error(`${output} already exists: pass --resume to continue training it or --overwrite to replace it`);
  }
}

/** The newest `<name>-<step><suffix>` in `dir` (a killed run's last snapshot), or undefined. */
export async function newestSnapshot(dir: string, name: string, suffix: string): Promise<ResumePoint | undefined> {
  if (!existsSync(dir)) return undefined;
  const prefix = `${name}-`;
  const steps = (await readdir(dir))
    .filter((f) => f.startsWith(prefix) && f.endsWith(suffix))
    .map((f) => f.slice(prefix.length, f.length - suffix.length))
    .filter((s) => /^\d+$/.test(s))
    .map(Number);
  if (!steps.length) return undefined;
  const step = Math.max(...steps);
  return { path: join(dir, `${name}-${step}${suffix}`), step };
}

/** Where a resume starts: the output when it continues a run, else the newest snapshot. */
export async function resumePoint(paths: RunPaths, name: string, layout: OutputLayout): Promise<ResumePoint | undefined> {
  if (layout.outputResumes && existsSync(paths.output)) return { path: paths.output };
  return newestSnapshot(paths.snapshots, name, layout.snapshotSuffix);
}

/** The job's settings beside its snapshots (webui save_settings_to_file). */
export async function saveSettings(paths: RunPaths, spec: object, extra: object): Promise<void> {
  await mkdir(paths.runDir, { recursive: true });
  await writeFile(join(paths.runDir, 'settings.json'), JSON.stringify({ ...spec, ...extra }, null, 2));
}

/**
 * The spec with the width and height it left out set to its model family's native side (512
 * where the header says no family: loading the model then fails with the reason).
 */
export async function withNativeSize<S extends { model: string } & Partial<Sized>>(spec: S): Promise<S & Sized> {
  const { width, height } = spec;
  if (width !== undefined && height !== undefined) return { ...spec, width, height };
  const side = nativeResolution((await headerFamily(spec.model)) ?? 'sd1');
  return { ...spec, width: width ?? side, height: height ?? side };
}

/** The training size of a method that trains at one (MethodDefinition.sized). */
export interface Sized {
  width: number;
  height: number;
}

/** A spec as a job gives it: a sized method's width and height may be left to the model family. */
export type Unsized<S> = Omit<S, keyof Sized> & Partial<Sized>;

/**
 * Check, load, train, save. Cancel saves the current step (a run cancelled before its first
 * step trained nothing and writes nothing); NaN stops with the last good snapshot kept.
 */
export async function runMethod<S extends RunSpec, B>(def: MethodDefinition<S, B>, given: Unsized<S>, ctx: JobContext): Promise<JobResult> {
  checkName(given.name);
  await checkReadableFile(given.model, '/model');
  // a method that is not sized has no width and height in its spec
  let spec = (def.sized ? await withNativeSize(given) : given) as S;
  await checkReadableDir(spec.images, '/images');
  const layout = def.layout(spec);
  const paths = runPaths(spec, layout);
  checkOutputFree(paths.output, spec);
  const lr = def.schedule(spec, 0); // a bad schedule fails before anything loads
  for (const message of lr.warnings) ctx.emit({ type: 'log', level: 'warn', message });
  const from = spec.resume ? await resumePoint(paths, spec.name, layout) : undefined;
  if (spec.resume && !from) ctx.emit({ type: 'log', level: 'warn', message: `nothing to resume for '${spec.name}': ${def.freshStart(spec)}` });
  spec = (await def.preflight?.(spec, paths, from, ctx)) ?? spec;
  const backend = await initJobBackend(spec, ctx);
  const releases: (() => unknown)[] = [];
  try {
    const session = await def.load({ spec, paths, from, backend: backend.name, onRelease: (r) => releases.push(r) }, ctx);
    const { step, outputs, cancelled } = await trainAndSave(def, spec, paths, layout, session, backend.name, ctx);
    return { step, output: paths.output, outputs, kind: def.kind, usage: def.usage(spec), cancelled };
  } finally {
    for (const release of releases.reverse()) await release();
  }
}

async function trainAndSave<S extends RunSpec, B>(
  def: MethodDefinition<S, B>, spec: S, paths: RunPaths, layout: OutputLayout, session: Session<B>, backend: string, ctx: JobContext,
): Promise<{ step: number; outputs: string[]; cancelled: boolean }> {
  const start = session.startStep;
  const lr = def.schedule(spec, start);
  const clipValue = !spec.clipGrad || spec.clipGrad === 'disabled' ? undefined : parseLrSchedule(spec.clipGradValue ?? '', spec.steps, start, 'clip value');
  const choice = currentBackend();
  ctx.emit({ type: 'started', totalSteps: lr.endStep, startStep: start, backend, ...(choice ? { message: describeBackend(choice) } : {}) });
  if (choice) ctx.emit({ type: 'log', level: 'info', message: describeBackend(choice) });
  await saveSettings(paths, spec, session.settings);
  ctx.emit({ type: 'log', level: 'info', message: `learn rate: ${lr.describe()}` });
  await session.begin?.();
  const result = await trainLoop(session, {
    startStep: start, steps: lr.endStep, gradAccum: session.gradAccum, learnRate: (d) => lr.getLr(d),
    clip: clipValue && makeClipper(spec.clipGrad!, (d) => clipValue.getLr(d)), optimizer: session.optimizer, fused: spec.fusedBackward === true,
    saveEvery: spec.saveEvery, previewEvery: session.previewEvery, stepsPerEpoch: session.stepsPerEpoch, csvPath: paths.csv,
  }, ctx);
  if (result.cancelled && result.step === start) return { step: result.step, outputs: [], cancelled: true };
  const snapshotted = spec.saveEvery > 0 && result.step % spec.saveEvery === 0;
  // the output does not continue a run: a cancel keeps a snapshot to resume from
  if (result.cancelled && !layout.outputResumes && !snapshotted) await atomicGroup(() => session.save(result.step, false), (p) => p[0]);
  // the output and its side files (.optim) land together or not at all, the output last
  const outputs = await atomicGroup(() => session.save(result.step, true), (p) => p[0]);
  return { step: result.step, outputs, cancelled: result.cancelled };
}
