/**
 * @file `sidetrain` command line (commander). Each sub-command lives in bridge/commands/ and
 * registers itself here; flags come from the job schemas where a job is involved.
 */
import { Command } from 'commander';
import { commands } from './commands/index.ts';
import { oneLineErrors } from './commands/flags.ts';

// configured before the sub-commands exist: they inherit it (an unknown flag gets one line with a suggestion, not the help)
const program = oneLineErrors(new Command('sidetrain'))
  .description('Train Textual Inversion embeddings, hypernetworks, Dreambooth/LoRA and fine-tunes for AUTOMATIC1111-compatible webuis')
  .version('0.1.0');

for (const register of commands) register(program);

try {
  await program.parseAsync(process.argv);
} catch (err) {
  console.error(`sidetrain: ${err instanceof Error ? err.message : String(err)}`);
  process.exitCode = process.exitCode || 1;
}
