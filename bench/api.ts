/**
 * @file API benchmark: p50/p99 latency of `GET /api/jobs/:id` while a (stub) job runs in its
 * worker, and WebSocket events per second delivered to a client. Uses the stub methods
 * (test/helpers/methods-stub.ts), so it measures the server, not training.
 *
 *   node --import tsx bench/api.ts
 */
import { pino } from 'pino';
import { WebSocket } from 'ws';
import { fileURLToPath } from 'node:url';
import { makeDirs, STUB_METHODS } from '../test/helpers/api-server.ts';
import { startServer } from '../bridge/main.ts';
import { rmSync } from 'node:fs';

const percentile = (sorted: number[], p: number) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;

async function postJob(url: string, spec: Record<string, unknown>): Promise<string> {
  const r = await fetch(`${url}/api/jobs`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ type: 'stub', spec }) });
  const body = (await r.json()) as { id: string; error?: string };
  if (r.status !== 201) throw new Error(`POST /api/jobs: ${r.status} ${body.error}`);
  return body.id;
}

async function waitState(url: string, id: string, states: string[]): Promise<void> {
  for (;;) {
    const j = (await (await fetch(`${url}/api/jobs/${id}`)).json()) as { state: string };
    if (states.includes(j.state)) return;
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Status latency under a running job. */
async function statusLatency(url: string, requests: number): Promise<Record<string, unknown>> {
  const id = await postJob(url, { name: 'bench_latency', steps: 100_000, stepMs: 1, saveEvery: 1000 });
  await waitState(url, id, ['running']);
  await new Promise((r) => setTimeout(r, 500)); // let the worker get going
  const times: number[] = [];
  for (let i = 0; i < requests; i++) {
    const t0 = performance.now();
    await (await fetch(`${url}/api/jobs/${id}`)).arrayBuffer();
    times.push(performance.now() - t0);
  }
  await fetch(`${url}/api/jobs/${id}/cancel`, { method: 'POST' });
  await waitState(url, id, ['cancelled', 'failed', 'finished']);
  times.sort((a, b) => a - b);
  return { bench: 'api status latency (job running)', requests, p50_ms: +percentile(times, 50).toFixed(3), p99_ms: +percentile(times, 99).toFixed(3) };
}

/** Events per second a WebSocket client receives from a job emitting steps as fast as it can. */
async function wsThroughput(url: string, steps: number): Promise<Record<string, unknown>> {
  const id = await postJob(url, { name: 'bench_ws', steps, stepMs: 0, saveEvery: 100000 });
  const ws = new WebSocket(`${url.replace(/^http/, 'ws')}/api/jobs/${id}/events`);
  let count = 0;
  let first = 0;
  let last = 0;
  await new Promise<void>((resolve) => {
    ws.on('message', (data) => {
      const m = JSON.parse(String(data)) as { type: string };
      if (m.type === 'step') {
        if (!count) first = performance.now();
        count++;
        last = performance.now();
      }
      if (m.type === 'finished' || m.type === 'failed') resolve();
    });
  });
  ws.close();
  const seconds = (last - first) / 1000;
  return { bench: 'ws step events delivered', events: count, seconds: +seconds.toFixed(3), events_per_sec: Math.round(count / Math.max(seconds, 1e-6)) };
}

export async function benchApi(): Promise<Record<string, unknown>[]> {
  const dirs = makeDirs();
  const srv = await startServer(
    { port: 0, methodsModule: STUB_METHODS, stateDir: dirs.state, stepIntervalMs: 0, folders: { embeddings: dirs.embeddings, logs: dirs.logs } },
    pino({ level: 'silent' }),
  );
  try {
    return [await statusLatency(srv.url, 2000), await wsThroughput(srv.url, 20000)];
  } finally {
    await srv.close();
    rmSync(dirs.root, { recursive: true, force: true });
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  for (const row of await benchApi()) console.log(JSON.stringify(row));
}
