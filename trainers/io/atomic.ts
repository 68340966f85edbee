/**
 * @file Atomic writes: a temp file in the same folder (a name the webui's folder scans ignore:
 * dot-prefixed, `.sidetrain-tmp` extension), fsync, rename over the target. A reader — the
 * webui refreshing its embeddings list mid-save — sees either nothing or the whole file.
 * An existing target is never replaced unless the caller asked to overwrite.
 *
 * Files that belong together (an embedding and its `.optim`) are written inside `atomicGroup`:
 * every temp is written first, and only when all are complete are they renamed into place, the
 * first written first — so a full disk leaves none of them, and the main output, written last,
 * exists only beside its side files. A write killed mid-way (SIGKILL, a crash) leaves its temp;
 * the next write into that folder removes the temps of processes that are gone. Every error
 * names the file it is about (`ENOSPC` alone never did).
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { open, readdir, rename, rm, stat, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';

export interface WriteOptions {
  /** Replace an existing file (default: refuse with an error naming it). */
  overwrite?: boolean;
}

/** Receives an open handle and writes the content sequentially through `write`. */
export type Writer = (write: (chunk: Uint8Array) => Promise<void>) => Promise<void>;

const TEMP_SUFFIX = '.sidetrain-tmp';
/** `.<name>.<pid>.<hex>.sidetrain-tmp`; older versions wrote `.<name>.<hex>.sidetrain-tmp`. */
const TEMP_RE = /^\..+\.(\d+)\.[0-9a-f]{8}\.sidetrain-tmp$/;
const OLD_TEMP_RE = /^\..+\.[0-9a-f]{8}\.sidetrain-tmp$/;
/** A temp without a pid is someone's only when it is this fresh. */
const UNOWNED_TEMP_AGE_MS = 60 * 60 * 1000;

/** The temp name used for `path` (exported so tests can check nothing is left behind). */
export function tempPathFor(path: string): string {
  return join(dirname(path), `.${basename(path)}.${process.pid}.${randomBytes(4).toString('hex')}${TEMP_SUFFIX}`);
}

/** Is `name` one of our temp files? */
export const isTempName = (name: string): boolean => name.endsWith(TEMP_SUFFIX) && OLD_TEMP_RE.test(name);

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

const cleaned = new Set<string>();

/**
 * Remove the temps a killed write left in `dir`: those of processes that no longer run (and
 * old pid-less ones). Once per folder per process; returns the names removed.
 */
export async function cleanStaleTemps(dir: string): Promise<string[]> {
  if (cleaned.has(dir)) return [];
  cleaned.add(dir);
  const removed: string[] = [];
  for (const name of await readdir(dir).catch(() => [] as string[])) {
    if (!isTempName(name)) continue;
    const m = TEMP_RE.exec(name);
    const pid = m ? Number(m[1]) : undefined;
    if (pid === process.pid || (pid !== undefined && alive(pid))) continue;
    if (pid === undefined) {
      const st = await stat(join(dir, name)).catch(() => undefined);
      if (!st || Date.now() - st.mtimeMs < UNOWNED_TEMP_AGE_MS) continue;
    }
    await rm(join(dir, name), { force: true });
    removed.push(name);
  }
  return removed;
}

/** `err` with `path` in its message (and its code kept), unless it names it already. */
export function namingFile(err: unknown, path: string): Error {
  const e = err instanceof Error ? err : new Error(String(err));
  if (e.message.includes(path)) return e;
  const named = new Error(`${path}: ${e.message}`, { cause: e });
  (named as NodeJS.ErrnoException).code = (e as NodeJS.ErrnoException).code;
  return named;
}

export async function assertWritable(path: string, options: WriteOptions = {}): Promise<void> {
  const existing = await stat(path).catch(() => undefined);
  if (existing?.isDirectory()) throw new Error(`${path}: is a directory, cannot write a file there`);
  if (existing && !options.overwrite) {
    throw new Error(`${path}: already exists (pass overwrite to replace it)`);
  }
}

interface Pending {
  tmp: string;
  path: string;
  options: WriteOptions;
}

const group = new AsyncLocalStorage<Pending[]>();

/**
 * Where `path`'s content is right now: its temp while it waits in the current group (a side file
 * that hashes its main file reads it there), else `path` itself.
 */
export function pendingPath(path: string): string {
  return group.getStore()?.find((p) => p.path === path)?.tmp ?? path;
}

/**
 * Run `fn`; every writeFileAtomic inside it lands together when it returns (renamed in the
 * order written, and the file `main(result)` names last, so the main output never stands without
 * its side files) or not at all when it throws. Nested groups join the outer one.
 */
export async function atomicGroup<T>(fn: () => Promise<T>, main?: (result: T) => string | undefined): Promise<T> {
  if (group.getStore()) return fn();
  const pending: Pending[] = [];
  let result: T;
  try {
    result = await group.run(pending, fn);
    const last = main?.(result);
    pending.sort((a, b) => Number(a.path === last) - Number(b.path === last)); // stable: the rest keep their order
    for (const p of pending) await assertWritable(p.path, p.options);
  } catch (err) {
    await Promise.all(pending.map((p) => rm(p.tmp, { force: true })));
    throw err;
  }
  for (let i = 0; i < pending.length; i++) {
    const p = pending[i]!;
    try {
      await rename(p.tmp, p.path);
    } catch (err) {
      await Promise.all(pending.slice(i).map((q) => rm(q.tmp, { force: true })));
      throw namingFile(err, p.path);
    }
  }
  for (const dir of new Set(pending.map((p) => dirname(p.path)))) await syncDir(dir);
  return result;
}

/** Write `data` (bytes or a streaming writer) to `path` atomically. */
export async function writeFileAtomic(path: string, data: Uint8Array | Writer, options: WriteOptions = {}): Promise<void> {
  await assertWritable(path, options);
  await cleanStaleTemps(dirname(path));
  const tmp = tempPathFor(path);
  let fh: FileHandle | undefined;
  try {
    fh = await open(tmp, 'wx');
    let position = 0;
    const write = async (chunk: Uint8Array): Promise<void> => {
      let done = 0;
      while (done < chunk.length) {
        const { bytesWritten } = await fh!.write(chunk, done, chunk.length - done, position);
        done += bytesWritten;
        position += bytesWritten;
      }
    };
    if (data instanceof Uint8Array) await write(data);
    else await data(write);
    await fh.sync();
    await fh.close();
    fh = undefined;
    const pending = group.getStore();
    if (pending) {
      // renamed when the group ends; a second write of the same file in the group replaces the first
      const earlier = pending.findIndex((p) => p.path === path);
      if (earlier >= 0) await rm(pending.splice(earlier, 1)[0]!.tmp, { force: true });
      pending.push({ tmp, path, options });
      return;
    }
    // Re-check right before the rename: another writer may have created the target meanwhile.
    await assertWritable(path, options);
    await rename(tmp, path);
    await syncDir(dirname(path));
  } catch (err) {
    await fh?.close().catch(() => {});
    await rm(tmp, { force: true });
    throw namingFile(err, path);
  }
}

/** fsync the folder so the rename itself survives a crash (best effort: not every FS allows it). */
async function syncDir(dir: string): Promise<void> {
  const dh = await open(dir, 'r').catch(() => undefined);
  if (!dh) return;
  await dh.sync().catch(() => {});
  await dh.close();
}
