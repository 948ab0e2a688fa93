// Output folders: an interrupted replacement is recovered (the aside copy restored), folders are
// claimed with a lock file (a second writer fails at once, a dead writer's lock is taken over), and
// the final rename never replaces a folder the writer did not claim.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { XftError } from '../lib/errors';
import { lockFolder, recoverFolder, writeFolderAtomic, checkOutputFolder } from '../lib/folder';
import { tinyConfig } from '../lib/config';
import { createDense } from '../lib/xft';
import { saveModel, readCheckpointInfo, loadModel } from '../lib/checkpoint';
import { throwsCode } from './helpers/check';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-folders-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
const at = (name: string) => path.join(tmp, name);
const FOLDER = path.join(__dirname, '..', 'lib', 'folder.ts');

/** The pid of a process that has exited. */
function deadPid(): number {
  const r = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
  return Number(r.stdout);
}

/** A child process that claims `dir` and waits (until killed). */
async function holder(dir: string): Promise<ChildProcess> {
  const script = `
    const { lockFolder } = require(${JSON.stringify(FOLDER)});
    lockFolder(${JSON.stringify(dir)});
    console.log('locked');
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);`;
  const child = spawn(process.execPath, [...process.execArgv, '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', () => resolve());
    child.on('exit', (c) => reject(new Error(`holder exited with ${c}`)));
  });
  return child;
}

async function kill9(child: ChildProcess): Promise<void> {
  child.kill('SIGKILL');
  if (child.exitCode === null && child.signalCode === null) await new Promise((resolve) => child.on('exit', resolve));
}

const config = tinyConfig({ hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 2, num_hidden_layers: 1, vocab_size: 40 });

t.test('a kill between the two renames: the next read or write restores the aside copy', async (t) => {
  const dir = at('ckpt');
  const m = createDense(config, { seed: 1 });
  saveModel(m, dir);
  const before = fs.readFileSync(path.join(dir, 'model.safetensors'));
  // the state a writer killed between `rename(dir -> aside)` and `rename(tmp -> dir)` leaves
  const pid = deadPid();
  let n = 0;
  const simulate = () => {
    n++;
    fs.renameSync(dir, at(`.ckpt.old-${pid}-old${n}`));
    fs.mkdirSync(at(`.ckpt.tmp-${pid}-tmp${n}`));
    fs.writeFileSync(at(`.ckpt.tmp-${pid}-tmp${n}/model.safetensors`), 'the new copy, never renamed into place');
    t.notOk(fs.existsSync(dir), 'nothing under the final name');
  };
  simulate();
  t.equal(readCheckpointInfo(dir).kind, 'dense', 'a read restores it');
  t.same(fs.readFileSync(path.join(dir, 'model.safetensors')), before, 'with its contents');
  simulate();
  loadModel(dir).dispose();
  t.same(fs.readFileSync(path.join(dir, 'model.safetensors')), before, 'loadModel restores it too');
  simulate();
  throwsCode(t, () => saveModel(m, dir), 'XFT_IO', /not empty/, 'the next write without overwrite finds the restored folder');
  t.same(fs.readFileSync(path.join(dir, 'model.safetensors')), before, 'and leaves it');
  simulate();
  saveModel(m, dir, { overwrite: true });
  t.ok(fs.existsSync(path.join(dir, 'config.json')), 'a write with overwrite replaces the restored folder');
  t.same(fs.readdirSync(tmp).filter((n) => n.startsWith('.ckpt')), [], "the dead writer's temporary copies are cleared: nothing hidden is left");
  // an aside copy of a process that still runs is left alone (it is between its renames right now)
  fs.renameSync(dir, at(`.ckpt.old-${process.pid}-live`));
  t.notOk(recoverFolder(dir), 'not restored while its writer runs');
  t.ok(fs.existsSync(at(`.ckpt.old-${process.pid}-live`)));
  fs.renameSync(at(`.ckpt.old-${process.pid}-live`), dir);
  // an aside copy left after the second rename (killed before removing it) is cleared once the folder is back
  fs.mkdirSync(at(`.ckpt.old-${pid}-late`));
  writeFolderAtomic(dir, (d) => fs.writeFileSync(path.join(d, 'config.json'), '{}'));
  t.notOk(fs.existsSync(at(`.ckpt.old-${pid}-late`)), 'a stale aside copy beside a complete folder is removed');
  m.dispose();
});

