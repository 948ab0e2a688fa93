// lib/dist: where a process sits (torchrun and Slurm variables), the CPU (Gloo) collectives across 2-4
// real processes against the arithmetic (f32, bf16, uneven sizes, views, async), identical bits on every
// rank, a rank that dies or hangs mid-run named in the others' XftError within the timeout, and the
// launcher stopping every rank when one fails.
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import * as path from 'node:path';
import { XftError } from '../lib/errors';
import { Tensor, backend } from '../lib/tensor';
import { ProcessGroup, distEnv, expandNodelist, launch } from '../lib/dist';
import { freePort } from '../lib/dist/launch';
import { distNative } from '../lib/dist/native';
import { noGloo } from './helpers/dist';
import { distInput } from './helpers/dist_inputs';

const CHILD = path.join(__dirname, 'helpers', 'dist_child.ts');
// the children load TypeScript through a light hook (tap's loader costs seconds of CPU per process)
const TS_REQUIRE = path.join(__dirname, 'helpers', 'ts_require.js');
/** The children's environment without tap's NODE_OPTIONS (its loaders would take the .ts files and cost seconds each). */
const CHILD_ENV = { ...process.env, NODE_OPTIONS: '' };
const skipGloo = noGloo;

interface RankRun {
  code: number | null;
  signal: string | null;
  out: Record<string, unknown> & { error?: { code: string; message: string } | null; ms?: number; after?: string };
  stderr: string;
}

/** Runs `n` ranks of dist_child.ts; a rank in `stallers` is killed once every other rank has exited. */
async function runRanks(n: number, args: string[], stallers: number[] = []): Promise<RankRun[]> {
  const port = await freePort();
  const runs: Promise<RankRun>[] = [];
  const kids: ReturnType<typeof spawn>[] = [];
  // a failure scenario's survivors hold their group (and rank 0 its store) until every survivor has
  // printed what it saw: else one that reports late blames rank 0, whose store left with it
  const reported: boolean[] = [];
  const report = (rank: number) => {
    reported[rank] = true;
    if (reported.length === n && reported.every((done, r) => done || stallers.includes(r))) for (const kid of kids) kid.stdin!.end();
  };
  for (let rank = 0; rank < n; rank++) {
    const env = { ...CHILD_ENV, RANK: String(rank), WORLD_SIZE: String(n), LOCAL_RANK: String(rank), LOCAL_WORLD_SIZE: String(n), MASTER_ADDR: '127.0.0.1', MASTER_PORT: String(port) };
    // the entry is JavaScript (-e) so that tap's process-info hooks, which it adds to every child, leave the .ts to the hook
    const child = spawn(process.execPath, ['-r', TS_REQUIRE, '-e', `require(${JSON.stringify(CHILD)})`], { env: { ...env, XFT_TEST_DIST: args.join(' ') }, stdio: ['pipe', 'pipe', 'pipe'] });
    kids.push(child);
    reported.push(false);
    const guard = setTimeout(() => child.kill('SIGKILL'), 60_000);
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d) => {
      stdout += d;
      if (stdout.includes('\n')) report(rank);
    });
    child.stderr!.on('data', (d) => (stderr += d));
    runs.push(
      new Promise((resolve) =>
        child.on('close', (code, signal) => {
          report(rank);
          clearTimeout(guard);
          const line = stdout.trim().split('\n').pop() ?? '';
          let out = {};
          try {
            out = JSON.parse(line);
          } catch {
            /* no result line */
          }
          resolve({ code, signal, out, stderr });
        }),
      ),
    );
  }
  const others = runs.filter((_, r) => !stallers.includes(r));
  void Promise.all(others).then(() => stallers.forEach((r) => kids[r].kill('SIGKILL')));
  return Promise.all(runs);
}

