/** @file What the method tests that run whole jobs share: a temp dir with two fixture images, a job context that can cancel, a file's tensors. */
import { before, after } from 'node:test';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../../trainers/backend/index.ts';
import { openSafetensors } from '../../trainers/io/safetensors.ts';
import type { JobContext, JobEvent } from '../../trainers/job.ts';

/** A new temp dir with `images/` holding the orange cat and the green triangle (with `captions`, a `<stem>.txt` each). */
export function tempWithImages(prefix: string, captions?: [string, string]): { tmp: string; images: string } {
  const tmp = mkdtempSync(join(tmpdir(), prefix));
  const images = join(tmp, 'images');
  mkdirSync(images);
  ['01-orange cat.png', 'green_triangle.png'].forEach((f, i) => {
    copyFileSync(join('test/fixtures/images', f), join(images, f));
    if (captions) writeFileSync(join(images, f.replace(/\.png$/, '.txt')), captions[i]!);
  });
  return { tmp, images };
}

/** The suite's backend and temp dir with images (tempWithImages), set up before its tests and removed after. */
export function jobSuite(prefix: string, captions?: [string, string]): { tmp: string; images: string } {
  const suite = { tmp: '', images: '' };
  before(async () => {
    await initBackend();
    Object.assign(suite, tempWithImages(prefix, captions));
  });
  after(() => rmSync(suite.tmp, { recursive: true, force: true }));
  return suite;
}

/** A job context collecting events into `events`; `onEvent` may abort the job (cancel). */
export function ctxFor(events: JobEvent[], onEvent?: (e: JobEvent, abort: () => void) => void): JobContext {
  const controller = new AbortController();
  return { emit: (e) => { events.push(e); onEvent?.(e, () => controller.abort()); }, signal: controller.signal };
}

/** Every tensor of a safetensors file, by name. */
export async function readTensors(path: string): Promise<Map<string, Float32Array>> {
  const f = await openSafetensors(path);
  try {
    return new Map(await Promise.all(f.keys().map(async (k) => [k, await f.read(k)] as const)));
  } finally {
    await f.close();
  }
}
