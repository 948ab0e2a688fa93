// The fast CPU GEMM (binding/cpu/gemm_*.cc, each instruction-set kernel this CPU has) against the
// reference path (XFT_CPU_REFERENCE=1) on awkward shapes: sizes that are not multiples of the register
// tiles, depths over one packed block, M and n over one packing chunk, empty groups, offsets out of
// order, bf16, accumulation into f32 and bf16 gradients. The stated tolerance:
//   f32 inputs   relative error (norm) <= 1e-5 (the fast path fuses each multiply-add, the reference
//                rounds the product first; both sum in k order)
//   bf16 inputs  bit for bit (products of bf16 values are exact in fp32, so fused or not, the same
//                sums in the same order round the same)
// Bits do not depend on the thread count (1, 2, 3) and the AVX2 and AVX-512 kernels agree bit for bit.
// The thread pool: a child process that ran parallel GEMMs exits promptly and cleanly; GEMMs on a
// worker_thread while the main thread runs its own give the same bits.
import t from 'tap';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { Worker } from 'node:worker_threads';
import { Tensor, ops } from '../lib/index';
import { native } from '../lib/native';
import { randomOffsets, randomTensor } from './helpers/ref';
import { close, exact } from './helpers/check';

const F32_TOL = 1e-5;

/** run fn with these environment variables (read by the addon at each call), restoring them after */
function withEnv<T>(vars: Record<string, string | undefined>, fn: () => T): T {
  const saved = Object.fromEntries(Object.keys(vars).map((k) => [k, process.env[k]]));
  const set = (v: Record<string, string | undefined>) => {
    for (const [k, val] of Object.entries(v)) if (val === undefined) delete process.env[k]; else process.env[k] = val;
  };
  set(vars);
  try {
    return fn();
  } finally {
    set(saved);
  }
}

// the kernels this CPU runs (XFT_CPU_ISA caps the choice; a kernel the CPU lacks falls back)
const kernels = [...new Set(['avx512', 'avx2', 'portable'].map((isa) => withEnv({ XFT_CPU_ISA: isa, XFT_CPU_REFERENCE: undefined }, () => native.cpuGemm().kernel)))];

interface Case { M: number; n: number; k: number; E: number; offsets?: number[]; what: string }
const cases: Case[] = [
  { M: 1, n: 1, k: 1, E: 1, what: 'one element' },
  { M: 2, n: 3, k: 5, E: 1, what: 'smaller than a tile' },
  { M: 13, n: 17, k: 19, E: 1, what: 'primes' },
  { M: 37, n: 33, k: 23, E: 8, what: 'random groups, some empty' },
  { M: 10, n: 8, k: 8, E: 4, offsets: [0, 0, 10, 10, 10], what: 'empty groups around a full one' },
  { M: 37, n: 19, k: 29, E: 4, offsets: [5, 3, 40, 20, -7], what: 'bad offsets (clamped, made non-decreasing)' },
  { M: 300, n: 280, k: 270, E: 1, what: 'depths over one packed block (k, n and rows > 256)' },
  { M: 2100, n: 5, k: 3, E: 1, what: 'M over one packing chunk' },
  { M: 3, n: 2053, k: 5, E: 1, what: 'n over one packing chunk' },
  { M: 300, n: 45, k: 530, E: 3, offsets: [0, 1, 299, 300], what: 'a group of one row, depth 530' },
  // dw's depth is the rows: past the packed panels' budget, it is cut into super-blocks that continue
  // the sums (in fp32 scratch for bf16 and accumulated outputs); two such experts do not share a batch
  { M: 30000, n: 45, k: 29, E: 1, what: "dw's depth over one batch of packed panels" },
  { M: 30000, n: 45, k: 29, E: 2, offsets: [0, 14000, 30000], what: 'two experts over one batch of packed panels' },
];

interface Outputs { y: number[][]; dx: number[][]; dw: number[][]; acc: number[][]; acc32: number[][] }

