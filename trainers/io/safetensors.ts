/**
 * @file safetensors reader (streaming: header parsed once, each tensor read from its byte range
 * on demand). Format: 8-byte LE header length N, N bytes of JSON, then the data.
 */
import { open, type FileHandle } from 'node:fs/promises';
import type { DType, TensorInfo, TensorSource } from './types.ts';

interface Entry extends TensorInfo {
  begin: number;
  end: number;
}

const BYTES: Record<string, number> = { F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4 };

export async function openSafetensors(path: string): Promise<TensorSource> {
  const fh = await open(path, 'r');
  try {
    const size = (await fh.stat()).size;
    const lenBuf = Buffer.alloc(8);
    await fh.read(lenBuf, 0, 8, 0);
    const headerLen = Number(lenBuf.readBigUInt64LE(0));
    if (8 + headerLen > size) throw new Error(`${path}: header length ${headerLen} runs past the end`);
    const headerBuf = Buffer.alloc(headerLen);
    await fh.read(headerBuf, 0, headerLen, 8);
    const header = JSON.parse(headerBuf.toString('utf8')) as Record<string, unknown>;
    const meta = (header.__metadata__ ?? {}) as Record<string, string>;
    const entries = new Map<string, Entry>();
    for (const [key, v] of Object.entries(header)) {
      if (key === '__metadata__') continue;
      const e = v as { dtype: DType; shape: number[]; data_offsets: [number, number] };
      entries.set(key, { dtype: e.dtype, shape: e.shape, begin: e.data_offsets[0], end: e.data_offsets[1] });
    }
    return new SafetensorsFile(path, fh, 8 + headerLen, entries, meta);
  } catch (err) {
    await fh.close();
    throw err;
  }
}

class SafetensorsFile implements TensorSource {
  constructor(
    readonly path: string,
    private fh: FileHandle,
    private dataStart: number,
    private entries: Map<string, Entry>,
    private meta: Record<string, string>,
  ) {}

  keys(): string[] {
    return [...this.entries.keys()];
  }
  has(key: string): boolean {
    return this.entries.has(key);
  }
  info(key: string): TensorInfo {
    const e = this.entries.get(key);
    if (!e) throw new Error(`${this.path}: no tensor '${key}'`);
    return { dtype: e.dtype, shape: e.shape };
  }
  metadata(): Record<string, string> {
    return { ...this.meta };
  }
  async read(key: string): Promise<Float32Array> {
    const e = this.entries.get(key);
    if (!e) throw new Error(`${this.path}: no tensor '${key}'`);
    const buf = Buffer.alloc(e.end - e.begin);
    await this.fh.read(buf, 0, buf.length, this.dataStart + e.begin);
    return toFloat32(buf, e.dtype, BYTES[e.dtype] ?? 0);
  }
  async close(): Promise<void> {
    await this.fh.close();
  }
}

function toFloat32(buf: Buffer, dtype: DType, width: number): Float32Array {
  const n = buf.length / width;
  const out = new Float32Array(n);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  for (let i = 0; i < n; i++) {
    if (dtype === 'F32') out[i] = dv.getFloat32(i * 4, true);
    else if (dtype === 'F16') out[i] = halfToFloat(dv.getUint16(i * 2, true));
    else if (dtype === 'BF16') out[i] = new Float32Array(new Uint32Array([dv.getUint16(i * 2, true) << 16]).buffer)[0]!;
    else if (dtype === 'I64') out[i] = Number(dv.getBigInt64(i * 8, true));
    else if (dtype === 'F64') out[i] = dv.getFloat64(i * 8, true);
    else if (dtype === 'I32') out[i] = dv.getInt32(i * 4, true);
    else throw new Error(`unsupported dtype ${dtype}`);
  }
  return out;
}

function halfToFloat(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const f = h & 0x3ff;
  if (e === 0) return s * f * 2 ** -24;
  if (e === 31) return f ? NaN : s * Infinity;
  return s * (1 + f / 1024) * 2 ** (e - 15);
}
