/**
 * @file What a job run by the CLI shows: a progress bar in a terminal, and one plain line every N
 * steps (or 30 s) anywhere else (nohup, a log file, a pipe), where a bar would print nothing; log
 * lines in between; and at the end one summary of every path the run wrote, with how to use
 * the output in the webui.
 */
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { SingleBar, Presets } from 'cli-progress';
import type { JobEvent, JobResult } from '../../trainers/job.ts';

/** 95 → "1m 35s", 3725 → "1h 02m". */
export function duration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '?';
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

export interface ProgressOptions {
  /** Draw a bar (default: whether stderr is a terminal). */
  tty?: boolean;
  /** Without a terminal, a line every this many steps (default: a twentieth of the run). */
  every?: number;
  write?: (line: string) => void;
}

export type Reporter = ((e: JobEvent) => void) & { previews: string[]; snapshots: string[] };

/** The bar (terminal) or the lines (anything else), log lines in between; previews and snapshots remembered for the summary. */
export function progressReporter(opts: ProgressOptions = {}): Reporter {
  const tty = opts.tty ?? process.stderr.isTTY === true;
  const write = opts.write ?? ((line: string) => process.stderr.write(`${line}\n`));
  const bar = tty ? new SingleBar({ format: '{bar} {value}/{total} | loss {loss} | {rate} it/s | ETA {eta_formatted}', hideCursor: true }, Presets.shades_classic) : undefined;
  let payload = { loss: '-', rate: '-' };
  let running = false;
  let every = 1;
  let last = { step: -1, at: 0 };
  const stopBar = () => running && bar?.stop();
  const report = ((e: JobEvent) => {
    if (e.type === 'started') {
      write(`backend: ${e.backend}`);
      every = opts.every ?? Math.max(1, Math.round((e.totalSteps - e.startStep) / 20));
      if (!bar) write(`training steps ${e.startStep + 1}–${e.totalSteps}`);
      bar?.start(e.totalSteps, e.startStep, payload);
      running = true;
    } else if (e.type === 'step') {
      payload = { loss: e.loss.toFixed(5), rate: e.itPerSec.toFixed(2) };
      if (bar && running) bar.update(e.step, payload);
      const due = e.step - last.step >= every || e.step === e.totalSteps || Date.now() - last.at > 30_000;
      if (!bar && due) {
        write(`step ${e.step}/${e.totalSteps}  loss ${payload.loss}  lr ${e.learnRate.toPrecision(3)}  ${payload.rate} it/s  ETA ${duration(e.etaSeconds)}`);
        last = { step: e.step, at: Date.now() };
      }
    } else if (e.type === 'log') {
      stopBar();
      write(`${e.level}: ${e.message}`);
      // restart with the last numbers: a bar started without them shows its template ({loss})
      if (bar && running) bar.start(bar.getTotal(), (bar as unknown as { value: number }).value ?? 0, payload);
    } else if (e.type === 'preview') report.previews.push(e.path);
    else if (e.type === 'snapshot') report.snapshots.push(e.path);
    if (e.type === 'finished' || e.type === 'failed' || e.type === 'cancelled') {
      stopBar();
      running = false;
    }
  }) as Reporter;
  report.previews = [];
  report.snapshots = [];
  return report;
}

/** How to use an output of this kind in the webui. */
export function usageLine(result: Pick<JobResult, 'kind' | 'usage'>): string {
  if (result.kind === 'checkpoint') return `pick '${result.usage}' in the webui's checkpoint list`;
  if (result.kind === 'embedding') return `put ${result.usage} in a prompt (refresh the webui's Textual Inversion tab first)`;
  return `put ${result.usage} in a prompt`;
}

/** The run's closing summary: output, how to use it, and every other path it wrote. */
export function runSummary(result: JobResult, spec: { logDir?: unknown; name?: unknown }, seen: Pick<Reporter, 'previews' | 'snapshots'>): string {
  if (result.outputs.length === 0) return 'stopped before the first step: nothing written';
  const runDir = typeof spec.logDir === 'string' && typeof spec.name === 'string' ? resolve(spec.logDir, spec.name) : undefined;
  const lines = [`${result.cancelled ? 'stopped at' : 'finished at'} step ${result.step}: ${result.output}`, `  output     ${result.output}`, `  use it     ${usageLine(result)}`];
  const others = result.outputs.filter((p) => p !== result.output);
  if (others.length) lines.push(`  also       ${others.join(', ')}`);
  const folder = (paths: string[]) => `${dirname(paths.at(-1)!)} (${paths.length}, last ${paths.at(-1)!.split(/[\\/]/).pop()})`;
  if (seen.previews.length) lines.push(`  previews   ${folder(seen.previews)}`);
  if (seen.snapshots.length) lines.push(`  snapshots  ${folder(seen.snapshots)}`);
  if (runDir) {
    for (const [label, file] of [['loss CSV', 'loss.csv'], ['prior loss', 'prior-loss.csv'], ['settings', 'settings.json']] as const) {
      if (existsSync(join(runDir, file))) lines.push(`  ${label.padEnd(10)} ${join(runDir, file)}`);
    }
  }
  return lines.join('\n');
}
