// routerLinear / routerLinearBackward (the small-N router and noise linears) on the CPU: against the
// grouped GEMM with one group and float64, against finite differences, gradient accumulation, the
// MoE layer routing its router through them, and errors.
import t from 'tap';
import { Tensor, ops, createDense, upcycle, tinyConfig, type MoeFFN } from '../lib/index';
import { ROUTER_LINEAR_MAX_N } from '../lib/ops_router';
import { randomTensor, refGroupedGemm } from './helpers/ref';
import { close, throwsCode } from './helpers/check';

const TOL = { f32: 1e-5, bf16: 1e-2 };

const cases: { T: number; N: number; d: number; what: string }[] = [
  { T: 37, N: 7, d: 64, what: 'N = 7 (8 experts), d a multiple of 8' },
  { T: 41, N: 15, d: 23, what: 'N = 15, odd d' },
  { T: 5, N: 1, d: 9, what: 'N = 1' },
  { T: 70, N: 32, d: 40, what: 'N = 32 (the largest)' },
  { T: 33, N: 7, d: 7, what: 'the mlp router second layer (d = N)' },
  { T: 0, N: 7, d: 16, what: 'no tokens' },
];

for (const dtype of ['f32', 'bf16'] as const)
  t.test(`router linear vs the grouped GEMM (one group) and float64: ${dtype}`, async (t) => {
    for (const [ci, c] of cases.entries()) {
      const { T, N, d } = c;
      const x = randomTensor([T, d], 10 + ci, { dtype }), w = randomTensor([N, d], 20 + ci, { dtype });
      const dy = randomTensor([T, N], 30 + ci, { dtype });
      const offsets = Tensor.from([0, T], [2], { dtype: 'i32' });
      const w3 = w.t.reshape([1, N, d]);
      const y = ops.routerLinear(x.t, w.t);
      t.same(y.shape, [T, N]);
      t.equal(y.dtype, dtype);
      const yg = ops.groupedGemm(x.t, w3, offsets);
      close(t, y.toArray(), yg.toArray(), TOL[dtype], `${c.what}: y vs groupedGemm`);
      close(t, y.toArray(), refGroupedGemm(x.values, w.values, [0, T], T, N, d), TOL[dtype], `${c.what}: y vs float64`);
      const r = ops.routerLinearBackward(x.t, w.t, dy.t);
      const g = ops.groupedGemmBackward(x.t, w3, offsets, dy.t);
      t.same(r.dx!.shape, [T, d]);
      t.same(r.dw!.shape, [N, d]);
      close(t, r.dx!.toArray(), g.dx!.toArray(), TOL[dtype], `${c.what}: dx vs groupedGemmBackward`);
      close(t, r.dw!.toArray(), g.dw!.toArray(), TOL[dtype], `${c.what}: dw vs groupedGemmBackward`);
      // float64: dx = dy @ w, dw = dy^T @ x
      const refDx = new Float64Array(T * d), refDw = new Float64Array(N * d);
      for (let s = 0; s < T; s++)
        for (let n = 0; n < N; n++)
          for (let i = 0; i < d; i++) {
            refDx[s * d + i] += dy.values[s * N + n] * w.values[n * d + i];
            refDw[n * d + i] += dy.values[s * N + n] * x.values[s * d + i];
          }
      close(t, r.dx!.toArray(), refDx, TOL[dtype], `${c.what}: dx vs float64`);
      if (T > 0) close(t, r.dw!.toArray(), refDw, TOL[dtype], `${c.what}: dw vs float64`);
      else t.ok(r.dw!.toArray().every((v) => v === 0), `${c.what}: dw is zero`);
      [x.t, w.t, dy.t, offsets, y, yg, r.dx, r.dw, g.dx, g.dw].forEach((v) => v?.dispose());
    }
  });

t.test('gradients vs central finite differences (f32, L = sum(y * r))', async (t) => {
  const T = 6, N = 5, d = 11, h = 1e-2;
  const x = randomTensor([T, d], 1), w = randomTensor([N, d], 2), r = randomTensor([T, N], 3);
  const loss = (xv: ArrayLike<number>, wv: ArrayLike<number>) => {
    const xt = Tensor.from(Array.from(xv), [T, d]), wt = Tensor.from(Array.from(wv), [N, d]);
    const y = ops.routerLinear(xt, wt).toArray();
    [xt, wt].forEach((v) => v.dispose());
    let s = 0;
    for (let i = 0; i < y.length; i++) s += y[i] * r.values[i];
    return s;
  };
  const { dx, dw } = ops.routerLinearBackward(x.t, w.t, r.t);
  const gx = dx!.toArray(), gw = dw!.toArray();
  for (const [name, base, grad] of [['x', x.values, gx], ['w', w.values, gw]] as const) {
    const fd: number[] = [], an: number[] = [];
    for (let i = 0; i < base.length; i += 3) {
      const p = Array.from(base), m = Array.from(base);
      p[i] += h;
      m[i] -= h;
      fd.push(name === 'x' ? (loss(p, w.values) - loss(m, w.values)) / (2 * h) : (loss(x.values, p) - loss(x.values, m)) / (2 * h));
      an.push(grad[i]);
    }
    close(t, an, fd, 1e-3, `d${name} vs finite differences (${fd.length} coordinates)`);
  }
});