// ---- reference arithmetic ----
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
/** f64 -> bf16 (through f32, round to nearest even), back to a number. */
function bf16(x: number): number {
  f32[0] = x;
  const b = u32[0];
  u32[0] = ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) << 16;
  return f32[0];
}
const round = (dtype: string, x: number) => (dtype === 'bf16' ? bf16(x) : Math.fround(x));
const inputOf = (dtype: string, rank: number, n: number, salt: number) => distInput(rank, n, salt).map((x) => round(dtype, x));
/** Per element, the exact sum of every rank's (rounded) input, and the sum of their magnitudes. */
type Sums = number[] & { abs: number[] };
const sumOf = (dtype: string, ws: number, n: number, salt: number): Sums => {
  const s = new Array<number>(n).fill(0) as Sums;
  s.abs = new Array<number>(n).fill(0);
  for (let r = 0; r < ws; r++)
    inputOf(dtype, r, n, salt).forEach((x, i) => {
      s[i] += x;
      s.abs[i] += Math.abs(x);
    });
  return s;
};
const scaled = (s: Sums, k: number, from = 0, to = s.length): Sums => Object.assign(s.slice(from, to).map((x) => x * k), { abs: s.abs.slice(from, to).map((x) => x * k) });
/** |got - want| within f32 summation error (a few ulps of the sum of magnitudes), plus the final bf16 rounding for bf16. */
function close(t: Test, got: unknown, want: Sums, dtype: string, what: string) {
  const g = got as number[];
  const tol = (w: number, i: number) => (dtype === 'bf16' ? Math.abs(w) * 2 ** -8 : 0) + want.abs[i] * 2 ** -21 + 1e-30;
  const bad = want.findIndex((w, i) => !(Math.abs(g[i] - w) <= tol(w, i)));
  t.ok(g.length === want.length && bad < 0, `${what}: ${bad < 0 ? 'matches' : `element ${bad}: ${g[bad]} vs ${want[bad]}`}`);
}

t.test('distEnv: torchrun, Slurm and single-process layouts; bad values name the variable', async (t) => {
  t.same(distEnv({}), { rank: 0, worldSize: 1, localRank: 0, localWorldSize: 1, masterAddr: '127.0.0.1', masterPort: 29500, source: 'single' });
  const tr = { RANK: '3', WORLD_SIZE: '8', LOCAL_RANK: '1', LOCAL_WORLD_SIZE: '2', MASTER_ADDR: 'node7', MASTER_PORT: '1234' };
  t.same(distEnv(tr), { rank: 3, worldSize: 8, localRank: 1, localWorldSize: 2, masterAddr: 'node7', masterPort: 1234, source: 'torchrun' });
  t.equal(distEnv({ ...tr, XFT_DIST_LAUNCHER: '1' }).source, 'xft');
  t.same(distEnv({ RANK: '0', WORLD_SIZE: '1' }), { rank: 0, worldSize: 1, localRank: 0, localWorldSize: 1, masterAddr: '127.0.0.1', masterPort: 29500, source: 'torchrun' });
  const slurm = { SLURM_PROCID: '5', SLURM_NTASKS: '8', SLURM_LOCALID: '1', SLURM_NODELIST: 'gpu[03-06],login1', SLURM_TASKS_PER_NODE: '2(x4)' };
  t.same(distEnv(slurm), { rank: 5, worldSize: 8, localRank: 1, localWorldSize: 2, masterAddr: 'gpu03', masterPort: 29500, source: 'slurm' });
  t.equal(distEnv({ ...slurm, MASTER_ADDR: '10.0.0.1', MASTER_PORT: '4000' }).masterAddr, '10.0.0.1', 'MASTER_ADDR overrides the node list');
  t.equal(distEnv({ ...slurm, MASTER_PORT: '4000' }).masterPort, 4000);
  t.equal(distEnv({ ...tr, SLURM_PROCID: '0', SLURM_NTASKS: '2' }).source, 'torchrun', 'torchrun variables win over Slurm');
  t.same(expandNodelist('a,b'), ['a', 'b']);
  t.same(expandNodelist('node[01-03,7],x'), ['node01', 'node02', 'node03', 'node7', 'x']);
  t.same(expandNodelist('r[1-2]-n[8-9]'), ['r1-n8', 'r1-n9', 'r2-n8', 'r2-n9']);
  t.same(expandNodelist('n[098-100]'), ['n098', 'n099', 'n100'], 'zero padding from the first bound');
  const bad: [Record<string, string>, RegExp][] = [
    [{ RANK: 'x', WORLD_SIZE: '2', MASTER_ADDR: 'a', MASTER_PORT: '1' }, /RANK but received "x"/],
    [{ RANK: '2', WORLD_SIZE: '2', MASTER_ADDR: 'a', MASTER_PORT: '1' }, /integer in \[0, 1\] for the environment variable RANK/],
    [{ RANK: '0', WORLD_SIZE: '0' }, /WORLD_SIZE/],
    [{ RANK: '0', WORLD_SIZE: '2', MASTER_PORT: '1' }, /MASTER_ADDR is required/],
    [{ RANK: '0', WORLD_SIZE: '2', MASTER_ADDR: 'a', MASTER_PORT: '70000' }, /MASTER_PORT/],
    [{ RANK: '1', WORLD_SIZE: '4', LOCAL_RANK: '2', LOCAL_WORLD_SIZE: '2', MASTER_ADDR: 'a', MASTER_PORT: '5' }, /LOCAL_RANK/],
    [{ WORLD_SIZE: '2', MASTER_ADDR: 'a', MASTER_PORT: '5' }, /RANK is required/],
    [{ SLURM_PROCID: '0', SLURM_NTASKS: '2', SLURM_LOCALID: '0', SLURM_NODELIST: 'node[1-' }, /SLURM_NODELIST but received "node\[1-"/],
    [{ SLURM_PROCID: '0', SLURM_NTASKS: '2', SLURM_LOCALID: '0', SLURM_NODELIST: 'node[3-1]' }, /SLURM_NODELIST/],
    [{ SLURM_PROCID: '0', SLURM_NTASKS: '2', SLURM_LOCALID: '0' }, /SLURM_NODELIST \(or MASTER_ADDR\) is required/],
    [{ SLURM_PROCID: '9', SLURM_NTASKS: '2', SLURM_NODELIST: 'a' }, /SLURM_PROCID/],
  ];
  for (const [env, re] of bad) t.throws(() => distEnv(env), { name: 'XftError', code: 'XFT_VALUE', message: re }, JSON.stringify(env));
});

