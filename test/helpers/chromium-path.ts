/**
 * @file Which Chromium the page's browser tests drive, so that `npm install && npm test` needs
 * nothing installed by hand. In order:
 * 1. `SIDETRAIN_CHROMIUM`, when set (it must exist);
 * 2. Debian's `/usr/bin/chromium`, when installed;
 * 3. the headless Chromium inside the `@sparticuz/chromium` npm package (a devDependency). Its
 *    tarball holds the binary brotli-compressed (`bin/chromium.br`) and the NSS/NSPR/expat
 *    libraries it links against (`bin/al2023.tar.br`); with those on LD_LIBRARY_PATH it needs only
 *    glibc and libgcc from the system. Both are unpacked once into
 *    `node_modules/.cache/sidetrain-chromium/<version>/` (renamed into place, so a half-written
 *    binary is never used) — not the package's own /tmp/chromium, which any local user could plant.
 * No browser at all is an error naming the three places, never a skipped test.
 */
import { execFileSync } from 'node:child_process';
import { createReadStream, createWriteStream, existsSync, mkdirSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { brotliDecompressSync, createBrotliDecompress } from 'node:zlib';

export const DEBIAN_CHROMIUM = '/usr/bin/chromium';
const PACKAGE = '@sparticuz/chromium';
const CACHE = fileURLToPath(new URL('../../node_modules/.cache/sidetrain-chromium/', import.meta.url));

export interface ChromiumFound {
  executablePath: string;
  /** Extra environment for the browser process (the bundled libraries' folder). */
  env: Record<string, string>;
  /** Where it came from, for messages. */
  source: string;
}

/** The package's root folder, or undefined when it is not installed. */
function packageDir(): string | undefined {
  try {
    // the main entry is build/cjs/index.cjs; its exports map hides package.json itself
    return join(dirname(createRequire(import.meta.url).resolve(PACKAGE)), '..', '..');
  } catch {
    return undefined;
  }
}

/** Unpack `<pkg>/bin/chromium.br` and the libraries once; later calls find them in place. */
async function unpackBundled(dir: string): Promise<ChromiumFound> {
  const version = (JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as { version: string }).version;
  const target = join(CACHE, version);
  const executablePath = join(target, 'chromium');
  const libDir = join(target, 'lib');
  if (!existsSync(executablePath) || !existsSync(libDir)) {
    mkdirSync(CACHE, { recursive: true });
    const staging = join(CACHE, `${version}.tmp-${process.pid}`);
    rmSync(staging, { recursive: true, force: true });
    mkdirSync(staging);
    try {
      await pipeline(createReadStream(join(dir, 'bin', 'chromium.br')), createBrotliDecompress(), createWriteStream(join(staging, 'chromium'), { mode: 0o755 }));
      // Debian's tar (an essential package) reads the uncompressed archive from stdin: lib/*.so
      execFileSync('tar', ['-x', '-C', staging], { input: brotliDecompressSync(readFileSync(join(dir, 'bin', 'al2023.tar.br'))) });
      rmSync(target, { recursive: true, force: true });
      renameSync(staging, target);
    } catch (err) {
      rmSync(staging, { recursive: true, force: true });
      if (!existsSync(executablePath)) throw new Error(`could not unpack the headless Chromium of ${PACKAGE} (${dir}) into ${target}: ${(err as Error).message}`);
    }
  }
  const inherited = process.env.LD_LIBRARY_PATH;
  return { executablePath, env: { LD_LIBRARY_PATH: inherited ? `${libDir}:${inherited}` : libDir }, source: `${PACKAGE}@${version}` };
}

/** The browser to launch (see the file comment for the order). */
export async function findChromium(): Promise<ChromiumFound> {
  const fromEnv = process.env.SIDETRAIN_CHROMIUM;
  if (fromEnv) {
    if (!existsSync(fromEnv)) throw new Error(`SIDETRAIN_CHROMIUM=${fromEnv}: no such file`);
    return { executablePath: fromEnv, env: {}, source: 'SIDETRAIN_CHROMIUM' };
  }
  if (existsSync(DEBIAN_CHROMIUM)) return { executablePath: DEBIAN_CHROMIUM, env: {}, source: `Debian's chromium` };
  const dir = packageDir();
  if (dir) return unpackBundled(dir);
  throw new Error(
    `no browser for the page's tests: SIDETRAIN_CHROMIUM is not set, ${DEBIAN_CHROMIUM} does not exist and the ${PACKAGE} devDependency is not installed (run npm install)`,
  );
}
