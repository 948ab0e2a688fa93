/**
 * Atomic files and folders, and output-folder claims (locks).
 *
 * A file is written under a temporary name beside it and renamed into place. A folder is filled
 * under a temporary name, then the old folder (if any) is renamed aside (`.<name>.old-<pid>-<r>`),
 * the new one renamed into place, and the aside copy removed. A process killed between the two
 * renames leaves no folder under the final name but a complete aside copy: the next write or read
 * of that folder (recoverFolder) renames the aside copy back, so nothing is lost.
 *
 * A writer claims an output folder with lockFolder: a lock file `.<name>.lock` beside the folder
 * holding the owner's pid and host, created exclusively. A second writer fails at once (XFT_BUSY);
 * a lock whose process no longer runs (same host) is taken over. A claim belongs to the process:
 * claiming a folder this process already holds nests (released by the last release()).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { XftError } from './errors';

/** True while process `pid` runs (on this host). */
export function alive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

const rand = () => Math.random().toString(36).slice(2, 8);
const hidden = (target: string, kind: 'tmp' | 'old') => `.${path.basename(target)}.${kind}-`;

/** pid in a `.<name>.<kind>-<pid>-<r>` name (NaN when it is not one). */
function pidOf(name: string, prefix: string): number {
  return Number(name.slice(prefix.length).split('-')[0]);
}

function tempName(target: string): string {
  removeStaleTemps(target);
  return path.join(path.dirname(target), `${hidden(target, 'tmp')}${process.pid}-${rand()}`);
}

function listDir(dir: string): string[] {
  try {
    return fs.readdirSync(dir);
  } catch {
    return [];
  }
}

/**
 * Removes what interrupted writes to `target` left behind (killed mid-write: the final name was
 * never touched): temporaries of processes that no longer run, and their aside copies once a
 * folder is back under the final name. A live process's files are left alone.
 */
function removeStaleTemps(target: string): void {
  const dir = path.dirname(target), tmp = hidden(target, 'tmp'), old = hidden(target, 'old');
  const targetExists = fs.existsSync(target);
  for (const n of listDir(dir)) {
    const prefix = n.startsWith(tmp) ? tmp : n.startsWith(old) && targetExists ? old : null;
    if (!prefix) continue;
    const pid = pidOf(n, prefix);
    if (Number.isSafeInteger(pid) && pid > 0 && !alive(pid)) fs.rmSync(path.join(dir, n), { recursive: true, force: true });
  }
}

/**
 * When no folder is under `dir` but a replacement was interrupted between its two renames (an
 * aside copy of a process that no longer runs), renames that copy back to `dir`. True when it did.
 */
export function recoverFolder(dir: string): boolean {
  const target = path.resolve(dir);
  if (fs.existsSync(target)) return false;
  const prefix = hidden(target, 'old'), parent = path.dirname(target);
  const asides = listDir(parent)
    .filter((n) => n.startsWith(prefix) && Number.isSafeInteger(pidOf(n, prefix)) && !alive(pidOf(n, prefix)))
    .map((n) => ({ n, t: fs.statSync(path.join(parent, n), { throwIfNoEntry: false })?.mtimeMs ?? 0 }))
    .sort((a, b) => b.t - a.t);
  for (const { n } of asides) {
    try {
      fs.renameSync(path.join(parent, n), target);
      process.emitWarning(`${target} was restored from ${n}: a replacement of it was interrupted`, { code: 'XFT_RECOVERED' });
      return true;
    } catch {
      // another process restored it first, or the copy is gone
      if (fs.existsSync(target)) return false;
    }
  }
  return false;
}

/** Writes `content` to `file` atomically (temporary file, fsync, rename). */
export function writeFileAtomic(file: string, content: string | Uint8Array): void {
  const tmp = tempName(file);
  try {
    fs.writeFileSync(tmp, content);
    const fd = fs.openSync(tmp, 'r');
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fs.renameSync(tmp, file);
  } catch (err) {
    fs.rmSync(tmp, { force: true });
    throw new XftError(`cannot write ${file}: ${(err as Error).message}`, 'XFT_IO');
  }
}

