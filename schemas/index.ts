/**
 * @file The schema registry: every `schemas/*.json` file, loaded once into ONE Ajv 8 instance
 * (+ ajv-formats). The CLI, the server and the UI validate with `validate(name, data)` and get
 * errors that name the field (`/steps must be >= 1`), so a message can be shown next to it.
 *
 * Names: a file stem (`textual-inversion`), or a stem plus a JSON pointer into it
 * (`server#/definitions/StartJobRequest`). Defaults from the schema are filled into `data`
 * (Ajv `useDefaults`), so a validated job spec carries the webui Train-tab defaults.
 *
 * Example:
 *   const errors = validate('textual-inversion', spec);
 *   if (errors.length) throw new Error(errors.map((e) => e.text).join('; '));
 */
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Ajv, type AnySchemaObject, type ErrorObject, type ValidateFunction } from 'ajv';
import addFormatsModule from 'ajv-formats';
import { RE2JS } from 're2js';
import type { JobEvent } from '../trainers/job.ts';
import type { JobSpecs } from './types.ts';

export type * from './types.ts';

// ajv-formats is CommonJS; under NodeNext its default import is the module object.
const addFormats = ((addFormatsModule as unknown as { default?: unknown }).default ??
  addFormatsModule) as unknown as (ajv: Ajv) => Ajv;

export const SCHEMA_DIR = dirname(fileURLToPath(import.meta.url));

/** One validation problem, already phrased for a person. */
export interface FieldError {
  /** JSON pointer of the offending field (`/steps`, `/spec/name`); `` for the whole object. */
  field: string;
  /** What is wrong with it (`must be >= 1`). */
  message: string;
  /** `field message`, e.g. `/steps must be >= 1`. */
  text: string;
}

/**
 * Longest string a schema `pattern` is run on. With `allErrors`, Ajv runs `pattern` even after
 * `maxLength` failed, so the pattern must be safe on anything under the body limit: strings past
 * this are refused unseen (every patterned field has a maxLength well below it).
 */
export const PATTERN_INPUT_LIMIT = 4096;

/**
 * Schema patterns run on RE2 (re2js, pure JS): linear time whatever the pattern and input, so a
 * request cannot hold the event loop with a backtracking regex (`"1"×250000 + "x"` against the
 * lr schedule pattern took 246 s on V8's engine).
 */
function linearRegExp() {
  const engine = (pattern: string): { test(s: string): boolean; toString(): string } => {
    const re = RE2JS.compile(pattern);
    // toString is Ajv's cache key for a compiled pattern: it must differ per pattern.
    return { test: (s: string) => s.length <= PATTERN_INPUT_LIMIT && re.test(s), toString: () => `re2:${pattern}` };
  };
  return Object.assign(engine, { code: 'linearRegExp' });
}

/**
 * `strict: false` because schema authors may add annotations (`x-sidetrain`, `examples`, UI
 * hints); `useDefaults` so specs are complete after validation; `allErrors` so a form can show
 * every bad field at once.
 */
export const ajv = new Ajv({ allErrors: true, useDefaults: true, strict: false, discriminator: true, verbose: true, code: { regExp: linearRegExp() } });
addFormats(ajv);

const loaded = new Map<string, AnySchemaObject>();
const compiled = new Map<string, ValidateFunction>();

/** Register a schema under a name (used for schemas/*.json and by tests/stub registries). */
export function addSchema(name: string, schema: AnySchemaObject): void {
  if (loaded.has(name)) return;
  const copy = structuredClone(schema) as AnySchemaObject;
  // Draft 2020-12 and draft-07 differ little for our schemas; the meta-schema URI would make the
  // draft-07 instance refuse the file, so it is dropped (the keywords still validate).
  delete copy.$schema;
  copy.$id ??= `${name}.json`;
  ajv.addSchema(copy, name);
  loaded.set(name, copy);
}

/** Load every schemas/*.json (idempotent). */
export function loadSchemas(dir = SCHEMA_DIR): void {
  for (const file of readdirSync(dir).sort()) {
    if (!file.endsWith('.json')) continue;
    const name = file.slice(0, -'.json'.length);
    addSchema(name, JSON.parse(readFileSync(join(dir, file), 'utf8')) as AnySchemaObject);
  }
}

/** The schema object registered under `name` (a stem), or undefined. */
export function getSchema(name: string): AnySchemaObject | undefined {
  loadSchemas();
  return loaded.get(name);
}

/** Every registered schema by name (for the OpenAPI document and UI forms). */
export function allSchemas(): Record<string, AnySchemaObject> {
  loadSchemas();
  return Object.fromEntries(loaded);
}

