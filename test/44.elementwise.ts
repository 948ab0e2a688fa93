// add, axpby, tanh, router noise and sumSquares on the CPU: against float64 references (the
// router noise against an independent TypeScript port of the counter-based generator), finite
// differences, mixed dtypes, and errors.
import t from 'tap';
import { Tensor, ops } from '../lib/index';
import { native } from '../lib/native';
import { randomTensor, refNormal, rng } from './helpers/ref';
import { close, exact, throwsCode } from './helpers/check';

const TOL = { f32: 1e-5, bf16: 1e-2 };
const DTYPES = ['f32', 'bf16'] as const;

t.before(() => native.setPoison(true));
t.teardown(() => native.setPoison(false));

const softplus = (z: number) => (z > 20 ? z : Math.log1p(Math.exp(z)));
const sigmoid = (z: number) => 1 / (1 + Math.exp(-z));

function fd(vals: number[], f: (v: number[]) => number, h = 1e-2): number[] {
  return vals.map((_, i) => {
    const p = [...vals], m = [...vals];
    p[i] += h;
    m[i] -= h;
    return (f(p) - f(m)) / (2 * h);
  });
}

for (const dtype of DTYPES)
  t.test(`add: ${dtype}`, async (t) => {
    for (const [ci, shape] of [[5, 7], [1], [0, 3], [1000]].entries()) {
      const a = randomTensor(shape, 1 + ci, { dtype }), b = randomTensor(shape, 11 + ci, { dtype });
      const y = ops.add(a.t, b.t);
      t.same(y.shape, shape);
      close(t, y.toArray(), a.values.map((v, i) => v + b.values[i]), TOL[dtype], `${shape}: a + b`);
      const inPlace = ops.add(a.t, b.t, { out: a.t });
      t.equal(inPlace, a.t, 'out is returned');
      exact(t, a.t.toArray(), y.toArray(), `${shape}: in place into a`);
    }
  });

t.test('axpby: every dtype pair, beta = 0 does not read y', async (t) => {
  for (const xd of DTYPES)
    for (const yd of DTYPES)
      for (const [alpha, beta] of [[1, 1], [0.5, -2], [3, 0]]) {
        const x = randomTensor([9, 13], 5, { dtype: xd }), y0 = randomTensor([9, 13], 6, { dtype: yd });
        const y = beta === 0 ? Tensor.full([9, 13], NaN, { dtype: yd }) : y0.t;
        t.equal(ops.axpby(alpha, x.t, beta, y), y, 'returns y');
        const ref = x.values.map((v, i) => alpha * v + (beta === 0 ? 0 : beta * y0.values[i]));
        close(t, y.toArray(), ref, TOL[yd === 'bf16' || xd === 'bf16' ? 'bf16' : 'f32'], `x ${xd}, y ${yd}, alpha ${alpha}, beta ${beta}`);
      }
  const g = Tensor.randn([4, 4], { seed: 1, dtype: 'bf16' }), acc = Tensor.zeros([4, 4]);
  ops.axpby(1, g, 1, acc);
  ops.axpby(1, g, 1, acc);
  exact(t, acc.toArray(), Array.from(g.toArray(), (v) => 2 * v), 'bf16 gradients accumulate exactly into f32');
  ops.axpby(0.25, acc, 0, acc);
  exact(t, acc.toArray(), Array.from(g.toArray(), (v) => 0.5 * v), 'scale in place: axpby(s, y, 0, y)');
});

for (const dtype of DTYPES)
  t.test(`tanh forward and backward: ${dtype}`, async (t) => {
    const x = randomTensor([7, 11], 3, { dtype, scale: 2 }), dy = randomTensor([7, 11], 4, { dtype });
    const y = ops.tanh(x.t);
    close(t, y.toArray(), x.values.map(Math.tanh), TOL[dtype], 'tanh');
    const yv = Array.from(y.toArray());
    close(t, ops.tanhBackward(y, dy.t).toArray(), dy.values.map((g, i) => g * (1 - yv[i] * yv[i])), TOL[dtype], 'dx');
  });

t.test('tanh backward vs finite differences', async (t) => {
  const xv = Array.from(rng(9).array(10)), dyv = Array.from(rng(10).array(10));
  const loss = (v: number[]) => Array.from(ops.tanh(Tensor.from(v, [10])).toArray()).reduce((a, y, i) => a + y * dyv[i], 0);
  const y = ops.tanh(Tensor.from(xv, [10]));
  close(t, ops.tanhBackward(y, Tensor.from(dyv, [10])).toArray(), fd(xv, loss), 1e-3, 'dx');
});

for (const dtype of DTYPES)
  t.test(`router noise vs the reference generator: ${dtype}`, async (t) => {
    const T = 37, N = 7, seed = 12345n;
    const clean = randomTensor([T, N], 1, { dtype }), z = randomTensor([T, N], 2, { dtype, scale: 3 });
    z.values[3] = 30; // above softplus's threshold
    const zt = Tensor.from(z.values, [T, N], { dtype });
    const noisy = ops.routerNoise(clean.t, zt, { seed });
    const n = Array.from({ length: T * N }, (_, i) => refNormal(seed, i));
    close(t, noisy.toArray(), clean.values.map((c, i) => c + n[i] * (softplus(z.values[i]) + 0.01)), TOL[dtype], 'noisy, eps 0.01');
    const plain = ops.routerNoise(clean.t, zt, { seed: 12345, eps: 0 });
    close(t, plain.toArray(), clean.values.map((c, i) => c + n[i] * softplus(z.values[i])), TOL[dtype], 'eps 0, number seed');
    const dN = randomTensor([T, N], 3, { dtype });
    const { dClean, dz } = ops.routerNoiseBackward(zt, dN.t, { seed });
    exact(t, dClean.toArray(), dN.t.toArray(), 'dClean = dNoisy');
    close(t, dz.toArray(), dN.values.map((g, i) => g * n[i] * sigmoid(z.values[i])), TOL[dtype], 'dz');
    const other = ops.routerNoise(clean.t, zt, { seed: 12346n }).toArray();
    t.not(other[0], noisy.toArray()[0], 'another seed, other noise');
  });

