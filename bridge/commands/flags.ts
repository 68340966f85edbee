/**
 * @file CLI flags from a job schema, for `train` and `estimate`: one `--kebab-case` flag per
 * property, with a placeholder that says what to type (`<n>`, `<dir>`, `<rate>`), the schema's
 * title and description as help, its default shown, and a value checked as it is parsed, so a
 * wrong one gives one line naming the flag (`--steps: 'abc' is not a whole number`) instead of
 * every schema rule it breaks. Validation errors and path errors are turned from the schema's
 * field names (`/model is required`) into the flags a person typed (`--model is required`).
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import type { FieldError } from '../../schemas/index.ts';

export type Prop = {
  type?: string; title?: string; description?: string; default?: unknown; enum?: unknown[]; items?: { type?: string; enum?: unknown[] };
  'x-cli-alias'?: string; 'x-sidetrain'?: string; $ref?: string; minimum?: number; maximum?: number;
};

export const kebab = (s: string) => s.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);

/** What to type after the flag, from the property's type and role. */
export function placeholder(key: string, prop: Prop): string {
  if (prop.$ref?.endsWith('/lrSchedule')) return '<rate>';
  if (prop.type === 'integer') return '<n>';
  if (prop.type === 'number') return '<number>';
  if (prop.type === 'array') return prop.items?.type === 'string' ? '<a,b,...>' : '<n,n,...>';
  if (key === 'name') return '<name>';
  if (/^(model|vae)$|Model$/.test(key)) return '<file>';
  if (/Dir$|^images$|^dataset/.test(key) || prop['x-sidetrain'] === 'dataset') return '<dir>';
  if (/Prompt$/.test(key)) return '<text>';
  if (key === 'template') return '<name|file>';
  return '<value>';
}

/** The value as the schema's type wants it; a number that is not one is refused here, once. */
export function parseValue(prop: Prop, raw: string, flag: string): unknown {
  const number = (s: string): number => {
    const n = Number(s.trim());
    // commander prefixes "option '--steps <n>' argument 'abc' is invalid."
    if (s.trim() === '' || !Number.isFinite(n) || (prop.type === 'integer' && !Number.isInteger(n))) {
      throw new InvalidArgumentError(`${flag} takes ${prop.type === 'integer' ? 'a whole number' : 'a number'}${prop.minimum !== undefined ? ` (at least ${prop.minimum})` : ''}`);
    }
    return n;
  };
  if (prop.type === 'integer' || prop.type === 'number') return number(raw);
  if (prop.type === 'array') return raw.split(',').map((x) => (prop.items?.type === 'string' ? x.trim() : number(x)));
  return raw;
}

const shown = (v: unknown) => (typeof v === 'string' ? (v === '' ? '""' : v) : Array.isArray(v) ? v.join(',') : JSON.stringify(v));

/** Help text: the title (a label for people), then the description, then the default. */
export function helpText(prop: Prop): string {
  const text = [prop.title, prop.description].filter(Boolean).join(': ');
  return prop.default === undefined || prop.type === 'boolean' && prop.default === false ? text : `${text} (default: ${shown(prop.default)})`;
}

/** One option per property (`skip`: keys the command does not take). */
export function addSchemaOptions(cmd: Command, props: Record<string, Prop>, skip: string[] = []): void {
  for (const [key, prop] of Object.entries(props)) {
    if (skip.includes(key)) continue;
    const flag = `--${kebab(key)}`;
    const opt = prop.type === 'boolean'
      ? new Option(flag, helpText(prop))
      : new Option(`${flag} ${placeholder(key, prop)}`, helpText(prop)).argParser((raw: string) => parseValue(prop, raw, flag));
    if (prop.enum) opt.choices(prop.enum.map(String));
    cmd.addOption(opt);
    const alias = prop['x-cli-alias'];
    if (alias) cmd.addOption(new Option(`--${alias} ${placeholder(key, prop)}`, `same as ${flag}`).hideHelp().argParser((raw: string) => parseValue(prop, raw, `--${alias}`)));
  }
}

/** `/spec/steps` or `/steps` → `--steps` (nested fields keep their pointer after the flag). */
export function flagOf(field: string): string {
  const [, key, rest] = /^\/(?:spec\/)?([^/]+)(.*)$/.exec(field) ?? [];
  return key ? `--${kebab(key)}${rest ?? ''}` : field || 'the job';
}

/** Schema errors named by their flags, one line each. */
export function flagErrors(errors: FieldError[], why: (e: FieldError) => string | undefined = () => undefined): string {
  return errors.map((e) => {
    const text = why(e) ?? e.message;
    return `${flagOf(e.field)}${text.startsWith(':') ? '' : ' '}${text}`;
  }).join('\n');
}

/**
 * The program's error output on one line: commander puts "(Did you mean --steps?)" on a line of
 * its own, and an unknown flag should not print the whole help.
 */
export function oneLineErrors(program: Command): Command {
  return program
    .showSuggestionAfterError(true)
    .configureOutput({ outputError: (text, write) => write(`${text.trimEnd().replace(/\s*\n\s*/g, ' ')}\n`) });
}
