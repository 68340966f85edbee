/**
 * @file I/O benchmark: open a synthetic multi-GB safetensors file (sparse on disk), read every
 * tensor through the streaming reader, report open time, read throughput and peak RSS.
 * Peak RSS must stay far below the file size (tensors are read one at a time, never the file).
 * Run alone: `node --import tsx bench/io.ts [GB]`.
 */
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { encodeHeader, openSafetensors } from '../trainers/io/safetensors.ts';

/** A sparse safetensors of `gb` GiB: F16 tensors of 64 MiB each, data left as holes (zeros). */
const PER_TENSOR = 32 * 1024 * 1024; // elements (64 MiB of F16)
const TENSOR_BYTES = PER_TENSOR * 2;

async function makeSparse(path: string, gb: number): Promise<number> {
  const per = PER_TENSOR;
  const count = Math.max(1, Math.round((gb * 1024) / 64));
  const tensors = Array.from({ length: count }, (_, i) => ({ name: `model.diffusion_model.block.${i}.weight`, dtype: 'F16' as const, shape: [per / 4096, 4096] }));
  const header = encodeHeader(tensors, { format: 'pt' });
  const fh = await open(path, 'w');
  await fh.write(header, 0, header.length, 0);
  const size = header.length + count * per * 2;
  await fh.truncate(size);
  await fh.close();
  return size;
}

export async function benchIo(gb = Number(process.env.SIDETRAIN_BENCH_IO_GB ?? 2)): Promise<Record<string, unknown>[]> {
  const dir = await mkdtemp(join(tmpdir(), 'sidetrain-bench-io-'));
  const path = join(dir, 'big.safetensors');
  try {
    const size = await makeSparse(path, gb);
    const rss0 = process.memoryUsage().rss;
    let peak = rss0;
    const sample = () => { peak = Math.max(peak, process.memoryUsage().rss); };
    const t0 = performance.now();
    const src = await openSafetensors(path);
    const openMs = performance.now() - t0;
    const t1 = performance.now();
    let checksum = 0;
    for (const key of src.keys()) {
      const values = await src.read(key);
      checksum += values[0]! + values[values.length - 1]!;
      sample();
    }
    const readS = (performance.now() - t1) / 1000;
    await src.close();
    const row = {
      bench: 'io.safetensors-stream', fileGiB: +(size / 2 ** 30).toFixed(2), tensors: src.keys().length,
      openMs: +openMs.toFixed(1), readGiBps: +(size / 2 ** 30 / readS).toFixed(2),
      peakRssMiB: Math.round(peak / 2 ** 20), rssGrowthMiB: Math.round((peak - rss0) / 2 ** 20),
      rssFractionOfFile: +(peak / size).toFixed(3),
      // streaming means growth bounded by a few tensors in flight (raw bytes + float32 copy), whatever the file size
      ok: peak - rss0 < 4 * TENSOR_BYTES * 3 && checksum === 0,
    };
    return [row];
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const rows = await benchIo(process.argv[2] ? Number(process.argv[2]) : undefined);
  console.table(rows);
  if (rows.some((r) => r.ok === false)) process.exitCode = 1;
}
