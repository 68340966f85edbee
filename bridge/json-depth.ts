/**
 * @file A bound on JSON nesting, checked on the raw body before it is parsed. `JSON.parse` copes
 * with deep nesting, but every recursive walk after it (the schema validator, structuredClone)
 * overflows the stack on a 256 kB body of `[[[[…` and answered 500. One linear pass over the
 * bytes: brackets inside strings (and escaped quotes) do not count.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';

const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const OPEN = new Set([0x5b, 0x7b]); // [ {
const CLOSE = new Set([0x5d, 0x7d]); // ] }

/** The deepest nesting of arrays/objects in a JSON text (0 for a scalar). */
export function jsonDepth(buf: Uint8Array): number {
  let depth = 0;
  let max = 0;
  let inString = false;
  for (let i = 0; i < buf.length; i++) {
    const c = buf[i]!;
    if (inString) {
      if (c === BACKSLASH) i++;
      else if (c === QUOTE) inString = false;
    } else if (c === QUOTE) inString = true;
    else if (OPEN.has(c)) max = Math.max(max, ++depth);
    else if (CLOSE.has(c)) depth--;
  }
  return max;
}

export class JsonTooDeepError extends Error {
  readonly type = 'entity.too.deep';
  constructor(readonly limit: number) {
    super(`request body is nested deeper than ${limit} levels`);
  }
}

/** body-parser `verify` hook: refuse a body nested deeper than `limit`. */
export function jsonDepthLimit(limit: number) {
  return (_req: IncomingMessage, _res: ServerResponse, buf: Buffer): void => {
    if (jsonDepth(buf) > limit) throw new JsonTooDeepError(limit);
  };
}
