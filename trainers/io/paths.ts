/**
 * @file Paths that come from requests: names sanitised as the webui does, output paths kept inside
 * the configured output folders, dataset folders checked. Everything a request names is resolved
 * here before a worker ever sees it, so a job cannot write outside the webui's folders.
 */
import { constants } from 'node:fs';
import { access, lstat, readdir, readlink, realpath, stat } from 'node:fs/promises';
import { basename, dirname, isAbsolute, relative, resolve, sep } from 'node:path';

/** A request problem tied to a field; the server turns it into a 400 naming the field. */
export class PathError extends Error {
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(message);
  }
}

/**
 * The webui's rule for embedding and hypernetwork names
 * (modules/textual_inversion/textual_inversion.py create_embedding, hypernetwork.py
 * create_hypernetwork: `"".join(x for x in name if x.isalnum() or x in "._- ")`). Python's
 * isalnum is Unicode-aware, so "café" or "猫" are names the webui makes and lists (letters with
 * their combining marks, digits); path characters, controls and symbols are still removed.
 */
export function sanitizeName(name: string): string {
  return name.replace(/[^\p{L}\p{M}\p{N}._\- ]/gu, '');
}

/** Throw unless `name` is already what sanitizeName makes of it and is a usable file stem. */
export function checkName(name: string, field = '/name'): string {
  const clean = sanitizeName(name).trim();
  if (name !== clean || clean === '' || /^\.+$/.test(clean)) {
    const hint = clean && !/^\.+$/.test(clean) ? ` (did you mean '${clean}'?)` : '';
    throw new PathError(field, `must contain only letters, digits, '.', '_', '-' and spaces${hint}`);
  }
  return clean;
}

/** Linux's NAME_MAX and PATH_MAX, in bytes: a longer path fails only when a job writes it. */
const NAME_MAX = 255;
const PATH_MAX = 4095;

/** No NUL bytes, no component over NAME_MAX bytes, the whole under PATH_MAX. */
export function checkPathText(value: string, field: string): void {
  if (value.includes('\0')) throw new PathError(field, 'contains a NUL byte');
  if (Buffer.byteLength(value) > PATH_MAX) throw new PathError(field, `is ${Buffer.byteLength(value)} bytes long; a path may have at most ${PATH_MAX}`);
  const long = value.split(/[\\/]/).find((part) => Buffer.byteLength(part) > NAME_MAX);
  if (long !== undefined) throw new PathError(field, `has a folder or file name of ${Buffer.byteLength(long)} bytes ('${long.slice(0, 24)}…'); the file system allows at most ${NAME_MAX}`);
}

function isInside(root: string, target: string): boolean {
  const rel = relative(root, target);
  return rel === '' || (!rel.startsWith(`..${sep}`) && rel !== '..' && !isAbsolute(rel));
}

/**
 * realpath of the deepest existing ancestor of `p`, with the missing tail appended. A dangling
 * symlink is followed by hand (realpath fails on it, yet writing through it would land at its
 * target).
 */
async function realpathPartial(p: string): Promise<string> {
  let existing = p;
  const tail: string[] = [];
  for (let hops = 0; hops < 64; hops++) {
    try {
      return resolve(await realpath(existing), ...[...tail].reverse());
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      const st = await lstat(existing).catch(() => undefined);
      if (st?.isSymbolicLink()) {
        existing = resolve(dirname(existing), await readlink(existing));
        continue;
      }
      const parent = dirname(existing);
      if (parent === existing) return p;
      tail.push(basename(existing));
      existing = parent;
    }
  }
  throw new PathError('', `too many symlinks resolving ${p}`);
}

/**
 * Join relative `parts` under `root` and prove the result stays inside it: no NUL bytes, no
 * absolute parts, no `..` escapes, and no symlink on the way (or at the target) that leads out
 * (checked with realpath). Returns the absolute path (not realpath'd).
 */
export async function safeJoin(root: string, ...parts: string[]): Promise<string> {
  for (const part of parts) {
    if (part.includes('\0')) throw new PathError('', 'path contains a NUL byte');
    if (isAbsolute(part)) throw new PathError('', `'${part}' must be a relative path`);
  }
  const base = resolve(root);
  const target = resolve(base, ...parts);
  if (!isInside(base, target)) throw new PathError('', `'${parts.join('/')}' leaves ${base}`);
  const realBase = await realpathPartial(base);
  if (!isInside(realBase, await realpathPartial(target))) {
    throw new PathError('', `'${parts.join('/')}' leads outside ${base} through a symlink`);
  }
  return target;
}

/**
 * An output folder named by a request: absolute, or relative to the first root. It must lie
 * inside one of `roots` (after symlinks). Returns the absolute path.
 */
export async function resolveOutputDir(value: string, roots: string[], field: string): Promise<string> {
  checkPathText(value, field);
  const candidates = isAbsolute(value) ? roots.filter((r) => isInside(resolve(r), resolve(value))) : roots.slice(0, 1);
  for (const root of candidates) {
    try {
      return await safeJoin(root, relative(resolve(root), resolve(root, value)));
    } catch {
      /* try the next root */
    }
  }
  throw new PathError(field, `must be inside the configured output folder${roots.length > 1 ? 's' : ''} (${roots.join(', ')})`);
}

/** A dataset path must be a folder we can list and read. Returns the absolute path. */
export async function checkReadableDir(value: string, field: string): Promise<string> {
  checkPathText(value, field);
  const p = resolve(value);
  try {
    if (!(await stat(p)).isDirectory()) throw new PathError(field, `'${value}' is not a folder`);
    await access(p, constants.R_OK | constants.X_OK);
    await readdir(p);
  } catch (err) {
    if (err instanceof PathError) throw err;
    throw new PathError(field, `'${value}' is not a readable folder (${(err as NodeJS.ErrnoException).code ?? err})`);
  }
  return p;
}

/** A model file must exist and be a regular readable file (not a folder, device or fifo). */
export async function checkReadableFile(value: string, field: string, searchDirs: string[] = []): Promise<string> {
  checkPathText(value, field);
  const candidates = isAbsolute(value) ? [value] : [resolve(value), ...searchDirs.map((d) => resolve(d, value))];
  for (const p of candidates) {
    try {
      const st = await stat(p);
      if (!st.isFile()) continue;
      await access(p, constants.R_OK);
      return p;
    } catch {
      /* next */
    }
  }
  throw new PathError(field, `'${value}' is not a readable file`);
}

