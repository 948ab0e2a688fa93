// Index safety of every op that takes indices (routing experts, group offsets, permutations,
// cross-entropy targets, embedding ids), on the CPU and, when there is one, the CUDA backend:
// corrupted index tensors never reach memory outside their tensors, are refused with XFT_INDEX
// where the op has no meaning for them (routeSharedBackward's experts; embedding ids on CUDA, at
// the next synchronisation), and otherwise give fully defined outputs (validate: false). Every
// new allocation is poisoned (NaN / -1) so that an unwritten output element fails. The native ops
// also run without the TypeScript checks in a child process (test/helpers/index_child.js), under
// valgrind's memcheck when it is installed (CI installs it; XFT_REQUIRE_VALGRIND=1 makes it required).
import t from 'tap';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { Tensor, ops, XftError, type Routing } from '../lib/index';
import { native } from '../lib/native';
import { SKIP_NO_CUDA, randomTensor } from './helpers/ref';
import { close, exact } from './helpers/check';

type Device = 'cpu' | 'cuda';
const devices: Device[] = SKIP_NO_CUDA ? ['cpu'] : ['cpu', 'cuda'];
const CHILD = path.join(__dirname, 'helpers', 'index_child.js');

t.before(() => native.setPoison(true));
t.teardown(() => native.setPoison(false));

/** Runs fn expecting an XftError with `code` whose message matches `match`. */
function expectError(t: tap.Test, fn: () => unknown, code: string, match: RegExp, what: string): void {
  try {
    fn();
    t.fail(`${what}: should throw ${code}`);
  } catch (err) {
    t.ok(err instanceof XftError && err.code === code, `${what}: XftError ${code} (${(err as Error).message})`);
    t.match((err as Error).message, match, `${what}: the message names the index`);
  }
}

const allFinite = (a: ArrayLike<number>) => Array.from(a).every(Number.isFinite);

t.test('routeSharedBackward refuses experts that are not the routing\'s', async (t) => {
  const T = 13, N = 7, K = 4;
  for (const device of devices) {
    const { t: logits } = randomTensor([T, N], 21, { scale: 2 });
    const x = logits.to(device);
    const dW = Tensor.randn([T, K], { seed: 22, device });
    const corruptions: [string, (r: Routing) => Routing][] = [
      ['fill_(1e6)', (r) => (r.experts.fill_(1e6), r)],
      ['fill_(0)', (r) => (r.experts.fill_(0), r)],
      ['fill_(-7)', (r) => (r.experts.fill_(-7), r)],
      ['hand-built, one expert N + 1', (r) => {
        const ex = Array.from(r.experts.toArray());
        ex[5 * K + 1] = N + 1;
        return { ...r, experts: Tensor.from(Int32Array.from(ex), [T, K], { dtype: 'i32', device }) };
      }],
    ];
    for (const [what, corrupt] of corruptions) {
      const r = corrupt(ops.routeShared(x, { topK: K }));
      const label = `${device}: experts ${what}`;
      if (device === 'cpu') {
        expectError(t, () => ops.routeSharedBackward(x, r, dW), 'XFT_INDEX', /routing\.experts\[\d+, \d+\] = -?\d+/, label);
      } else {
        // the kernel skips the bad entries and raises the fault record; the next sync reports it once
        const d = ops.routeSharedBackward(x, r, dW);
        expectError(t, () => d.toArray(), 'XFT_INDEX', /routing\.experts\[\d+\] = -?\d+/, label);
        t.ok(allFinite(d.toArray()), `${label}: after the report, dLogits is defined (the fault was cleared)`);
        d.dispose();
      }
      r.dispose();
    }
    // a valid routing still works, and CUDA reports nothing
    const r = ops.routeShared(x, { topK: K });
    const d = ops.routeSharedBackward(x, r, dW);
    t.ok(allFinite(d.toArray()), `${device}: valid experts pass`);
    for (const z of [d, x, dW, logits]) z.dispose();
    r.dispose();
  }
});

t.test('embedding ids out of range: XftError on the CPU, zero rows and XFT_INDEX at the next sync on CUDA', async (t) => {
  const V = 5, d = 8;
  for (const device of devices) {
    const table = Tensor.randn([V, d], { seed: 31, device });
    for (const bad of [V, 1e6, -7, -2147483648]) {
      const ids = Tensor.from(Int32Array.from([1, bad, 4]), [3], { dtype: 'i32', device });
      if (device === 'cpu') {
        expectError(t, () => ops.embedding(ids, table), 'XFT_VALUE', /ids\[1\]/, `cpu: id ${bad}`);
      } else {
        const out = ops.embedding(ids, table);
        expectError(t, () => out.toArray(), 'XFT_INDEX', /ids\[1\] = -?\d+/, `cuda: id ${bad}`);
        const v = out.toArray();
        t.same(Array.from(v.slice(d, 2 * d)), new Array(d).fill(0), `cuda: id ${bad} gives a zero row`);
        const dT = ops.embeddingBackward(ids, Tensor.randn([3, d], { seed: 32, device }), V);
        expectError(t, () => dT.toArray(), 'XFT_INDEX', /ids\[1\]/, `cuda backward: id ${bad}`);
        t.ok(allFinite(dT.toArray()), `cuda backward: id ${bad}: dTable defined`);
      }
    }
  }
});

