/**
 * @file Trained weights STORED as bfloat16 (the `bf16Weights` job option with fusedBackward): each
 * trained tf.Variable keeps its identity (the tape and the fused census of recompute.ts know
 * variables by object), but between uses its float32 array is dropped from the CPU backend and
 * the store holds its upper 16 bits instead (Uint16Array, 2 B a weight). Stochastic rounding
 * (optim/bf16-round.ts) leaves every trained weight bf16-exact after each update, so keeping the
 * upper half loses nothing: a run is bit-identical to the float32-held emulation it replaces.
 *
 * A float32 copy exists only while needed ("resident"):
 * - a kernel reads the weight (the kernel entry is hooked, kernel-hook.ts: the values are refilled from the
 *   bits before the kernel runs). Inside a training step (`sticky`) the copy stays until
 *   recompute.ts releases it — after its checkpointed block's forward, and after the block's
 *   recompute in the backward pass; weights read outside every block (the census's `onTape`:
 *   time embedding, label_emb, conv_in/out, a trained text encoder) stay for the whole step.
 *   Outside a step (previews, checks) the copy lives for that one kernel.
 * - `dataSync()`/`data()` of an evicted weight (saving, EMA) get a fresh decoded array; the
 *   optimizer's host path (optim/native.ts hostValues) gets the same, so an update needs only its
 *   own output arrays; `commit` then takes the new (rounded) values' bits and drops them.
 *
 * Weights are found by dataId (a reshape on the CPU backend shares its input's), so views work.
 * Only the CPU backends hold host arrays: on WASM and WebGPU the store refuses to start.
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { decodeBf16 as bf16ToFloat32 } from '../io/half.ts';
import { hookKernelInputs } from './kernel-hook.ts';

interface Entry {
  variable: tf.Variable;
  dataId: object;
  bits: Uint16Array;
  resident: boolean;
}

interface CpuData { values?: unknown; dtype: string }
interface CpuBackend {
  data: { get(dataId: object): CpuData; has(dataId: object): boolean };
  readSync(dataId: object): unknown;
  read(dataId: object): Promise<unknown>;
}

let active: Bf16Store | undefined;
let lastReport: Bf16StoreReport | undefined;

/** What a store held: the bits, and the most float32 copies resident at once. */
export interface Bf16StoreReport {
  storedBytes: number;
  peakResidentBytes: number;
}

/** The report of the last store disposed (a finished job's), for tests and benches. */
export function lastBf16StoreReport(): Bf16StoreReport | undefined {
  return lastReport;
}

/** The store of the running job, if any (recompute.ts releases weights through it). */
export function activeBf16Store(): Bf16Store | undefined {
  return active;
}

/** A stored weight's float32 values for reading (its own array when resident, else a decoded copy); undefined when `t` is not stored. */
export function storedValues(t: Tensor): Float32Array | undefined {
  const e = active?.entryOf(t.dataId);
  if (!e) return undefined;
  return e.resident ? (active!.cpuData(e).values as Float32Array) : bf16ToFloat32(e.bits);
}

/** The upper 16 bits of each float32 (exact for bf16-representable values). */
function upperBits(values: Float32Array): Uint16Array {
  const u = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < u.length; i++) out[i] = u[i]! >>> 16;
  return out;
}

export class Bf16Store {
  private readonly byId = new Map<object, Entry>();
  private readonly byVar = new Map<tf.Variable, Entry>();
  private readonly resident = new Set<Entry>();
  /** Inside a training step: refills stay until released (see the file comment). */
  sticky = false;
  /** Bytes of float32 copies resident now, and the most at any time (for tests and benches). */
  residentBytes = 0;
  peakResidentBytes = 0;
  private readonly backend: CpuBackend;
  private readonly restore: (() => void)[] = [];

  /** Take over `vars` (their values must be bf16-exact: useBf16Weights rounds them first). */
  constructor(vars: Iterable<tf.Variable>) {
    if (active) throw new Error('bf16Weights: a bf16 weight store is already active (one training job per process)');
    if (tf.getBackend() !== 'cpu') {
      throw new Error(`bf16Weights keeps trained weights as bfloat16 host arrays, which only the cpu-native and cpu backends have (this run uses '${tf.getBackend()}'): turn bf16Weights off or use the cpu-native backend`);
    }
    this.backend = tf.backend() as unknown as CpuBackend;
    for (const v of vars) {
      if (v.dtype !== 'float32') throw new Error(`bf16Weights: variable '${v.name}' is ${v.dtype}, not float32`);
      this.adopt(v);
    }
    this.install();
    active = this;
  }

  entryOf(dataId: object): Entry | undefined {
    return this.byId.get(dataId);
  }