t.test('dw accumulates into a given tensor (f32 gradient of bf16 weights too); dx/dw can be skipped', async (t) => {
  for (const dtype of ['f32', 'bf16'] as const) {
    const T = 19, N = 7, d = 24;
    const x = randomTensor([T, d], 40, { dtype }), w = randomTensor([N, d], 41, { dtype }), dy = randomTensor([T, N], 42, { dtype });
    const once = ops.routerLinearBackward(x.t, w.t, dy.t, { dx: false, dw: true });
    t.equal(once.dx, null, `${dtype}: dx skipped`);
    const acc = Tensor.full([N, d], 0.5, { dtype: 'f32' });
    ops.routerLinearBackward(x.t, w.t, dy.t, { dx: false, dw: acc });
    ops.routerLinearBackward(x.t, w.t, dy.t, { dx: false, dw: acc });
    const want = Array.from(once.dw!.toArray(), (v) => 0.5 + 2 * v);
    close(t, acc.toArray(), want, TOL[dtype], `${dtype}: into f32, twice: 0.5 + 2 dw`);
    const none = ops.routerLinearBackward(x.t, w.t, dy.t, { dw: false });
    t.equal(none.dw, null, `${dtype}: dw skipped`);
    [x.t, w.t, dy.t, once.dw, acc, none.dx].forEach((v) => v?.dispose());
  }
});

t.test('the MoE layer trains its router (mlp and linear, with noise) through the router linears', async (t) => {
  // every router parameter gets a finite, non-zero gradient (test/60-66 compare the whole MoE
  // against the reference model)
  for (const router of ['mlp', 'linear'] as const) {
    const dense = createDense(tinyConfig(), { seed: 3 });
    const moe = upcycle(dense, { experts: 4, topK: 3, seed: 3, router, routerInit: 'reference' });
    dense.dispose();
    const ids = Array.from({ length: 2 * 12 }, (_, i) => (i * 7) % 250);
    const idsT = Tensor.from(ids, [24], { dtype: 'i32' }), targets = Tensor.from(ids.map((v) => (v + 1) % 250), [24], { dtype: 'i32' });
    const out = moe.forward(idsT, targets, 2, 12, { training: true, seed: 5n });
    moe.backward();
    const ffn = moe.blocks[0].ffn as MoeFFN;
    for (const p of [...ffn.router, ffn.noise!]) {
      const g = p.grad!.toArray();
      t.ok(g.every(Number.isFinite) && g.some((v) => v !== 0), `${router}: ${p.name} has a finite, non-zero gradient`);
    }
    t.ok(Number.isFinite(out.loss), `${router}: finite loss`);
    idsT.dispose();
    targets.dispose();
    moe.dispose();
  }
});

t.test('errors name the argument', async (t) => {
  const x = Tensor.zeros([4, 8]), w = Tensor.zeros([ROUTER_LINEAR_MAX_N + 1, 8]), w5 = Tensor.zeros([5, 6]), wb = Tensor.zeros([5, 8], { dtype: 'bf16' });
  throwsCode(t, () => ops.routerLinear(x, w), 'XFT_SHAPE', /1 <= N <= 32/, 'N = 33');
  throwsCode(t, () => ops.routerLinear(x, w5), 'XFT_SHAPE', /d differs/, 'd mismatch');
  throwsCode(t, () => ops.routerLinear(x, wb), 'XFT_DTYPE', /w/, 'dtype mismatch');
  throwsCode(t, () => ops.routerLinear(x, 3 as unknown as Tensor), 'XFT_TYPE', /w/, 'not a tensor');
  const w8 = Tensor.zeros([5, 8]), dy = Tensor.zeros([4, 4]);
  throwsCode(t, () => ops.routerLinearBackward(x, w8, dy), 'XFT_SHAPE', /dy/, 'dy shape');
  throwsCode(t, () => ops.routerLinearBackward(x, w8, Tensor.zeros([4, 5]), { dw: Tensor.zeros([5, 7]) }), 'XFT_SHAPE', /options\.dw/, 'dw shape');
  throwsCode(t, () => ops.routerLinearBackward(x, w8, Tensor.zeros([4, 5]), { dw: 1 as unknown as boolean }), 'XFT_TYPE', /options\.dw/, 'dw type');
  [x, w, w5, wb, w8, dy].forEach((v) => v.dispose());
});
