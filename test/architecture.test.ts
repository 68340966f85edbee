/**
 * @file The layout of trainers/ holds: imports run one way (methods → train → optim → nets →
 * data/text/memory → io → backend → leaf types) and no import circle exists. Static, `import
 * type` and dynamic `import('…')` specifiers all count. A failure names the edge.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const TRAINERS = join(REPO, 'trainers');

/** Layer of each top-level entry of trainers/; a module may import its own layer or lower ones. */
const LAYERS: Record<string, number> = {
  'job.ts': 0,
  'random.ts': 0,
  backend: 1,
  io: 2,
  data: 3,
  text: 3,
  memory: 3,
  nets: 4,
  optim: 5,
  train: 6,
  methods: 7,
  'golden.ts': 8,
  'golden-sdxl.ts': 8,
};

function walk(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) return walk(path);
    return path.endsWith('.ts') ? [path] : [];
  });
}

function layerOf(file: string): { top: string; layer: number | undefined } {
  const top = relative(TRAINERS, file).split('/')[0]!;
  return { top, layer: LAYERS[top] };
}

/** Relative .ts specifiers of a module: `from '…'`, `import '…'` and `import('…')`. */
function importsOf(file: string): string[] {
  const src = readFileSync(file, 'utf8');
  const specs: string[] = [];
  for (const m of src.matchAll(/(?:\bfrom\s*|\bimport\s*\(?\s*)'(\.{1,2}\/[^']+\.ts)'/g)) specs.push(m[1]!);
  return specs.map((s) => resolve(dirname(file), s));
}

const files = walk(TRAINERS);
const graph = new Map(files.map((f) => [f, importsOf(f).filter((t) => t.startsWith(TRAINERS + '/'))]));
const rel = (f: string) => relative(REPO, f);

test('every top-level entry of trainers/ has a layer', () => {
  const unknown = readdirSync(TRAINERS).filter((name) => LAYERS[name] === undefined && (name.endsWith('.ts') || statSync(join(TRAINERS, name)).isDirectory()));
  assert.deepEqual(unknown, [], `trainers/ entries without a layer in test/architecture.test.ts: ${unknown.join(', ')}`);
});

test('no upward import inside trainers/', () => {
  const upward: string[] = [];
  for (const [from, targets] of graph) {
    const a = layerOf(from);
    for (const to of targets) {
      const b = layerOf(to);
      if (a.layer !== undefined && b.layer !== undefined && b.layer > a.layer) upward.push(`${rel(from)} → ${rel(to)} (${a.top} ${a.layer} imports ${b.top} ${b.layer})`);
    }
  }
  assert.deepEqual(upward, [], `upward imports:\n${upward.join('\n')}`);
});

test('no import circle inside trainers/', () => {
  const state = new Map<string, 'open' | 'done'>();
  const stack: string[] = [];
  const cycles: string[] = [];
  const visit = (f: string): void => {
    state.set(f, 'open');
    stack.push(f);
    for (const t of graph.get(f) ?? []) {
      if (!graph.has(t)) continue;
      if (state.get(t) === 'open') cycles.push([...stack.slice(stack.indexOf(t)), t].map(rel).join(' → '));
      else if (!state.has(t)) visit(t);
    }
    stack.pop();
    state.set(f, 'done');
  };
  for (const f of graph.keys()) if (!state.has(f)) visit(f);
  assert.deepEqual(cycles, [], `import circles:\n${cycles.join('\n')}`);
});

test('the walker sees dynamic imports (the backend chooser loads the native kernels lazily)', () => {
  const chooser = join(TRAINERS, 'backend', 'index.ts');
  assert.ok(graph.get(chooser)!.some((t) => t.endsWith('backend/native/index.ts')));
});
