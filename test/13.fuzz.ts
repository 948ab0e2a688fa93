// The fuzz suite: ≥ 10,000 seeded calls (3 batches of 3,500) over every public op, Tensor constructor and method, and
// library function, with bad arguments (test/helpers/fuzz_child.ts says which), in child processes
// so that a crash (a signal) or a hang (no progress for HANG_MS) is counted, not fatal. Wanted:
// 0 crashes, 0 hangs, 0 exceptions that are not XftErrors, and no tensor left allocated by a call
// (an entry point checks its arguments before it allocates).
// A fifth batch corrupts the index values the ops take (routing experts, group offsets,
// permutations, token ids, targets) while everything else is valid: those must not crash either.
// XFT_FUZZ_SEED=<n> picks another seed (the default is fixed, so CI is reproducible); XFT_FUZZ_CALLS
// scales the number of calls per batch. A failure prints the seed, batch and call to rerun alone:
//   node --import=<tap's TypeScript loader> test/helpers/fuzz_child.ts <seed> <batch> <call> 1 <mode>
import t from 'tap';
import * as path from 'node:path';
import { spawn } from 'node:child_process';

const SEED = Number(process.env.XFT_FUZZ_SEED ?? 20261201);
const CALLS = Number(process.env.XFT_FUZZ_CALLS ?? 3500);
const GENERAL_BATCHES = 3;
const INDEX_CALLS = Math.max(50, Math.round(CALLS / 10));
/** A call that makes no progress for this long is a hang. */
const HANG_MS = 30_000;
/** A batch restarts after a crash at most this many times (each restart starts a process). */
const MAX_RESTARTS = 4;
const CHILD = path.join(__dirname, 'helpers', 'fuzz_child.ts');
// the children need tap's TypeScript loader, not its coverage and mock hooks (each start costs seconds)
const NODE_ARGS = process.execArgv.filter((a) => !/processinfo|@tapjs\/mock/.test(a));

interface Failure { batch: number; call: number; name: string; how: string }
interface BatchResult {
  calls: number; returned: number; xftErrors: number; otherErrors: number; leakedTensors: number;
  others: { call: number; name: string; error: string }[]; leaks: Record<string, number>; crashes: Failure[]; hangs: Failure[]; stoppedAt?: number;
}

/** Runs calls [first, first + count) of a batch in one child; resolves with its counts, or with the call it died in. */
function runChild(batch: number, first: number, count: number, mode: string): Promise<{ summary?: Record<string, unknown>; last?: [number, string]; how?: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [...NODE_ARGS, CHILD, String(SEED), String(batch), String(first), String(count), mode], {
      env: { ...process.env, XFT_DEVICE: 'cpu', TS_NODE_TRANSPILE_ONLY: '1' }, stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '', err = '', hung = false;
    let timer = setTimeout(() => ((hung = true), child.kill('SIGKILL')), HANG_MS * 2); // startup included
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      clearTimeout(timer);
      timer = setTimeout(() => ((hung = true), child.kill('SIGKILL')), HANG_MS);
    });
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const lines = out.trim().split('\n');
      const lastLine = lines[lines.length - 1] ?? '';
      if (!hung && code === 0 && lastLine.startsWith('{')) return resolve({ summary: JSON.parse(lastLine) });
      const lastCall = [...lines].reverse().find((l) => l.startsWith('call '));
      const m = lastCall ? /^call (\d+) (.*)$/.exec(lastCall) : null;
      const how = hung ? `hang (no progress for ${HANG_MS / 1000} s)` : signal ? `signal ${signal}` : `exit ${code}: ${err.trim().split('\n').slice(-3).join(' | ')}`;
      resolve({ last: m ? [Number(m[1]), m[2]] : [first - 1, '(before the first call)'], how });
    });
  });
}

