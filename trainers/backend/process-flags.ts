/**
 * @file Node flags for a process that trains (the CLI through bin/sidetrain.mjs's shebang and the
 * package scripts, the server's job worker, the bench's children). No imports: the server process
 * reads this without loading TF.js.
 *
 * `--single-threaded-gc`: the native kernels keep one thread per core busy, and every tensor's
 * Float32Array counts as V8 external memory, so a training step (gigabytes of outputs) starts a
 * mark-compact GC every ~64 MB allocated — about a hundred per SD1.5 step at 512 px. With V8's
 * default concurrent marking those GCs run on helper threads that take cores from the kernels: on a
 * 2-core machine they cost 4–5 CPU-seconds per such step and the kernels ran 15–25% slower. On the
 * main thread the same GCs cost a few ms each, between kernels. The flag cannot be set at run time
 * (v8.setFlagsFromString aborts V8's concurrent marker) nor in NODE_OPTIONS, so it is on the
 * command line of each such process.
 */
export const TRAINING_NODE_FLAGS: readonly string[] = ['--single-threaded-gc'];
