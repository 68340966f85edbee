/**
 * @file What the webui has: checkpoints, embeddings, hypernetworks, LoRAs — from its API when it is
 * up (so names and hashes are the ones its UI shows), otherwise from the folders on disk.
 */
import { readdir, stat } from 'node:fs/promises';
import { extname, join, relative } from 'node:path';
import type { WebuiClient } from './webui.ts';
import { peekFamily } from '../trainers/io/checkpoint.ts';

export interface WebuiFile {
  name: string;
  path?: string;
  title?: string;
  hash?: string | null;
  loaded?: boolean;
  /** Checkpoints: the family from the file's keys (header only), or 'unsupported: <why>'. */
  family?: string;
  source: 'webui' | 'folder';
}

export interface WebuiFileList {
  items: WebuiFile[];
  webuiUp: boolean;
  folder: string | null;
}

/** Files with one of `exts` under `dir` (the webui scans sub-folders too), depth-limited. */
export async function listFolder(dir: string, exts: string[], depth = 3): Promise<WebuiFile[]> {
  const out: WebuiFile[] = [];
  const walk = async (d: string, left: number): Promise<void> => {
    let entries;
    try {
      entries = await readdir(d, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries.sort((a, b) => a.name.localeCompare(b.name))) {
      const p = join(d, e.name);
      if (e.isDirectory() && left > 0 && !e.name.startsWith('.')) await walk(p, left - 1);
      // users symlink their models into the webui's folders: a link to a file counts as a file
      else if ((e.isFile() || (e.isSymbolicLink() && (await isFileTarget(p)))) && exts.includes(extname(e.name).toLowerCase())) {
        const rel = relative(dir, p);
        out.push({ name: rel.slice(0, rel.length - extname(rel).length).split('\\').join('/').split('/').pop()!, path: p, source: 'folder' });
      }
    }
  };
  await walk(dir, depth);
  return out;
}

async function isFileTarget(p: string): Promise<boolean> {
  try {
    return (await stat(p)).isFile();
  } catch {
    return false; // dangling link
  }
}

async function fromWebui<T>(webui: WebuiClient, fetch: () => Promise<T>): Promise<T | undefined> {
  if (!webui.configured) return undefined;
  try {
    return await fetch();
  } catch {
    return undefined;
  }
}

export async function listModels(webui: WebuiClient, folder: string): Promise<WebuiFileList> {
  const models = await fromWebui(webui, () => webui.sdModels());
  if (models) {
    const items = models.map((m) => ({ name: m.model_name, title: m.title, path: m.filename, hash: m.hash ?? null, source: 'webui' as const }));
    return { webuiUp: true, folder, items: await withFamilies(items) };
  }
  return { webuiUp: false, folder, items: await withFamilies(await listFolder(folder, ['.safetensors', '.ckpt'])) };
}

/** Each checkpoint's family from its header (one file at a time: a folder of .ckpt files is read lazily). */
async function withFamilies(items: WebuiFile[]): Promise<WebuiFile[]> {
  for (const item of items) {
    if (!item.path) continue;
    try {
      item.family = await peekFamily(item.path);
    } catch (err) {
      const why = (err as Error).message.replace(/^.*?: /, '').replace(/ — sidetrain trains.*$/, '');
      item.family = `unsupported: ${why}`;
    }
  }
  return items;
}

export async function listEmbeddings(webui: WebuiClient, folder: string): Promise<WebuiFileList> {
  const e = await fromWebui(webui, () => webui.embeddings());
  if (e) {
    const items = [
      ...e.loaded.map((name) => ({ name, loaded: true, source: 'webui' as const })),
      ...e.skipped.map(({ name }) => ({ name, loaded: false, source: 'webui' as const })),
    ];
    return { webuiUp: true, folder, items };
  }
  return { webuiUp: false, folder, items: await listFolder(folder, ['.pt', '.bin', '.safetensors']) };
}

export async function listHypernetworks(webui: WebuiClient, folder: string): Promise<WebuiFileList> {
  const h = await fromWebui(webui, () => webui.hypernetworks());
  if (h) return { webuiUp: true, folder, items: h.map((x) => ({ name: x.name, path: x.path, source: 'webui' as const })) };
  return { webuiUp: false, folder, items: await listFolder(folder, ['.pt']) };
}

export async function listLoras(webui: WebuiClient, folder: string): Promise<WebuiFileList> {
  const l = await fromWebui(webui, () => webui.loras());
  if (l) return { webuiUp: true, folder, items: l.map((x) => ({ name: x.name, path: x.path, source: 'webui' as const })) };
  return { webuiUp: false, folder, items: await listFolder(folder, ['.safetensors', '.pt', '.ckpt']) };
}