/** every output of the op on this case, on the environment's kernel and threads */
function outputs(c: Case, dtype: 'f32' | 'bf16', seed: number): Outputs {
  const { M, n, k, E } = c;
  const offs = c.offsets ?? randomOffsets(M, E, seed, true);
  const x = randomTensor([M, k], seed + 1, { dtype }).t, w = randomTensor([E, n, k], seed + 2, { dtype }).t;
  const dy = randomTensor([M, n], seed + 3, { dtype }).t;
  const offsets = Tensor.from(offs, [E + 1], { dtype: 'i32' });
  const y = ops.groupedGemm(x, w, offsets, { validate: false });
  const g = ops.groupedGemmBackward(x, w, offsets, dy, { validate: false });
  const acc = randomTensor([E, n, k], seed + 4, { dtype }).t;
  ops.groupedGemmBackward(x, w, offsets, dy, { dx: false, dw: acc, validate: false });
  const acc32 = randomTensor([E, n, k], seed + 5).t;
  if (dtype === 'bf16') ops.groupedGemmBackward(x, w, offsets, dy, { dx: false, dw: acc32, validate: false });
  const arr = (v: Tensor) => [Array.from(v.toArray())];
  const r = { y: arr(y), dx: arr(g.dx!), dw: arr(g.dw!), acc: arr(acc), acc32: arr(acc32) };
  for (const v of [x, w, dy, offsets, y, g.dx!, g.dw!, acc, acc32]) v.dispose();
  return r;
}

t.test(`fast kernels (${kernels.join(', ')}) against the reference path`, async (t) => {
  t.ok(kernels.length >= 1 && !kernels.includes('reference'), `kernels on this CPU: ${kernels.join(', ')}`);
  for (const dtype of ['f32', 'bf16'] as const)
    for (const [ci, c] of cases.entries()) {
      const seed = 100 * ci + (dtype === 'bf16' ? 50 : 0);
      // three threads: the reference splits its rows into chunks that a partition bug would show
      const ref = withEnv({ XFT_CPU_REFERENCE: '1', XFT_NUM_THREADS: '3' }, () => outputs(c, dtype, seed));
      for (const kernel of kernels) {
        const got = withEnv({ XFT_CPU_ISA: kernel, XFT_CPU_REFERENCE: undefined }, () => outputs(c, dtype, seed));
        const what = `${kernel} ${dtype} ${c.what} (M=${c.M} n=${c.n} k=${c.k} E=${c.E})`;
        for (const key of ['y', 'dx', 'dw', 'acc', 'acc32'] as const) {
          if (dtype === 'bf16') exact(t, got[key][0], ref[key][0], `${what}: ${key} bit for bit`);
          else close(t, got[key][0], ref[key][0], F32_TOL, `${what}: ${key}`);
        }
      }
    }
});

t.test('bits do not depend on the thread count or on AVX2 vs AVX-512', async (t) => {
  // large enough for 3 threads on every product (above 32 Mflop per packed depth block)
  const c: Case = { M: 900, n: 400, k: 300, E: 2, offsets: [0, 890, 900], what: 'threads' };
  const kernel = kernels[0];  // the one this CPU runs by default (the partition code is shared by all)
  const runs = [1, 2, 3].map((threads) => withEnv({ XFT_NUM_THREADS: `${threads}`, XFT_CPU_ISA: kernel, XFT_CPU_REFERENCE: undefined },
    () => outputs(c, 'f32', 7)));
  for (const key of ['y', 'dx', 'dw', 'acc'] as const) {
    exact(t, runs[1][key][0], runs[0][key][0], `${kernel} ${key}: 2 threads = 1 thread`);
    exact(t, runs[2][key][0], runs[0][key][0], `${kernel} ${key}: 3 threads = 1 thread`);
  }
  if (kernels.includes('avx512') && kernels.includes('avx2')) {
    const [a, b] = ['avx512', 'avx2'].map((kernel) => withEnv({ XFT_CPU_ISA: kernel, XFT_CPU_REFERENCE: undefined }, () => outputs(c, 'f32', 8)));
    for (const key of ['y', 'dx', 'dw', 'acc'] as const) exact(t, a[key][0], b[key][0], `${key}: AVX-512 = AVX2 bit for bit`);
  }
});

t.test('the thread count comes from XFT_NUM_THREADS, then XFT_CPU_THREADS', async (t) => {
  t.equal(withEnv({ XFT_NUM_THREADS: '3', XFT_CPU_THREADS: '5' }, () => native.cpuGemm().threads), 3, 'XFT_NUM_THREADS first');
  t.equal(withEnv({ XFT_NUM_THREADS: undefined, XFT_CPU_THREADS: '5' }, () => native.cpuGemm().threads), 5, 'XFT_CPU_THREADS as an alias');
  t.ok(withEnv({ XFT_NUM_THREADS: undefined, XFT_CPU_THREADS: undefined }, () => native.cpuGemm().threads) >= 1, 'else the cores');
  t.equal(withEnv({ XFT_CPU_REFERENCE: '1' }, () => native.cpuGemm().kernel), 'reference', 'XFT_CPU_REFERENCE=1 selects the reference path');
});

