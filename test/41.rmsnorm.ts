// rmsnorm / rmsnormBackward on the CPU: against float64 references, finite differences, mixed
// dtypes of x and w, gradient accumulation, and errors.
import t from 'tap';
import { Tensor, ops } from '../lib/index';
import { native } from '../lib/native';
import { randomTensor, rng } from './helpers/ref';
import { close, throwsCode } from './helpers/check';

const TOL = { f32: 1e-5, bf16: 1e-2 };

t.before(() => native.setPoison(true));
t.teardown(() => native.setPoison(false));

/** y, rstd, dx, dw in float64 from the math. */
function refRmsnorm(x: number[], w: number[], dy: number[], R: number, d: number, eps: number) {
  const y: number[] = [], rstd: number[] = [], dx: number[] = [], dw = new Array(d).fill(0);
  for (let r = 0; r < R; r++) {
    const xr = x.slice(r * d, (r + 1) * d), g = dy.slice(r * d, (r + 1) * d);
    const rs = 1 / Math.sqrt(xr.reduce((a, v) => a + v * v, 0) / d + eps);
    rstd.push(rs);
    const a = xr.reduce((acc, v, i) => acc + w[i] * g[i] * v, 0) / d;
    for (let i = 0; i < d; i++) {
      y.push(xr[i] * rs * w[i]);
      dx.push(rs * (w[i] * g[i] - xr[i] * rs * rs * a));
      dw[i] += g[i] * xr[i] * rs;
    }
  }
  return { y, rstd, dx, dw };
}

// d = 1 with a small eps makes dx = rstd w dy (1 - x^2 rstd^2) a cancellation: a large eps there
const cases: { shape: number[]; what: string; eps?: number }[] = [
  { shape: [13, 48], what: '[R, d]' },
  { shape: [2, 3, 20], what: '[B, T, d]' },
  { shape: [5, 1], what: 'd = 1', eps: 0.5 },
  { shape: [4, 131], what: 'odd d' },
  { shape: [2, 8192], what: 'd = MAX_RMSNORM_DIM' },
  { shape: [0, 16], what: 'no rows' },
];

for (const dtype of ['f32', 'bf16'] as const)
  for (const wdtype of ['f32', 'bf16'] as const)
    t.test(`forward and backward vs float64: x ${dtype}, w ${wdtype}`, async (t) => {
      for (const [ci, c] of cases.entries()) {
        const d = c.shape[c.shape.length - 1], R = c.shape.reduce((a, b) => a * b, 1) / d;
        const x = randomTensor(c.shape, 10 + ci, { dtype, scale: 2 });
        const w = randomTensor([d], 20 + ci, { dtype: wdtype });
        const dy = randomTensor(c.shape, 30 + ci, { dtype });
        const eps = c.eps ?? (ci % 2 ? 1e-5 : 1e-6);
        const ref = refRmsnorm(x.values, w.values, dy.values, R, d, eps);
        const { y, rstd } = ops.rmsnorm(x.t, w.t, { eps });
        t.same(y.shape, c.shape);
        t.same(rstd.shape, [R]);
        t.equal(y.dtype, dtype);
        close(t, y.toArray(), ref.y, TOL[dtype], `${c.what}: y`);
        close(t, rstd.toArray(), ref.rstd, TOL.f32, `${c.what}: rstd`);
        const g = ops.rmsnormBackward(x.t, w.t, rstd, dy.t);
        close(t, g.dx.toArray(), ref.dx, TOL[dtype], `${c.what}: dx`);
        t.equal(g.dw!.dtype, 'f32');
        close(t, g.dw!.toArray(), ref.dw, TOL.f32, `${c.what}: dw`);
      }
    });

t.test('default eps is 1e-6; a zero row stays finite', async (t) => {
  const x = Tensor.from([0, 0, 0, 0, 3, 4, 0, 0], [2, 4]);
  const w = Tensor.ones([4]);
  const { y, rstd } = ops.rmsnorm(x, w);
  close(t, rstd.toArray(), [1 / Math.sqrt(1e-6), 1 / Math.sqrt(25 / 4 + 1e-6)], 1e-6, 'rstd');
  close(t, y.toArray(), [0, 0, 0, 0, 1.2, 1.6, 0, 0], 1e-5, 'y');
});

