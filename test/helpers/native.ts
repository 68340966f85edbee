/**
 * @file How a test that needs the native addon says it cannot run: a skip with the reason, which
 * node:test prints — never an early return that passes. Under SIDETRAIN_REQUIRE_NATIVE=1 (CI) it
 * is not a skip but an error naming the addon, so a broken C++ build fails the suite.
 */
import { addonPath, nativeRequired } from '../../trainers/backend/native/addon.ts';

/** `reason` as a node:test `skip` option (false when the test can run); throws when the addon is required. */
export function nativeSkip(reason: string | false): string | false {
  if (reason && nativeRequired()) throw new Error(`SIDETRAIN_REQUIRE_NATIVE=1 but the native addon ${addonPath} is not usable: ${reason}`);
  return reason;
}
