/**
 * @file The PyTorch yardstick runner: Debian's python3-torch as a user would tune it on a CPU
 * machine (issue 10) — OpenBLAS as the system BLAS (libopenblas0-pthread; the reference BLAS
 * makes matmul 30× slower and would not count), jemalloc preloaded (libjemalloc2), 2 threads —
 * installed with apt-get when missing, then bench/pytorch/ti_step.py in its own process.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, realpathSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const PYTHON = '/usr/bin/python3';
const JEMALLOC = '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2';
const BLAS = '/usr/lib/x86_64-linux-gnu/libblas.so.3';
const SCRIPT = fileURLToPath(new URL('./pytorch/ti_step.py', import.meta.url));
const PACKAGES = ['python3-torch', 'libopenblas0-pthread', 'libjemalloc2'];

function torchPresent(): boolean {
  return spawnSync(PYTHON, ['-c', 'import torch'], { stdio: 'ignore' }).status === 0;
}

/** Install the yardstick's packages if any is missing; returns why it cannot run, or undefined. */
export function ensurePytorch(): string | undefined {
  const blasOk = () => existsSync(BLAS) && realpathSync(BLAS).includes('openblas');
  if (torchPresent() && existsSync(JEMALLOC) && blasOk()) return undefined;
  console.error(`bench: installing ${PACKAGES.join(' ')} for the PyTorch yardstick (apt-get)…`);
  try {
    execFileSync('apt-get', ['install', '-y', '--no-install-recommends', ...PACKAGES], {
      stdio: ['ignore', 'ignore', 'inherit'], env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
    });
  } catch (err) {
    return `apt-get install ${PACKAGES.join(' ')} failed (${String((err as Error).message).split('\n')[0]}); run it as root`;
  }
  if (!torchPresent()) return 'python3-torch installed but `import torch` fails';
  if (!blasOk()) return `the system BLAS (${BLAS}) is not OpenBLAS: the yardstick would be handicapped; select it with update-alternatives`;
  return undefined;
}

/** One yardstick run: s/step (median after a warm-up step) and peak RSS, or an error. */
export function pytorchTiStep(px: number, steps: number, threads = 2): Record<string, unknown> {
  const missing = ensurePytorch();
  if (missing) return { error: missing };
  const child = spawnSync(PYTHON, [SCRIPT, '--px', String(px), '--steps', String(steps), '--threads', String(threads)], {
    encoding: 'utf8', timeout: 20 * 60_000,
    env: { ...process.env, LD_PRELOAD: JEMALLOC, OMP_NUM_THREADS: String(threads), OPENBLAS_NUM_THREADS: String(threads) },
  });
  const line = child.stdout?.split('\n').reverse().find((l) => l.startsWith('{'));
  if (child.status !== 0 || !line) return { error: (child.stderr || `exit ${child.status}`).trim().split('\n').pop()!.slice(0, 200) };
  const r = JSON.parse(line) as { secondsPerStep: number; firstStepSeconds: number; peakRssBytes: number; steps: number; torch: string };
  return {
    steps: r.steps, secPerStep: +r.secondsPerStep.toPrecision(3), firstStepSec: +r.firstStepSeconds.toPrecision(3),
    peakRssMB: Math.round(r.peakRssBytes / 2 ** 20), note: `torch ${r.torch}, OpenBLAS, jemalloc, ${threads} threads`,
  };
}
