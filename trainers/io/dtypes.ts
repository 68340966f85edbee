/**
 * @file Storage dtypes: byte widths, raw little-endian bytes → float32 (exact upcast) and back,
 * and a positioned read that loops until the range is filled (`FileHandle.read` may return short).
 */
import type { FileHandle } from 'node:fs/promises';
import type { DType } from './types.ts';
import { decodeBf16, decodeHalf, encodeBf16, encodeHalf } from './half.ts';

export const DTYPE_BYTES: Readonly<Record<DType, number>> = Object.freeze({
  F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1,
});

export function isDType(x: unknown): x is DType {
  return typeof x === 'string' && Object.hasOwn(DTYPE_BYTES, x);
}

export function numel(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** Fill `buf` from `position`; an error naming `path` if the file ends first. */
export async function readFully(fh: FileHandle, buf: Uint8Array, position: number, path: string): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, position + done);
    if (bytesRead === 0) throw new Error(`${path}: file ends at byte ${position + done}, expected ${buf.length - done} more (truncated?)`);
    done += bytesRead;
  }
}

/** A copy of `bytes` in a fresh, aligned ArrayBuffer (typed-array views need alignment). */
function aligned(bytes: Uint8Array): ArrayBuffer {
  return bytes.slice().buffer as ArrayBuffer;
}

/** Raw little-endian storage bytes → float32 values (I64 must stay within ±2^53 to be exact). */
export function bytesToFloat32(bytes: Uint8Array, dtype: DType, what: string): Float32Array {
  // Zero-copy when `bytes` owns its whole buffer (the readers allocate it so); otherwise copy.
  const whole = bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength && bytes.buffer instanceof ArrayBuffer;
  const buf = whole ? (bytes.buffer as ArrayBuffer) : aligned(bytes);
  switch (dtype) {
    case 'F32': return new Float32Array(buf);
    case 'F16': return decodeHalf(new Uint16Array(buf));
    case 'BF16': return decodeBf16(new Uint16Array(buf));
    case 'F64': return Float32Array.from(new Float64Array(buf));
    case 'I32': return Float32Array.from(new Int32Array(buf));
    case 'I16': return Float32Array.from(new Int16Array(buf));
    case 'I8': return Float32Array.from(new Int8Array(buf));
    case 'U8': case 'BOOL': return Float32Array.from(new Uint8Array(buf));
    case 'I64': {
      const ints = new BigInt64Array(buf);
      const out = new Float32Array(ints.length);
      for (let i = 0; i < ints.length; i++) {
        const v = ints[i]!;
        if (v > 9007199254740992n || v < -9007199254740992n) throw new Error(`${what}: int64 value ${v} does not fit a float`);
        out[i] = Number(v);
      }
      return out;
    }
  }
}

/** Values → raw little-endian bytes of `dtype` (float16/bfloat16 rounded to nearest even). */
export function float32ToBytes(values: ArrayLike<number>, dtype: DType): Uint8Array {
  let arr: ArrayBufferView;
  switch (dtype) {
    case 'F32': arr = values instanceof Float32Array ? values : Float32Array.from(values); break;
    case 'F16': arr = encodeHalf(values); break;
    case 'BF16': arr = encodeBf16(values); break;
    case 'F64': arr = Float64Array.from(values); break;
    case 'I64': arr = BigInt64Array.from(Array.from(values, (v) => BigInt(Math.trunc(v)))); break;
    case 'I32': arr = Int32Array.from(values); break;
    case 'I16': arr = Int16Array.from(values); break;
    case 'I8': arr = Int8Array.from(values); break;
    case 'U8': case 'BOOL': arr = Uint8Array.from(values); break;
  }
  return new Uint8Array(arr.buffer, arr.byteOffset, arr.byteLength);
}
