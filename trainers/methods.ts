/**
 * @file The registry of training methods, by the job type the API and CLI use. Adding a method is
 * a schema in schemas/ and an entry here; nothing in bridge/ is special-cased.
 */
import type { MethodEntry } from './job.ts';

export const methods: Record<string, MethodEntry> = {};
