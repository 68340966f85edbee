#!/usr/bin/env -S node --single-threaded-gc
// `npx sidetrain …`: run the TypeScript CLI through tsx (no build step to forget). Training runs in
// this process, so the shebang carries the training flags (trainers/backend/process-flags.ts: V8's
// GC kept off the cores the kernels use); npm's Windows shims read `env -S` shebangs too.
import { register } from 'tsx/esm/api';

register();
await import('../bridge/cli.ts');
