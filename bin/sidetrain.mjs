#!/usr/bin/env node
// `npx sidetrain …`: run the TypeScript CLI through tsx (no build step to forget).
import { register } from 'tsx/esm/api';

register();
await import('../bridge/cli.ts');
