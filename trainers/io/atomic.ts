/**
 * @file Atomic writes: a temp file in the same folder (a name the webui's folder scans ignore:
 * dot-prefixed, `.sidetrain-tmp` extension), fsync, rename over the target. A reader — the
 * webui refreshing its embeddings list mid-save — sees either nothing or the whole file.
 * An existing target is never replaced unless the caller asked to overwrite.
 */
import { open, rename, rm, stat, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';

export interface WriteOptions {
  /** Replace an existing file (default: refuse with an error naming it). */
  overwrite?: boolean;
}

/** Receives an open handle and writes the content sequentially through `write`. */
export type Writer = (write: (chunk: Uint8Array) => Promise<void>) => Promise<void>;

/** The temp name used for `path` (exported so tests can check nothing is left behind). */
export function tempPathFor(path: string): string {
  return join(dirname(path), `.${basename(path)}.${randomBytes(4).toString('hex')}.sidetrain-tmp`);
}

export async function assertWritable(path: string, options: WriteOptions = {}): Promise<void> {
  const existing = await stat(path).catch(() => undefined);
  if (existing?.isDirectory()) throw new Error(`${path}: is a directory, cannot write a file there`);
  if (existing && !options.overwrite) {
    throw new Error(`${path}: already exists (pass overwrite to replace it)`);
  }
}

/** Write `data` (bytes or a streaming writer) to `path` atomically. */
export async function writeFileAtomic(path: string, data: Uint8Array | Writer, options: WriteOptions = {}): Promise<void> {
  await assertWritable(path, options);
  const tmp = tempPathFor(path);
  let fh: FileHandle | undefined = await open(tmp, 'wx');
  try {
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
    // Re-check right before the rename: another writer may have created the target meanwhile.
    await assertWritable(path, options);
    await rename(tmp, path);
    await syncDir(dirname(path));
  } catch (err) {
    await fh?.close().catch(() => {});
    await rm(tmp, { force: true });
    throw err;
  }
}

/** fsync the folder so the rename itself survives a crash (best effort: not every FS allows it). */
async function syncDir(dir: string): Promise<void> {
  const dh = await open(dir, 'r').catch(() => undefined);
  if (!dh) return;
  await dh.sync().catch(() => {});
  await dh.close();
}