  cpuData(e: Entry): CpuData {
    const d = this.backend.data.has(e.dataId) ? this.backend.data.get(e.dataId) : undefined; // get() of a freed id would try to move it between backends
    if (!d) throw new Error(`bf16Weights: the values of '${e.variable.name}' are gone (disposed while stored)`);
    return d;
  }

  /** Bytes of the bf16 bits of every stored weight (half their float32 size). */
  storedBytes(): number {
    let n = 0;
    for (const e of this.byVar.values()) n += e.bits.byteLength;
    return n;
  }

  private refill(e: Entry): void {
    if (e.resident) return;
    this.cpuData(e).values = bf16ToFloat32(e.bits);
    e.resident = true;
    this.resident.add(e);
    this.residentBytes += e.bits.length * 4;
    this.peakResidentBytes = Math.max(this.peakResidentBytes, this.residentBytes);
  }

  private evict(e: Entry): void {
    if (this.resident.delete(e)) this.residentBytes -= e.bits.length * 4;
    if (!e.resident) return;
    this.cpuData(e).values = undefined; // the float32 array goes to the GC; the bits stay
    e.resident = false;
  }

  /** Drop the float32 copies of resident weights, except `keep`'s (the tape's, mid-step). */
  release(keep?: ReadonlySet<tf.Variable>): void {
    for (const e of [...this.resident]) if (!keep?.has(e.variable)) this.evict(e);
  }

  /**
   * After `v`'s update (its new values bf16-exact: the optimizer's result stochastically rounded):
   * keep their bits and drop the float32 array. The old dataId is forgotten, not evicted (a view
   * of the old values, if any, keeps its array).
   */
  commit(v: tf.Variable): void {
    const old = this.byVar.get(v);
    if (!old) return;
    if (old.dataId !== v.dataId && this.backend.data.has(old.dataId)) this.refill(old); // a view of the old values lives on
    this.byId.delete(old.dataId);
    if (this.resident.delete(old)) this.residentBytes -= old.bits.length * 4;
    if (!this.backend.data.has(old.dataId)) old.resident = false; // freed by the assign: nothing to drop
    if (old.dataId === v.dataId) {
      // updated in place (not by assign): the array is the variable's own
      old.bits = upperBits(this.cpuData(old).values as Float32Array);
      old.resident = true;
      this.byId.set(old.dataId, old);
      this.evict(old);
      return;
    }
    this.adopt(v);
  }

  /** Take `v`'s current (bf16-exact) values as bits and drop its float32 array. */
  private adopt(v: tf.Variable): void {
    const e: Entry = { variable: v, dataId: v.dataId, bits: upperBits(v.dataSync() as Float32Array), resident: true };
    this.byId.set(e.dataId, e);
    this.byVar.set(v, e);
    this.evict(e);
  }

  /** Wrap the engine's kernel entry and the backend's reads (see the file comment). */
  private install(): void {
    const store = this;
    this.restore.push(hookKernelInputs((inputs) => {
      let transient: Entry[] | undefined;
      for (const x of inputs) {
        const e = store.byId.get(x.dataId);
        if (!e || e.resident) continue;
        store.refill(e);
        if (!store.sticky) (transient ??= []).push(e);
      }
      return transient && (() => transient.forEach((e) => store.evict(e)));
    }));
    const b = this.backend;
    const readSync = b.readSync;
    const read = b.read;
    const ownRead = Object.hasOwn(b, 'readSync');
    const decoded = (dataId: object) => {
      const e = store.byId.get(dataId);
      return e && !e.resident ? bf16ToFloat32(e.bits) : undefined;
    };
    b.readSync = function (this: CpuBackend, dataId) {
      return decoded(dataId) ?? readSync.call(this, dataId);
    };
    b.read = async function (this: CpuBackend, dataId) {
      return decoded(dataId) ?? read.call(this, dataId);
    };
    this.restore.push(() => {
      if (ownRead) Object.assign(b, { readSync, read });
      else {
        delete (b as Partial<CpuBackend>).readSync;
        delete (b as Partial<CpuBackend>).read;
      }
    });
  }

  /**
   * Every weight still alive float32 again (resident for good), the hooks removed. A job frees its
   * weights first (methods register this release to run after theirs), so nothing is refilled then.
   */
  dispose(): void {
    lastReport = { storedBytes: this.storedBytes(), peakResidentBytes: this.peakResidentBytes };
    for (const e of this.byVar.values()) if (!e.variable.isDisposed && this.backend.data.has(e.dataId)) this.refill(e);
    this.resident.clear();
    for (const r of this.restore.reverse()) r();
    this.restore.length = 0;
    this.byId.clear();
    this.byVar.clear();
    if (active === this) active = undefined;
  }
}