/** The groups as the kernels see any offsets: clamped to [0, M], running maximum. */
function effectiveOffsets(offsets: number[], M: number): number[] {
  const o: number[] = [];
  offsets.forEach((v, e) => o.push(Math.max(e ? o[e - 1] : 0, Math.min(Math.max(v, 0), M))));
  return o;
}

/** y, dx, dw of the grouped GEMM over the groups of valid offsets o (float64), zero rows outside [o_0, o_E). */
function refGroupedGemm(x: ArrayLike<number>, w: ArrayLike<number>, dy: ArrayLike<number>, o: number[], M: number, n: number, k: number) {
  const E = o.length - 1;
  const y = new Array(M * n).fill(0), dx = new Array(M * k).fill(0), dw = new Array(E * n * k).fill(0);
  for (let e = 0; e < E; e++)
    for (let r = o[e]; r < o[e + 1]; r++)
      for (let j = 0; j < n; j++) {
        const we = (e * n + j) * k;
        let s = 0;
        for (let i = 0; i < k; i++) {
          s += x[r * k + i] * w[we + i];
          dx[r * k + i] += dy[r * n + j] * w[we + i];
          dw[we + i] += dy[r * n + j] * x[r * k + i];
        }
        y[r * n + j] = s;
      }
  return { y, dx, dw };
}

t.test('groupedGemm with validate: false and bad offsets: fully defined outputs', async (t) => {
  const M = 300, n = 24, k = 40, E = 3;
  const cases = [[0, 100, 200, 250], [10, 100, 200, 300], [0, 200, 90, 300], [-5, 2147483647, 7, 300], [300, 0, 0, 0], [0, 0, 0, 0],
    [-2147483648, 50, 40, 1e6]];
  for (const dtype of ['f32', 'bf16'] as const)
    for (const offsets of cases) {
      const eff = effectiveOffsets(offsets, M);
      const tol = dtype === 'bf16' ? 1e-2 : 1e-5;
      for (const device of devices) {
        const x = Tensor.randn([M, k], { seed: 41, dtype, device }), w = Tensor.randn([E, n, k], { seed: 42, dtype, device });
        const dy = Tensor.randn([M, n], { seed: 43, dtype, device });
        const bad = Tensor.from(Int32Array.from(offsets), [E + 1], { dtype: 'i32', device });
        const what = `${device} ${dtype} offsets ${offsets}`;
        const y = ops.groupedGemm(x, w, bad, { validate: false });
        const g = ops.groupedGemmBackward(x, w, bad, dy, { validate: false });
        const ref = refGroupedGemm(x.toArray(), w.toArray(), dy.toArray(), eff, M, n, k);
        const got = { y: y.toArray(), dx: g.dx!.toArray(), dw: g.dw!.toArray() };
        for (const name of ['y', 'dx', 'dw'] as const) {
          t.ok(allFinite(got[name]), `${what}: ${name} fully written`);
          close(t, got[name], ref[name], tol, `${what}: ${name} = the groups of the clamped running-max offsets`);
        }
        const zeroRows = (a: ArrayLike<number>, cols: number) =>
          Array.from(a).every((v, i) => { const r = Math.floor(i / cols); return (r >= eff[0] && r < eff[E]) || v === 0; });
        t.ok(zeroRows(got.y, n) && zeroRows(got.dx, k), `${what}: rows outside [${eff[0]}, ${eff[E]}) of y and dx are zero`);
        for (const z of [x, w, dy, bad, y, g.dx!, g.dw!]) z.dispose();
      }
    }
});

