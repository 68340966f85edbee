/**
 * @file The shape every tensor source has (safetensors, torch zip-pickle, an in-memory map), so
 * networks load from any checkpoint format without knowing which one it is.
 */

/** Storage dtypes as safetensors names them; torch storages map onto these. */
export type DType = 'F64' | 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL';

export interface TensorInfo {
  dtype: DType;
  /** PyTorch shape, e.g. Conv2d [out, in, kh, kw]. */
  shape: number[];
}

/** A checkpoint or weights file opened lazily: tensors are read from disk only when asked. */
export interface TensorSource {
  /** The file this came from, for error messages. */
  readonly path: string;
  /** Keys in file order. */
  keys(): string[];
  has(key: string): boolean;
  /** Throws an error naming the key and the file when the key is missing. */
  info(key: string): TensorInfo;
  /** Values upcast to float32 (I64 must fit in 2^53). */
  read(key: string): Promise<Float32Array>;
  /** Free-form string metadata (safetensors `__metadata__`), empty when the format has none. */
  metadata(): Record<string, string>;
  close(): Promise<void>;
}
