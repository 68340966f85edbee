/**
 * @file `npm run bench`: every benchmark module in one run, one table. Sections (each a module
 * with an exported bench function returning records): io, api, estimate (bench/estimate-run.ts: the
 * estimate against a user's `train` run on the tiny model), kernels, precision (peak probes,
 * GEMM classes in fp32 and bf16), unet, vae, ti (if
 * bench/ti.ts exists), steps (bench/steps.ts: TI/hypernetwork/Dreambooth/LoRA steps with estimates on
 * the tiny, SD1.5- and SDXL-shaped models, the PyTorch yardstick and the SD1.5 TI profile), each
 * in its own child process so that one section's memory and TF.js backend state cannot touch the
 * next. A section that throws becomes an error row.
 *
 * Each row is printed as soon as its section yields it (a run cut off after an hour still shows
 * what it measured): one line per row, then the summary table at the end; with --json, one JSON
 * record per row as it comes, and nothing else on stdout.
 *
 *   npm run bench                      # all sections, rows as they come, then one table
 *   npm run bench -- --json            # one JSON record per row (with `section`)
 *   npm run bench -- --only steps,kernels
 *   npm run bench -- --only steps --methods textual_inversion,lora --variants adamw,half+ckpt
 *
 * Flags after --only reach the sections that read them (steps: --methods, --variants, --quick).
 * Env: SIDETRAIN_BENCH_SD15=0 skips the full-size SD1.5 rows everywhere (minutes each),
 * SIDETRAIN_BENCH_SDXL=0 the SDXL-shaped ones, SIDETRAIN_BENCH_PYTORCH=0 the PyTorch yardstick.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { TRAINING_NODE_FLAGS } from '../trainers/backend/process-flags.ts';

type Row = Record<string, unknown>;
/** A section's rows: returned at the end, or handed to `emit` one by one as they are measured. */
type Section = { name: string; run: (emit: (r: Row) => void, argv: string[]) => Promise<Row[]> };

const here = (f: string) => fileURLToPath(new URL(f, import.meta.url));

/** The sections in the order they run (cheap first; SD1.5 steps last). */
function sections(): Section[] {
  const list: Section[] = [
    { name: 'io', run: async () => (await import('./io.ts')).benchIo() },
    { name: 'api', run: async () => (await import('./api.ts')).benchApi() },
    { name: 'estimate', run: async () => (await import('./estimate-run.ts')).benchEstimateRun() },
    { name: 'kernels', run: async () => (await import('./kernels.ts')).benchKernels() },
    { name: 'precision', run: async () => (await import('./precision.ts')).benchPrecision() },
    { name: 'unet', run: async () => (await import('./unet.ts')).benchUnet() },
    { name: 'vae', run: async () => (await import('./vae.ts')).benchVae() },
    { name: 'text', run: async () => (await import('./text.ts')).benchText() },
    { name: 'half', run: async () => (await import('./half.ts')).benchHalf() },
  ];
  if (existsSync(here('./ti.ts'))) {
    list.push({
      name: 'ti',
      run: async () => {
        const mod = (await import('./ti.ts')) as { benchTi?: () => Promise<Row[]> };
        if (!mod.benchTi) throw new Error('bench/ti.ts exports no benchTi()');
        return mod.benchTi();
      },
    });
  }
  list.push({
    name: 'steps',
    run: async (emit, argv) => {
      const { benchSteps, stepsArgs } = await import('./steps.ts');
      return benchSteps({ ...stepsArgs(argv), onRow: emit });
    },
  });
  list.push({ name: 'finetune', run: async () => (await import('./finetune.ts')).benchFinetune() });
  return list;
}

const TIME_KEYS = [['secPerStep', 's'], ['msPerCall', 'ms'], ['ms', 'ms'], ['stepSec', 's'], ['p50_ms', 'ms p50'], ['readGiBps', 'GiB/s'], ['events_per_sec', 'ev/s']] as const;
const LABEL_KEYS = ['bench', 'case', 'model', 'variant', 'latent', 'px', 'batch', 'backend'];
const SHOWN = new Set([...LABEL_KEYS, ...TIME_KEYS.map(([k]) => k), 'peakRssMB', 'peakRssMiB', 'estPeakRssMB', 'estVsMeasured', 'estSecPerStep', 'pytorchSecPerStep', 'oursOverPytorch', 'section', 'pytorchMs', 'ratio', 'load1']);

