/** @file The sub-commands of the CLI, each a function that adds itself to the program. */
import type { Command } from 'commander';

export type RegisterCommand = (program: Command) => void;

export const commands: RegisterCommand[] = [];
commands.push((await import('./serve.ts')).registerServe);
commands.push((await import('./golden.ts')).registerGolden);
commands.push((await import('./inspect.ts')).registerInspect);
commands.push((await import('./train.ts')).registerTrain);
commands.push((await import('./demo.ts')).registerDemo);
commands.push((await import('./estimate.ts')).registerEstimate);
commands.push((await import('./install-extension.ts')).registerInstallExtension);
commands.push((await import('./dataset.ts')).registerDataset);
