// swiglu / swigluBackward on the CPU: against float64 references, finite differences, extreme
// inputs, and errors.
import t from 'tap';
import { Tensor, ops } from '../lib/index';
import { native } from '../lib/native';
import { randomTensor, rng } from './helpers/ref';
import { close, throwsCode } from './helpers/check';

const TOL = { f32: 1e-5, bf16: 1e-2 };

t.before(() => native.setPoison(true));
t.teardown(() => native.setPoison(false));

const sigmoid = (g: number) => 1 / (1 + Math.exp(-g));

for (const dtype of ['f32', 'bf16'] as const)
  t.test(`forward and backward vs float64: ${dtype}`, async (t) => {
    for (const [ci, shape] of [[17, 40], [3, 5, 7], [1, 1], [0, 8], [64, 129]].entries()) {
      const g = randomTensor(shape, 10 + ci, { dtype, scale: 3 }), u = randomTensor(shape, 20 + ci, { dtype });
      const dh = randomTensor(shape, 30 + ci, { dtype });
      const h = ops.swiglu(g.t, u.t);
      t.same(h.shape, shape);
      t.equal(h.dtype, dtype);
      close(t, h.toArray(), g.values.map((v, i) => v * sigmoid(v) * u.values[i]), TOL[dtype], `${shape}: h`);
      const { dg, du } = ops.swigluBackward(g.t, u.t, dh.t);
      const refDg = g.values.map((v, i) => {
        const s = sigmoid(v);
        return dh.values[i] * u.values[i] * s * (1 + v * (1 - s));
      });
      close(t, dg.toArray(), refDg, TOL[dtype], `${shape}: dg`);
      close(t, du.toArray(), g.values.map((v, i) => dh.values[i] * v * sigmoid(v)), TOL[dtype], `${shape}: du`);
    }
  });

t.test('backward vs finite differences of <dh, swiglu(g, u)>', async (t) => {
  const n = 12, r = rng(5);
  const gv = Array.from(r.array(n, 2)), uv = Array.from(r.array(n)), dhv = Array.from(r.array(n));
  const loss = (gs: number[], us: number[]) =>
    Array.from(ops.swiglu(Tensor.from(gs, [3, 4]), Tensor.from(us, [3, 4])).toArray()).reduce((a, v, i) => a + v * dhv[i], 0);
  const fd = (vals: number[], f: (v: number[]) => number) =>
    vals.map((_, i) => {
      const p = [...vals], m = [...vals];
      p[i] += 1e-2;
      m[i] -= 1e-2;
      return (f(p) - f(m)) / 2e-2;
    });
  const { dg, du } = ops.swigluBackward(Tensor.from(gv, [3, 4]), Tensor.from(uv, [3, 4]), Tensor.from(dhv, [3, 4]));
  close(t, dg.toArray(), fd(gv, (v) => loss(v, uv)), 1e-3, 'dg');
  close(t, du.toArray(), fd(uv, (v) => loss(gv, v)), 1e-3, 'du');
});

t.test('large |g| stays finite', async (t) => {
  const g = Tensor.from([-200, -90, 90, 200], [4]), u = Tensor.ones([4]);
  const h = Array.from(ops.swiglu(g, u).toArray());
  t.same(h.map((v) => Object.is(v, -0) ? 0 : v), [0, 0, 90, 200], 'silu saturates to 0 and g');
  const { dg } = ops.swigluBackward(g, u, Tensor.ones([4]));
  t.ok(Array.from(dg.toArray()).every(Number.isFinite), 'dg finite');
});

t.test('swiglu errors name the argument', async (t) => {
  const g = Tensor.randn([4, 6]);
  throwsCode(t, () => ops.swiglu(g, Tensor.randn([4, 5])), 'XFT_SHAPE', /u.*\[4, 6\].*shape of g/, 'u shape');
  throwsCode(t, () => ops.swiglu(g, Tensor.randn([4, 6], { dtype: 'bf16' })), 'XFT_DTYPE', /u.*f32/, 'u dtype');
  throwsCode(t, () => ops.swiglu(Tensor.zeros([4], { dtype: 'i32' }), Tensor.zeros([4], { dtype: 'i32' })), 'XFT_DTYPE', /g.*f32 or bf16/, 'i32 g');
  throwsCode(t, () => ops.swigluBackward(g, Tensor.randn([4, 6]), Tensor.randn([6, 4])), 'XFT_SHAPE', /dh/, 'dh shape');
  throwsCode(t, () => ops.swiglu(g, null as never), 'XFT_TYPE', /u/, 'missing u');
});