t.test('backward vs finite differences of <dy, rmsnorm(x, w)>', async (t) => {
  const R = 3, d = 5, eps = 1e-6;
  const r = rng(3);
  const xv = Array.from(r.array(R * d)), wv = Array.from(r.array(d)), dyv = Array.from(r.array(R * d));
  const loss = (xs: number[], ws: number[]) =>
    Array.from(ops.rmsnorm(Tensor.from(xs, [R, d]), Tensor.from(ws, [d]), { eps }).y.toArray()).reduce((a, v, i) => a + v * dyv[i], 0);
  const fd = (vals: number[], f: (v: number[]) => number) => {
    const h = 1e-2;
    return vals.map((_, i) => {
      const p = [...vals], m = [...vals];
      p[i] += h;
      m[i] -= h;
      return (f(p) - f(m)) / (2 * h);
    });
  };
  const x = Tensor.from(xv, [R, d]), w = Tensor.from(wv, [d]);
  const { rstd } = ops.rmsnorm(x, w, { eps });
  const g = ops.rmsnormBackward(x, w, rstd, Tensor.from(dyv, [R, d]));
  close(t, g.dx.toArray(), fd(xv, (v) => loss(v, wv)), 2e-3, 'dx');
  close(t, g.dw!.toArray(), fd(wv, (v) => loss(xv, v)), 2e-3, 'dw');
});

t.test('dw: accumulate into a tensor, or skip', async (t) => {
  const x = Tensor.randn([6, 10], { seed: 1 }), w = Tensor.randn([10], { seed: 2 }), dy = Tensor.randn([6, 10], { seed: 3 });
  const { rstd } = ops.rmsnorm(x, w);
  const plain = ops.rmsnormBackward(x, w, rstd, dy);
  const acc = Tensor.full([10], 1);
  const into = ops.rmsnormBackward(x, w, rstd, dy, { dw: acc });
  t.equal(into.dw, acc, 'the given tensor is returned');
  close(t, acc.toArray(), Array.from(plain.dw!.toArray(), (v) => v + 1), 1e-6, 'added into');
  const none = ops.rmsnormBackward(x, w, rstd, dy, { dw: false });
  t.equal(none.dw, null, 'dw: false gives no dw');
  close(t, none.dx.toArray(), plain.dx.toArray(), 0, 'dx unchanged');
});

t.test('rmsnorm errors name the argument', async (t) => {
  const x = Tensor.randn([4, 8]), w = Tensor.randn([8]);
  const { rstd } = ops.rmsnorm(x, w);
  throwsCode(t, () => ops.rmsnorm(x, Tensor.randn([7])), 'XFT_SHAPE', /w.*\[d\] = \[8\]/, 'w length');
  throwsCode(t, () => ops.rmsnorm(Tensor.zeros([4, 8], { dtype: 'i32' }), w), 'XFT_DTYPE', /x.*f32 or bf16/, 'i32 x');
  throwsCode(t, () => ops.rmsnorm(Tensor.randn([2, 8193]), Tensor.randn([8193])), 'XFT_SHAPE', /d <= 8192/, 'd too large');
  throwsCode(t, () => ops.rmsnorm(x, w, { eps: -1 }), 'XFT_VALUE', /eps/, 'negative eps');
  throwsCode(t, () => ops.rmsnorm(x, w, { eps: 'small' as never }), 'XFT_TYPE', /eps/, 'eps type');
  throwsCode(t, () => ops.rmsnormBackward(x, w, Tensor.randn([5]), Tensor.randn([4, 8])), 'XFT_SHAPE', /rstd.*\[R\] = \[4\]/, 'rstd length');
  throwsCode(t, () => ops.rmsnormBackward(x, w, rstd, Tensor.randn([4, 8], { dtype: 'bf16' })), 'XFT_DTYPE', /dy.*f32/, 'dy dtype');
  throwsCode(t, () => ops.rmsnormBackward(x, w, rstd, Tensor.randn([8, 4])), 'XFT_SHAPE', /dy.*\[4, 8\].*shape of x/, 'dy shape');
  throwsCode(t, () => ops.rmsnormBackward(x, w, rstd, Tensor.randn([4, 8]), { dw: Tensor.zeros([8], { dtype: 'bf16' }) }), 'XFT_DTYPE', /options.dw.*f32/, 'dw dtype');
  throwsCode(t, () => ops.rmsnormBackward(x, w, rstd, Tensor.randn([4, 8]), { dw: 1 as never }), 'XFT_TYPE', /options.dw/, 'dw type');
});