t.test('permutation ops with validate: false: duplicates and out-of-range entries give defined outputs', async (t) => {
  const T = 6, K = 3, n = T * K, d = 20;
  const perms = [
    Array.from({ length: n }, (_, i) => (i * 5) % n), // valid
    Array.from({ length: n }, (_, i) => (i < 4 ? 2 : i)), // 2 four times; 0, 1, 3 unmapped
    Array.from({ length: n }, (_, i) => [1e6, -7, 2147483647, -2147483648, n][i % 5] ?? i), // all out of range
    Array.from({ length: n }, (_, i) => (i % 3 === 0 ? n + i : (i * 7) % n)),
  ];
  const off = { validate: false };
  for (const perm of perms) {
    const inverse = new Array(n).fill(-1);
    perm.forEach((v, i) => { if (v >= 0 && v < n) inverse[v] = Math.max(inverse[v], i); });
    const results: Record<string, number[][]> = {};
    for (const device of devices) {
      const p = Tensor.from(Int32Array.from(perm), [n], { dtype: 'i32', device });
      const y = Tensor.randn([n, d], { seed: 51, device }), g = Tensor.randn([T, K], { seed: 52, device });
      const dOut = Tensor.randn([T, d], { seed: 53, device });
      const what = `${device} ${perm.slice(0, 6)}…`;
      const pos = ops.invertPermutation(p, off).toArray();
      exact(t, pos, inverse, `${what}: invertPermutation (-1 unmapped, the last source of duplicates)`);
      const { dy, dg } = ops.unpermuteBackward(dOut, y, p, g, off);
      const dyv = dy.toArray(), gv = g.toArray(), dOv = dOut.toArray();
      const want = Array.from({ length: n * d }, (_, j) => {
        const q = inverse[Math.floor(j / d)];
        return q < 0 ? 0 : Math.fround(gv[q] * dOv[Math.floor(q / K) * d + (j % d)]);
      });
      exact(t, dyv, want, `${what}: unpermuteBackward dy (zero rows unmapped, the last pair of duplicates)`);
      const dgv = dg.toArray();
      t.ok(allFinite(dgv), `${what}: dg defined`);
      const others = [ops.permute(dOut, p, K, off), ops.permuteBackward(y, p, K, off), ops.unpermute(y, p, g, off)];
      const ov = others.map((o) => Array.from(o.toArray()));
      t.ok(ov.every(allFinite), `${what}: permute, permuteBackward, unpermute defined`);
      results[device] = [Array.from(pos), Array.from(dyv), Array.from(dgv), ...ov];
    }
    if (results.cuda) results.cuda.forEach((v, i) => close(t, v, results.cpu[i], 1e-5, `${perm.slice(0, 6)}…: CUDA vs CPU output ${i}`));
  }
});

t.test('cross-entropy with validate: false: targets out of range are ignored rows', async (t) => {
  const R = 5, V = 7;
  const targets = [3, 1e6, -7, V, -2147483648];
  const results: number[][][] = [];
  for (const device of devices) {
    const logits = Tensor.randn([R, V], { seed: 61, device });
    const tt = Tensor.from(Int32Array.from(targets), [R], { dtype: 'i32', device });
    const { losses, predictions } = ops.crossEntropy(logits, tt, { validate: false });
    const dl = ops.crossEntropyBackward(logits, tt, Tensor.from(new Float32Array(R).fill(1), [R], { device }), { validate: false }).toArray();
    const lv = losses.toArray();
    t.ok(lv[0] > 0 && Array.from(lv.slice(1)).every((v) => v === 0), `${device}: only the valid target has a loss`);
    t.ok(Array.from(predictions.toArray()).every((p) => p >= 0 && p < V), `${device}: predictions defined`);
    t.ok(allFinite(dl) && Array.from(dl.slice(V)).every((v) => v === 0), `${device}: zero gradient rows for ignored targets`);
    results.push([Array.from(lv), Array.from(dl)]);
  }
  if (results.length === 2) results[1].forEach((v, i) => close(t, v, results[0][i], 1e-5, `CUDA vs CPU output ${i}`));
});

function runChild(t: tap.Test, command: string, args: string[], what: string): void {
  const started = Date.now();
  const r = spawnSync(command, args, { encoding: 'utf8', env: process.env, timeout: 240_000 });
  const output = `${r.stdout ?? ''}${r.stderr ?? ''}`.trim();
  t.equal(r.status, 0, `${what}: exit 0 in ${((Date.now() - started) / 1000).toFixed(1)} s (signal ${r.signal})\n${output.slice(-3000)}`);
  t.match(r.stdout ?? '', /index ops: \d+ checks, 0 failed/, `${what}: every check passed`);
}

t.test('native index ops without the TypeScript checks (child process)', async (t) => {
  runChild(t, process.execPath, [CHILD], 'node');
});

const valgrind = spawnSync('valgrind', ['--version'], { encoding: 'utf8' });
const haveValgrind = valgrind.status === 0;
const requireValgrind = process.env.XFT_REQUIRE_VALGRIND === '1';
// the child uses only CPU storages: with the CUDA backend (a GPU, or the emulator) the CPU run covers it
const valgrindSkip = !SKIP_NO_CUDA ? 'the CUDA backend is in use; the CPU-backend run covers the native CPU ops'
  : !haveValgrind && !requireValgrind ? 'valgrind is not installed (XFT_REQUIRE_VALGRIND=1 makes this a failure)' : false;
t.test('native index ops under valgrind memcheck', { skip: valgrindSkip }, async (t) => {
  if (!haveValgrind) {
    t.fail('XFT_REQUIRE_VALGRIND=1 but valgrind is not installed (apt-get install -y valgrind)');
    return;
  }
  t.comment(valgrind.stdout.trim());
  // memcheck: any invalid read/write or use of an uninitialised output exits 97
  runChild(t, 'valgrind', ['-q', '--error-exitcode=97', '--leak-check=no', process.execPath, CHILD], 'valgrind');
});