t.test("cpuPeak: the machine's FMA ceiling on 1 and 2 threads, for each kernel, and its argument checks", async (t) => {
  for (const kernel of kernels)
    for (const threads of [1, 2]) {
      const g = withEnv({ XFT_CPU_ISA: kernel, XFT_CPU_REFERENCE: undefined }, () => native.cpuPeak(threads, 5));
      t.ok(Number.isFinite(g) && g > 0, `${kernel}, ${threads} thread(s): ${g.toFixed(1)} GFLOP/s`);
    }
  t.ok(withEnv({ XFT_CPU_REFERENCE: '1' }, () => native.cpuPeak(1, 5)) > 0, 'measured with the ISA kernel under XFT_CPU_REFERENCE=1 too');
  const bad: [unknown[], string, RegExp][] = [
    [[0, 5], 'XFT_VALUE', /threads must be an integer in \[1, 1024\]/],
    [[1.5, 5], 'XFT_TYPE', /threads/],
    [[2000, 5], 'XFT_VALUE', /threads/],
    [[1, 0], 'XFT_VALUE', /ms must be a number in \[1, 60000\]/],
    [[1, NaN], 'XFT_VALUE', /ms/],
    [[1, 1e9], 'XFT_VALUE', /ms/],
    [['2', 5], 'XFT_TYPE', /threads/],
  ];
  for (const [args, code, message] of bad)
    t.throws(() => (native.cpuPeak as (...a: unknown[]) => number)(...args), { name: 'XftError', code, message }, `cpuPeak(${args.map(String).join(', ')}): ${code}`);
});

// A GEMM large enough to split over 3 threads, five times, on the addon alone (plain JavaScript: a
// child process or a worker starts in a fraction of a second without the TypeScript loader); returns y.
function gemmOnAddon(addonPath: string | undefined, root: string): number[] {
  /* eslint-disable @typescript-eslint/no-require-imports */
  const p = require('node:path');
  const addon = addonPath ? require(p.resolve(addonPath)) : require(require.resolve('node-gyp-build', { paths: [root] }))(root);
  /* eslint-enable @typescript-eslint/no-require-imports */
  process.env.XFT_NUM_THREADS = '3';
  const M = 400, n = 300, k = 256, owner = {};
  const values = (len: number, f: number) => Float32Array.from({ length: len }, (_, i) => Math.sin(i * f));
  const x = addon.alloc(0, M * k * 4, owner), w = addon.alloc(0, n * k * 4, owner);
  const y = addon.alloc(0, M * n * 4, owner), offsets = addon.alloc(0, 8, owner);
  addon.upload(x, 0, values(M * k, 0.37), 0);
  addon.upload(w, 0, values(n * k, 0.11), 0);
  addon.upload(offsets, 2, Int32Array.from([0, M]), 0);
  for (let i = 0; i < 5; i++) addon.groupedGemmForward(x, w, offsets, y, 0, M, n, k, 1);
  const out = Array.from(addon.download(y, 0, M * n, 0) as Float32Array);
  for (const s of [x, w, y, offsets]) addon.free(s);
  return out;
}
const ROOT = path.join(__dirname, '..');
const gemmScript = `(${gemmOnAddon.toString()})(${JSON.stringify(process.env.XFT_ADDON_PATH)}, ${JSON.stringify(ROOT)})`;

t.test('a process that ran parallel GEMMs exits promptly (the pool keeps nothing alive)', async (t) => {
  for (const ending of ['', 'process.exit(0);']) {
    const t0 = Date.now();
    const r = spawnSync(process.execPath, ['-e', `const y = ${gemmScript}; console.log(y.length); ${ending}`], { encoding: 'utf8', timeout: 60000 });
    t.equal(r.status, 0, `exit status 0 ${ending ? 'after process.exit' : 'at the natural end'} (${Date.now() - t0} ms) ${r.stderr.slice(-500)}`);
    t.equal(r.stdout.trim(), '120000', 'it computed y');
  }
});

t.test('GEMMs on a worker_thread and the main thread at once give the same bits', async (t) => {
  const worker = new Worker(`require('node:worker_threads').parentPort.postMessage(${gemmScript})`, { eval: true });
  const fromWorker = new Promise<number[]>((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });
  const y = withEnv({ XFT_NUM_THREADS: '3' }, () => gemmOnAddon(process.env.XFT_ADDON_PATH, ROOT));
  exact(t, await fromWorker, y, 'the worker computed the same y');
  await worker.terminate();
});
