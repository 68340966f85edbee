/**
 * @file A restricted unpickler: a small pickle VM (protocols 0–5, the opcodes torch files use)
 * that never imports or calls anything. GLOBAL names are checked against an allow-list no wider
 * than the webui's `modules/safe.py` (`RestrictedUnpickler.find_class`, AUTOMATIC1111 v1.10);
 * an allowed name becomes an inert `PyGlobal`, and REDUCE/NEWOBJ of it build plain data
 * (`TensorRef`, `PyOrderedDict`, `Set`, `PyObject`). Anything else is an error naming the
 * global and the file — `os.system`, `builtins.eval`, `posix.system` never get past GLOBAL.
 */
import { PyFloat, PyGlobal, PyObject, PyOrderedDict, PyTuple, STORAGE_DTYPES, TensorRef, type StorageRef } from './pyobjects.ts';

/** safe.py's find_class, minus nothing: module → allowed names. */
const ALLOWED: Readonly<Record<string, readonly string[]>> = Object.freeze({
  collections: ['OrderedDict'],
  'torch._utils': ['_rebuild_tensor_v2', '_rebuild_parameter', '_rebuild_device_tensor_from_numpy'],
  torch: ['FloatStorage', 'HalfStorage', 'IntStorage', 'LongStorage', 'DoubleStorage', 'ByteStorage', 'float32', 'BFloat16Storage'],
  'torch.nn.modules.container': ['ParameterDict'],
  'numpy.core.multiarray': ['scalar', '_reconstruct'],
  numpy: ['dtype', 'ndarray'],
  _codecs: ['encode'],
  'pytorch_lightning.callbacks': ['model_checkpoint'],
  'pytorch_lightning.callbacks.model_checkpoint': ['ModelCheckpoint'],
  __builtin__: ['set'],
});

export function isAllowedGlobal(module: string, name: string): boolean {
  // An own property only: `__proto__` or `constructor` as a module name must not reach Object's.
  return Object.hasOwn(ALLOWED, module) && ALLOWED[module]!.includes(name);
}

export interface UnpickleOptions {
  /** Return floats as `PyFloat` (keeps `0.0` apart from `0`; for inspecting and re-writing). */
  tagFloats?: boolean;
}

export interface UnpickleResult {
  value: unknown;
  /** Every GLOBAL the pickle named, `module.name`, in first-seen order. */
  globals: string[];
}

/** Run the pickle in `data` (from `file`, for errors) and return its value. */
export function unpickle(data: Uint8Array, file: string, options: UnpickleOptions = {}): UnpickleResult {
  const vm = new Vm(data, file);
  if (options.tagFloats) vm.float = (x) => new PyFloat(x);
  return { value: vm.run(), globals: [...vm.globals] };
}

class Vm {
  pos = 0;
  stack: unknown[] = [];
  metastack: unknown[][] = [];
  memo = new Map<number, unknown>();
  globals = new Set<string>();
  float: (x: number) => unknown = (x) => x;
  private view: DataView;

  constructor(readonly data: Uint8Array, readonly file: string) {
    this.view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  }

  fail(msg: string): never {
    throw new Error(`${this.file}: ${msg}`);
  }

  run(): unknown {
    for (;;) {
      if (this.pos >= this.data.length) this.fail('pickle ends without STOP (truncated data.pkl?)');
      const op = this.data[this.pos++]!;
      if (op === 0x2e) return this.pop(); // STOP '.'
      const handler = OPS[op];
      if (!handler) this.fail(`unsupported pickle opcode 0x${op.toString(16)} ('${String.fromCharCode(op)}') at byte ${this.pos - 1}`);
      handler(this);
    }
  }

