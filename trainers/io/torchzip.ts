/**
 * @file torch zip-pickle (`.ckpt` / `.pt`) reader and writer.
 *
 * Reading (yauzl for the central directory, our own file handle for data): member names are
 * checked first (no `../`, no absolute names, only the members torch writes), declared sizes are
 * checked against the file size (zip bombs), the single `<dir>/data.pkl` is run through the
 * restricted unpickler, and tensors are read lazily from their stored `<dir>/data/<n>` members.
 *
 * Writing (yazl, stored): `<dir>/data.pkl`, `<dir>/data/<n>`, `<dir>/version` and nothing else —
 * the names webui v1.10 `safe.py` accepts (`^([^/]+)/((data/\d+)|version|(data\.pkl))$`; it has
 * no `byteorder`, see AUTOMATIC1111/stable-diffusion-webui#14261), as torch 1.13 wrote them.
 */
import { open, stat, type FileHandle } from 'node:fs/promises';
import { basename } from 'node:path';
import { Readable } from 'node:stream';
import yauzl from 'yauzl';
import yazl from 'yazl';
import { TensorRef, type StorageRef } from './pyobjects.ts';
import { unpickle, type UnpickleOptions } from './unpickle.ts';
import { pickleTorch, SaveTensor } from './pickle-write.ts';
import { DTYPE_BYTES, bytesToFloat32, float32ToBytes, numel, readFully } from './dtypes.ts';
import { writeFileAtomic, type WriteOptions } from './atomic.ts';

interface Member {
  name: string;
  method: number;
  compressedSize: number;
  size: number;
  entry: yauzl.Entry;
}

/** Members torch ≥ 1.6 writes (reading is as lenient as torch; writing emits only the first three). */
const TORCH_MEMBER = /^([^/]+)\/(data\.pkl|data\/\d+|version|byteorder|\.data\/serialization_id|\.format_version|\.storage_alignment)$/;
const LEGACY_MAGIC = [0x80, 0x02, 0x8a, 0x0a];
/** data.pkl larger than this is refused (real checkpoints: < 1 MB of pickle per 1000 tensors). */
const MAX_PKL_BYTES = 512 * 1024 * 1024;

export interface TorchZip {
  readonly path: string;
  /** The folder inside the zip (`archive`, the file stem, …). */
  readonly dir: string;
  readonly members: string[];
  /** The unpickled object tree. */
  readonly value: unknown;
  /** Every global the pickle named. */
  readonly globals: string[];
  readTensor(t: TensorRef): Promise<Float32Array>;
  /** The tensor's elements as stored (little-endian `t.storage.dtype`), contiguous. */
  readTensorRaw(t: TensorRef): Promise<Uint8Array>;
  close(): Promise<void>;
}

export async function openTorchZip(path: string, options: UnpickleOptions = {}): Promise<TorchZip> {
  const st = await stat(path);
  if (st.isDirectory()) throw new Error(`${path}: is a directory, not a torch file`);
  const fh = await open(path, 'r');
  try {
    await checkMagic(fh, path, st.size);
    const members = await listMembers(path);
    const { dir, pkl } = checkMembers(path, members, st.size);
    const zip = new ZipReader(path, fh, dir, members);
    if (members.some((m) => m.name === `${dir}/byteorder`)) {
      const order = Buffer.from(await zip.member(`${dir}/byteorder`, 16)).toString('latin1').trim();
      if (order !== 'little') throw new Error(`${path}: byteorder is '${order}', only little-endian files are supported`);
    }
    const { value, globals } = unpickle(await zip.member(pkl.name, MAX_PKL_BYTES), `${path} (${pkl.name})`, options);
    zip.value = value;
    zip.globals = globals;
    return zip;
  } catch (err) {
    await fh.close();
    throw err;
  }
}

async function checkMagic(fh: FileHandle, path: string, size: number): Promise<void> {
  if (size === 0) throw new Error(`${path}: empty file, not a torch checkpoint`);
  const head = new Uint8Array(Math.min(4, size));
  await readFully(fh, head, 0, path);
  if (head[0] === 0x50 && head[1] === 0x4b) return; // 'PK'
  if (LEGACY_MAGIC.every((b, i) => head[i] === b)) {
    throw new Error(`${path}: legacy (pre-1.6, non-zip) torch file; it is not supported — re-save it with a newer torch or convert it to .safetensors`);
  }
  throw new Error(`${path}: not a torch zip file (it does not start with the zip signature 'PK')`);
}