/** A temporary file name beside `target` (stale ones of dead processes are removed first). */
export function temporaryName(target: string): string {
  return tempName(target);
}

/**
 * Throws XFT_IO at once unless `dir` could be written: its temporary folder and lock file go beside
 * it, so a probe folder is created (and removed) in the nearest existing folder above it. For callers
 * that would otherwise work for a long time before writing (`xft train`, `xft demo`).
 */
export function checkWritable(dir: string): void {
  const target = path.resolve(dir);
  if (fs.existsSync(target) && !fs.statSync(target).isDirectory()) throw new XftError(`${dir} exists and is not a folder`, 'XFT_IO');
  let parent = path.dirname(target);
  while (!fs.existsSync(parent) && path.dirname(parent) !== parent) parent = path.dirname(parent);
  if (!fs.statSync(parent).isDirectory()) throw new XftError(`${dir} cannot be written: ${parent} is not a folder`, 'XFT_IO');
  try {
    fs.rmdirSync(fs.mkdtempSync(path.join(parent, '.xft-probe-')));
  } catch (err) {
    throw new XftError(`${dir} cannot be written: creating a folder in ${parent} fails (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`, 'XFT_IO');
  }
}

/** An output folder must not exist, or be empty, unless `overwrite` (XFT_IO otherwise). */
export function checkOutputFolder(dir: string, overwrite?: boolean): void {
  recoverFolder(dir);
  if (fs.existsSync(dir) && !overwrite) {
    if (!fs.statSync(dir).isDirectory()) throw new XftError(`${dir} exists and is not a folder`, 'XFT_IO');
    if (fs.readdirSync(dir).length > 0) throw new XftError(`${dir} exists and is not empty (pass overwrite: true to replace it)`, 'XFT_IO');
  }
}

/**
 * Writes a folder atomically: `fill(tmpDir)` writes every file into a temporary folder beside
 * `dir`, which then replaces `dir` (an earlier folder there is removed only after the new one is
 * in place; an interrupted replacement is undone by recoverFolder). The folder is claimed
 * (lockFolder) for the whole write. Without `overwrite` (default true) an existing non-empty `dir`
 * is an error, checked under the claim both before filling and before the final rename.
 */
export function writeFolderAtomic(dir: string, fill: (tmpDir: string) => void, options: { overwrite?: boolean } = {}): void {
  const target = path.resolve(dir), overwrite = options.overwrite ?? true;
  fs.mkdirSync(path.dirname(target), { recursive: true });
  const lock = lockFolder(target);
  try {
    recoverFolder(target);
    removeStaleTemps(target);
    checkOutputFolder(target, overwrite);
    const tmp = tempName(target);
    fs.mkdirSync(tmp);
    try {
      fill(tmp);
      checkOutputFolder(target, overwrite);
      lock.verify();
    } catch (err) {
      fs.rmSync(tmp, { recursive: true, force: true });
      throw err;
    }
    const old = fs.existsSync(target) ? path.join(path.dirname(target), `${hidden(target, 'old')}${process.pid}-${rand()}`) : null;
    if (old) fs.renameSync(target, old);
    try {
      fs.renameSync(tmp, target);
    } catch (err) {
      if (old) fs.renameSync(old, target);
      fs.rmSync(tmp, { recursive: true, force: true });
      throw new XftError(`cannot write ${dir}: ${(err as Error).message}`, 'XFT_IO');
    }
    if (old) fs.rmSync(old, { recursive: true, force: true });
  } finally {
    lock.release();
  }
}

// ---- claims ----

/** A claim on an output folder; release() ends it (also done when the process exits). */
export interface FolderLock {
  readonly dir: string;
  /** the lock file */
  readonly file: string;
  /** throws XFT_BUSY when the lock file is no longer this claim's (removed or taken over) */
  verify(): void;
  release(): void;
}

interface LockRecord {
  pid: number;
  host: string;
  since: string;
  token: string;
  command?: string;
}

/** Lock files held by this process: path -> { token, nesting count }. */
const held = new Map<string, { token: string; count: number }>();
let exitHook = false;

