/**
 * @file safetensors reader (streaming: the header is parsed and validated once, each tensor is
 * read from its own byte range on demand — a 7 GB checkpoint is never one Buffer) and writer
 * (8-byte aligned header, tensors written one at a time).
 *
 * Format (huggingface/safetensors): 8-byte little-endian header length N, N bytes of JSON
 * `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}`, then the data;
 * offsets count from the end of the header. Validation follows the reference implementation:
 * offsets contiguous from 0 and covering the data exactly, byte length = numel × dtype width.
 */
import { open, stat, type FileHandle } from 'node:fs/promises';
import type { DType, TensorInfo, TensorSource } from './types.ts';
import { DTYPE_BYTES, bytesToFloat32, float32ToBytes, isDType, numel, readFully } from './dtypes.ts';
import { findDuplicateKey } from './json-keys.ts';
import { writeFileAtomic, type WriteOptions } from './atomic.ts';

interface Entry extends TensorInfo {
  begin: number;
  end: number;
}

/** Headers above this are refused (the reference reader's limit is 100 MB). */
const MAX_HEADER_BYTES = 100_000_000;

export async function openSafetensors(path: string): Promise<SafetensorsFile> {
  const st = await stat(path);
  if (st.isDirectory()) throw new Error(`${path}: is a directory, not a safetensors file`);
  const fh = await open(path, 'r');
  try {
    const size = st.size;
    if (size < 8) throw new Error(`${path}: ${size === 0 ? 'empty file' : `only ${size} bytes`}, not a safetensors file (needs an 8-byte header length)`);
    const lenBuf = new Uint8Array(8);
    await readFully(fh, lenBuf, 0, path);
    const headerLen = Number(Buffer.from(lenBuf).readBigUInt64LE(0));
    // The length is the file's first 8 bytes: name it only when it is plausible, so a message
    // never echoes the start of whatever file a request pointed at.
    if (headerLen > size - 8) throw new Error(`${path}: its first 8 bytes are not a header length that fits the file (${size} bytes): truncated or not safetensors`);
    if (headerLen > MAX_HEADER_BYTES) throw new Error(`${path}: header length ${headerLen} exceeds ${MAX_HEADER_BYTES} bytes`);
    const headerBuf = new Uint8Array(headerLen);
    await readFully(fh, headerBuf, 8, path);
    const { entries, meta } = parseHeader(path, Buffer.from(headerBuf).toString('utf8'), size - 8 - headerLen);
    return new SafetensorsFile(path, fh, 8 + headerLen, entries, meta);
  } catch (err) {
    await fh.close();
    throw err;
  }
}

function parseHeader(path: string, text: string, dataLen: number): { entries: Map<string, Entry>; meta: Record<string, string> } {
  let header: unknown;
  try {
    header = JSON.parse(text);
  } catch (err) {
    // V8's message quotes the text around the error; say only where it is.
    const at = /position (\d+)/.exec((err as Error).message)?.[1];
    throw new Error(`${path}: header is not valid JSON${at ? ` (at byte ${at})` : ''}: not a safetensors file or corrupted`);
  }
  if (typeof header !== 'object' || header === null || Array.isArray(header)) throw new Error(`${path}: header is not a JSON object`);
  const dup = findDuplicateKey(text);
  if (dup !== undefined) throw new Error(`${path}: header names '${dup}' twice`);
  const meta = parseMetadata(path, (header as Record<string, unknown>).__metadata__);
  const entries = new Map<string, Entry>();
  for (const [key, v] of Object.entries(header)) {
    if (key !== '__metadata__') entries.set(key, parseEntry(path, key, v, dataLen));
  }
  checkLayout(path, entries, dataLen);
  return { entries, meta };
}

function parseMetadata(path: string, raw: unknown): Record<string, string> {
  if (raw === undefined || raw === null) return {};
  if (typeof raw !== 'object' || Array.isArray(raw)) throw new Error(`${path}: __metadata__ is not an object`);
  for (const [k, v] of Object.entries(raw)) {
    if (typeof v !== 'string') throw new Error(`${path}: __metadata__['${k}'] is not a string`);
  }
  return { ...(raw as Record<string, string>) };
}

function parseEntry(path: string, key: string, v: unknown, dataLen: number): Entry {
  const where = `${path}: tensor '${key}'`;
  if (typeof v !== 'object' || v === null) throw new Error(`${where}: entry is not an object`);
  const { dtype, shape, data_offsets: offs } = v as Record<string, unknown>;
  if (!isDType(dtype)) throw new Error(`${where}: unknown dtype ${JSON.stringify(dtype)} (known: ${Object.keys(DTYPE_BYTES).join(', ')})`);
  if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw new Error(`${where}: shape ${JSON.stringify(shape)} is not a list of non-negative integers`);
  }
  if (!Array.isArray(offs) || offs.length !== 2 || !offs.every((o) => Number.isSafeInteger(o) && o >= 0)) {
    throw new Error(`${where}: data_offsets ${JSON.stringify(offs)} is not [begin, end]`);
  }
  const [begin, end] = offs as [number, number];
  if (begin > end) throw new Error(`${where}: data_offsets [${begin}, ${end}] end before they begin`);
  if (end > dataLen) throw new Error(`${where}: data_offsets [${begin}, ${end}] run past the end of the data (${dataLen} bytes): out of range or truncated file`);
  const expected = numel(shape as number[]) * DTYPE_BYTES[dtype];
  if (end - begin !== expected) {
    throw new Error(`${where}: shape [${shape.join(', ')}] × ${dtype} is ${expected} bytes but data_offsets span ${end - begin}`);
  }
  return { dtype, shape: shape as number[], begin, end };
}