t.test('a world of one: every collective is local, arguments are checked, no Gloo needed', async (t) => {
  const g = await ProcessGroup.init({ env: {} });
  t.equal(g.worldSize, 1);
  t.equal(g.backend, 'gloo');
  const a = Tensor.from([1, 2, 3, 4], [4]);
  g.allReduce(a, 'avg');
  t.same(Array.from(a.toArray()), [1, 2, 3, 4]);
  const out = Tensor.zeros([4]);
  g.reduceScatter(a, out);
  g.allGather(a, out);
  t.same(Array.from(out.toArray()), [1, 2, 3, 4]);
  g.allReduceAsync(a).wait();
  t.same(g.allReduceNumbers([2.5, 3], 'avg'), [2.5, 3]);
  t.same(g.broadcastJson({ x: [1, 'a'] }), { x: [1, 'a'] });
  g.barrier();
  t.throws(() => g.allReduce(Tensor.from([1], [1], { dtype: 'i32' })), { code: 'XFT_DTYPE', message: /f32 or bf16/ });
  t.throws(() => g.allReduce([a, Tensor.zeros([2], { dtype: 'bf16' })]), { code: 'XFT_DTYPE', message: /one dtype/ });
  t.throws(() => g.allReduce(a, 'max' as 'sum'), { code: 'XFT_VALUE', message: /op/ });
  t.throws(() => g.reduceScatter(a, Tensor.zeros([3])), { code: 'XFT_SHAPE', message: /worldSize 1/ });
  t.throws(() => g.broadcast(a, 1), { code: 'XFT_VALUE', message: /root/ });
  t.throws(() => g.allReduceNumbers([NaN]), { code: 'XFT_VALUE', message: /values\[0\]/ });
  const gone = Tensor.zeros([1]);
  gone.dispose();
  t.throws(() => g.allReduce(gone), { code: 'XFT_DISPOSED' });
  g.dispose();
  t.throws(() => g.allReduce(a), { code: 'XFT_DISPOSED' });
  await t.rejects(ProcessGroup.init({ device: 'tpu' as 'cpu', env: {} }), { code: 'XFT_DEVICE' });
  await t.rejects(ProcessGroup.init({ timeoutMs: 0, env: {} }), { code: 'XFT_VALUE', message: /timeoutMs/ });
  // a build without Gloo says what to install (played by hiding it)
  const had = distNative.distGloo;
  (distNative as { distGloo: boolean }).distGloo = false;
  try {
    await t.rejects(ProcessGroup.init({ env: { RANK: '0', WORLD_SIZE: '2', MASTER_ADDR: '127.0.0.1', MASTER_PORT: '1' } }), {
      name: 'XftError', code: 'XFT_NATIVE', message: /apt-get install libgloo-dev/,
    });
  } finally {
    (distNative as { distGloo: boolean }).distGloo = had;
  }
});

