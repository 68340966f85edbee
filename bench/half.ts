/**
 * @file Frozen weights in float16 (trainers/nets/half-params.ts): resident memory of an
 * SD1.5-shaped UNet (random F16 checkpoint, bench/sd15-checkpoint.ts) loaded as float32
 * (nets/unet.ts loadUnet) vs kept in float16 (loadUnetHalf), each in a fresh child process,
 * through the same key-normalising source a job opens (io/checkpoint.ts openCheckpoint); and the
 * cost of the upcast: ms to materialise every UNet weight once (what one forward pays on top),
 * also on the WASM backend, whose 4 GB heap the float32 SD1.5 UNet alone nearly fills.
 * Run alone with `node --import tsx --expose-gc bench/half.ts`; `npm run bench` calls benchHalf().
 * SIDETRAIN_BENCH_SD15=0 skips it (it writes a 2 GB checkpoint to the temp folder).
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { initBackend, tf } from '../trainers/backend/index.ts';
import { openCheckpoint } from '../trainers/io/checkpoint.ts';
import { disposeParams } from '../trainers/nets/params.ts';
import { loadUnet } from '../trainers/nets/unet.ts';
import { halfConverter, loadUnetHalf, type HalfParams } from '../trainers/nets/half-params.ts';
import { writeRandomSd15 } from './sd15-checkpoint.ts';

type Row = Record<string, unknown>;
type Mode = 'float32' | 'half';

const MB = 2 ** 20;
const rssMb = () => Math.round(process.memoryUsage().rss / MB);
const peakRssMb = () => Math.round(process.resourceUsage().maxRSS / 1024); // maxRSS is KiB
const gc = () => (globalThis as { gc?: () => void }).gc?.();

/** ms to materialise (and free) every UNet weight once, median of `runs`. */
function upcastMs(params: HalfParams, runs: number): number {
  const times: number[] = [];
  for (let r = 0; r < runs; r++) {
    const t0 = performance.now();
    for (const key of params.keys()) tf.tidy(() => void params.get(key));
    times.push(performance.now() - t0);
  }
  return Math.round(times.sort((a, b) => a - b)[Math.floor(runs / 2)]!);
}

/** In the child: load the UNet one way, measure, print one JSON row. */
async function child(mode: Mode, path: string): Promise<Row> {
  const backend = (await initBackend()).name;
  const ckpt = await openCheckpoint(path);
  gc();
  const rssBefore = rssMb();
  const t0 = performance.now();
  const { params } = mode === 'half' ? await loadUnetHalf(ckpt.source) : await loadUnet(ckpt.source);
  const loadSec = +((performance.now() - t0) / 1000).toFixed(1);
  gc();
  const rssAfter = rssMb();
  const row: Row = {
    bench: 'half', case: `SD1.5 UNet ${mode}`, backend, loadSec,
    unetMB: rssAfter - rssBefore, rssMB: rssAfter, peakRssMB: peakRssMb(), tensors: params.size,
  };
  if (mode === 'half') {
    const h = params as HalfParams;
    Object.assign(row, { converter: halfConverter(), heldMB: Math.round((h.report().halfBytes + h.report().floatBytes) / MB) });
    row.upcastAllMs = upcastMs(h, 3);
    row.upcastGBps = +((h.report().halfBytes * 3) / 1e9 / (Number(row.upcastAllMs) / 1000)).toFixed(2); // read 2 B + write 4 B per value
    h.dispose();
  } else {
    disposeParams(params);
  }
  await ckpt.source.close();
  return row;
}

function runChild(mode: Mode, path: string, backend?: string): Promise<Row> {
  const proc = spawn(process.execPath, ['--import', 'tsx', '--expose-gc', fileURLToPath(import.meta.url), '--child', mode, path], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: backend ? { ...process.env, SIDETRAIN_BACKEND: backend } : process.env,
  });
  let out = '';
  proc.stdout.on('data', (d: Buffer) => (out += d));
  return new Promise((resolve) => {
    proc.on('close', (code) => {
      const line = out.split('\n').find((l) => l.startsWith('{'));
      resolve(line ? (JSON.parse(line) as Row) : { bench: 'half', case: `SD1.5 UNet ${mode}`, error: `child exited with ${code}` });
    });
  });
}

export async function benchHalf(): Promise<Row[]> {
  if (process.env.SIDETRAIN_BENCH_SD15 === '0') return [];
  const ckpt = await writeRandomSd15();
  try {
    const rows = [await runChild('float32', ckpt.path), await runChild('half', ckpt.path)];
    const [f, h] = rows as [Row, Row];
    if (typeof f.unetMB === 'number' && typeof h.unetMB === 'number') h.vsFloat32 = +(h.unetMB / f.unetMB).toFixed(2);
    // WASM: the float16 store lives outside the 4 GB heap; each read is copied into it
    if (h.backend !== 'wasm') rows.push(await runChild('half', ckpt.path, 'wasm'));
    return rows;
  } finally {
    await ckpt.remove();
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const at = process.argv.indexOf('--child');
  if (at >= 0) {
    console.log(JSON.stringify(await child(process.argv[at + 1] as Mode, process.argv[at + 2]!)));
  } else {
    for (const r of await benchHalf()) console.log(JSON.stringify(r));
  }
  process.exit(0);
}
