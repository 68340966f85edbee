/**
 * @file The OpenAPI 3.1 document, generated from the route table (routes.ts) and the same JSON
 * Schemas that validate requests (schemas/*.json), plus a small docs page that renders it.
 * Every schema file becomes `#/components/schemas/<stem>`; refs between files are rewritten.
 */
import { allSchemas } from '../schemas/index.ts';
import { routes, type ServerContext } from './routes.ts';

type Json = Record<string, unknown>;

/** Rewrite `$ref`s of schema file `stem` to point into components/schemas. */
function rewriteRefs(node: unknown, stem: string): unknown {
  if (Array.isArray(node)) return node.map((n) => rewriteRefs(n, stem));
  if (!node || typeof node !== 'object') return node;
  const out: Json = {};
  for (const [k, v] of Object.entries(node as Json)) {
    if (k === '$id' || k === '$schema') continue;
    out[k] = k === '$ref' && typeof v === 'string' ? refToComponent(v, stem) : rewriteRefs(v, stem);
  }
  return out;
}

/** `#/definitions/X` (in file stem), `job.json`, `server.json#/definitions/X`, `server#/…`. */
export function refToComponent(ref: string, stem: string): string {
  const [file, pointer = ''] = ref.split('#', 2) as [string, string | undefined];
  const target = file ? file.replace(/\.json$/, '').split('/').pop()! : stem;
  return `#/components/schemas/${target}${pointer}`;
}

function content(schema: string | undefined): Json | undefined {
  if (!schema) return undefined;
  if (schema.includes('/') && !schema.includes('#')) return { [schema]: { schema: { type: 'string' } } };
  return { 'application/json': { schema: { $ref: refToComponent(schema, '') } } };
}

/** POST /api/jobs documents one body shape per registered method. */
function startJobBody(ctx: ServerContext): Json {
  const variants = Object.entries(ctx.manager.methods).map(([type, m]) => ({
    type: 'object',
    required: ['type', 'spec'],
    properties: { type: { const: type }, spec: { $ref: `#/components/schemas/${m.schema}` } },
  }));
  const schema = variants.length ? { oneOf: variants } : { $ref: refToComponent('server#/definitions/StartJobRequest', '') };
  return { required: true, content: { 'application/json': { schema } } };
}

function operation(def: (typeof routes)[number], ctx: ServerContext): Json {
  const params = [...def.path.matchAll(/:(\w+)/g)].map((m) => ({ name: m[1], in: 'path', required: true, schema: { type: 'string' } }));
  const status = String(def.status ?? 200);
  const op: Json = {
    summary: def.summary,
    tags: [def.tag],
    parameters: params,
    responses: {
      [status]: { description: 'OK', ...(status === '204' ? {} : { content: content(def.response) ?? { 'application/json': {} } }) },
      '4XX': { description: 'Bad request; `errors` names each field', content: content('server#/definitions/Error') },
    },
  };
  if (def.query) {
    const q = allSchemas().server?.definitions as Json | undefined;
    const props = ((q?.[def.query.split('/').pop()!] as Json | undefined)?.properties ?? {}) as Json;
    for (const [name, schema] of Object.entries(props)) (op.parameters as Json[]).push({ name, in: 'query', schema });
  }
  if (def.body) op.requestBody = def.path === '/api/jobs' ? startJobBody(ctx) : { required: true, content: content(def.body) };
  return op;
}

export function openapi(ctx: ServerContext): Json {
  const paths: Json = {};
  for (const def of routes) {
    const path = def.path.replace(/:(\w+)/g, '{$1}');
    paths[path] = { ...(paths[path] as Json | undefined), [def.method]: operation(def, ctx) };
  }
  const ws = 'WebSocket upgrade (ws://). Sends a `state` message first, then events as server#/definitions/EventEnvelope. Token: Authorization header, ?token= or subprotocol `bearer.<token>`.';
  paths['/api/events'] = { get: { summary: 'All jobs\' events over WebSocket', description: ws, tags: ['events'], responses: { '101': { description: 'Switching Protocols' } } } };
  paths['/api/jobs/{id}/events'] = {
    get: {
      summary: "One job's events over WebSocket", description: ws, tags: ['events'],
      parameters: [{ name: 'id', in: 'path', required: true, schema: { type: 'string' } }],
      responses: { '101': { description: 'Switching Protocols' } },
    },
  };
  const schemas = Object.fromEntries(Object.entries(allSchemas()).map(([stem, s]) => [stem, rewriteRefs(s, stem)]));
  return {
    openapi: '3.1.0',
    info: { title: 'sidetrain', version: ctx.version, description: 'Training sidecar for AUTOMATIC1111-compatible webuis. With SIDETRAIN_TOKEN set, send `Authorization: Bearer <token>`.' },
    servers: [{ url: '/' }],
    components: { schemas, securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
    security: [{ bearer: [] }, {}],
    paths,
  };
}

/** A dependency-free docs page: fetches /openapi.json (asking for the token on 401) and lists it. */
export function docsPage(): string {
  return `<!doctype html><meta charset="utf-8"><title>sidetrain API</title>
<style>body{font:14px system-ui;max-width:60em;margin:2em auto;padding:0 1em}code,pre{background:#f4f4f4}
h3{margin-bottom:.2em}.m{display:inline-block;width:4.5em;font-weight:bold}pre{padding:.5em;overflow:auto;max-height:20em}</style>
<h1>sidetrain API</h1><p>Raw document: <a href="/openapi.json">/openapi.json</a></p><div id="out">loading…</div>
<script type="module">
const out = document.getElementById('out');
async function load(token) {
  const r = await fetch('/openapi.json', token ? { headers: { Authorization: 'Bearer ' + token } } : {});
  if (r.status === 401) { const t = prompt('sidetrain token'); if (t) { sessionStorage.token = t; return load(t); } }
  const doc = await r.json(); out.textContent = '';
  for (const [path, ops] of Object.entries(doc.paths)) for (const [m, op] of Object.entries(ops)) {
    const h = document.createElement('h3'); h.innerHTML = '<span class="m"></span><code></code>';
    h.firstChild.textContent = m.toUpperCase(); h.lastChild.textContent = path; out.append(h);
    const p = document.createElement('p'); p.textContent = op.summary + (op.description ? ' — ' + op.description : ''); out.append(p);
    if (op.requestBody) { const pre = document.createElement('pre'); pre.textContent = JSON.stringify(op.requestBody.content['application/json'].schema, null, 1); out.append(pre); }
  }
  const s = document.createElement('details'); s.innerHTML = '<summary>Schemas</summary><pre></pre>';
  s.querySelector('pre').textContent = JSON.stringify(doc.components.schemas, null, 1); out.append(s);
}
load(sessionStorage.token);
</script>`;
}