/** One row of the common table: what, backend, time, memory, estimate, PyTorch, and the rest. */
export function tableRow(r: Row): Row {
  const what = ['bench', 'case', 'model', 'variant', 'latent'].map((k) => r[k]).filter((v) => v !== undefined).join(' ');
  const size = r.px !== undefined ? `${r.px}px b${r.batch ?? 1}` : '';
  const time = TIME_KEYS.find(([k]) => typeof r[k] === 'number');
  const rest = Object.entries(r).filter(([k]) => !SHOWN.has(k)).map(([k, v]) => `${k}=${v}`).join(' ');
  return {
    section: r.section, what: `${what} ${size}`.trim(), backend: r.backend ?? '',
    time: time ? `${r[time[0]]} ${time[1]}` : '', peakRssMB: r.peakRssMB ?? r.peakRssMiB ?? '',
    estPeakMB: r.estPeakRssMB ?? '', 'est/meas': r.estVsMeasured ?? '', estSec: r.estSecPerStep ?? '',
    pytorch: r.pytorchSecPerStep !== undefined ? `${r.pytorchSecPerStep} s` : r.pytorchMs !== undefined ? `${r.pytorchMs} ms` : '',
    'ours/pytorch': r.oursOverPytorch ?? r.ratio ?? '', load: r.load1 ?? '', notes: rest.length > 140 ? `${rest.slice(0, 137)}…` : rest,
  };
}

/** One row as a line while the bench runs (the table's columns that have a value). */
export function rowLine(r: Row): string {
  return Object.entries(tableRow(r)).filter(([, v]) => v !== '' && v !== undefined).map(([k, v]) => (k === 'section' || k === 'what' ? String(v) : `${k}=${v}`)).join('  ');
}

/**
 * Run one section in a child process (its memory and TF.js backend state die with it); each JSON
 * line the child prints is a row, handed to `onRow` as it arrives.
 */
async function runSectionChild(name: string, argv: string[], onRow: (r: Row) => void): Promise<void> {
  const child = spawn(process.execPath, [...TRAINING_NODE_FLAGS, '--import', 'tsx', '--expose-gc', fileURLToPath(import.meta.url), '--section', name, ...argv], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let rows = 0;
  const lines = createInterface({ input: child.stdout });
  lines.on('line', (l) => {
    if (!l.startsWith('{')) return;
    rows++;
    onRow(JSON.parse(l) as Row);
  });
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  if (code !== 0 && !rows) throw new Error(`section '${name}' exited with ${code}`);
}

/** The flags a section reads (everything but the runner's own: --json, --only and its value). */
function sectionArgv(argv: string[]): string[] {
  return argv.filter((a, i) => a !== '--json' && a !== '--only' && argv[i - 1] !== '--only');
}

export async function runBench(argv: string[], onRow: (r: Row) => void = () => {}): Promise<Row[]> {
  const onlyAt = argv.indexOf('--only');
  const only = onlyAt >= 0 ? new Set((argv[onlyAt + 1] ?? '').split(',').map((s) => s.trim()).filter(Boolean)) : undefined;
  const all = sections();
  if (only) {
    const unknown = [...only].filter((n) => !all.some((s) => s.name === n));
    if (unknown.length) throw new Error(`--only: unknown section(s) ${unknown.join(', ')}; known: ${all.map((s) => s.name).join(', ')}`);
  }
  const rows: Row[] = [];
  const add = (r: Row) => {
    rows.push(r);
    onRow(r);
  };
  for (const section of all.filter((s) => !only || only.has(s.name))) {
    const t0 = performance.now();
    console.error(`bench: ${section.name}…`);
    try {
      await runSectionChild(section.name, sectionArgv(argv), (r) => add({ section: section.name, ...r }));
    } catch (err) {
      add({ section: section.name, error: String(err instanceof Error ? err.message : err).split('\n')[0] });
    }
    console.error(`bench: ${section.name} done in ${((performance.now() - t0) / 1000).toFixed(0)} s`);
  }
  return rows;
}

async function main(argv: string[]): Promise<void> {
  const sectionAt = argv.indexOf('--section');
  if (sectionAt >= 0) {
    const section = sections().find((s) => s.name === argv[sectionAt + 1]);
    if (!section) throw new Error(`no section '${argv[sectionAt + 1]}'`);
    // rows go out as they come; the returned ones not already emitted follow at the end
    const emitted = new Set<Row>();
    const emit = (r: Row) => {
      emitted.add(r);
      console.log(JSON.stringify(r));
    };
    try {
      for (const r of await section.run(emit, argv.filter((_, i) => i !== sectionAt && i !== sectionAt + 1))) if (!emitted.has(r)) emit(r);
    } catch (err) {
      emit({ error: String(err instanceof Error ? err.message : err).split('\n')[0] });
    }
    return;
  }
  const json = argv.includes('--json');
  const rows = await runBench(argv, (r) => console.log(json ? JSON.stringify(r) : rowLine(r)));
  if (!json) console.table(rows.map(tableRow));
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  await main(process.argv.slice(2));
  process.exit(0); // the API section's server and worker pools must not keep the process alive
}
