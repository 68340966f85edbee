/**
 * @file The route table: path → schemas → handler. It is the single source for both request
 * validation (bridge/app.ts) and the OpenAPI document (bridge/openapi.ts). Body and query schemas
 * are names in the schema registry (schemas/index.ts).
 */
import { existsSync } from 'node:fs';
import { METHODS as ESTIMATED_METHODS } from '../trainers/memory/estimate-methods.ts';
import { checkFits, dryRunInProbe, estimable, estimateInProbe, startSeconds } from './preflight.ts';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Request, Response } from 'express';
import { getSchema, type JobRecord } from '../schemas/index.ts';
import { LOSS_CSV_HEADER } from '../trainers/train/loss-log.ts';
import type { JobManager } from './jobs.ts';
import { RequestError, fieldError, prepareSpec, type Folders } from './spec.ts';
import type { WebuiClient } from './webui.ts';
import type { FolderSource } from './config.ts';
import { requestFolders } from './job-folders.ts';
import { FLAVOUR_NAMES } from './webui-flavours.ts';
import { webgpuStatus } from '../trainers/backend/webgpu/adapter.ts';
import { listEmbeddings, listHypernetworks, listLoras, listModels } from './listings.ts';
import { datasetRoutes } from './dataset-routes.ts';

export interface ServerContext {
  manager: JobManager;
  webui: WebuiClient;
  folders: FolderSource;
  version: string;
}

export interface RouteDef {
  method: 'get' | 'post' | 'delete';
  path: string;
  summary: string;
  tag: string;
  body?: string;
  query?: string;
  /** Response schema for the success status; `text/…` for non-JSON bodies. */
  response?: string;
  status?: number;
  handler(req: Request, res: Response, ctx: ServerContext): Promise<unknown> | unknown;
}

const S = (d: string) => `server#/definitions/${d}`;

function job(ctx: ServerContext, req: Request): JobRecord {
  const j = ctx.manager.get(String(req.params.id));
  if (!j) throw new RequestError([fieldError('/id', `no job '${String(req.params.id)}'`)], 404);
  return j;
}

/** The record as the API shows it: preview URLs added. */
export function present(j: JobRecord): JobRecord {
  return { ...j, previews: j.previews.map((p, i) => ({ ...p, url: `/api/jobs/${j.id}/previews/${i}` })) };
}

/** The estimate runs in the probe process (probe.ts): a model file cannot hold or bloat the server. */
async function estimate(req: Request, _res: Response, ctx: ServerContext): Promise<unknown> {
  const { type } = req.body as { type: string };
  const { spec, folders } = await requestFolders(ctx.folders, req.body);
  const prepared = await prepareSpec(ctx.manager.methods, type, spec, folders);
  if (!estimable(type)) throw new RequestError([fieldError('/type', `has no estimate (estimates exist for ${ESTIMATED_METHODS.join(', ')})`)], 422);
  const e = await estimateInProbe(type, prepared);
  return { ...e, startSeconds: startSeconds(e) };
}

/**
 * Start a job — or, with `dryRun: true`, only its dataset report (nothing loaded, nothing written,
 * no job stored), as the CLI's --dry-run does. A job whose estimate exceeds the machine's memory
 * is refused unless `force` is set.
 */
async function startJob(req: Request, res: Response, ctx: ServerContext): Promise<unknown> {
  const { type, force } = req.body as { type: string; force?: boolean };
  const { spec, webuiDir, folders } = await requestFolders(ctx.folders, req.body);
  const prepared = await prepareSpec(ctx.manager.methods, type, spec, folders);
  if (prepared.dryRun === true) {
    res.status(200).json({ dryRun: true, type, report: await dryRunInProbe(ctx.manager.methodsModule, type, prepared) });
    return undefined;
  }
  await checkFits(type, prepared, force === true);
  return present(await ctx.manager.create(type, spec, webuiDir));
}

