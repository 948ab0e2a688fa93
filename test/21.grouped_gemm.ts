// groupedGemm / groupedGemmBackward on the CPU: against float64 references, finite differences,
// group edge cases, and errors.
import t from 'tap';
import { Tensor, ops } from '../lib/index';
import { randomOffsets, randomTensor, refGroupedGemm, rng } from './helpers/ref';
import { close, throwsCode } from './helpers/check';

const TOL = { f32: 1e-5, bf16: 1e-2 };

const cases: { M: number; n: number; k: number; E: number; offsets?: number[]; what: string }[] = [
  { M: 37, n: 19, k: 23, E: 8, what: 'random groups, odd sizes' },
  { M: 64, n: 32, k: 16, E: 1, what: 'one group: a dense GEMM' },
  { M: 10, n: 8, k: 8, E: 4, offsets: [0, 0, 10, 10, 10], what: 'empty groups around a full one' },
  { M: 0, n: 5, k: 3, E: 3, offsets: [0, 0, 0, 0], what: 'no rows' },
  { M: 7, n: 1, k: 1, E: 7, offsets: [0, 1, 2, 3, 4, 5, 6, 7], what: 'one row per group, n = k = 1' },
  { M: 100, n: 33, k: 65, E: 5, what: 'larger' },
];

for (const dtype of ['f32', 'bf16'] as const)
  t.test(`forward and backward vs float64: ${dtype}`, async (t) => {
    for (const [ci, c] of cases.entries()) {
      const { M, n, k, E } = c;
      const offs = c.offsets ?? randomOffsets(M, E, ci + 1);
      const x = randomTensor([M, k], 10 + ci, { dtype });
      const w = randomTensor([E, n, k], 20 + ci, { dtype });
      const dy = randomTensor([M, n], 30 + ci, { dtype });
      const offsets = Tensor.from(offs, [E + 1], { dtype: 'i32' });
      const y = ops.groupedGemm(x.t, w.t, offsets);
      t.same(y.shape, [M, n]);
      t.equal(y.dtype, dtype);
      close(t, y.toArray(), refGroupedGemm(x.values, w.values, offs, M, n, k), TOL[dtype], `${c.what}: y`);
      const { dx, dw } = ops.groupedGemmBackward(x.t, w.t, offsets, dy.t);
      // dx[r] = dy[r] @ w[e]; dw[e] = sum_r dy[r] outer x[r]
      const refDx = new Array(M * k).fill(0), refDw = new Array(E * n * k).fill(0);
      for (let e = 0; e < E; e++)
        for (let r = offs[e]; r < offs[e + 1]; r++)
          for (let j = 0; j < n; j++)
            for (let i = 0; i < k; i++) {
              refDx[r * k + i] += dy.values[r * n + j] * w.values[(e * n + j) * k + i];
              refDw[(e * n + j) * k + i] += dy.values[r * n + j] * x.values[r * k + i];
            }
      close(t, dx!.toArray(), refDx, TOL[dtype], `${c.what}: dx`);
      close(t, dw!.toArray(), refDw, TOL[dtype], `${c.what}: dw`);
      // accumulate into an existing gradient
      const acc = w.t.clone();
      ops.groupedGemmBackward(x.t, w.t, offsets, dy.t, { dx: false, dw: acc });
      close(t, acc.toArray(), refDw.map((v, i) => v + w.values[i]), TOL[dtype], `${c.what}: dw accumulated`);
      const only = ops.groupedGemmBackward(x.t, w.t, offsets, dy.t, { dw: false });
      t.equal(only.dw, null, 'dw skipped when not asked for');
      if (dtype === 'bf16') {
        // f32 gradients of bf16 weights: the fp32 sums unrounded, so f32 accuracy against float64
        const acc32 = Tensor.from(w.values, w.t.shape);
        ops.groupedGemmBackward(x.t, w.t, offsets, dy.t, { dx: false, dw: acc32 });
        close(t, acc32.toArray(), refDw.map((v, i) => v + w.values[i]), TOL.f32, `${c.what}: f32 dw of bf16 inputs, accumulated`);
        acc32.dispose();
      }
      for (const v of [x.t, w.t, dy.t, offsets, y, dx!, dw!, acc, only.dx!]) v.dispose();
    }
  });

t.test('empty groups give zero weight gradients', async (t) => {
  const x = Tensor.randn([6, 4], { seed: 1 }), w = Tensor.randn([3, 5, 4], { seed: 2 }), dy = Tensor.randn([6, 5], { seed: 3 });
  const { dw } = ops.groupedGemmBackward(x, w, Tensor.from([0, 6, 6, 6], [4], { dtype: 'i32' }), dy);
  const g = dw!.toArray();
  t.ok(g.slice(20).every((v) => v === 0), 'experts 1 and 2 got no rows: zero gradient');
  t.ok(g.slice(0, 20).some((v) => v !== 0), 'expert 0 got a gradient');
});

