// Data-parallel `xft train` under faults, and resuming at another world size: a rank killed mid-run
// ends every rank with an error naming it, the last .resume (written by rank 0, the full optimizer
// state gathered from the ZeRO shards) stays loadable, and resuming it with 1 or 3 processes continues
// the one-process curve; a rank that hangs stops the run within --dist-timeout.
import t from 'tap';
import * as fs from 'node:fs';
import { distWorkspace, maxDiff, noGloo, ok } from './helpers/dist';
import { SafetensorsReader } from '../lib/safetensors';

const { at, xft, losses } = distWorkspace('xft-dist-faults-', (fn) => t.teardown(fn));
const RUN = ['train', 'moe', '--data', 'data.jsonl', '--seq-len', '200', '--batch-size', '6', '--micro-batch', '1', '--steps', '5', '--lr', '3e-3', '--warmup', '1'];
const TOLERANCE = 1e-5;

t.test('a killed rank ends the run; the .resume it leaves continues the curve with 1 and with 3 processes', { skip: noGloo }, async (t) => {
  const unbroken = await xft([...RUN, '--out', 'whole']);
  ok(t, unbroken);
  const curve = losses('whole');
  t.equal(curve.length, 5);

  // rank 1 is killed (SIGKILL) after step 3; the state of step 2 was saved
  const r = await xft([...RUN, '--out', 'run', '--nproc', '2', '--zero', '1', '--save-every', '2', '--dist-timeout', '20'], { XFT_TEST_DIE_AT_STEP: '1:3' });
  t.not(r.code, 0, `exit ${r.code}`);
  t.match(r.err, /xft: train --nproc 2: rank 1 of 2 was killed by SIGKILL/, 'the launcher names the rank and the cause');
  t.match(r.err, /the other ranks were stopped/);
  t.match(r.err, /\[rank 0\] xft: ProcessGroup\.\w+ \(collective #\d+ of rank 0\/2\): rank 1 is gone/, 'rank 0 says which rank is gone');
  t.ok(r.seconds < 20, `every rank stopped in ${r.seconds.toFixed(1)} s, within the timeout`);
  t.notOk(fs.existsSync(at('run')), 'no output checkpoint');
  const info = JSON.parse(fs.readFileSync(at('run.resume/trainer_state.json'), 'utf8'));
  t.equal(info.step, 2, '.resume holds step 2');
  const opt = new SafetensorsReader(at('run.resume/optimizer.safetensors'));
  const params = new SafetensorsReader(at('run.resume/params.safetensors'));
  t.same(opt.names().filter((n) => n.startsWith('m.')).map((n) => n.slice(2)).sort(), params.names().sort(), 'the full AdamW state: one m per parameter (gathered from the shards)');
  const wrong = opt.names().filter((n) => JSON.stringify(opt.info(n).shape) !== JSON.stringify(params.info(n.replace(/^[mv]\./, '')).shape));
  t.same(wrong, [], "every moment has its parameter's shape");

  // --resume continues <out>.resume into <out> (the saved options name it): one copy per resume
  fs.cpSync(at('run.resume'), at('saved.resume'), { recursive: true });
  for (const [nproc, zero] of [[1, '0'], [3, '1']] as const) {
    fs.rmSync(at('run'), { recursive: true, force: true });
    fs.cpSync(at('saved.resume'), at('run.resume'), { recursive: true });
    const rr = await xft(['train', 'moe', '--out', 'run', '--resume', '--zero', zero, ...(nproc > 1 ? ['--nproc', String(nproc)] : [])]);
    ok(t, rr);
    t.match(rr.out, nproc > 1 ? /resuming at step 2 with the saved options on 3 ranks/ : /resuming at step 2 with the saved options\n/);
    const d = maxDiff(losses('run'), curve);
    t.ok(d <= TOLERANCE, `resumed with --nproc ${nproc} --zero ${zero}: steps 1-5 within ${d.toExponential(2)} of the unbroken one-process run`);
    t.notOk(fs.existsSync(at('run.resume')), 'the finished run removed its .resume');
  }
});

t.test('a rank that hangs stops every rank within --dist-timeout, naming it', { skip: noGloo }, async (t) => {
  const r = await xft([...RUN, '--out', 'hang', '--nproc', '2', '--dist-timeout', '3'], { XFT_TEST_HANG_AT_STEP: '1:1' });
  t.not(r.code, 0, `exit ${r.code}`);
  t.match(r.err, /rank 1 did not arrive within 3000 ms/, 'rank 0 names the rank that hangs');
  t.match(r.err, /xft: train --nproc 2: rank 0 of 2 exited with code 1/, 'and the run ends');
  t.ok(r.seconds < 20, `in ${r.seconds.toFixed(1)} s`);
  t.notOk(fs.existsSync(at('hang')), 'no output checkpoint');
});
