/**
 * @file The probe process: answers ONE question about a job — its memory/time estimate (which
 * parses the model's header) or its dry-run report (which reads the dataset) — and exits. Forked
 * by bridge/probe.ts with a heap limit, an RSS watch and a deadline, so a model file with a 99 MB
 * header or a 256-megapixel image costs this process, never the server's event loop or memory.
 *
 * IPC in: {op: 'estimate' | 'dryRun', type, spec, methodsModule} · out: {ok: true, result} |
 * {ok: false, message}
 */
import { pathToFileURL } from 'node:url';
import type { MethodEntry } from '../trainers/job.ts';

export interface ProbeRequest {
  op: 'estimate' | 'dryRun';
  type: string;
  spec: Record<string, unknown>;
  methodsModule: string;
}

export type ProbeReply = { ok: true; result: unknown } | { ok: false; message: string };

async function answer(req: ProbeRequest): Promise<unknown> {
  if (req.op === 'estimate') {
    if (typeof req.spec.model === 'string') await checkHeadSplit(req.spec.model);
    const { estimateJob } = await import('../trainers/memory/estimate.ts');
    return await estimateJob(req.type, req.spec);
  }
  const mod = (await import(pathToFileURL(req.methodsModule).href)) as { methods: Record<string, MethodEntry> };
  const entry = Object.hasOwn(mod.methods, req.type) ? mod.methods[req.type] : undefined;
  if (!entry) throw new Error(`unknown job type '${req.type}'`);
  if (!entry.dryRun) throw new Error(`${req.type} jobs have no dry run`);
  const report = await entry.dryRun();
  return await report(req.spec);
}

/**
 * A model whose head split no config gives (a copy without the config beside it) is refused now,
 * naming the file to put beside it, not after the job has started loading it. A file that cannot
 * be opened is left to the estimator, which says why.
 */
async function checkHeadSplit(path: string): Promise<void> {
  const { openCheckpoint } = await import('../trainers/io/checkpoint.ts');
  const { modelConfig } = await import('./model-config.ts');
  const ck = await openCheckpoint(path).catch(() => undefined);
  if (!ck) return;
  try {
    modelConfig(path, ck.family, new Map(ck.source.keys().map((k) => [k, ck.source.info(k).shape] as [string, number[]])));
  } finally {
    await ck.source.close();
  }
}

function reply(msg: ProbeReply): void {
  process.send!(msg, undefined, {}, () => process.exit(0));
}

process.once('message', (req: ProbeRequest) => {
  answer(req).then(
    (result) => reply({ ok: true, result }),
    (err: unknown) => reply({ ok: false, message: err instanceof Error ? err.message : String(err) }),
  );
});
process.on('disconnect', () => process.exit(1));
