/**
 * @file `sidetrain install-extension --webui-dir DIR`: the webui extension in one step. The
 * webui's "Install from URL" clones a whole repository as the extension, and sidetrain's
 * extension is its `extension/` folder, so it cannot work; this puts that folder into
 * `DIR/extensions/sidetrain` (a link that follows this clone, or `--copy`), writes
 * `sidecar.json` there with this clone's path and autostart on (extension/sidetrain_ext/config.py
 * reads it when Settings → sidetrain does not say otherwise), and checks Node. A folder of that
 * name that is not sidetrain's extension is never replaced.
 */
import { cp, lstat, mkdir, readFile, readlink, realpath, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { REPO_DIR, checkWebuiDir } from '../config.ts';

/** The Node the CLI and the sidecar need (package.json engines). */
export const MIN_NODE = [20, 9] as const;

export function nodeProblem(version = process.versions.node): string | undefined {
  const [major = 0, minor = 0] = version.split('.').map(Number);
  if (major > MIN_NODE[0] || (major === MIN_NODE[0] && minor >= MIN_NODE[1])) return undefined;
  return `Node ${version} is too old: sidetrain needs Node ${MIN_NODE.join('.')} or newer (https://nodejs.org)`;
}

export interface InstallOptions {
  webuiDir: string;
  copy?: boolean;
  autostart?: boolean;
  /** The clone whose extension/ is installed (default: this one). */
  from?: string;
}

/** Whether `path` holds sidetrain's extension (its metadata.ini names it), so it may be replaced. */
async function isOurs(path: string): Promise<boolean> {
  try {
    return /^\s*Name\s*=\s*sidetrain\s*$/m.test(await readFile(join(path, 'metadata.ini'), 'utf8'));
  } catch {
    return false;
  }
}

async function exists(path: string): Promise<boolean> {
  return lstat(path).then(() => true, () => false);
}

/** Install; returns what was done, one line each. */
export async function installExtension(o: InstallOptions): Promise<string[]> {
  const node = nodeProblem();
  if (node) throw new Error(node);
  const webui = await checkWebuiDir(o.webuiDir, '--webui-dir');
  const clone = resolve(o.from ?? REPO_DIR);
  const source = join(clone, 'extension');
  if (!(await isOurs(source))) throw new Error(`${source} is not sidetrain's extension folder`);
  const extensions = join(webui, 'extensions');
  const target = join(extensions, 'sidetrain');
  await mkdir(extensions, { recursive: true });
  const done: string[] = [];
  if (await exists(target)) {
    const link = (await lstat(target)).isSymbolicLink();
    const dangling = link && !(await exists(await realpath(target).catch(() => '')));
    if (!dangling && !(await isOurs(target))) {
      throw new Error(`${target} exists and is not sidetrain's extension: move it away first`);
    }
    done.push(`replacing the earlier ${link ? `link to ${await readlink(target)}` : 'copy'}`);
  }
  // built beside the target and renamed over it: the webui never sees half an extension
  const staging = `${target}.installing-${process.pid}`;
  await rm(staging, { recursive: true, force: true });
  if (o.copy) {
    await cp(source, staging, { recursive: true, filter: (p) => !/[\\/](__pycache__|sidecar\.log|sidecar\.json)$/.test(p) });
  } else {
    await symlink(source, staging, process.platform === 'win32' ? 'junction' : 'dir'); // a junction needs no admin rights
  }
  await rm(target, { recursive: true, force: true });
  await rename(staging, target);
  done.push(o.copy ? `copied ${source} to ${target}` : `linked ${target} → ${source} (it follows this clone)`);
  const sidecar = { folder: clone, autostart: o.autostart !== false };
  const settings = join(target, 'sidecar.json');
  await writeFile(`${settings}.tmp`, `${JSON.stringify(sidecar, null, 2)}\n`);
  await rename(`${settings}.tmp`, settings);
  done.push(`wrote ${settings}: sidecar from ${clone}, autostart ${sidecar.autostart ? 'on' : 'off'}`);
  done.push(`restart the webui (start it with --api so sidetrain can list its models and refresh its lists); the sidetrain tab appears`);
  return done;
}

export function registerInstallExtension(program: Command): void {
  program
    .command('install-extension')
    .description("install the webui extension (a sidetrain tab) into a webui folder, with the sidecar started by the webui")
    .requiredOption('--webui-dir <dir>', 'the webui folder (A1111, Forge or SD.Next): the one with webui.py / launch.py and extensions/')
    .option('--copy', 'copy the extension instead of linking it (a link follows updates of this clone)')
    .option('--no-autostart', 'do not start the sidecar with the webui (start it yourself with npm start)')
    .action(async (o: { webuiDir: string; copy?: boolean; autostart?: boolean }) => {
      for (const line of await installExtension(o)) console.log(line);
    });
}