for (const ws of [2, 3]) {
  t.test(`${ws} processes over Gloo: every collective against the arithmetic, identical bits on every rank`, { skip: skipGloo }, async (t) => {
    const runs = await runRanks(ws, ['collectives', '-1', '20000']);
    for (const [r, run] of runs.entries()) t.equal(run.code, 0, `rank ${r} exits 0 ${run.stderr}`);
    const outs = runs.map((r) => r.out);
    for (const key of Object.keys(outs[0]).filter((k) => k.endsWith('bits') || k === 'asyncBits'))
      t.ok(outs.every((o) => JSON.stringify(o[key]) === JSON.stringify(outs[0][key])), `${key}: the same bits on every rank`);
    for (const dtype of ['f32', 'bf16']) {
      const saltBase = dtype === 'bf16' ? 100 : 0;
      for (const op of ['sum', 'avg']) {
        const got = outs[0][`allReduce.${dtype}.${op}`] as number[][];
        [1, 5, 1031].forEach((n, i) => close(t, got[i], scaled(sumOf(dtype, ws, n, 10 * i + saltBase), op === 'avg' ? 1 / ws : 1), dtype, `allReduce ${dtype} ${op} [${n}]`));
      }
      close(t, outs[1][`allReduce1.${dtype}`], sumOf(dtype, ws, 4099, 7), dtype, `allReduce ${dtype} one tensor of 4099`);
      for (const [r, o] of outs.entries()) {
        const own = inputOf(dtype, r, 12, 9);
        const summed = sumOf(dtype, ws, 12, 9);
        const view = o[`view.${dtype}`] as number[];
        t.same([...view.slice(0, 3), ...view.slice(9)], [...own.slice(0, 3), ...own.slice(9)], `rank ${r} ${dtype}: rows outside the view untouched`);
        close(t, view.slice(3, 9), scaled(summed, 1, 3, 9), dtype, `rank ${r} ${dtype}: the narrowed rows summed`);
        close(t, o[`reduceScatter.${dtype}`], scaled(sumOf(dtype, ws, 3 * ws, 11), 1, 3 * r, 3 * r + 3), dtype, `rank ${r} ${dtype}: reduce-scatter chunk ${r}`);
        t.same(o[`allGather.${dtype}`], Array.from({ length: ws }, (_, q) => inputOf(dtype, q, 5, 13)).flat(), `rank ${r} ${dtype}: all-gather exact`);
        t.same(o[`broadcast.${dtype}`], [inputOf(dtype, ws - 1, 6, 15), inputOf(dtype, ws - 1, 2, 17)], `rank ${r} ${dtype}: broadcast from rank ${ws - 1}`);
      }
    }
    close(t, outs[0].async, scaled(sumOf('f32', ws, 2000, 19), 1 / ws), 'f32', 'allReduceAsync avg');
    t.ok(outs.every((o) => o.asyncDone === true), 'done after wait()');
    t.ok(outs.every((o) => JSON.stringify(o.second) === JSON.stringify([ws, ws, ws])), 'a second group made after dispose() works');
    const n0 = Array.from({ length: ws }, (_, r) => r + 0.5).reduce((a, b) => a + b);
    for (const o of outs) {
      t.equal((o.numbers as number[])[0], n0);
      t.ok(Math.abs((o.numbers as number[])[1] - 1e-3 * ((ws * (ws - 1)) / 2)) < 1e-15);
      t.same(o.numbersAvg, [(ws - 1) / 2]);
      t.same(o.json, { step: 7, from: 1, note: 'ünïcode' });
    }
  });
}

