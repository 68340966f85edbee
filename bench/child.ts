/**
 * @file One bench row in its own process, so its peak RSS is its own: spawn `script args` on a
 * backend, stop it past the RSS limit or a timeout, and take its last JSON stdout line as the row
 * (a child that prints its row so far as it goes and is stopped still gives that, with the reason
 * in `error` and its peak RSS at the stop).
 * The row carries the machine's 1-minute load average sampled while it ran (`load1`, mean;
 * `load1Max`): on a shared machine s/step means little without it.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { loadavg, totalmem } from 'node:os';
import { FIT_SHARE } from '../trainers/memory/estimate.ts';
import { TRAINING_NODE_FLAGS } from '../trainers/backend/process-flags.ts';

export type Row = Record<string, unknown>;

/**
 * Memory a row may take before it is stopped: the share of the machine a job may plan for
 * (the estimate's own fit rule), so a row the estimate says fits is run, and one that outgrows it
 * is stopped before the machine runs out.
 */
export const RSS_LIMIT_BYTES = FIT_SHARE * totalmem();

/** A /proc/self/status field in kB (VmHWM: peak RSS, VmRSS: now). */
export function statusKb(field: string): number {
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync('/proc/self/status', 'utf8'));
  return m ? Number(m[1]) : 0;
}

export async function runBenchChild(script: string, args: string[], backend: string, timeoutMs: number): Promise<Row> {
  const child = spawn(process.execPath, [...TRAINING_NODE_FLAGS, '--import', 'tsx', '--expose-gc', script, ...args], {
    env: { ...process.env, SIDETRAIN_BACKEND: backend }, stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '', stderr = '', stopped = '', hwmAtStopKb = 0;
  child.stdout.on('data', (d: Buffer) => (stdout += d));
  child.stderr.on('data', (d: Buffer) => (stderr = (stderr + d).slice(-20000)));
  const started = performance.now();
  const loads: number[] = [];
  const watch = setInterval(() => {
    if (stopped) return;
    loads.push(loadavg()[0]!);
    let rssKb = 0;
    try {
      rssKb = Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'))?.[1] ?? 0);
    } catch { /* exited */ }
    if (rssKb * 1024 > RSS_LIMIT_BYTES) stopped = `stopped at ${Math.round(rssKb / 1024)} MB RSS (limit ${Math.round(RSS_LIMIT_BYTES / 2 ** 20)} MB)`;
    else if (performance.now() - started > timeoutMs) stopped = `stopped after ${timeoutMs / 1000} s`;
    if (stopped) {
      try {
        hwmAtStopKb = Number(/VmHWM:\s+(\d+)/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'))?.[1] ?? 0);
      } catch { /* exited */ }
      child.kill('SIGKILL');
    }
  }, 500);
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  clearInterval(watch);
  if (!loads.length) loads.push(loadavg()[0]!);
  const load = { load1: +(loads.reduce((a, b) => a + b, 0) / loads.length).toFixed(2), load1Max: Math.max(...loads) };
  const line = stdout.split('\n').reverse().find((l) => l.startsWith('{'));
  if (code === 0 && line) return { ...(JSON.parse(line) as Row), ...load };
  const why = (stopped || stderr.split('\n').find((l) => /Error|Aborted|out of memory/i.test(l)) || `exit ${code ?? 'by a signal'}`).slice(0, 200);
  const atStop = Math.round(hwmAtStopKb / 1024);
  if (line) {
    // stopped, killed from outside or failed after printing a row so far: that row, with why it ended
    // (the peak: the last row's, or the process's high-water mark at our stop if higher)
    const row = JSON.parse(line) as Row;
    return { ...row, ...(stopped ? { peakRssMB: Math.max(Number(row.peakRssMB) || 0, atStop), vmHwmAtStopMB: atStop } : {}), error: why, ...load };
  }
  return { error: why, ...(stopped ? { peakRssMB: atStop } : {}), ...load };
}