t.test('router noise: the noise is Tensor.randn of the same seed', async (t) => {
  const n = Tensor.randn([500], { seed: 77 }).toArray();
  const noisy = ops.routerNoise(Tensor.zeros([500]), Tensor.full([500], 25), { seed: 77, eps: 0 }).toArray();
  close(t, noisy, Array.from(n, (v) => 25 * v), 1e-6, 'noisy = n * softplus(25) = 25 n');
});

t.test('router noise backward vs finite differences', async (t) => {
  const cv = Array.from(rng(11).array(8)), zv = Array.from(rng(12).array(8)), gv = Array.from(rng(13).array(8));
  const loss = (c: number[], z: number[]) =>
    Array.from(ops.routerNoise(Tensor.from(c, [2, 4]), Tensor.from(z, [2, 4]), { seed: 5 }).toArray()).reduce((a, v, i) => a + v * gv[i], 0);
  const { dClean, dz } = ops.routerNoiseBackward(Tensor.from(zv, [2, 4]), Tensor.from(gv, [2, 4]), { seed: 5 });
  close(t, dClean.toArray(), fd(cv, (v) => loss(v, zv)), 1e-3, 'dClean');
  close(t, dz.toArray(), fd(zv, (v) => loss(cv, v)), 1e-3, 'dz');
});

t.test('sumSquares over a list of f32 and bf16 tensors', async (t) => {
  const parts = [randomTensor([3, 5], 1), randomTensor([17], 2, { dtype: 'bf16' }), randomTensor([0], 3), randomTensor([2, 2, 2], 4, { scale: 10 })];
  const s = ops.sumSquares(parts.map((p) => p.t));
  t.same(s.shape, [1]);
  t.equal(s.dtype, 'f32');
  const ref = parts.reduce((a, p) => a + p.values.reduce((b, v) => b + v * v, 0), 0);
  close(t, s.toArray(), [ref], 1e-6, 'sum of squares');
  close(t, ops.sumSquares([Tensor.full([100000], 0.5, { dtype: 'bf16' })]).toArray(), [25000], 0, 'exact for a large tensor');
  const many = Array.from({ length: 150 }, (_, i) => Tensor.full([i + 1], 1));
  close(t, ops.sumSquares(many).toArray(), [(150 * 151) / 2], 0, 'more tensors than one launch takes');
});

t.test('elementwise errors name the argument', async (t) => {
  const a = Tensor.randn([3, 4]);
  throwsCode(t, () => ops.add(a, Tensor.randn([4, 3])), 'XFT_SHAPE', /b.*\[3, 4\].*shape of a/, 'add shapes');
  throwsCode(t, () => ops.add(a, Tensor.randn([3, 4], { dtype: 'bf16' })), 'XFT_DTYPE', /b.*f32/, 'add dtypes');
  throwsCode(t, () => ops.add(a, a, { out: Tensor.randn([12]) }), 'XFT_SHAPE', /options.out/, 'add out shape');
  throwsCode(t, () => ops.axpby(1, a, 1, Tensor.randn([12])), 'XFT_SHAPE', /y.*\[3, 4\]/, 'axpby shapes');
  throwsCode(t, () => ops.axpby(NaN, a, 1, a), 'XFT_VALUE', /alpha/, 'axpby alpha NaN');
  throwsCode(t, () => ops.axpby(1, a, '1' as never, a), 'XFT_TYPE', /beta/, 'axpby beta type');
  throwsCode(t, () => ops.axpby(1, Tensor.zeros([3, 4], { dtype: 'i32' }), 1, a), 'XFT_DTYPE', /x.*f32 or bf16/, 'axpby i32 x');
  throwsCode(t, () => ops.tanh(Tensor.zeros([2], { dtype: 'i32' })), 'XFT_DTYPE', /x/, 'tanh i32');
  throwsCode(t, () => ops.tanhBackward(a, Tensor.randn([3])), 'XFT_SHAPE', /dy/, 'tanhBackward shapes');
  throwsCode(t, () => ops.routerNoise(a, Tensor.randn([3, 5]), { seed: 1 }), 'XFT_SHAPE', /z.*shape of clean/, 'noise z shape');
  throwsCode(t, () => ops.routerNoise(a, a, {} as never), 'XFT_TYPE', /seed/, 'noise without seed');
  throwsCode(t, () => ops.routerNoise(a, a, { seed: 1.5 }), 'XFT_TYPE', /seed/, 'fractional seed');
  throwsCode(t, () => ops.routerNoise(a, a, { seed: 1, eps: Infinity }), 'XFT_VALUE', /eps/, 'infinite eps');
  throwsCode(t, () => ops.routerNoiseBackward(a, Tensor.randn([3, 4], { dtype: 'bf16' }), { seed: 1 }), 'XFT_DTYPE', /dNoisy/, 'noise backward dtype');
  throwsCode(t, () => ops.sumSquares([]), 'XFT_TYPE', /non-empty array/, 'empty list');
  throwsCode(t, () => ops.sumSquares([a, Tensor.zeros([2], { dtype: 'i32' })]), 'XFT_DTYPE', /tensors\[1\].*f32 or bf16/, 'i32 in the list');
  throwsCode(t, () => ops.sumSquares([a, 3 as never]), 'XFT_TYPE', /tensors\[1\]/, 'not a tensor');
});
