/**
 * @file The express 5 app (no listen): security checks first, a size-limited JSON body parser,
 * every route of routes.ts with its body/query validated by the schema registry, the OpenAPI
 * document and docs page, the training page (bridge/ui/, when present), and one error handler
 * that answers `{error, errors:[{field, message, text}]}`.
 */
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import express, { type NextFunction, type Request, type Response } from 'express';
import { validate } from '../schemas/index.ts';
import { docsPage, openapi } from './openapi.ts';
import { routes, type RouteDef, type ServerContext } from './routes.ts';
import { originMiddleware, tokenMiddleware, type SecurityOptions } from './security.ts';
import { jsonDepthLimit } from './json-depth.ts';
import { RequestError } from './spec.ts';

export interface AppOptions {
  security: SecurityOptions;
  /** Largest accepted JSON body (express/body-parser syntax). */
  bodyLimit?: string;
  /** The training page's folder; default bridge/ui when it exists. */
  uiDir?: string;
}

/** Deeper JSON than any job needs; a deep body would overflow the validator's stack (500). */
const JSON_DEPTH_LIMIT = 32;

const DEFAULT_UI = fileURLToPath(new URL('./ui/', import.meta.url));


function withoutToken(query: Record<string, unknown>): Record<string, unknown> {
  const { token: _t, ...rest } = query;
  return rest;
}

function validated(def: RouteDef) {
  return (req: Request, _res: Response, next: NextFunction): void => {
    const errors = [
      ...(def.body ? validate(def.body, req.body ?? {}) : []),
      ...(def.query ? validate(def.query, withoutToken(req.query as Record<string, unknown>)) : []),
    ];
    if (errors.length) return next(new RequestError(errors));
    next();
  };
}

function handle(def: RouteDef, ctx: ServerContext) {
  return async (req: Request, res: Response): Promise<void> => {
    const out = await def.handler(req, res, ctx);
    if (res.headersSent) return;
    res.status(res.statusCode !== 200 ? res.statusCode : (def.status ?? 200)).json(out);
  };
}

function errorHandler(err: unknown, _req: Request, res: Response, _next: NextFunction): void {
  if (err instanceof RequestError) {
    res.status(err.status).json({ error: err.message, errors: err.errors });
    return;
  }
  const e = err as { type?: string; status?: number; message?: string; limit?: number };
  if (e.type === 'entity.too.large') {
    res.status(413).json({ error: `request body too large (limit ${e.limit} bytes)` });
  } else if (e.type === 'entity.too.deep') {
    res.status(400).json({ error: e.message });
  } else if (e.type === 'entity.parse.failed') {
    res.status(400).json({ error: `request body is not valid JSON: ${e.message}` });
  } else if (e.status && e.status >= 400 && e.status < 500) {
    res.status(e.status).json({ error: e.message ?? 'bad request' });
  } else {
    res.status(500).json({ error: e.message ?? String(err) });
  }
}

export function createApp(ctx: ServerContext, opts: AppOptions): express.Express {
  const app = express();
  app.disable('x-powered-by');
  app.set('query parser', 'simple');
  app.use(originMiddleware(opts.security));
  app.use((_req, res, next) => {
    res.setHeader('X-Content-Type-Options', 'nosniff');
    res.setHeader('Cache-Control', 'no-store');
    next();
  });
  // Public: the docs page, the chart library and the training page's own files carry no data
  // (the page asks for the token). Whatever none of these handlers answers goes on to the token
  // check below, so a route is public only if it is one of these — however its path is spelled.
  app.get('/docs', (_req, res) => void res.type('html').send(docsPage()));
  app.use('/vendor/uplot', express.static(fileURLToPath(new URL('.', import.meta.resolve('uplot'))), { index: false, fallthrough: true })); // the page's loss chart
  const uiDir = opts.uiDir ?? DEFAULT_UI;
  if (existsSync(uiDir)) app.use(express.static(uiDir, { index: 'index.html', dotfiles: 'deny' }));
  else app.get('/', (_req, res) => void res.redirect('/docs'));
  app.use(tokenMiddleware(opts.security));
  app.use(express.json({ limit: opts.bodyLimit ?? '256kb', verify: jsonDepthLimit(JSON_DEPTH_LIMIT) }));
  for (const def of routes) app[def.method](def.path, validated(def), handle(def, ctx));
  app.get('/api/events', (_req, res) => void res.status(426).json({ error: 'WebSocket only: connect with ws://' }));
  app.get('/api/jobs/:id/events', (_req, res) => void res.status(426).json({ error: 'WebSocket only: connect with ws://' }));
  app.get('/openapi.json', (_req, res) => void res.json(openapi(ctx)));
  app.use((req, _res, next) => next(new RequestError([{ field: '', message: `no route ${req.method} ${req.originalUrl}`, text: `no route ${req.method} ${req.originalUrl}` }], 404)));
  app.use(errorHandler);
  return app;
}