  bytes(n: number): Uint8Array {
    if (n < 0 || this.pos + n > this.data.length) this.fail(`pickle wants ${n} bytes at ${this.pos}, only ${this.data.length - this.pos} left (truncated?)`);
    const out = this.data.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
  u8(): number { return this.bytes(1)[0]!; }
  u16(): number { const p = this.pos; this.bytes(2); return this.view.getUint16(p, true); }
  u32(): number { const p = this.pos; this.bytes(4); return this.view.getUint32(p, true); }
  i32(): number { const p = this.pos; this.bytes(4); return this.view.getInt32(p, true); }
  u64(): number {
    const p = this.pos;
    this.bytes(8);
    const v = this.view.getBigUint64(p, true);
    if (v > BigInt(this.data.length)) this.fail(`length ${v} at byte ${p} is larger than the pickle`);
    return Number(v);
  }
  line(): string {
    const end = this.data.indexOf(0x0a, this.pos);
    if (end < 0) this.fail('pickle text argument without newline (truncated?)');
    const s = Buffer.from(this.data.subarray(this.pos, end)).toString('latin1');
    this.pos = end + 1;
    return s;
  }
  utf8(n: number): string { return Buffer.from(this.bytes(n)).toString('utf8'); }

  push(x: unknown): void { this.stack.push(x); }
  pop(): unknown {
    if (this.stack.length === 0) this.fail(`pickle stack underflow at byte ${this.pos - 1}`);
    return this.stack.pop();
  }
  top(): unknown {
    if (this.stack.length === 0) this.fail(`pickle stack underflow at byte ${this.pos - 1}`);
    return this.stack[this.stack.length - 1];
  }
  mark(): void { this.metastack.push(this.stack); this.stack = []; }
  popMark(): unknown[] {
    const items = this.stack;
    const prev = this.metastack.pop();
    if (!prev) this.fail(`pickle MARK missing at byte ${this.pos - 1}`);
    this.stack = prev;
    return items;
  }
  memoGet(i: number): unknown {
    if (!this.memo.has(i)) this.fail(`pickle memo ${i} read before it was written`);
    return this.memo.get(i);
  }

  findClass(module: string, name: string): PyGlobal {
    this.globals.add(`${module}.${name}`);
    if (!isAllowedGlobal(module, name)) this.fail(`pickle refers to global '${module}.${name}', which is not allowed (this file may be malicious; nothing was executed)`);
    return new PyGlobal(module, name);
  }

  persistentLoad(pid: unknown): StorageRef {
    const items = pid instanceof PyTuple ? pid.items : undefined;
    if (!items || items[0] !== 'storage' || items.length < 5) this.fail(`unexpected persistent id ${describe(pid)} (expected ('storage', type, key, location, numel))`);
    const [, type, key, location, n] = items;
    if (!(type instanceof PyGlobal) || type.module !== 'torch' || !STORAGE_DTYPES[type.name]) this.fail(`unsupported storage type ${describe(type)}`);
    if (typeof key !== 'string' || !/^\d+$/.test(key)) this.fail(`storage key ${describe(key)} is not a number`);
    if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0) this.fail(`storage ${key} has invalid size ${describe(n)}`);
    return { key, dtype: STORAGE_DTYPES[type.name]!, numel: n, location: String(location) };
  }

  /** REDUCE / NEWOBJ of an allowed global: build data, call nothing. */
  call(fn: unknown, args: unknown[]): unknown {
    if (!(fn instanceof PyGlobal)) this.fail(`pickle calls ${describe(fn)}, which is not an allowed global`);
    switch (fn.qualified) {
      case 'collections.OrderedDict': return orderedDict(this, args);
      case 'torch._utils._rebuild_tensor_v2': return rebuildTensor(this, args);
      case 'torch._utils._rebuild_parameter': return rebuildParameter(this, args);
      case '__builtin__.set': return new Set(Array.isArray(args[0]) ? args[0] : []);
      case '_codecs.encode': return Buffer.from(String(args[0]), 'latin1');
      default: return new PyObject(fn, args);
    }
  }
}

function describe(x: unknown): string {
  if (x instanceof PyGlobal) return `'${x.qualified}'`;
  if (x instanceof PyTuple) return `(${x.items.map(describe).join(', ')})`;
  return typeof x === 'string' ? `'${x}'` : String(x);
}

function orderedDict(vm: Vm, args: unknown[]): PyOrderedDict {
  const d = new PyOrderedDict();
  const init = args[0];
  if (Array.isArray(init)) for (const pair of init) if (pair instanceof PyTuple) d.set(pair.items[0], pair.items[1]);
  if (init !== undefined && !Array.isArray(init)) vm.fail('OrderedDict built from something other than a list of pairs');
  return d;
}

function intTuple(vm: Vm, x: unknown, what: string): number[] {
  const items = x instanceof PyTuple ? x.items : Array.isArray(x) ? x : undefined;
  if (!items || !items.every((v) => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0)) vm.fail(`tensor ${what} ${describe(x)} is not a tuple of sizes`);
  return items as number[];
}

/** torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata]) */
function rebuildTensor(vm: Vm, args: unknown[]): TensorRef {
  const [storage, offset, size, stride, requiresGrad] = args;
  if (typeof storage !== 'object' || storage === null || !('key' in storage)) vm.fail('_rebuild_tensor_v2 without a storage');
  if (typeof offset !== 'number' || !Number.isSafeInteger(offset) || offset < 0) vm.fail(`tensor storage offset ${describe(offset)} is invalid`);
  const shape = intTuple(vm, size, 'size');
  const strides = intTuple(vm, stride, 'stride');
  if (strides.length !== shape.length) vm.fail(`tensor size ${describe(size)} and stride ${describe(stride)} differ in rank`);
  return new TensorRef(storage as StorageRef, offset, shape, strides, requiresGrad === true);
}

/** torch._utils._rebuild_parameter(data, requires_grad, backward_hooks) */
function rebuildParameter(vm: Vm, args: unknown[]): TensorRef {
  const [data, requiresGrad] = args;
  if (!(data instanceof TensorRef)) vm.fail('_rebuild_parameter without a tensor');
  return new TensorRef(data.storage, data.offset, data.shape, data.stride, requiresGrad === true, true);
}

function setItems(vm: Vm, target: unknown, items: unknown[]): void {
  if (!(target instanceof Map)) vm.fail(`SETITEMS on a ${describe(target)}, not a dict`);
  if (items.length % 2) vm.fail('SETITEMS with an odd number of items');
  for (let i = 0; i < items.length; i += 2) target.set(items[i], items[i + 1]);
}

function appendItems(vm: Vm, target: unknown, items: unknown[]): void {
  if (Array.isArray(target)) target.push(...items);
  else if (target instanceof Set) for (const x of items) target.add(x);
  else vm.fail(`APPEND on a ${describe(target)}, not a list`);
}

/** BUILD: set state on the object below it (OrderedDict `_metadata`, ParameterDict `__dict__`, …). */
function build(vm: Vm): void {
  const state = vm.pop();
  const target = vm.top();
  if (target instanceof PyOrderedDict) {
    const dictState = state instanceof PyTuple ? state.items[0] : state;
    if (dictState instanceof Map) for (const [k, v] of dictState) target.attrs.set(String(k), v);
    else if (dictState !== null) vm.fail('BUILD on OrderedDict with a non-dict state');
  } else if (target instanceof PyObject) {
    target.state = state;
  } else {
    vm.fail(`BUILD on ${describe(target)} is not supported`);
  }
}

function stackGlobal(vm: Vm): void {
  const name = vm.pop();
  const module = vm.pop();
  if (typeof module !== 'string' || typeof name !== 'string') vm.fail('STACK_GLOBAL needs two strings');
  vm.push(vm.findClass(module, name));
}

function textInt(vm: Vm): void {
  const s = vm.line();
  if (s === '00') vm.push(false);
  else if (s === '01') vm.push(true);
  else vm.push(toInt(BigInt(s)));
}

function toInt(v: bigint): number | bigint {
  return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
}

/** Two's-complement little-endian integer (LONG1 / LONG4). */
function longLE(b: Uint8Array): number | bigint {
  if (b.length === 0) return 0;
  let v = 0n;
  for (let i = b.length - 1; i >= 0; i--) v = (v << 8n) | BigInt(b[i]!);
  if (b[b.length - 1]! & 0x80) v -= 1n << BigInt(8 * b.length);
  return toInt(v);
}

const c = (ch: string): number => ch.charCodeAt(0);
type Op = (vm: Vm) => void;

