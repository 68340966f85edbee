/**
 * @file Output arrays for the native kernels: not zero-filled, and recycled.
 *
 * Not zero-filled: `new Float32Array(n)` zeroes its memory on the JavaScript thread, one core,
 * before the kernel overwrites every element: a 512 px SD1.5 TI step allocates ~6 GB of kernel
 * outputs, and the zeroing left the second core idle for ~0.4 s of a ~11 s step. Every kernel
 * handed one of these writes all of it (the GEMMs store, rather than add, in their first k block;
 * a transposed conv zeroes its input gradient itself when a stride phase has no tap); the native
 * tests run with poisoned outputs (NaN) to keep it so. `SIDETRAIN_POISON_OUTPUTS=1` poisons them
 * in any run (the golden harness, a job), recycled ones included.
 *
 * Recycled: a disposed tensor's array is freed only by V8's garbage collector, and V8 starts a
 * full collection for every ~64 MB of new array memory, so those ~6 GB a step cost ~100
 * collections on the JavaScript thread while both cores wait. A training step allocates the same
 * shapes step after step, so an array of ours goes to an idle list, by byte length, when the CPU
 * backend deletes the last tensor data holding it, and the next output of that length takes it.
 * - It is not recycled while any other data id holds it: a contiguous Slice is a view of its
 *   input (tfjs-backend-cpu sliceImpl), and a caller may make a tensor of an array it kept.
 * - It is never recycled once its values were read out of the backend (`readSync`/`read`, under
 *   every dataSync/data): the caller may keep that array.
 * - Idle memory does not add to the process's peak: an output that finds no idle array of its
 *   length first drops as many idle bytes (oldest first) to the GC. Phases with other
 *   allocations (snapshots, previews) call releaseIdleOutputs() first.
 */

let poison = process.env.SIDETRAIN_POISON_OUTPUTS === '1';

/** Fill every output array with NaN from now on (on), or leave it uninitialised (off). */
export function poisonOutputs(on: boolean): void {
  poison = on;
}

/** Data ids holding each array buffer outputArray made (views included); absent: not ours. */
const holders = new WeakMap<ArrayBuffer, number>();
/** Buffers whose values were read out of the backend: never recycled. */
const readOut = new WeakSet<ArrayBuffer>();
/** Idle buffers by byte length (most recently freed last), and all of them, oldest first. */
const idleBySize = new Map<number, ArrayBuffer[]>();
const idleOrder = new Set<ArrayBuffer>();
let idleBytes = 0;
let enabled = process.env.SIDETRAIN_RECYCLE_OUTPUTS !== '0';
const stats = { allocated: 0, reused: 0, dropped: 0 };

/** A Float32Array of n elements whose contents are unspecified: the kernel must write each one. */
export function outputArray(n: number): Float32Array {
  const bytes = n * 4;
  let buffer = idleBySize.get(bytes)?.pop();
  if (buffer) {
    idleOrder.delete(buffer);
    idleBytes -= bytes;
    stats.reused++;
  } else {
    dropIdle(bytes);
    // allocUnsafeSlow: a buffer of its own (not a slice of Node's pool), malloc'd without zeroing
    buffer = Buffer.allocUnsafeSlow(bytes).buffer as ArrayBuffer;
    holders.set(buffer, 0);
    stats.allocated++;
  }
  const out = new Float32Array(buffer, 0, n);
  if (poison) out.fill(NaN);
  return out;
}

/** Outputs allocated and reused so far, idle buffers dropped, and the idle bytes now. */
export function outputPoolStats() {
  return { ...stats, idleBytes };
}

/** Recycling on or off (off also releases the idle arrays); returns the previous setting. */
export function recycleOutputArrays(on: boolean): boolean {
  const was = enabled;
  enabled = on;
  if (!on) releaseIdleOutputs();
  return was;
}

/** Leaves every idle array to the GC (before a phase that allocates other shapes). */
export function releaseIdleOutputs(): void {
  dropIdle(Infinity);
}

function removeIdle(buffer: ArrayBuffer): void {
  const list = idleBySize.get(buffer.byteLength)!;
  list.splice(list.lastIndexOf(buffer), 1);
  if (list.length === 0) idleBySize.delete(buffer.byteLength);
  idleOrder.delete(buffer);
  idleBytes -= buffer.byteLength;
}

/** Drops idle buffers, oldest first, until `bytes` are dropped or none is left. */
function dropIdle(bytes: number): void {
  let dropped = 0;
  for (const buffer of idleOrder) {
    if (dropped >= bytes) return;
    removeIdle(buffer);
    dropped += buffer.byteLength;
    stats.dropped++;
  }
}

const ours = (values: unknown): ArrayBuffer | undefined =>
  ArrayBuffer.isView(values) && holders.has(values.buffer as ArrayBuffer) ? (values.buffer as ArrayBuffer) : undefined;

/** One more (+1) or one fewer (−1) data id holds `values`; at none, an array of ours goes idle. */
function hold(values: unknown, delta: 1 | -1): void {
  const buffer = ours(values);
  if (!buffer) return;
  const n = holders.get(buffer)! + delta;
  holders.set(buffer, n);
  // held again while idle (an array kept past its tensor's disposal, made a tensor again)
  if (idleOrder.has(buffer)) removeIdle(buffer);
  if (n > 0 || !enabled || readOut.has(buffer)) return;
  const list = idleBySize.get(buffer.byteLength);
  if (list) list.push(buffer);
  else idleBySize.set(buffer.byteLength, [buffer]);
  idleOrder.add(buffer);
  idleBytes += buffer.byteLength;
}

/** The parts of tfjs-backend-cpu's MathBackendCPU (and its DataStorage) that are hooked. */
export interface RecyclingBackend {
  data: {
    has(dataId: object): boolean;
    get(dataId: object): { values?: unknown } | undefined;
    set(dataId: object, value: { values?: unknown }): void;
    delete(dataId: object): boolean;
  };
  readSync(dataId: object): unknown;
  read(dataId: object): Promise<unknown>;
}
const hooked = new WeakSet<object>();

/**
 * Makes the CPU backend give disposed outputs back (idempotent): counts the data ids holding each
 * of our buffers (its storage's set and delete, which every write, move and dispose goes
 * through) and marks the buffers whose values are read out.
 */
export function recycleOutputs(backend: RecyclingBackend): void {
  if (hooked.has(backend)) return;
  hooked.add(backend);
  const storage = backend.data;
  const { set, delete: remove } = storage;
  // has() first: get() of an unknown id would ask the engine to move it from another backend
  const valuesOf = (dataId: object) => (storage.has(dataId) ? storage.get(dataId)?.values : undefined);
  storage.set = function (dataId, value) {
    const before = valuesOf(dataId);
    set.call(this, dataId, value);
    hold(value?.values, 1);
    hold(before, -1);
  };
  storage.delete = function (dataId) {
    const before = valuesOf(dataId);
    const deleted = remove.call(this, dataId);
    if (deleted) hold(before, -1);
    return deleted;
  };
  const { readSync, read } = backend;
  const markRead = (dataId: object) => {
    const buffer = ours(valuesOf(dataId));
    if (buffer) readOut.add(buffer);
  };
  backend.readSync = function (dataId) {
    markRead(dataId);
    return readSync.call(this, dataId);
  };
  backend.read = function (dataId) {
    markRead(dataId);
    return read.call(this, dataId);
  };
}
