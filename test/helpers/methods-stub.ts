/**
 * @file A stand-in methods registry for server tests (loaded by the worker instead of
 * trainers/methods/index.ts): `stub` "trains" by sleeping `stepMs` per step, emits the events a real
 * method emits, writes snapshots, previews and `<embeddingsDir>/<name>.pt`, honours the abort
 * signal (saves and returns cancelled), resumes from its last snapshot, and can be told to crash
 * (`crashAt` + `crash`: throw | exit | kill). With `pausable` it awaits ctx.waitIfPaused at the top
 * of each step, as trainers/train/loop.ts does. No TF.js.
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { JobContext, JobResult, MethodEntry, OutputKind } from '../../trainers/job.ts';
import { LossLog } from '../../trainers/train/loss-log.ts';

/** Registered by the server from this export (no file in schemas/ needed). */
export const schemas: Record<string, Record<string, unknown>> = {
  'stub-method': {
    type: 'object',
    required: ['name'],
    additionalProperties: false,
    properties: {
      name: { type: 'string', minLength: 1, maxLength: 100 },
      steps: { type: 'integer', minimum: 1, maximum: 100000, default: 20 },
      images: { type: 'string', description: 'dataset folder (checked, unused)' },
      embeddingsDir: { type: 'string' },
      logDir: { type: 'string' },
      stepMs: { type: 'integer', minimum: 0, default: 5 },
      saveEvery: { type: 'integer', minimum: 1, default: 5 },
      previewEvery: { type: 'integer', minimum: 0, default: 0 },
      crashAt: { type: 'integer', minimum: 1 },
      crash: { enum: ['throw', 'exit', 'kill'], default: 'throw' },
      ignoreAbort: { type: 'boolean', default: false },
      pausable: { type: 'boolean', default: false },
      resume: { type: 'boolean', default: false },
      overwrite: { type: 'boolean', default: false },
      writeNothing: { type: 'boolean', default: false, description: 'report the output path without writing it (a method cancelled while loading did)' },
    },
  },
};
// The hypernetwork stand-in writes to the hypernetworks folder (its own field name).
const { embeddingsDir: _e, ...rest } = (schemas['stub-method'] as { properties: Record<string, unknown> }).properties;
schemas['stub-hypernetwork'] = { ...schemas['stub-method'], properties: { ...rest, hypernetworkDir: { type: 'string' } } };

interface StubSpec {
  name: string;
  steps: number;
  embeddingsDir: string;
  logDir: string;
  stepMs: number;
  saveEvery: number;
  previewEvery: number;
  crashAt?: number;
  crash: 'throw' | 'exit' | 'kill';
  ignoreAbort: boolean;
  pausable: boolean;
  resume: boolean;
  overwrite: boolean;
  writeNothing: boolean;
}

/** 1×1 PNG, enough for a preview file. */
const PNG = Buffer.from('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==', 'base64');

const sleep = (ms: number) => new Promise((r) => (ms ? setTimeout(r, ms) : setImmediate(r)));

function crash(how: StubSpec['crash'], step: number): void {
  if (how === 'kill') process.kill(process.pid, 'SIGKILL');
  if (how === 'exit') process.exit(70);
  throw new Error(`stub crashed at step ${step}`);
}

function makeRunner(kind: OutputKind) {
  return async (raw: Record<string, unknown>, ctx: JobContext): Promise<JobResult> => {
    const spec = { ...raw, embeddingsDir: raw.embeddingsDir ?? raw.hypernetworkDir } as unknown as StubSpec;
    const runDir = join(spec.logDir, spec.name);
    const snapFile = join(runDir, 'snapshot.json');
    const output = join(spec.embeddingsDir, `${spec.name}.pt`);
    if (existsSync(output) && !spec.overwrite && !spec.resume) throw new Error(`${output} exists (use overwrite or resume)`);
    mkdirSync(join(runDir, 'images'), { recursive: true });
    mkdirSync(spec.embeddingsDir, { recursive: true });
    let step = spec.resume && existsSync(snapFile) ? (JSON.parse(readFileSync(snapFile, 'utf8')) as { step: number }).step : 0;
    ctx.emit({ type: 'started', totalSteps: spec.steps, startStep: step, backend: 'stub' });
    const lossLog = await LossLog.start(join(runDir, 'loss.csv'), step, ctx); // as trainers/train/loop.ts does
    const save = () => writeFileSync(snapFile, JSON.stringify({ step }));
    const t0 = Date.now();
    const first = step;
    while (step < spec.steps && !(ctx.signal.aborted && !spec.ignoreAbort)) {
      if (spec.pausable) await ctx.waitIfPaused?.();
      if (ctx.signal.aborted && !spec.ignoreAbort) break;
      await sleep(spec.stepMs);
      step++;
      if (spec.crashAt === step) crash(spec.crash, step);
      const itPerSec = (step - first) / Math.max(1e-3, (Date.now() - t0) / 1000);
      await lossLog.append({ step, epoch: Math.floor(step / 10), epochStep: (step % 10) + 1, loss: 1 / step, learnRate: 0.005 });
      ctx.emit({ type: 'step', step, totalSteps: spec.steps, epoch: Math.floor(step / 10), loss: 1 / step, learnRate: 0.005, itPerSec, etaSeconds: (spec.steps - step) / itPerSec });
      if (step % spec.saveEvery === 0) {
        save();
        ctx.emit({ type: 'snapshot', step, path: snapFile });
      }
      if (spec.previewEvery && step % spec.previewEvery === 0) {
        const png = join(runDir, 'images', `${spec.name}-${step}.png`);
        writeFileSync(png, PNG);
        ctx.emit({ type: 'preview', step, path: png });
      }
    }
    save();
    if (!spec.writeNothing) writeFileSync(output, `stub ${kind} ${spec.name} step ${step}\n`);
    const cancelled = step < spec.steps;
    const usage = kind === 'hypernetwork' ? `<hypernet:${spec.name}:1>` : spec.name;
    return { step, output, outputs: [output], kind, usage, cancelled };
  };
}

export const methods: Record<string, MethodEntry> = {
  stub: { schema: 'stub-method', load: async () => makeRunner('embedding'), outputKind: 'embedding' },
  stub_hypernetwork: { schema: 'stub-hypernetwork', load: async () => makeRunner('hypernetwork'), outputKind: 'hypernetwork' },
  stub_no_schema: { schema: 'does-not-exist', load: async () => makeRunner('embedding') },
};