t.test('claims: a second writer fails at once; nested claims in one process; release', async (t) => {
  const dir = at('claimed');
  const a = lockFolder(dir);
  const lockFile = at('.claimed.lock');
  const record = JSON.parse(fs.readFileSync(lockFile, 'utf8'));
  t.equal(record.pid, process.pid, 'the lock file holds the owner pid');
  t.equal(record.host, os.hostname(), 'and host');
  const nested = lockFolder(dir);
  nested.release();
  t.ok(fs.existsSync(lockFile), 'a nested claim keeps the lock until the outer one is released');
  writeFolderAtomic(dir, (d) => fs.writeFileSync(path.join(d, 'x'), '1'));
  t.ok(fs.existsSync(lockFile), 'a write under the claim keeps it');
  a.release();
  a.release();
  t.notOk(fs.existsSync(lockFile), 'released');

  const child = await holder(dir);
  const t0 = Date.now();
  throwsCode(t, () => lockFolder(dir), 'XFT_BUSY', new RegExp(`claimed is being written by process ${child.pid} on ${os.hostname()}.*remove .*\\.claimed\\.lock`), 'a second claim');
  throwsCode(t, () => writeFolderAtomic(dir, (d) => fs.writeFileSync(path.join(d, 'x'), '2')), 'XFT_BUSY', /being written by process/, 'a write to a claimed folder');
  t.ok(Date.now() - t0 < 2000, 'fails at once');
  t.equal(fs.readFileSync(path.join(dir, 'x'), 'utf8'), '1', 'the folder is untouched');
  await kill9(child);
  t.ok(fs.existsSync(lockFile), 'the killed holder left its lock');
  writeFolderAtomic(dir, (d) => fs.writeFileSync(path.join(d, 'x'), '3'));
  t.equal(fs.readFileSync(path.join(dir, 'x'), 'utf8'), '3', "a dead process's lock is taken over");
  t.notOk(fs.existsSync(lockFile), 'and released after the write');
});

t.test('locks that cannot be judged stale: another host, a fresh half-written lock; an old half-written one is taken over', async (t) => {
  const dir = at('foreign'), lockFile = at('.foreign.lock');
  fs.writeFileSync(lockFile, JSON.stringify({ pid: deadPid(), host: 'another-host', since: 'x', token: 'y' }));
  throwsCode(t, () => lockFolder(dir), 'XFT_BUSY', /on another-host/, 'a lock of another host');
  fs.writeFileSync(lockFile, '');
  throwsCode(t, () => lockFolder(dir), 'XFT_BUSY', /another process/, 'a lock being written right now');
  const old = new Date(Date.now() - 60_000);
  fs.utimesSync(lockFile, old, old);
  lockFolder(dir).release();
  t.notOk(fs.existsSync(lockFile), 'an empty lock a minute old is taken over');
});

t.test('the final step never replaces a folder the writer did not claim', async (t) => {
  const dir = at('raced');
  // another writer (not honouring the lock) creates the folder while this one fills its copy
  throwsCode(t, () => writeFolderAtomic(dir, (d) => {
    fs.writeFileSync(path.join(d, 'x'), 'mine');
    fs.mkdirSync(dir);
    fs.writeFileSync(path.join(dir, 'x'), 'theirs');
  }, { overwrite: false }), 'XFT_IO', /raced exists and is not empty/, 'without overwrite');
  t.equal(fs.readFileSync(path.join(dir, 'x'), 'utf8'), 'theirs', 'their folder stays');
  // the lock was removed and taken by someone else while filling
  throwsCode(t, () => writeFolderAtomic(dir, (d) => {
    fs.writeFileSync(path.join(d, 'x'), 'mine');
    fs.writeFileSync(at('.raced.lock'), JSON.stringify({ pid: process.ppid, host: os.hostname(), since: 'now', token: 'someone-else' }));
  }), 'XFT_BUSY', /claim was lost/, 'after losing the claim');
  t.equal(fs.readFileSync(path.join(dir, 'x'), 'utf8'), 'theirs', 'their folder stays');
  t.ok(fs.existsSync(at('.raced.lock')), "and so does their lock");
  fs.rmSync(at('.raced.lock'));
  t.same(fs.readdirSync(tmp).filter((n) => n.startsWith('.raced')), [], 'no temporary left behind');
  throwsCode(t, () => checkOutputFolder(dir), 'XFT_IO', /not empty/, 'checkOutputFolder');
  t.ok(new XftError('x', 'XFT_BUSY') instanceof Error);
});
