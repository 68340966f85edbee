#!/usr/bin/env node
/**
 * @file Builds the native CPU kernels (native/, N-API, node-gyp) — the package's `install`
 * script, so a plain `npm install` builds them (npm runs the root project's own install
 * scripts; only dependencies' scripts wait for approval). It never fails the install (unless
 * SIDETRAIN_REQUIRE_NATIVE=1, as CI sets): when the build fails, the reason goes to
 * native/build-error.txt, `registerNativeKernels()` throws it, and the backend picker falls
 * through to WASM / pure-JS CPU and says why.
 * Run again by hand with `node scripts/build-native.mjs`.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const nativeDir = join(root, 'native');
const errorFile = join(nativeDir, 'build-error.txt');
const require = createRequire(import.meta.url);

/** node-gyp: the one npm hands to scripts, else npm's bundled copy, else a local install. */
function findNodeGyp() {
  const candidates = [
    process.env.npm_config_node_gyp,
    join(dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
    join(dirname(process.execPath), 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
  ];
  try {
    candidates.push(require.resolve('node-gyp/bin/node-gyp.js'));
  } catch {
    /* not installed locally */
  }
  return candidates.find((p) => p && existsSync(p));
}

/** Node's headers shipped with the node binary (e.g. /usr/include/node): no download needed. */
function localNodeDir() {
  if (process.env.npm_config_nodedir) return undefined; // node-gyp reads it from the env
  const prefix = join(dirname(process.execPath), '..');
  return existsSync(join(prefix, 'include', 'node', 'node_api.h')) ? prefix : undefined;
}

function build(gyp, extra) {
  const nodedir = localNodeDir();
  const args = [gyp, 'rebuild', `--directory=${nativeDir}`, ...(nodedir ? [`--nodedir=${nodedir}`] : []), ...extra];
  return spawnSync(process.execPath, args, { cwd: nativeDir, encoding: 'utf8', maxBuffer: 64 << 20 });
}

function main() {
  if (process.env.SIDETRAIN_SKIP_NATIVE) {
    writeFileSync(errorFile, 'native build skipped (SIDETRAIN_SKIP_NATIVE is set)\n');
    console.log('sidetrain: native kernels skipped (SIDETRAIN_SKIP_NATIVE)');
    return;
  }
  const gyp = findNodeGyp();
  if (!gyp) {
    writeFileSync(errorFile, 'node-gyp not found (it ships with npm; reinstall npm or `npm i -g node-gyp`)\n');
    console.warn('sidetrain: native kernels not built: node-gyp not found; using WASM / pure-JS CPU');
    failIfRequired('node-gyp not found');
    return;
  }
  // every ISA variant of the kernels (native/binding.gyp), chosen at load; the portable one alone
  // if the compiler refuses the x86 variants' flags
  let res = build(gyp, []);
  if (res.status !== 0) res = build(gyp, ['--', '-Dst_isa_variants=0']);
  if (res.status === 0) {
    rmSync(errorFile, { force: true });
    console.log('sidetrain: native CPU kernels built (native/build/Release/sidetrain_native.node)');
    return;
  }
  const log = `${res.error ?? ''}${res.stdout ?? ''}${res.stderr ?? ''}`;
  // the first compiler diagnostic if there is one, else the first line that says error
  const lines = log.split('\n');
  const first = (lines.find((l) => /error:/.test(l)) ?? lines.find((l) => /error/i.test(l)) ?? 'see log').trim();
  writeFileSync(errorFile, `native build failed (node-gyp exit ${res.status}): ${first.slice(0, 200)}\n\n${log.slice(-20000)}`);
  console.warn(`sidetrain: native kernels not built (see native/build-error.txt); using WASM / pure-JS CPU`);
  failIfRequired(first.slice(0, 200));
}

/** CI (SIDETRAIN_REQUIRE_NATIVE=1) wants the kernels: a build that did not happen fails the install. */
function failIfRequired(why) {
  if (process.env.SIDETRAIN_REQUIRE_NATIVE !== '1') return;
  console.error(`sidetrain: SIDETRAIN_REQUIRE_NATIVE=1 but the native addon native/build/Release/sidetrain_native.node was not built: ${why}`);
  process.exitCode = 1;
}

main();
