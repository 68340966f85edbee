/**
 * @file The filename word regex (webui setting "Filename word regex") compiled for RE2 (re2js,
 * pure JS, linear time). It is the user's own pattern, so it must not run on V8's backtracking
 * engine, where `(a|a)+$` on a long file name hangs the worker. Kept apart from dataset.ts so the
 * server can check the regex at submission without loading TF.js.
 */
import { RE2JS } from 're2js';

/** Compile a filename word regex, or throw saying why (unsupported syntax, too many groups). */
export function compileWordRegex(wordRegex: string): RE2JS {
  let re: RE2JS;
  try {
    re = RE2JS.compile(wordRegex);
  } catch (err) {
    throw new Error(`filename word regex '${wordRegex}' is not valid RE2 syntax (no look-arounds or back-references): ${(err as Error).message}`);
  }
  if (re.groupCount() > 1) throw new Error(`filename word regex '${wordRegex}' has ${re.groupCount()} groups; use at most one`);
  return re;
}