function listMembers(path: string): Promise<Member[]> {
  return new Promise((resolve, reject) => {
    const fail = (err: Error): void => reject(new Error(`${path}: not a readable zip (${err.message})`));
    yauzl.open(path, { lazyEntries: true, autoClose: true, decodeStrings: false, validateEntrySizes: true }, (err, zf) => {
      if (err || !zf) return fail(err ?? new Error('no zip'));
      const members: Member[] = [];
      zf.on('error', fail);
      zf.on('entry', (entry: yauzl.Entry) => {
        const raw = entry.fileName as unknown as Buffer;
        members.push({ name: raw.toString('utf8'), method: entry.compressionMethod, compressedSize: entry.compressedSize, size: entry.uncompressedSize, entry });
        zf.readEntry();
      });
      zf.on('end', () => resolve(members));
      zf.readEntry();
    });
  });
}

/** Names, sizes and the single data.pkl; returns the folder name. */
function checkMembers(path: string, members: Member[], fileSize: number): { dir: string; pkl: Member } {
  let declared = 0;
  for (const m of members) {
    if (/^([/\\]|[a-zA-Z]:)/.test(m.name)) throw new Error(`${path}: zip member '${m.name}' has an absolute path`);
    if (m.name.split(/[/\\]/).includes('..')) throw new Error(`${path}: zip member '${m.name}' escapes its folder ('..')`);
    if (!TORCH_MEMBER.test(m.name)) throw new Error(`${path}: unexpected zip member '${m.name}' (not a torch.save file: expected <dir>/data.pkl, <dir>/data/<n>, <dir>/version)`);
    if (m.method === 0 && m.compressedSize !== m.size) throw new Error(`${path}: stored member '${m.name}' declares ${m.size} bytes but holds ${m.compressedSize}`);
    declared += m.size;
  }
  // Stored members cannot add up to more than the file; compressed ones may, but not by much.
  if (declared > fileSize * 8 + (1 << 20)) {
    throw new Error(`${path}: members declare ${declared} bytes uncompressed in a ${fileSize}-byte file (zip bomb?)`);
  }
  const pkls = members.filter((m) => m.name.endsWith('/data.pkl'));
  if (pkls.length !== 1) throw new Error(`${path}: ${pkls.length ? 'several' : 'no'} <dir>/data.pkl members (found ${pkls.map((m) => m.name).join(', ') || 'none'})`);
  const dir = pkls[0]!.name.slice(0, -'/data.pkl'.length);
  const stray = members.find((m) => !m.name.startsWith(`${dir}/`));
  if (stray) throw new Error(`${path}: zip member '${stray.name}' is outside the '${dir}/' folder`);
  return { dir, pkl: pkls[0]! };
}

class ZipReader implements TorchZip {
  value: unknown = undefined;
  globals: string[] = [];
  private byName: Map<string, Member>;
  private dataStarts = new Map<string, number>();

  constructor(readonly path: string, private fh: FileHandle, readonly dir: string, members: Member[]) {
    this.byName = new Map(members.map((m) => [m.name, m]));
  }

  get members(): string[] {
    return [...this.byName.keys()];
  }

  /** Where a stored member's bytes begin (from its local header). */
  private async dataStart(m: Member): Promise<number> {
    const cached = this.dataStarts.get(m.name);
    if (cached !== undefined) return cached;
    const head = new Uint8Array(30);
    await readFully(this.fh, head, m.entry.relativeOffsetOfLocalHeader, this.path);
    const b = Buffer.from(head.buffer);
    if (b.readUInt32LE(0) !== 0x04034b50) throw new Error(`${this.path}: bad local header for zip member '${m.name}'`);
    const start = m.entry.relativeOffsetOfLocalHeader + 30 + b.readUInt16LE(26) + b.readUInt16LE(28);
    this.dataStarts.set(m.name, start);
    return start;
  }

  /** A byte range of a stored member. */
  async range(name: string, begin: number, length: number): Promise<Uint8Array> {
    const m = this.byName.get(name);
    if (!m) throw new Error(`${this.path}: zip member '${name}' is missing`);
    if (m.method !== 0) throw new Error(`${this.path}: zip member '${name}' is compressed; torch writes tensors stored (uncompressed) — re-save the file`);
    if (begin + length > m.size) throw new Error(`${this.path}: zip member '${name}' has ${m.size} bytes, needs ${begin + length}`);
    const out = new Uint8Array(length);
    await readFully(this.fh, out, (await this.dataStart(m)) + begin, this.path);
    return out;
  }

  /** A whole member (data.pkl may be deflated by re-zipping tools: inflate with a size cap). */
  async member(name: string, cap: number): Promise<Uint8Array> {
    const m = this.byName.get(name)!;
    if (m.size > cap) throw new Error(`${this.path}: zip member '${name}' is ${m.size} bytes (limit ${cap})`);
    if (m.method === 0) return this.range(name, 0, m.size);
    if (m.method !== 8) throw new Error(`${this.path}: zip member '${name}' uses unsupported compression method ${m.method}`);
    return inflateMember(this.path, m);
  }

