/**
 * @file A protocol-2 pickler for torch `data.pkl` (what `torch.save` writes with torch 1.13):
 * dicts, OrderedDicts (with `_metadata`), lists, tuples, str, int, float, bool, None and tensors.
 * A tensor becomes `_rebuild_tensor_v2(BINPERSID ('storage', torch.<T>Storage, '<n>', 'cpu', numel),
 * 0, size, stride, requires_grad, OrderedDict())`, the layout the webui's own `.pt` files have;
 * the storages are returned for the zip writer to store as `<dir>/data/<n>`.
 * Only globals the webui's safe.py and torch's weights_only unpickler allow are ever emitted.
 */
import type { DType } from './types.ts';
import { PyFloat, PyOrderedDict, PyTuple, STORAGE_DTYPES } from './pyobjects.ts';
import { numel } from './dtypes.ts';

export type TensorData = Float32Array | Uint8Array | (() => Promise<Float32Array | Uint8Array>);

/** A tensor to save: values (converted to `dtype`) or raw little-endian bytes, or a producer. */
export class SaveTensor {
  constructor(
    readonly dtype: DType,
    readonly shape: number[],
    readonly data: TensorData,
    readonly requiresGrad = false,
  ) {}
}

const STORAGE_CLASS: Partial<Record<DType, string>> = Object.fromEntries(
  Object.entries(STORAGE_DTYPES).map(([cls, dtype]) => [dtype, cls]),
);

export interface PickleOutput {
  pkl: Uint8Array;
  /** Storages in key order ('0', '1', …). */
  storages: { key: string; tensor: SaveTensor }[];
}

export function pickleTorch(value: unknown): PickleOutput {
  const p = new Pickler();
  p.raw(0x80, 2); // PROTO 2
  p.value(value);
  p.raw(0x2e); // STOP
  return { pkl: Buffer.concat(p.chunks), storages: p.storages };
}

class Pickler {
  chunks: Uint8Array[] = [];
  storages: { key: string; tensor: SaveTensor }[] = [];
  private memo = new Map<string, number>();

  raw(...bytes: number[]): void {
    this.chunks.push(Uint8Array.from(bytes));
  }
  op(ch: string): void {
    this.raw(ch.charCodeAt(0));
  }
  u32(n: number): Uint8Array {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(n);
    return b;
  }

  /** BINGET if this memo key was written before; otherwise write it and BINPUT it. */
  private memoized(key: string, write: () => void): void {
    const idx = this.memo.get(key);
    if (idx !== undefined) {
      if (idx < 256) this.raw(0x68, idx); // BINGET
      else this.chunks.push(Uint8Array.of(0x6a), this.u32(idx)); // LONG_BINGET
      return;
    }
    write();
    const n = this.memo.size;
    this.memo.set(key, n);
    if (n < 256) this.raw(0x71, n); // BINPUT
    else this.chunks.push(Uint8Array.of(0x72), this.u32(n)); // LONG_BINPUT
  }

  global(module: string, name: string): void {
    this.memoized(`g:${module}\n${name}`, () => this.chunks.push(Buffer.from(`c${module}\n${name}\n`, 'latin1')));
  }

  str(s: string): void {
    this.memoized(`s:${s}`, () => {
      const b = Buffer.from(s, 'utf8');
      this.chunks.push(Uint8Array.of(0x58), this.u32(b.length), b); // BINUNICODE
    });
  }

  int(v: number | bigint): void {
    if (typeof v === 'number' && v >= 0 && v < 256) this.raw(0x4b, v); // BININT1
    else if (typeof v === 'number' && v >= 0 && v < 65536) this.raw(0x4d, v & 0xff, v >> 8); // BININT2
    else if (typeof v === 'number' && v >= -(2 ** 31) && v < 2 ** 31) {
      const b = Buffer.alloc(4);
      b.writeInt32LE(v);
      this.chunks.push(Uint8Array.of(0x4a), b); // BININT
    } else this.long(BigInt(v));
  }