function lockFileOf(dir: string): string {
  const target = path.resolve(dir);
  return path.join(path.dirname(target), `.${path.basename(target)}.lock`);
}

function readLock(file: string): { text: string; record: LockRecord | null } | null {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return null;
  }
  try {
    const r = JSON.parse(text) as LockRecord;
    return { text, record: r && Number.isSafeInteger(r.pid) && typeof r.host === 'string' ? r : null };
  } catch {
    return { text, record: null };
  }
}

/** A lock file left by a process that no longer runs (or a half-written one older than a few seconds). */
function isStale(file: string, record: LockRecord | null): boolean {
  if (!record) {
    const age = Date.now() - (fs.statSync(file, { throwIfNoEntry: false })?.mtimeMs ?? 0);
    return age > 5000;
  }
  return record.host === os.hostname() && record.pid !== process.pid && !alive(record.pid);
}

/**
 * Claims the output folder `dir` for this process (see the file comment). Throws XFT_BUSY at once
 * when another running process holds it; a stale lock (its process is gone) is taken over.
 */
export function lockFolder(dir: string): FolderLock {
  const target = path.resolve(dir), file = lockFileOf(target);
  fs.mkdirSync(path.dirname(target), { recursive: true });
  const mine = held.get(file);
  if (mine && readLock(file)?.record?.token === mine.token) {
    mine.count++;
    return handle(target, file, mine.token);
  }
  const record: LockRecord = { pid: process.pid, host: os.hostname(), since: new Date().toISOString(), token: `${process.pid}-${rand()}${rand()}`, command: process.argv.slice(1).join(' ').slice(0, 500) };
  for (let attempt = 0; attempt < 8; attempt++) {
    try {
      fs.writeFileSync(file, JSON.stringify(record) + '\n', { flag: 'wx' });
      held.set(file, { token: record.token, count: 1 });
      if (!exitHook) {
        exitHook = true;
        process.on('exit', releaseAll);
      }
      return handle(target, file, record.token);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw new XftError(`cannot claim ${dir} (lock file ${file}): ${(err as Error).message}`, 'XFT_IO');
    }
    const found = readLock(file);
    if (!found) continue; // released meanwhile: try again
    if (!isStale(file, found.record)) {
      const r = found.record;
      const who = r ? `process ${r.pid} on ${r.host} (since ${r.since}${r.command ? `: ${r.command}` : ''})` : 'another process';
      throw new XftError(`${dir} is being written by ${who}; wait for it to finish, or remove ${file} if that process is gone`, 'XFT_BUSY');
    }
    // take the stale lock over: move it aside, and only drop it if it is the stale one we read
    const aside = `${file}.stale-${process.pid}-${rand()}`;
    try {
      fs.renameSync(file, aside);
    } catch {
      continue;
    }
    if (fs.readFileSync(aside, 'utf8') === found.text) fs.rmSync(aside, { force: true });
    else {
      // a live claim was made between our read and the rename: put it back
      try {
        fs.linkSync(aside, file);
      } catch {
        // the name was claimed again meanwhile
      }
      fs.rmSync(aside, { force: true });
    }
  }
  throw new XftError(`cannot claim ${dir}: the lock file ${file} keeps changing (another writer)`, 'XFT_BUSY');
}

function handle(dir: string, file: string, token: string): FolderLock {
  let released = false;
  return {
    dir, file,
    verify() {
      if (readLock(file)?.record?.token !== token)
        throw new XftError(`${dir}: this process's claim was lost (the lock file ${file} was removed or taken over); not replacing the folder`, 'XFT_BUSY');
    },
    release() {
      if (released) return;
      released = true;
      const mine = held.get(file);
      if (!mine || mine.token !== token || --mine.count > 0) return;
      held.delete(file);
      if (readLock(file)?.record?.token === token) fs.rmSync(file, { force: true });
    },
  };
}

function releaseAll(): void {
  for (const [file, { token }] of held) if (readLock(file)?.record?.token === token) fs.rmSync(file, { force: true });
  held.clear();
}