t.test('a rank that exits mid-run: the others throw XFT_DIST naming it, within the timeout, and stay failed', { skip: skipGloo }, async (t) => {
  const timeoutMs = 4000;
  const runs = await runRanks(3, ['die', '1', String(timeoutMs)]);
  t.equal(runs[1].code, 7, 'the victim exited 7');
  for (const r of [0, 2]) {
    const o = runs[r].out;
    t.equal(runs[r].code, 0, `rank ${r} reported and exited ${runs[r].stderr}`);
    t.equal(o.error?.code, 'XFT_DIST', `rank ${r}: XFT_DIST`);
    t.match(o.error?.message, /ProcessGroup\.allReduce \(collective #2 of rank \d\/3\): rank 1 is gone \(its connection to the rendezvous store closed/, `rank ${r} names rank 1`);
    t.ok((o.ms ?? Infinity) < timeoutMs + 3000, `rank ${r} failed within the timeout (${o.ms} ms)`);
    t.match(o.after, /failed earlier/, 'later collectives fail at once');
  }
});

t.test('a rank that hangs: the others time out naming it; rank 0 gone: named too', { skip: skipGloo }, async (t) => {
  const timeoutMs = 1500;
  const runs = await runRanks(3, ['hang', '2', String(timeoutMs)], [2]);
  for (const r of [0, 1]) {
    const o = runs[r].out;
    t.equal(o.error?.code, 'XFT_DIST', `rank ${r}: XFT_DIST ${runs[r].stderr}`);
    t.match(o.error?.message, new RegExp(`rank 2 did not arrive within ${timeoutMs} ms \\(its last was #1 \\(allReduce\\)`), `rank ${r} names rank 2`);
    t.ok((o.ms ?? Infinity) < timeoutMs + 4000, `rank ${r} failed within the timeout (${o.ms} ms)`);
  }
  const dead0 = await runRanks(2, ['die', '0', '4000']);
  t.equal(dead0[0].code, 7);
  t.match(dead0[1].out.error?.message, /rank 0 is gone: its rendezvous store at 127\.0\.0\.1:\d+ cannot be reached/, 'rank 0 named');
});

// NCCL is loaded at run time: without it, a CUDA group says what to install (the emulated CUDA backend
// plays a GPU host without NCCL: bash cuda/dev/emu/check.sh quick test/68.dist.ts)
const b = backend();
const emulated = b.kind === 'cuda' && /host emulation/.test(b.name ?? '');
t.test('a CUDA process group without NCCL: XFT_NATIVE naming libnccl.so.2 and what to install', { skip: emulated ? false : 'needs the emulated CUDA backend' }, async (t) => {
  process.env.XFT_NCCL_LIBRARY = '/nonexistent/libnccl.so.2';
  try {
    const env = { RANK: '0', WORLD_SIZE: '2', LOCAL_RANK: '0', LOCAL_WORLD_SIZE: '2', MASTER_ADDR: '127.0.0.1', MASTER_PORT: String(await freePort()) };
    await t.rejects(ProcessGroup.init({ env, device: 'cuda', timeoutMs: 5000 }), {
      name: 'XftError', code: 'XFT_NATIVE',
      message: /cannot load NCCL \(libnccl\.so\.2\); tried:\n {2}\/nonexistent\/libnccl\.so\.2: [^\n]+\n {2}libnccl\.so\.2: [\s\S]*pip install nvidia-nccl-cu12/,
    });
  } finally {
    delete process.env.XFT_NCCL_LIBRARY;
  }
  t.ok(distNative.distNccl, 'the NCCL loader is compiled in');
});

t.test('launch: N ranks with the torchrun variables, output prefixed; one failure stops all and names the rank', async (t) => {
  const chunks: string[] = [];
  const sink = { write: (s: string) => chunks.push(String(s)) } as unknown as NodeJS.WritableStream;
  const echo = `console.log([process.env.RANK, process.env.WORLD_SIZE, process.env.LOCAL_RANK, process.env.MASTER_ADDR, process.env.XFT_DIST_LAUNCHER].join(' '))`;
  let r = await launch({ nproc: 3, argv: [process.execPath, '-e', echo], env: CHILD_ENV, stdout: sink as never, stderr: sink as never });
  t.same(r, { exitCode: 0 });
  t.same(chunks.sort(), ['[rank 0] 0 3 0 127.0.0.1 1\n', '[rank 1] 1 3 1 127.0.0.1 1\n', '[rank 2] 2 3 2 127.0.0.1 1\n']);
  // rank 1 fails; rank 0 sleeps (killed by SIGTERM), rank 2 ignores SIGTERM (killed by SIGKILL after timeoutMs)
  const script = `
    const r = Number(process.env.RANK); console.log('pid', process.pid);
    if (r === 1) setTimeout(() => { console.log('failing at', Date.now()); console.error('boom: bad shard'); process.exit(3); }, 300);
    else { if (r === 2) process.on('SIGTERM', () => {}); setTimeout(() => {}, 60000); }`;
  chunks.length = 0;
  r = await launch({ nproc: 3, argv: [process.execPath, '-e', script], env: CHILD_ENV, timeoutMs: 700, stdout: sink as never, stderr: sink as never });
  const failedAt = Number(/failing at (\d+)/.exec(chunks.join(''))![1]);
  t.ok(Date.now() - failedAt < 700 + 5000, `all stopped ${Date.now() - failedAt} ms after the failure (SIGKILL after 700 ms)`);
  t.equal(r.exitCode, 3);
  t.equal(r.failedRank, 1);
  t.equal(r.message, 'rank 1 of 3 exited with code 3 (its last error line: boom: bad shard); the other ranks were stopped');
  const pids = chunks.join('').match(/pid (\d+)/g)!.map((s) => Number(s.slice(4)));
  t.equal(pids.length, 3);
  for (const pid of pids) t.throws(() => process.kill(pid, 0), { code: 'ESRCH' }, `pid ${pid} is gone`);
  // a rank killed by a signal
  r = await launch({ nproc: 2, argv: [process.execPath, '-e', `if (process.env.RANK === '0') process.kill(process.pid, 'SIGKILL'); else setTimeout(() => {}, 60000)`], env: CHILD_ENV, stdout: sink as never, stderr: sink as never });
  t.match(r, { exitCode: 1, failedRank: 0, cause: 'was killed by SIGKILL' });
  t.rejects(launch({ nproc: 0, argv: ['x'] }), { code: 'XFT_VALUE' });
});

t.test("launch: the launcher's SIGTERM stops every rank, no orphans", async (t) => {
  const parent = `
    const { launch } = require(${JSON.stringify(path.join(__dirname, '..', 'lib', 'dist', 'launch.ts'))});
    launch({ nproc: 2, argv: [process.execPath, '-e', "console.log('pid', process.pid); setTimeout(() => {}, 60000)"] })
      .then((r) => { console.log(JSON.stringify(r)); process.exit(r.exitCode); });`;
  const child = spawn(process.execPath, ['-r', TS_REQUIRE, '-e', parent], { env: CHILD_ENV, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.on('data', (d) => {
    out += d;
    if ((out.match(/pid \d+/g) ?? []).length === 2) child.kill('SIGTERM');
  });
  let err = '';
  child.stderr!.on('data', (d) => (err += d));
  const code = await new Promise<number | null>((resolve) => child.on('close', (c) => resolve(c)));
  t.equal(code, 143, `exit 143 ${err}`);
  t.match(out, /"cause":"interrupted by SIGTERM"/);
  const pids = out.match(/pid (\d+)/g)!.map((s) => Number(s.slice(4)));
  for (const pid of pids) t.throws(() => process.kill(pid, 0), { code: 'ESRCH' }, `rank pid ${pid} is gone`);
});

void XftError;