  /** LONG1: two's-complement little-endian, shortest form. */
  long(v: bigint): void {
    const bytes: number[] = [];
    let x = v;
    for (;;) {
      const byte = Number(x & 0xffn);
      bytes.push(byte);
      x >>= 8n;
      if ((x === 0n && !(byte & 0x80)) || (x === -1n && byte & 0x80)) break;
    }
    this.raw(0x8a, bytes.length, ...bytes);
  }

  float(v: number): void {
    const b = Buffer.alloc(8);
    b.writeDoubleBE(v);
    this.chunks.push(Uint8Array.of(0x47), b); // BINFLOAT
  }

  value(x: unknown): void {
    if (x === null || x === undefined) this.op('N');
    else if (x === true) this.raw(0x88);
    else if (x === false) this.raw(0x89);
    else if (typeof x === 'number') Number.isInteger(x) ? this.int(x) : this.float(x);
    else if (typeof x === 'bigint') this.int(x);
    else if (x instanceof PyFloat) this.float(x.value);
    else if (typeof x === 'string') this.str(x);
    else if (x instanceof SaveTensor) this.tensor(x);
    else if (x instanceof PyTuple) this.tuple(x.items);
    else if (Array.isArray(x)) this.list(x);
    else if (x instanceof PyOrderedDict) this.orderedDict(x);
    else if (x instanceof Map) this.dict(x);
    else throw new Error(`pickle: cannot write a ${Object.prototype.toString.call(x)}`);
  }

  tuple(items: unknown[]): void {
    if (items.length === 0) return this.op(')');
    if (items.length > 3) this.op('(');
    for (const it of items) this.value(it);
    this.raw(items.length > 3 ? 0x74 : [0, 0x85, 0x86, 0x87][items.length]!);
  }

  list(items: unknown[]): void {
    this.op(']');
    if (items.length === 1) {
      this.value(items[0]);
      this.op('a');
    } else if (items.length > 1) {
      this.op('(');
      for (const it of items) this.value(it);
      this.op('e');
    }
  }

  dict(d: Map<unknown, unknown>): void {
    this.op('}');
    this.items(d);
  }

  /** SETITEMS in batches of 1000, as pickle does. */
  items(d: Map<unknown, unknown>): void {
    const entries = [...d];
    for (let i = 0; i < entries.length; i += 1000) {
      this.op('(');
      for (const [k, v] of entries.slice(i, i + 1000)) {
        this.value(k);
        this.value(v);
      }
      this.op('u');
    }
  }

  orderedDict(d: PyOrderedDict): void {
    this.global('collections', 'OrderedDict');
    this.op(')');
    this.op('R');
    this.items(d);
    if (d.attrs.size) {
      this.dict(d.attrs); // state dict → BUILD sets the attributes (`_metadata`)
      this.op('b');
    }
  }

  tensor(t: SaveTensor): void {
    const cls = STORAGE_CLASS[t.dtype];
    if (!cls) throw new Error(`pickle: dtype ${t.dtype} has no storage class the webui allows`);
    const key = String(this.storages.length);
    this.storages.push({ key, tensor: t });
    const strides = t.shape.map((_, i) => numel(t.shape.slice(i + 1)));
    this.global('torch._utils', '_rebuild_tensor_v2');
    this.op('(');
    this.op('('); // persistent id ('storage', torch.<T>Storage, key, 'cpu', numel)
    this.str('storage');
    this.global('torch', cls);
    this.str(key);
    this.str('cpu');
    this.int(numel(t.shape));
    this.op('t');
    this.op('Q'); // BINPERSID
    this.int(0);
    this.tuple(t.shape);
    this.tuple(strides);
    this.value(t.requiresGrad);
    this.orderedDict(new PyOrderedDict()); // backward_hooks
    this.op('t');
    this.op('R');
  }
}