async function runBatch(batch: number, count: number, mode: string): Promise<BatchResult> {
  const total: BatchResult = { calls: 0, returned: 0, xftErrors: 0, otherErrors: 0, leakedTensors: 0, others: [], leaks: {}, crashes: [], hangs: [] };
  let first = 0;
  for (let attempt = 0; first < count; attempt++) {
    const r = await runChild(batch, first, count - first, mode);
    if (r.summary) {
      const s = r.summary as unknown as BatchResult;
      for (const k of ['calls', 'returned', 'xftErrors', 'otherErrors', 'leakedTensors'] as const) total[k] += s[k];
      total.others.push(...s.others.map((o) => ({ ...o, name: `batch ${batch}: ${o.name}` })));
      for (const [k, v] of Object.entries(s.leaks)) total.leaks[k] = (total.leaks[k] ?? 0) + v;
      break;
    }
    const [call, name] = r.last!;
    const failure = { batch, call, name, how: r.how! };
    (r.how!.startsWith('hang') ? total.hangs : total.crashes).push(failure);
    total.calls += call - first + 1; // the calls before it returned or threw an XftError (a non-XftError is caught in the child)
    first = call + 1;
    if (attempt >= MAX_RESTARTS) {
      total.stoppedAt = first;
      break;
    }
  }
  return total;
}

t.test(`fuzz: every public entry point returns or throws an XftError (seed ${SEED})`, async (t) => {
  const jobs: [number, number, string][] = [
    ...Array.from({ length: GENERAL_BATCHES }, (_, b) => [b, CALLS, 'general'] as [number, number, string]),
    [GENERAL_BATCHES, INDEX_CALLS, 'index-values'],
  ];
  // two children at a time (CI has 2 cores)
  const results: BatchResult[] = [];
  const queue = [...jobs];
  await Promise.all([0, 1].map(async () => {
    for (let job = queue.shift(); job; job = queue.shift()) results[job[0]] = await runBatch(...job);
  }));
  const general = results.slice(0, GENERAL_BATCHES), index = results[GENERAL_BATCHES];
  const sum = (rs: BatchResult[], k: 'calls' | 'returned' | 'xftErrors' | 'otherErrors' | 'leakedTensors') => rs.reduce((a, r) => a + r[k], 0);
  const all = [...general, index];
  t.comment(`seed ${SEED}: ${sum(all, 'calls')} calls (${sum(index ? [index] : [], 'calls')} with corrupted index values): ` +
    `${sum(all, 'returned')} returned, ${sum(all, 'xftErrors')} XftErrors, ${sum(all, 'otherErrors')} other exceptions, ` +
    `${all.reduce((a, r) => a + r.crashes.length, 0)} crashes, ${all.reduce((a, r) => a + r.hangs.length, 0)} hangs, ${sum(all, 'leakedTensors')} tensors leaked`);
  const describeFailures = (fs: Failure[]) => fs.map((f) => `batch ${f.batch} call ${f.call} ${f.name}: ${f.how}`).join('\n') || 'none';
  t.ok(sum(all, 'calls') >= 10_000 || CALLS < 3500, `at least 10,000 calls (${sum(all, 'calls')})`);
  t.equal(general.reduce((a, r) => a + r.crashes.length, 0), 0, `no crash: ${describeFailures(general.flatMap((r) => r.crashes))}`);
  t.equal(all.reduce((a, r) => a + r.hangs.length, 0), 0, `no hang: ${describeFailures(all.flatMap((r) => r.hangs))}`);
  t.equal(sum(all, 'otherErrors'), 0, `only XftErrors: ${all.flatMap((r) => r.others).slice(0, 20).map((o) => `${o.name} (call ${o.call}): ${o.error}`).join('\n') || 'none'}`);
  t.equal(sum(all, 'leakedTensors'), 0, `a call that fails allocates nothing: ${JSON.stringify(Object.assign({}, ...all.map((r) => r.leaks)))}`);
  t.equal(index.crashes.length, 0, `corrupted index values do not crash: ${describeFailures(index.crashes)}` +
    (index.stoppedAt !== undefined ? ` (stopped after ${MAX_RESTARTS + 1} crashes, at call ${index.stoppedAt} of ${INDEX_CALLS})` : ''));
  t.ok(sum(all, 'returned') > 1000, 'valid calls among them return');
});