function validatorFor(name: string): ValidateFunction {
  loadSchemas();
  let fn = compiled.get(name);
  if (fn) return fn;
  const [stem, pointer] = name.split('#', 2) as [string, string | undefined];
  const base = loaded.get(stem);
  if (!base) throw new Error(`schema '${stem}' not found; known: ${[...loaded.keys()].join(', ')}`);
  fn = pointer ? ajv.getSchema(`${base.$id as string}#${pointer}`) : ajv.getSchema(stem);
  if (!fn) throw new Error(`schema '${name}' not found`);
  compiled.set(name, fn);
  return fn;
}

/** Turn Ajv errors into field-named messages; `prefix` is prepended to every field. */
export function formatErrors(errors: ErrorObject[] | null | undefined, prefix = ''): FieldError[] {
  const out: FieldError[] = [];
  for (const e of errors ?? []) {
    let field = prefix + e.instancePath;
    let message = e.message ?? 'is invalid';
    if (e.keyword === 'required') {
      field += `/${(e.params as { missingProperty: string }).missingProperty}`;
      message = 'is required';
    } else if (e.keyword === 'additionalProperties') {
      field += `/${(e.params as { additionalProperty: string }).additionalProperty}`;
      message = 'is not a known field';
    } else if (e.keyword === 'pattern' && typeof e.parentSchema?.['x-pattern-message'] === 'string') {
      message = e.parentSchema['x-pattern-message']; // a regex is no help to a person
    } else if (e.keyword === 'enum') {
      message += `: ${(e.params as { allowedValues: unknown[] }).allowedValues.map((v) => JSON.stringify(v)).join(', ')}`;
    }
    if (out.some((o) => o.field === field && o.message === message)) continue;
    out.push({ field, message, text: `${field || '/'} ${message}` });
  }
  return out;
}

/**
 * Validate `data` against schema `name`; returns [] when valid. Fills schema defaults into
 * `data` in place. `prefix` names where `data` sits in a larger body (e.g. `/spec`).
 */
export function validate(name: string, data: unknown, prefix = ''): FieldError[] {
  const fn = validatorFor(name);
  return fn(data) ? [] : formatErrors(fn.errors, prefix);
}

/** Like validate() but throws one Error listing every problem. */
export function assertValid(name: string, data: unknown): void {
  const errors = validate(name, data);
  if (errors.length) throw new Error(errors.map((e) => e.text).join('; '));
}

/**
 * A job spec as the trainers take it (schemas/types.ts, generated from the same file): `data`
 * validated by the job's schema, every default filled in (on a copy); throws naming each bad field.
 */
export function jobSpec<K extends keyof JobSpecs>(schema: K, data: unknown): JobSpecs[K] {
  const spec = structuredClone(data);
  const fn = validatorFor(schema) as ValidateFunction<JobSpecs[K]>;
  if (fn(spec)) return spec;
  throw new Error(formatErrors(fn.errors).map((e) => e.text).join('; '));
}

// ---- Types for the server's own schemas (schemas/job.json, schemas/server.json) ----

export type JobState = 'queued' | 'running' | 'finished' | 'failed' | 'cancelled' | 'interrupted';

export interface FileRef {
  step: number;
  path: string;
  url?: string;
}

/** The last `step` event of a job, as its record keeps it. */
export type Progress = Omit<Extract<JobEvent, { type: 'step' }>, 'type'>;

/** schemas/job.json */
export interface JobRecord {
  id: string;
  type: string;
  spec: Record<string, unknown>;
  /** The webui folder the request named (StartJobRequest.webuiDir), absolute. */
  webuiDir?: string;
  state: JobState;
  createdAt: string;
  startedAt?: string;
  endedAt?: string;
  attempts: number;
  queuePosition?: number;
  step: number;
  totalSteps: number;
  progress?: Progress;
  backend?: string;
  output?: string;
  outputs: string[];
  kind?: 'embedding' | 'hypernetwork' | 'checkpoint' | 'lora';
  usage?: string;
  error?: string;
  lastSnapshot?: string;
  lossLog?: string;
  previews: FileRef[];
  snapshots: FileRef[];
  webui?: { ready: boolean; message: string };
}

/** server.json#/definitions/QueuedEvent */
export interface QueuedEvent {
  type: 'queued';
  position: number;
}

/** server.json#/definitions/WebuiEvent: what the webui client did for a job. */
export interface WebuiEvent {
  type: 'webui';
  action: 'refresh' | 'verify' | 'unload' | 'reload' | 'pause' | 'resume';
  ok: boolean;
  message: string;
  ready?: boolean;
}

/** server.json#/definitions/StateEvent */
export interface StateEvent {
  type: 'state';
  job: JobRecord;
}
