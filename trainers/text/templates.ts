/**
 * @file Prompt templates, as the webui's Train tab uses them (textual_inversion_templates/*.txt
 * and PersonalizedBase.create_text in modules/textual_inversion/dataset.py, webui v1.10.1):
 * one prompt per line; `[name]` becomes the embedding's name (the token being trained) and
 * `[filewords]` the image's caption. Shipped: subject, subject_filewords, style,
 * style_filewords, hypernetwork, none (trainers/text/templates/); any other .txt by path.
 *
 * create_text order, kept exactly: pick a line; split the caption on ','; drop each tag with
 * probability `tagDropOut` (kept when random > p); shuffle the tags; join them with ',' (the
 * spaces after the commas travel with their tags); replace [filewords], then [name].
 * Differences: blank lines in a template are skipped (the webui would train on an empty prompt),
 * and the random choices come from a seeded stream (trainers/random.ts).
 *
 * Example:
 *   const t = await loadTemplate('subject_filewords');
 *   createPrompt(rng.choice(t.lines), 'pallas_cat', 'cat, grass', { shuffleTags: true, tagDropOut: 0.1 }, rng)
 */
import { readFile, stat } from 'node:fs/promises';
import { readdirSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Rng } from '../random.ts';

export const TEMPLATE_DIR = join(dirname(fileURLToPath(import.meta.url)), 'templates');

export interface Template {
  /** Shipped name (`subject_filewords`) or the file name of a user template. */
  name: string;
  path: string;
  /** Non-empty, trimmed lines. */
  lines: string[];
  /** Whether some line has [name] / [filewords]. */
  usesName: boolean;
  usesFilewords: boolean;
}

export interface PromptOptions {
  /** Shuffle the caption's comma-separated tags for every prompt (webui shuffle_tags). */
  shuffleTags?: boolean;
  /** Drop each tag with this probability for every prompt (webui tag_drop_out, 0..1). */
  tagDropOut?: number;
}

/** Names of the shipped templates, sorted. */
export function listTemplates(): string[] {
  return readdirSync(TEMPLATE_DIR)
    .filter((f) => f.endsWith('.txt'))
    .map((f) => f.slice(0, -4))
    .sort();
}

/** Split a template file into its prompt lines. */
export function parseTemplate(text: string): string[] {
  return text
    .split(/\r?\n/)
    .map((l) => l.trim())
    .filter((l) => l !== '');
}

async function isFile(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFile();
  } catch {
    return false;
  }
}

/** Where a template name or path lives: a shipped name (with or without .txt) wins over a relative path. */
async function resolveTemplate(nameOrPath: string): Promise<{ name: string; path: string }> {
  const stem = nameOrPath.endsWith('.txt') ? nameOrPath.slice(0, -4) : nameOrPath;
  if (/^[A-Za-z0-9_-]+$/.test(stem) && listTemplates().includes(stem)) {
    return { name: stem, path: join(TEMPLATE_DIR, `${stem}.txt`) };
  }
  const path = resolve(nameOrPath);
  if (await isFile(path)) return { name: basename(path), path };
  throw new Error(
    `prompt template '${nameOrPath}' not found: use one of ${listTemplates().join(', ')} or the path of a .txt file ` +
      'with one prompt per line ([name] = the embedding, [filewords] = the caption)',
  );
}

/** Load a shipped template by name or a user template by path. */
export async function loadTemplate(nameOrPath: string): Promise<Template> {
  const { name, path } = await resolveTemplate(nameOrPath);
  const lines = parseTemplate(await readFile(path, 'utf8'));
  if (lines.length === 0) throw new Error(`prompt template ${path} has no lines: write one prompt per line`);
  return {
    name,
    path,
    lines,
    usesName: lines.some((l) => l.includes('[name]')),
    usesFilewords: lines.some((l) => l.includes('[filewords]')),
  };
}

/** The caption's tags after drop-out and shuffling, joined back with ',' (create_text). */
export function processTags(filewords: string, opts: PromptOptions, rng: Rng): string {
  const dropOut = opts.tagDropOut ?? 0;
  let tags = filewords.split(',');
  if (dropOut !== 0) tags = tags.filter(() => rng.next() > dropOut);
  if (opts.shuffleTags) rng.shuffle(tags);
  return tags.join(',');
}

/** One prompt from one template line (create_text after the line is chosen). */
export function createPrompt(line: string, name: string, filewords: string, opts: PromptOptions, rng: Rng): string {
  const tags = line.includes('[filewords]') ? processTags(filewords, opts, rng) : filewords;
  return line.replaceAll('[filewords]', tags).replaceAll('[name]', name);
}

/** Choose a line and fill it in (the whole of create_text). */
export function samplePrompt(template: Template, name: string, filewords: string, opts: PromptOptions, rng: Rng): string {
  return createPrompt(rng.choice(template.lines), name, filewords, opts, rng);
}

/** Warnings for a template that cannot work for a method (shown by --dry-run and at start). */
export function templateWarnings(template: Template, method: 'textual_inversion' | 'hypernetwork'): string[] {
  const out: string[] = [];
  if (method === 'textual_inversion' && !template.usesName) {
    out.push(`template '${template.name}' has no [name]: the embedding never appears in a prompt, so nothing is learned`);
  }
  if (method === 'hypernetwork' && template.usesName) {
    out.push(`template '${template.name}' has [name]: for a hypernetwork it is replaced by the hypernetwork's name as plain text`);
  }
  return out;
}