/** The webui's URL, whether it answers and which one it is (A1111, Forge, SD.Next). */
async function webuiHealth(webui: WebuiClient): Promise<{ url: string | null; up: boolean; flavour: string | null }> {
  const up = await webui.up();
  const flavour = up ? await webui.flavour() : undefined;
  return { url: webui.url ?? null, up, flavour: flavour ? FLAVOUR_NAMES[flavour] : null };
}

export const routes: RouteDef[] = [
  {
    method: 'get', path: '/api/health', tag: 'server', summary: 'Health, version, TF.js backend, queue and webui status', response: S('Health'),
    handler: async (_req, _res, ctx) => ({
      ok: true, name: 'sidetrain', version: ctx.version, node: process.version, backend: ctx.manager.backend,
      webgpu: await webgpuStatus(), methods: Object.keys(ctx.manager.methods), queue: ctx.manager.counts(),
      webui: await webuiHealth(ctx.webui), folders: { ...(await ctx.folders()) },
    }),
  },
  {
    method: 'get', path: '/api/version', tag: 'server', summary: 'Version and the TF.js backend the last worker used',
    handler: (_req, _res, ctx) => ({ name: 'sidetrain', version: ctx.version, node: process.version, backend: ctx.manager.backend }),
  },
  {
    method: 'get', path: '/api/methods', tag: 'jobs', summary: 'Training methods and their job schemas', response: S('MethodList'),
    handler: async (_req, _res, ctx) => ({
      methods: await Promise.all(Object.entries(ctx.manager.methods).map(async ([type, m]) => {
        // what the webui cannot use at all (a hypernetwork on Forge or SD.Next), said where the method is picked
        const webuiNote = m.outputKind && ctx.webui.configured ? await ctx.webui.unusable(m.outputKind) : undefined;
        return { type, schema: m.schema, jsonSchema: getSchema(m.schema), ...(m.outputKind ? { outputKind: m.outputKind } : {}), ...(webuiNote ? { webuiNote } : {}) };
      })),
    }),
  },
  {
    method: 'post', path: '/api/jobs', tag: 'jobs', summary: 'Start a job (queued if another is running); with spec.dryRun only its dataset report; refused (422) when its estimate exceeds the memory, unless force', body: S('StartJobRequest'), response: 'job', status: 201,
    handler: startJob,
  },
  {
    method: 'get', path: '/api/jobs', tag: 'jobs', summary: 'List jobs, newest first', query: S('ListJobsQuery'), response: S('JobList'),
    handler: (req, _res, ctx) => {
      const { state, limit } = req.query as { state?: string; limit?: string };
      const jobs = ctx.manager.list().filter((j) => !state || j.state === state);
      return { jobs: jobs.slice(0, limit ? Number(limit) : undefined).map(present) };
    },
  },
  {
    method: 'get', path: '/api/jobs/:id', tag: 'jobs', summary: "One job's state", response: 'job',
    handler: (req, _res, ctx) => present(job(ctx, req)),
  },
  {
    method: 'post', path: '/api/jobs/:id/cancel', tag: 'jobs', summary: 'Cancel: a queued job at once, a running one after its current step (it saves)', response: 'job',
    handler: async (req, _res, ctx) => present(await ctx.manager.cancel(job(ctx, req).id)),
  },
  {
    method: 'post', path: '/api/jobs/:id/resume', tag: 'jobs', summary: 'Resume a failed, cancelled or interrupted job from its last snapshot', response: 'job',
    handler: async (req, _res, ctx) => present(await ctx.manager.resume(job(ctx, req).id)),
  },
  {
    method: 'delete', path: '/api/jobs/:id', tag: 'jobs', summary: "Forget a job (its outputs stay)", status: 204,
    handler: async (req, res, ctx) => {
      await ctx.manager.delete(job(ctx, req).id);
      res.status(204).end();
    },
  },
  {
    method: 'get', path: '/api/jobs/:id/previews', tag: 'jobs', summary: "A job's preview images (URLs)",
    handler: (req, _res, ctx) => ({ previews: present(job(ctx, req)).previews }),
  },
  {
    method: 'get', path: '/api/jobs/:id/previews/:index', tag: 'jobs', summary: 'One preview image', response: 'image/png',
    handler: async (req, res, ctx) => {
      const p = job(ctx, req).previews[Number(req.params.index)];
      if (!p || !/^\d+$/.test(String(req.params.index))) throw new RequestError([fieldError('/index', 'no such preview')], 404);
      // Paths come from the job's own events (never from the request).
      res.type(p.path.split('.').pop() ?? 'png').send(await readFile(p.path));
    },
  },
  {
    method: 'get', path: '/api/jobs/:id/loss.csv', tag: 'jobs', summary: "A job's loss log as the training loop writes it: step,epoch,epoch_step,loss,learn_rate", response: 'text/csv',
    handler: async (req, res, ctx) => {
      // the loop's own file (train/loss-log.ts), as written: every step, once
      const file = job(ctx, req).lossLog;
      res.type('text/csv').send(file && existsSync(file) ? await readFile(file) : LOSS_CSV_HEADER);
    },
  },
  {
    method: 'get', path: '/api/jobs/:id/log', tag: 'jobs', summary: "A job's events as text (or ?format=jsonl)", response: 'text/plain',
    handler: async (req, res, ctx) => {
      const dir = ctx.manager.store.jobDir(job(ctx, req).id);
      const read = async (f: string) => (existsSync(join(dir, f)) ? await readFile(join(dir, f), 'utf8') : '');
      const events = await read('events.jsonl');
      if (req.query.format === 'jsonl') return res.type('application/x-ndjson').send(events);
      res.type('text/plain').send(formatLog(events) + (await read('worker.log')));
    },
  },
  {
    method: 'post', path: '/api/estimate', tag: 'jobs', summary: 'Memory and time estimate for a job before it starts', body: S('StartJobRequest'),
    handler: estimate,
  },
  {
    method: 'get', path: '/api/webui/models', tag: 'webui', summary: "The webui's checkpoints (from its API, else its folder)", response: S('WebuiFileList'),
    handler: async (_req, _res, ctx) => listModels(ctx.webui, (await ctx.folders()).checkpoints),
  },
  {
    method: 'get', path: '/api/webui/embeddings', tag: 'webui', summary: "The webui's embeddings (loaded/skipped when it is up)", response: S('WebuiFileList'),
    handler: async (_req, _res, ctx) => listEmbeddings(ctx.webui, (await ctx.folders()).embeddings),
  },
  {
    method: 'get', path: '/api/webui/hypernetworks', tag: 'webui', summary: "The webui's hypernetworks", response: S('WebuiFileList'),
    handler: async (_req, _res, ctx) => listHypernetworks(ctx.webui, (await ctx.folders()).hypernetworks),
  },
  {
    method: 'get', path: '/api/webui/loras', tag: 'webui', summary: "The webui's LoRAs", response: S('WebuiFileList'),
    handler: async (_req, _res, ctx) => listLoras(ctx.webui, (await ctx.folders()).lora),
  },
  ...datasetRoutes,
];

/** One line per event, for people. */
export function formatLog(jsonl: string): string {
  return jsonl
    .split('\n')
    .filter(Boolean)
    .map((line) => {
      const e = JSON.parse(line) as Record<string, unknown>;
      const { time, type, jobId: _j, seq: _s, ...rest } = e;
      const text =
        type === 'step'
          ? `step ${rest.step}/${rest.totalSteps} loss ${Number(rest.loss).toFixed(5)} lr ${rest.learnRate} ${Number(rest.itPerSec).toFixed(2)} it/s eta ${Math.round(Number(rest.etaSeconds))}s`
          : typeof rest.message === 'string'
            ? `${rest.level ?? rest.action ?? ''} ${rest.message}`.trim()
            : JSON.stringify(rest);
      return `${time} [${type}] ${text}\n`;
    })
    .join('');
}