/** Byte ranges must tile the data exactly: no overlap, no gap, nothing after the last. */
function checkLayout(path: string, entries: Map<string, Entry>, dataLen: number): void {
  const sorted = [...entries].sort((a, b) => a[1].begin - b[1].begin || a[1].end - b[1].end);
  let cursor = 0;
  let prev = '(start of data)';
  for (const [key, e] of sorted) {
    if (e.begin < cursor) throw new Error(`${path}: tensor '${key}' [${e.begin}, ${e.end}] overlaps '${prev}' (ends at ${cursor})`);
    if (e.begin > cursor) throw new Error(`${path}: gap of ${e.begin - cursor} bytes before tensor '${key}' (after '${prev}')`);
    cursor = e.end;
    prev = key;
  }
  if (cursor !== dataLen) throw new Error(`${path}: ${dataLen - cursor} bytes after the last tensor are not described by the header`);
}

export class SafetensorsFile implements TensorSource {
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
    const e = this.entry(key);
    return { dtype: e.dtype, shape: [...e.shape] };
  }
  metadata(): Record<string, string> {
    return { ...this.meta };
  }
  /** The stored little-endian bytes, unconverted. */
  async readRaw(key: string): Promise<Uint8Array> {
    const e = this.entry(key);
    const buf = new Uint8Array(e.end - e.begin);
    await readFully(this.fh, buf, this.dataStart + e.begin, this.path);
    return buf;
  }
  async read(key: string): Promise<Float32Array> {
    return bytesToFloat32(await this.readRaw(key), this.entry(key).dtype, `${this.path}: tensor '${key}'`);
  }
  async close(): Promise<void> {
    await this.fh.close();
  }
  private entry(key: string): Entry {
    const e = this.entries.get(key);
    if (!e) throw new Error(`${this.path}: no tensor '${key}'`);
    return e;
  }
}

/** One tensor to write. `data` may be produced lazily so big files stream tensor by tensor. */
export interface TensorToWrite {
  name: string;
  dtype: DType;
  shape: number[];
  /** float values (converted to `dtype`), raw little-endian bytes of `dtype`, or a producer of either. */
  data: Float32Array | Uint8Array | (() => Promise<Float32Array | Uint8Array>);
}

export interface SafetensorsWriteOptions extends WriteOptions {
  /** 'widest-first' (the Python library's order: dtype width descending, then name) or 'given'. */
  order?: 'widest-first' | 'given';
}

/** The header bytes (length prefix included) for `tensors` in the order given. */
export function encodeHeader(tensors: readonly Omit<TensorToWrite, 'data'>[], metadata?: Record<string, string>): Uint8Array {
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length) header.__metadata__ = metadata;
  let offset = 0;
  for (const t of tensors) {
    if (Object.hasOwn(header, t.name) || t.name === '__metadata__') throw new Error(`safetensors: tensor name '${t.name}' used twice or reserved`);
    const bytes = numel(t.shape) * DTYPE_BYTES[t.dtype];
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (Buffer.byteLength(json) % 8)) % 8); // data starts 8-byte aligned
  const jsonBytes = Buffer.from(json, 'utf8');
  const out = new Uint8Array(8 + jsonBytes.length);
  Buffer.from(out.buffer).writeBigUInt64LE(BigInt(jsonBytes.length), 0);
  out.set(jsonBytes, 8);
  return out;
}

export async function writeSafetensors(
  path: string,
  tensors: readonly TensorToWrite[],
  metadata?: Record<string, string>,
  options: SafetensorsWriteOptions = {},
): Promise<void> {
  const ordered = options.order === 'widest-first'
    ? [...tensors].sort((a, b) => DTYPE_BYTES[b.dtype] - DTYPE_BYTES[a.dtype] || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
    : [...tensors];
  const header = encodeHeader(ordered, metadata);
  await writeFileAtomic(path, async (write) => {
    await write(header);
    for (const t of ordered) {
      const value = typeof t.data === 'function' ? await t.data() : t.data;
      const bytes = value instanceof Float32Array ? float32ToBytes(value, t.dtype) : value;
      const expected = numel(t.shape) * DTYPE_BYTES[t.dtype];
      if (bytes.byteLength !== expected) {
        throw new Error(`${path}: tensor '${t.name}' has ${bytes.byteLength} bytes, shape [${t.shape.join(', ')}] × ${t.dtype} needs ${expected}`);
      }
      await write(bytes);
    }
  }, options);
}
