/**
 * @file The Python values the restricted unpickler produces and the pickler accepts.
 * str → string, int → number (bigint beyond 2^53), float → number (`PyFloat` forces a float when
 * writing an integral value), bool/None → boolean/null, list → array, tuple → `PyTuple`,
 * dict → `Map`, OrderedDict → `PyOrderedDict` (with its `_metadata` attribute), set → `Set`,
 * bytes → Uint8Array, a torch tensor → `TensorRef`, any other allowed object → `PyObject` (inert).
 */
import type { DType } from './types.ts';

export class PyTuple {
  constructor(readonly items: unknown[]) {}
}

/** A float that stays a float when written even if integral (`0.0` in optimizer param groups). */
export class PyFloat {
  constructor(readonly value: number) {}
}

export class PyOrderedDict extends Map<unknown, unknown> {
  /** Attributes set by BUILD — `_metadata` for state dicts. */
  attrs = new Map<string, unknown>();
}

/** A class or function named by GLOBAL that the allow-list let through. Never called. */
export class PyGlobal {
  constructor(readonly module: string, readonly name: string) {}
  get qualified(): string {
    return `${this.module}.${this.name}`;
  }
}

/** An instance of an allowed class (ParameterDict, numpy scalar, …): class, args and state, inert. */
export class PyObject {
  state: unknown = undefined;
  constructor(readonly cls: PyGlobal, readonly args: unknown[]) {}
}

/** A torch storage as the zip stores it: `<dir>/data/<key>`, `numel` elements of `dtype`. */
export interface StorageRef {
  key: string;
  dtype: DType;
  numel: number;
  location: string;
}

/** A tensor view of a storage (`_rebuild_tensor_v2` / `_rebuild_parameter` arguments). */
export class TensorRef {
  constructor(
    readonly storage: StorageRef,
    readonly offset: number,
    readonly shape: number[],
    readonly stride: number[],
    public requiresGrad: boolean,
    /** True when it was an `nn.Parameter` (`_rebuild_parameter`). */
    public isParameter = false,
  ) {}
}

/** torch storage class names ↔ dtypes (only those the webui's safe.py allows). */
export const STORAGE_DTYPES: Readonly<Record<string, DType>> = Object.freeze({
  FloatStorage: 'F32', HalfStorage: 'F16', BFloat16Storage: 'BF16', DoubleStorage: 'F64',
  LongStorage: 'I64', IntStorage: 'I32', ByteStorage: 'U8',
});

/** Map/PyOrderedDict or a ParameterDict object → a Map of its entries (else undefined). */
export function asMap(x: unknown): Map<unknown, unknown> | undefined {
  if (x instanceof Map) return x;
  if (x instanceof PyObject && x.cls.name === 'ParameterDict') {
    // webui: `if hasattr(param_dict, '_parameters'): param_dict = param_dict._parameters`
    const state = x.state instanceof Map ? x.state : undefined;
    const params = state?.get('_parameters');
    return params instanceof Map ? params : undefined;
  }
  return undefined;
}

