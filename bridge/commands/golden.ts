/** @file `sidetrain golden <fixture-dir>`: check the networks against a fixture's PyTorch goldens. */
import type { Command } from 'commander';

export function registerGolden(program: Command): void {
  program
    .command('golden')
    .description("compute every tensor named in <dir>/golden.json and compare with the PyTorch goldens (exit 1 if any fails or is missing)")
    .argument('<dirs...>', 'fixture directories laid out like test/fixtures/sd-tiny')
    .option('--backend <name>', 'TF.js backend to use (default: the best present)')
    .option('--precision <p>', 'fp32 (default: each tensor within its atol), bf16 or auto (bf16: outputs within max(atol, 1% of the golden\'s max |value|), gradients with cosine similarity ≥ 0.995)', 'fp32')
    .option('--low-memory', 'run every UNet with gradient checkpointing and attention sliced into single query rows (must give the same numbers)')
    .action(async (dirs: string[], opts: { backend?: string; lowMemory?: boolean; precision: string }) => {
      const { initBackend, choosePrecision } = await import('../../trainers/backend/index.ts');
      const { runGolden } = await import('../../trainers/golden.ts');
      const backend = await initBackend(opts.backend);
      const precision = choosePrecision(opts.precision as 'fp32');
      console.log(`backend: ${backend.name}${backend.adapter ? ` on ${backend.adapter}` : ''}${opts.lowMemory ? ' (gradient checkpointing, attention slices of one row)' : ''}, ${precision.why}${precision.kernel ? ` (kernel ${precision.kernel})` : ''}`);
      // 1 byte per slice: every attention runs one query row at a time, the most slices there can be
      const memory = opts.lowMemory ? { checkpointing: true, attentionSliceBytes: 1 } : undefined;
      let failed = 0;
      for (const dir of dirs) {
        const rows = await runGolden(dir, { memory });
        console.log(`\n${dir}\n${'tensor'.padEnd(80)} ${'max|ours-golden|'.padStart(16)} ${'atol'.padStart(9)}  result`);
        for (const r of rows) {
          const result = !r.computed ? 'NOT COMPUTED' : r.pass ? 'pass' : 'FAIL';
          const rule = r.cosine === undefined ? r.atol.toExponential(0).padStart(9) : `cos ${r.cosine.toFixed(5)} ≥ 0.995`;
          console.log(`${r.name.padEnd(80)} ${r.maxAbsDiff.toExponential(2).padStart(16)} ${rule}  ${result}`);
        }
        const bad = rows.filter((r) => !r.pass).length;
        console.log(`${rows.length - bad} passed, ${bad} failed`);
        failed += bad;
      }
      if (failed) process.exitCode = 1;
    });
}
