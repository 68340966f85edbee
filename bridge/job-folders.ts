/**
 * @file A job request's own webui folder: `webuiDir` beside `type` and `spec` (or `spec.webuiDir`,
 * as in a CLI job file, so one file serves `sidetrain train --config` and `POST /api/jobs`). It
 * is checked as `--webui-dir` is (it exists and looks like a webui) before anything else, and
 * means that webui's folders for this job; folders the server was given explicitly still win,
 * and every output path is then held inside them by prepareSpec, as always.
 */
import { checkWebuiDir, type FolderSource } from './config.ts';
import { RequestError, fieldError, type Folders } from './spec.ts';

export interface RequestFolders {
  /** The spec without `webuiDir`. */
  spec: Record<string, unknown>;
  /** Absolute, checked; undefined: the server's folders. */
  webuiDir?: string;
  folders: Folders;
}

/** Check a webui folder named by a request (or kept by a job being resumed); 400 naming `field`. */
export async function checkedWebuiDir(dir: unknown, field: string): Promise<string> {
  if (typeof dir !== 'string' || !dir) throw new RequestError([fieldError(field, 'must be the folder a webui is installed in')]);
  try {
    return await checkWebuiDir(dir, 'folder');
  } catch (err) {
    throw new RequestError([fieldError(field, (err as Error).message)]);
  }
}

/** The folders a request's job writes to, and its spec without `webuiDir`. */
export async function requestFolders(source: FolderSource, body: { webuiDir?: unknown; spec?: Record<string, unknown> }): Promise<RequestFolders> {
  const spec = { ...(body.spec ?? {}) };
  const inSpec = 'webuiDir' in spec;
  const named = body.webuiDir ?? spec.webuiDir;
  delete spec.webuiDir;
  if (named === undefined) return { spec, folders: await source() };
  const webuiDir = await checkedWebuiDir(named, body.webuiDir === undefined && inSpec ? '/spec/webuiDir' : '/webuiDir');
  return { spec, webuiDir, folders: await source(webuiDir) };
}
