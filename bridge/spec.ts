/**
 * @file From a request's `{type, spec}` to a spec a worker may run: the method's JSON Schema
 * (defaults filled in), then every path in it checked and made absolute — names sanitised as the
 * webui does, output folders kept inside the configured ones, datasets readable folders, models
 * readable files. Generic over trainers/methods/index.ts: which field is what comes from an
 * `x-sidetrain` annotation on the schema property, or else from its name (see roleOf).
 */
import { validate, getSchema, type FieldError } from '../schemas/index.ts';
import type { MethodEntry } from '../trainers/job.ts';
import { compileWordRegex } from '../trainers/data/word-regex.ts';
import { lrScheduleError } from '../trainers/optim/lr.ts';
import { PathError, checkName, checkReadableDir, checkReadableFile, resolveOutputDir, safeJoin } from '../trainers/io/paths.ts';

/** Where outputs of each kind go, plus the log root for snapshots/previews/loss CSVs. */
export interface Folders {
  embeddings: string;
  hypernetworks: string;
  checkpoints: string;
  lora: string;
  logs: string;
}

/** 400: the request is wrong, and these fields say where. */
export class RequestError extends Error {
  constructor(
    readonly errors: FieldError[],
    readonly status = 400,
  ) {
    super(errors.map((e) => e.text).join('; '));
  }
}

export function fieldError(field: string, message: string): FieldError {
  return { field, message, text: `${field || '/'} ${message}` };
}

type Role = 'name' | 'dataset' | 'model' | 'regex' | 'schedule' | { output: (keyof Folders)[] } | undefined;

const OUTPUT_FIELDS: Record<string, keyof Folders> = {
  embeddingsDir: 'embeddings',
  embeddingDir: 'embeddings',
  hypernetworkDir: 'hypernetworks',
  hypernetworksDir: 'hypernetworks',
  loraDir: 'lora',
  ckptDir: 'checkpoints',
  checkpointDir: 'checkpoints',
  checkpointsDir: 'checkpoints',
  logDir: 'logs',
};

/**
 * What a spec field is. `x-sidetrain` on the property wins: 'name' | 'dataset' | 'model' |
 * 'regex' | 'schedule' | 'output:<folder>' | 'none'. Otherwise: `name`; `*images`/`dataset*`
 * folders; `model`/`vae`/`*Model` files; `*Regex` (a user regex, compiled for RE2 now rather than
 * failing in the worker); a `$ref` to common.json's lrSchedule (parsed now: `1e400` passes the
 * pattern but is no finite rate); known `*Dir` output folders; any other `*Dir` may be any
 * output folder.
 */
export function roleOf(key: string, prop: Record<string, unknown> | undefined): Role {
  const tag = prop?.['x-sidetrain'];
  if (typeof tag === 'string') {
    if (tag === 'none') return undefined;
    if (tag.startsWith('output:')) return { output: [tag.slice(7) as keyof Folders] };
    return tag as Role;
  }
  if (key === 'name') return 'name';
  if (/Regex$/.test(key)) return 'regex';
  if (typeof prop?.$ref === 'string' && prop.$ref.endsWith('#/definitions/lrSchedule')) return 'schedule';
  if (/(^images|Images|^dataset|Dataset)(Dir)?$/.test(key)) return 'dataset';
  if (/^(model|vae)$|Model$/.test(key)) return 'model';
  if (key in OUTPUT_FIELDS) return { output: [OUTPUT_FIELDS[key]!] };
  if (/Dir$/.test(key)) return { output: ['embeddings', 'hypernetworks', 'checkpoints', 'lora', 'logs'] };
  return undefined;
}

function properties(schemaName: string): Record<string, Record<string, unknown>> {
  const s = getSchema(schemaName.split('#')[0]!);
  return (s?.properties ?? {}) as Record<string, Record<string, unknown>>;
}

/** Check and resolve one field in place; returns the error, if any. */
async function checkField(spec: Record<string, unknown>, key: string, role: Role, folders: Folders): Promise<FieldError | undefined> {
  const field = `/spec/${key}`;
  const value = spec[key];
  if (typeof value !== 'string' || !role) return undefined;
  try {
    if (role === 'name') spec[key] = checkName(value, field);
    else if (role === 'dataset') spec[key] = await checkReadableDir(value, field);
    else if (role === 'model') spec[key] = await checkReadableFile(value, field, [folders.checkpoints]);
    else if (role === 'regex') {
      if (value) compileWordRegex(value);
    } else if (role === 'schedule') {
      const why = lrScheduleError(value, key);
      if (why) return fieldError(field, why);
    }
    else spec[key] = await resolveOutputDir(value, role.output.map((f) => folders[f]), field);
  } catch (err) {
    if (err instanceof PathError) return fieldError(err.field || field, err.message);
    if (role === 'regex') return fieldError(field, (err as Error).message);
    throw err;
  }
  return undefined;
}

/** The output file names a job will write must not be symlinks out of their folder either. */
async function checkTargets(spec: Record<string, unknown>, props: Record<string, Record<string, unknown>>): Promise<FieldError[]> {
  const name = spec.name;
  if (typeof name !== 'string') return [];
  const errors: FieldError[] = [];
  for (const key of Object.keys(spec)) {
    const role = roleOf(key, props[key]);
    if (typeof role !== 'object' || typeof spec[key] !== 'string') continue;
    for (const file of [name, `${name}.pt`, `${name}.pt.optim`, `${name}.safetensors`]) {
      try {
        await safeJoin(spec[key] as string, file);
      } catch (err) {
        if (!(err instanceof PathError)) throw err;
        errors.push(fieldError('/spec/name', `${file}: ${err.message}`));
        break;
      }
    }
  }
  return errors;
}

/**
 * Validate and resolve a job request. Throws RequestError (400, or 404 for an unknown type)
 * naming every bad field; returns the spec to run (a copy, defaults filled, paths absolute).
 */
export async function prepareSpec(
  methods: Record<string, MethodEntry>,
  type: string,
  rawSpec: Record<string, unknown>,
  folders: Folders,
): Promise<Record<string, unknown>> {
  // An own property only: `__proto__` or `constructor` must not find Object's and pass as a method.
  const entry = Object.hasOwn(methods, type) ? methods[type] : undefined;
  if (!entry) throw new RequestError([fieldError('/type', `must be one of: ${Object.keys(methods).join(', ') || '(no methods registered)'}`)]);
  if (!getSchema(entry.schema)) throw new RequestError([fieldError('/type', `method '${type}' has no schema '${entry.schema}' yet`)], 501);
  const spec = structuredClone(rawSpec);
  const props = properties(entry.schema);
  // Fill output folders the schema declares but the request left out (before validation, so a
  // schema that requires them is satisfied by the server's configuration).
  for (const [key, prop] of Object.entries(props)) {
    const role = roleOf(key, prop);
    if (typeof role === 'object' && spec[key] === undefined && role.output.length === 1) spec[key] = folders[role.output[0]!];
  }
  const errors = validate(entry.schema, spec, '/spec');
  if (errors.length) throw new RequestError(errors);
  for (const key of Object.keys(spec)) {
    const err = await checkField(spec, key, roleOf(key, props[key]), folders);
    if (err) errors.push(err);
  }
  if (!errors.length) errors.push(...(await checkTargets(spec, props)));
  if (errors.length) throw new RequestError(errors);
  return spec;
}
