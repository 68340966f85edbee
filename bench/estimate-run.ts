/**
 * @file The estimate against the run a user would make (issue 22: "tiny-model times right within
 * 2×"): `sidetrain estimate … --json` and then `sidetrain train …` with the same flags, both as
 * child processes exactly as typed, on the sd-tiny fixture. The train's own non-terminal progress
 * lines are timed as they arrive: the step phase (from "training steps" to "finished") is what the
 * estimate's seconds per step × steps predicts; the rest of the wall time (process start, loading,
 * caching latents, writing) is what the estimate's start-and-load term (bridge/preflight.ts
 * startSeconds) predicts; `estTotalVsWall` compares the estimate's total with the wall time.
 */
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const CLI = fileURLToPath(new URL('../bin/sidetrain.mjs', import.meta.url));
const MODEL = fileURLToPath(new URL('../test/fixtures/sd-tiny/model.safetensors', import.meta.url));
const IMAGES = fileURLToPath(new URL('../test/fixtures/images', import.meta.url));
const STEPS = 60;

interface Case {
  command: string;
  label: string;
  flags: string[];
}

const CASES: Case[] = [
  { command: 'ti', label: 'textual_inversion', flags: [] },
  { command: 'lora', label: 'lora', flags: ['--instance-prompt', 'a photo of sks cat'] },
];

/** Seconds from start to the first line matching each pattern, and to exit. */
async function timedRun(args: string[]): Promise<{ marks: (number | undefined)[]; wall: number; code: number | null; tail: string }> {
  const patterns = [/^training steps /, /^finished at step /];
  const marks: (number | undefined)[] = patterns.map(() => undefined);
  const t0 = performance.now();
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const lines: string[] = [];
  for (const stream of [child.stdout, child.stderr]) {
    createInterface({ input: stream }).on('line', (l) => {
      lines.push(l);
      patterns.forEach((p, i) => {
        if (marks[i] === undefined && p.test(l)) marks[i] = (performance.now() - t0) / 1000;
      });
    });
  }
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  return { marks, wall: (performance.now() - t0) / 1000, code, tail: lines.slice(-3).join(' | ') };
}

export async function benchEstimateRun(): Promise<Record<string, unknown>[]> {
  const rows: Record<string, unknown>[] = [];
  for (const c of CASES) {
    const out = mkdtempSync(join(tmpdir(), 'sidetrain-estrun-'));
    const flags = ['--model', MODEL, '--width', '64', '--height', '64', '--steps', String(STEPS), ...c.flags];
    try {
      const est = JSON.parse(execFileSync(process.execPath, [CLI, 'estimate', c.command, ...flags, '--json'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] })) as { secondsPerStep: number; totalSeconds: number };
      const load1 = +loadavg()[0]!.toFixed(1);
      const run = await timedRun([
        'train', c.command, ...flags, '--images', IMAGES, '--name', `estrun_${c.label}`, '--log-dir', join(out, 'logs'),
        c.command === 'ti' ? '--embeddings-dir' : '--lora-dir', out,
      ]);
      const [begin, end] = run.marks;
      if (run.code !== 0 || begin === undefined || end === undefined) {
        rows.push({ bench: 'estimate vs run', case: `${c.label} sd-tiny 64px ${STEPS} steps`, error: `train exited ${run.code}: ${run.tail}` });
        continue;
      }
      const stepPhase = end - begin;
      rows.push({
        bench: 'estimate vs run', case: `${c.label} sd-tiny 64px ${STEPS} steps`, backend: 'cpu-native',
        secPerStep: +(stepPhase / STEPS).toFixed(3), estSecPerStep: +est.secondsPerStep.toFixed(3),
        estVsMeasured: +(est.secondsPerStep / (stepPhase / STEPS)).toFixed(2),
        stepsSec: +stepPhase.toFixed(1), estTotalSec: +est.totalSeconds.toFixed(1), wallSec: +run.wall.toFixed(1),
        startAndLoadSec: +(run.wall - stepPhase).toFixed(1), estTotalVsWall: +(est.totalSeconds / run.wall).toFixed(2), load1,
      });
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  }
  return rows;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  for (const row of await benchEstimateRun()) console.log(JSON.stringify(row));
}
