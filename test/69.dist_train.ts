// Data-parallel `xft train` on Gloo (CPU): with the same global batch, --nproc 2 and --nproc 3 give the
// per-step losses of one process (f32, within 1e-5), with the optimizer state replicated or sharded
// (--zero 1: AdamW by flat ranges, Adafactor by whole tensors); a batch that does not split is refused.
import t from 'tap';
import { distWorkspace, maxDiff, noGloo, ok } from './helpers/dist';

const { xft, losses } = distWorkspace('xft-dist-train-', (fn) => t.teardown(fn));
// an MoE: the balance loss and router noise must follow the micro-batch, not the rank
const RUN = ['train', 'moe', '--data', 'data.jsonl', '--seq-len', '200', '--batch-size', '6', '--micro-batch', '1', '--steps', '3', '--lr', '3e-3', '--warmup', '1'];
const TOLERANCE = 1e-5;

t.test('--nproc 2 and 3, with and without --zero 1, give the losses of one process (AdamW)', { skip: noGloo }, async (t) => {
  const one = await xft([...RUN, '--out', 'one']);
  ok(t, one);
  const base = losses('one');
  t.equal(base.length, 3);
  for (const [nproc, zero] of [[2, '0'], [3, '0'], [2, '1'], [3, '1']] as const) {
    const out = `n${nproc}z${zero}`;
    const r = await xft([...RUN, '--out', out, '--nproc', String(nproc), '--zero', zero], { XFT_DDP_BUCKET_BYTES: '20000' });
    ok(t, r);
    t.match(r.out, new RegExp(`data parallel: ${nproc} ranks × ${6 / nproc} micro-batches of 1 per step`));
    const d = maxDiff(losses(out), base);
    t.ok(d <= TOLERANCE, `--nproc ${nproc} --zero ${zero}: max |loss - one process's| = ${d.toExponential(2)} (${r.seconds.toFixed(1)} s)`);
  }
});

t.test('Adafactor sharded by whole tensors (--zero 1) gives the losses of one process', { skip: noGloo }, async (t) => {
  const one = await xft([...RUN, '--optim', 'adafactor', '--out', 'af1']);
  ok(t, one);
  const r = await xft([...RUN, '--optim', 'adafactor', '--out', 'af2', '--nproc', '2', '--zero', '1']);
  ok(t, r);
  const d = maxDiff(losses('af2'), losses('af1'));
  t.ok(d <= TOLERANCE, `max |loss - one process's| = ${d.toExponential(2)}`);
});

t.test('a batch that does not split over the ranks is refused before training', { skip: noGloo }, async (t) => {
  const r = await xft([...RUN, '--micro-batch', '2', '--out', 'bad', '--nproc', '2']);
  t.equal(r.code, 3, 'exit 3 (a value that does not fit)');
  t.match(r.err, /--batch-size 6 must be --micro-batch 2 × accumulation steps × world size 2: 3 micro-batches do not split over 2 ranks/);
  t.match(r.err, /rank \d of 2 exited with code 3/, 'the launcher names the rank');
});