const OPS: Record<number, Op> = {
  0x80: (vm) => { const p = vm.u8(); if (p > 5) vm.fail(`pickle protocol ${p} is not supported`); }, // PROTO
  0x95: (vm) => { vm.bytes(8); }, // FRAME (framing is only a read-ahead hint)
  [c('(')]: (vm) => vm.mark(),
  [c('0')]: (vm) => { vm.pop(); },
  [c('1')]: (vm) => { vm.popMark(); },
  [c('2')]: (vm) => vm.push(vm.top()),
  [c('N')]: (vm) => vm.push(null),
  0x88: (vm) => vm.push(true),
  0x89: (vm) => vm.push(false),
  [c('I')]: textInt,
  [c('L')]: (vm) => vm.push(toInt(BigInt(vm.line().replace(/L$/, '')))),
  [c('J')]: (vm) => vm.push(vm.i32()),
  [c('K')]: (vm) => vm.push(vm.u8()),
  [c('M')]: (vm) => vm.push(vm.u16()),
  0x8a: (vm) => vm.push(longLE(vm.bytes(vm.u8()))),
  0x8b: (vm) => { const n = vm.i32(); vm.push(longLE(vm.bytes(n))); },
  [c('F')]: (vm) => vm.push(vm.float(parseFloat(vm.line()))),
  [c('G')]: (vm) => { const b = vm.bytes(8); vm.push(vm.float(new DataView(b.buffer, b.byteOffset, 8).getFloat64(0, false))); },
  [c('X')]: (vm) => vm.push(vm.utf8(vm.u32())),
  0x8c: (vm) => vm.push(vm.utf8(vm.u8())),
  0x8d: (vm) => vm.push(vm.utf8(vm.u64())),
  [c('V')]: (vm) => vm.push(vm.line().replace(/\\u([0-9a-fA-F]{4})/g, (_, h: string) => String.fromCharCode(parseInt(h, 16)))),
  [c('T')]: (vm) => vm.push(Buffer.from(vm.bytes(vm.u32())).toString('latin1')),
  [c('U')]: (vm) => vm.push(Buffer.from(vm.bytes(vm.u8())).toString('latin1')),
  [c('B')]: (vm) => vm.push(vm.bytes(vm.u32()).slice()),
  [c('C')]: (vm) => vm.push(vm.bytes(vm.u8()).slice()),
  0x8e: (vm) => vm.push(vm.bytes(vm.u64()).slice()),
  0x96: (vm) => vm.push(vm.bytes(vm.u64()).slice()),
  [c(')')]: (vm) => vm.push(new PyTuple([])),
  [c('t')]: (vm) => vm.push(new PyTuple(vm.popMark())),
  0x85: (vm) => vm.push(new PyTuple([vm.pop()])),
  0x86: (vm) => { const b = vm.pop(); vm.push(new PyTuple([vm.pop(), b])); },
  0x87: (vm) => { const c3 = vm.pop(); const b = vm.pop(); vm.push(new PyTuple([vm.pop(), b, c3])); },
  [c(']')]: (vm) => vm.push([]),
  [c('l')]: (vm) => vm.push(vm.popMark()),
  [c('a')]: (vm) => { const x = vm.pop(); appendItems(vm, vm.top(), [x]); },
  [c('e')]: (vm) => { const items = vm.popMark(); appendItems(vm, vm.top(), items); },
  [c('}')]: (vm) => vm.push(new Map()),
  [c('d')]: (vm) => { const d = new Map(); setItems(vm, d, vm.popMark()); vm.push(d); },
  [c('s')]: (vm) => { const v = vm.pop(); const k = vm.pop(); setItems(vm, vm.top(), [k, v]); },
  [c('u')]: (vm) => { const items = vm.popMark(); setItems(vm, vm.top(), items); },
  0x8f: (vm) => vm.push(new Set()),
  0x90: (vm) => { const items = vm.popMark(); appendItems(vm, vm.top(), items); },
  0x91: (vm) => vm.push(new Set(vm.popMark())),
  [c('g')]: (vm) => vm.push(vm.memoGet(Number(vm.line()))),
  [c('h')]: (vm) => vm.push(vm.memoGet(vm.u8())),
  [c('j')]: (vm) => vm.push(vm.memoGet(vm.u32())),
  [c('p')]: (vm) => { vm.memo.set(Number(vm.line()), vm.top()); },
  [c('q')]: (vm) => { vm.memo.set(vm.u8(), vm.top()); },
  [c('r')]: (vm) => { vm.memo.set(vm.u32(), vm.top()); },
  0x94: (vm) => { vm.memo.set(vm.memo.size, vm.top()); },
  [c('c')]: (vm) => { const module = vm.line(); vm.push(vm.findClass(module, vm.line())); },
  0x93: stackGlobal,
  [c('R')]: (vm) => { const args = vm.pop(); const fn = vm.pop(); vm.push(vm.call(fn, args instanceof PyTuple ? args.items : [])); },
  0x81: (vm) => { const args = vm.pop(); const cls = vm.pop(); vm.push(vm.call(cls, args instanceof PyTuple ? args.items : [])); },
  0x92: (vm) => { vm.pop(); const args = vm.pop(); const cls = vm.pop(); vm.push(vm.call(cls, args instanceof PyTuple ? args.items : [])); },
  [c('b')]: build,
  [c('Q')]: (vm) => vm.push(vm.persistentLoad(vm.pop())),
};
