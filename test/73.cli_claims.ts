// Output folders claimed by one writer, end to end: two upcycles into one new folder, two trains with
// one --out (the second fails at once), a killed run's locks taken over and its .resume restored
// from the aside copy a kill between two renames leaves.
import t from 'tap';
import * as fs from 'node:fs';
import { readCheckpointInfo } from '../lib/checkpoint';
import { DATA, cliWorkspace } from './helpers/cli';

const { tmp, at, xft, start } = cliWorkspace('xft-cli-claims-', (fn) => t.teardown(fn));

t.test('output folders are claimed: two writers of one folder never both succeed; a dead run\'s lock and aside copy are recovered', async (t) => {
  const a = start('upcycle', 'dense', 'twin', '--experts', '4', '--top-k', '3'), b = start('upcycle', 'dense', 'twin', '--experts', '4', '--top-k', '3');
  const results = await Promise.all([a.done, b.done]);
  t.same(results.map((r) => r.code).sort(), [0, 1], 'two upcycles into one new folder: one succeeds, the other exits 1');
  t.match(results.find((r) => r.code === 1)!.err, /twin is being written by process \d+|twin exists and is not empty/);
  t.equal(readCheckpointInfo(at('twin')).kind, 'moe');

  // train A holds --out claim (and claim.resume); stopped (SIGSTOP) after its first save, it still runs
  const A = start('train', 'dense', ...DATA, '--batch-size', '4', '--steps', '60', '--lr', '1e-3', '--save-every', '2', '--out', 'claim');
  await new Promise<void>((resolve) => {
    const poll = setInterval(() => {
      if (/saved a resumable state/.test(A.err())) {
        clearInterval(poll);
        A.child.kill('SIGSTOP');
        resolve();
      }
    }, 5);
  });
  const B = xft('train', 'dense', ...DATA, '--batch-size', '4', '--steps', '60', '--out', 'claim');
  t.equal(B.code, 1, 'a second train with the same --out exits 1');
  t.match(B.err, new RegExp(`claim is being written by process ${A.child.pid} on `), 'naming the owner');
  t.notMatch(B.out, /SFT of the dense model/, 'at once: before loading anything');
  A.child.kill('SIGKILL');
  await A.done;
  // and a kill that struck between the two renames of a .resume save
  fs.renameSync(at('claim.resume'), at(`.claim.resume.old-${A.child.pid}-zz`));
  t.ok(fs.existsSync(at('.claim.lock')) && fs.existsSync(at('.claim.resume.lock')), 'the killed run left its locks');
  const resumed = xft('train', 'dense', '--out', 'claim', '--resume');
  t.equal(resumed.code, 0, `--resume takes over the dead run's locks and restores its .resume: ${resumed.err}`);
  t.match(resumed.out, /resuming at step \d+/);
  t.equal(JSON.parse(fs.readFileSync(at('claim/xft_train.json'), 'utf8')).losses.length, 60, 'and completes the run');
  t.same(fs.readdirSync(tmp).filter((n) => n.startsWith('.claim') || n.startsWith('.twin')), [], 'no lock, temporary or aside copy left');
});