t.test('backward vs finite differences', async (t) => {
  const M = 9, n = 4, k = 5, E = 3, offs = [0, 2, 2, 9];
  const R = rng(5);
  const xv = Array.from(R.array(M * k)), wv = Array.from(R.array(E * n * k)), dyv = Array.from(R.array(M * n));
  const offsets = Tensor.from(offs, [E + 1], { dtype: 'i32' });
  const L = (xs: number[], ws: number[]) => {
    const y = ops.groupedGemm(Tensor.from(xs, [M, k]), Tensor.from(ws, [E, n, k]), offsets).toArray();
    return Array.from(y).reduce((acc, v, i) => acc + v * dyv[i], 0);
  };
  const { dx, dw } = ops.groupedGemmBackward(Tensor.from(xv, [M, k]), Tensor.from(wv, [E, n, k]), offsets, Tensor.from(dyv, [M, n]));
  const h = 1e-2;
  const fdx = xv.map((_, i) => {
    const p = [...xv], m = [...xv];
    p[i] += h;
    m[i] -= h;
    return (L(p, wv) - L(m, wv)) / (2 * h);
  });
  const fdw = wv.map((_, i) => {
    const p = [...wv], m = [...wv];
    p[i] += h;
    m[i] -= h;
    return (L(xv, p) - L(xv, m)) / (2 * h);
  });
  close(t, dx!.toArray(), fdx, 1e-4, 'dx');
  close(t, dw!.toArray(), fdw, 1e-4, 'dw');
});

t.test('grouped GEMM errors name the argument', async (t) => {
  const x = Tensor.randn([6, 4]), w = Tensor.randn([3, 5, 4]);
  const offs = (o: number[]) => Tensor.from(o, [o.length], { dtype: 'i32' });
  throwsCode(t, () => ops.groupedGemm(x, w, offs([1, 2, 3, 6])), 'XFT_VALUE', /start at 0/, 'offsets not from 0');
  throwsCode(t, () => ops.groupedGemm(x, w, offs([0, 4, 3, 6])), 'XFT_VALUE', /must not decrease/, 'decreasing offsets');
  throwsCode(t, () => ops.groupedGemm(x, w, offs([0, 2, 3, 5])), 'XFT_VALUE', /end at M = 6/, 'offsets end short');
  throwsCode(t, () => ops.groupedGemm(x, w, offs([0, 2, 6])), 'XFT_SHAPE', /offsets.*\[E \+ 1\] = \[4\]/, 'offsets length');
  throwsCode(t, () => ops.groupedGemm(x, w, Tensor.from([0, 2, 3, 6], [4])), 'XFT_DTYPE', /offsets.*i32/, 'f32 offsets');
  throwsCode(t, () => ops.groupedGemm(x, Tensor.randn([3, 5, 3]), offs([0, 2, 3, 6])), 'XFT_SHAPE', /k differs/, 'k mismatch');
  throwsCode(t, () => ops.groupedGemm(x, w.cast('bf16'), offs([0, 2, 3, 6])), 'XFT_DTYPE', /w.*f32/, 'mixed dtypes');
  throwsCode(t, () => ops.groupedGemm(Tensor.randn([6, 4, 1]), w, offs([0, 2, 3, 6])), 'XFT_SHAPE', /x.*2-D.*\[M, k\]/, 'rank-3 x');
  throwsCode(t, () => ops.groupedGemm(x, Tensor.randn([5, 4]), offs([0, 6])), 'XFT_SHAPE', /w.*3-D.*\[E, n, k\]/, 'rank-2 w');
  throwsCode(t, () => ops.groupedGemm(x.cast('i32'), w, offs([0, 2, 3, 6])), 'XFT_DTYPE', /x.*f32 or bf16/, 'i32 x');
  throwsCode(t, () => ops.groupedGemmBackward(x, w, offs([0, 2, 3, 6]), Tensor.randn([6, 4])), 'XFT_SHAPE', /dy.*\[M, n\] = \[6, 5\]/, 'dy shape');
  throwsCode(t, () => ops.groupedGemmBackward(x, w, offs([0, 2, 3, 6]), Tensor.randn([6, 5]), { dw: Tensor.randn([3, 5]) }), 'XFT_SHAPE', /options.dw/, 'dw target shape');
  throwsCode(t, () => ops.groupedGemm(x, w, 'offsets' as never), 'XFT_TYPE', /offsets/, 'offsets not a tensor');
});