  async readTensorRaw(t: TensorRef): Promise<Uint8Array> {
    const width = DTYPE_BYTES[t.storage.dtype];
    const name = `${this.dir}/data/${t.storage.key}`;
    const n = numel(t.shape);
    if (n === 0) return new Uint8Array(0);
    const last = t.offset + t.shape.reduce((acc, d, i) => acc + (d - 1) * t.stride[i]!, 0);
    if (last >= t.storage.numel) throw new Error(`${this.path}: tensor view reaches element ${last} of storage ${t.storage.key} (${t.storage.numel} elements)`);
    if (isContiguous(t)) return this.range(name, t.offset * width, n * width);
    const whole = await this.range(name, 0, t.storage.numel * width);
    return gather(whole, t, width);
  }

  async readTensor(t: TensorRef): Promise<Float32Array> {
    return bytesToFloat32(await this.readTensorRaw(t), t.storage.dtype, `${this.path}: storage ${t.storage.key}`);
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

function inflateMember(path: string, m: Member): Promise<Uint8Array> {
  return new Promise((resolve, reject) => {
    yauzl.open(path, { lazyEntries: true, autoClose: true, decodeStrings: false, validateEntrySizes: true }, (err, zf) => {
      if (err || !zf) return reject(err);
      zf.openReadStream(m.entry, (e, stream) => {
        if (e) return reject(new Error(`${path}: cannot inflate '${m.name}' (${e.message})`));
        const chunks: Buffer[] = [];
        stream.on('data', (c: Buffer) => chunks.push(c));
        stream.on('error', (se: Error) => { zf.close(); reject(new Error(`${path}: '${m.name}': ${se.message}`)); });
        stream.on('end', () => { zf.close(); resolve(Buffer.concat(chunks)); });
      });
    });
  });
}

function isContiguous(t: TensorRef): boolean {
  let expected = 1;
  for (let i = t.shape.length - 1; i >= 0; i--) {
    if (t.shape[i] !== 1 && t.stride[i] !== expected) return false;
    expected *= t.shape[i]!;
  }
  return true;
}

/** Copy a strided view's elements out of the whole storage, row-major. */
function gather(storage: Uint8Array, t: TensorRef, width: number): Uint8Array {
  const n = numel(t.shape);
  const out = new Uint8Array(n * width);
  const idx = new Array<number>(t.shape.length).fill(0);
  for (let i = 0; i < n; i++) {
    const src = (t.offset + idx.reduce((acc, v, d) => acc + v * t.stride[d]!, 0)) * width;
    out.set(storage.subarray(src, src + width), i * width);
    for (let d = t.shape.length - 1; d >= 0; d--) {
      if (++idx[d]! < t.shape[d]!) break;
      idx[d] = 0;
    }
  }
  return out;
}

/** The folder name torch 1.13 uses: the file name without its last extension. */
export function archiveDirFor(path: string): string {
  const base = basename(path);
  const dot = base.lastIndexOf('.');
  const stem = dot > 0 ? base.slice(0, dot) : base;
  return /^[^/\\\x00-\x1f]+$/.test(stem) ? stem : 'archive';
}

/** `torch.save(value, path)`: `value` may hold `SaveTensor`s anywhere in dicts/lists/tuples. */
export async function writeTorchZip(path: string, value: unknown, options: WriteOptions & { dir?: string } = {}): Promise<void> {
  const dir = options.dir ?? archiveDirFor(path);
  const { pkl, storages } = pickleTorch(value);
  const zip = new yazl.ZipFile();
  const opts = { compress: false, forceDosTimestamp: true, mtime: new Date(1980, 0, 1) };
  zip.addBuffer(Buffer.from(pkl), `${dir}/data.pkl`, opts);
  for (const { key, tensor } of storages) {
    const size = numel(tensor.shape) * DTYPE_BYTES[tensor.dtype];
    zip.addReadStreamLazy(`${dir}/data/${key}`, { ...opts, size }, (cb) => {
      storageBytes(tensor, size, path).then((b) => cb(null, Readable.from([Buffer.from(b.buffer, b.byteOffset, b.byteLength)])), (e) => cb(e, Readable.from([])));
    });
  }
  zip.addBuffer(Buffer.from('3\n'), `${dir}/version`, opts);
  zip.on('error', (e: Error) => (zip.outputStream as Readable).destroy(e)); // a failing producer ends the write
  zip.end();
  await writeFileAtomic(path, async (write) => {
    for await (const chunk of zip.outputStream as AsyncIterable<Buffer>) await write(chunk);
  }, options);
}

async function storageBytes(t: SaveTensor, size: number, path: string): Promise<Uint8Array> {
  const value = typeof t.data === 'function' ? await t.data() : t.data;
  const bytes = value instanceof Float32Array ? float32ToBytes(value, t.dtype) : value;
  if (bytes.byteLength !== size) throw new Error(`${path}: tensor [${t.shape.join(', ')}] ${t.dtype} needs ${size} bytes, got ${bytes.byteLength}`);
  return bytes;
}

export type { StorageRef };
