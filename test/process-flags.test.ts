/**
 * The training processes run with TRAINING_NODE_FLAGS (trainers/backend/process-flags.ts): the CLI
 * through its shebang and the package scripts, the server's job worker through its fork arguments.
 * Without the flags training still works, only slower, so nothing else would notice them missing.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { TRAINING_NODE_FLAGS } from '../trainers/backend/process-flags.ts';

test('the CLI shebang and the package scripts that train carry the training flags', () => {
  const shebang = readFileSync('bin/sidetrain.mjs', 'utf8').split('\n')[0]!;
  assert.match(shebang, /^#!\/usr\/bin\/env -S node /);
  const scripts = JSON.parse(readFileSync('package.json', 'utf8')).scripts as Record<string, string>;
  for (const flag of TRAINING_NODE_FLAGS) {
    assert.ok(shebang.split(' ').includes(flag), `${flag} in ${shebang}`);
    for (const name of ['start', 'demo', 'golden']) assert.ok(scripts[name]!.split(' ').includes(flag), `${flag} in npm run ${name}`);
  }
});

test('the worker host forks with the training flags, and this node accepts them', () => {
  assert.match(readFileSync('bridge/worker-host.ts', 'utf8'), /const execArgv = \[\.\.\.TRAINING_NODE_FLAGS,/);
  const out = execFileSync(process.execPath, [...TRAINING_NODE_FLAGS, '-p', 'JSON.stringify(process.execArgv)'], { encoding: 'utf8' });
  assert.deepEqual(JSON.parse(out).slice(0, TRAINING_NODE_FLAGS.length), TRAINING_NODE_FLAGS);
});
