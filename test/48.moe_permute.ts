// The MoE permutation (invertPermutation, permute, unpermute and their backwards) and the balance
// loss on the CPU: against float64, with routeShared's order, adjointness, finite differences,
// bf16, and errors.
import t from 'tap';
import { Tensor, ops } from '../lib/index';
import { randomTensor, rng } from './helpers/ref';
import { close, exact, throwsCode } from './helpers/check';

/** A routing of T tokens to K experts (E = 8) and the inverse of its order. */
function routing(T: number, K: number, seed: number) {
  const r = ops.routeShared(Tensor.randn([T, 7], { seed, std: 2 }), { topK: K });
  const order = Array.from(r.order.toArray());
  const position = new Array(order.length);
  order.forEach((pair, i) => (position[pair] = i));
  return { r, order, position };
}

function refPermute(x: ArrayLike<number>, order: number[], K: number, d: number): number[] {
  return order.flatMap((pair) => Array.from({ length: d }, (_, c) => x[Math.floor(pair / K) * d + c]));
}

function refCombine(rows: ArrayLike<number>, position: number[], g: ArrayLike<number> | null, T: number, K: number, d: number): number[] {
  const out = new Array(T * d).fill(0);
  for (let tk = 0; tk < T * K; tk++)
    for (let c = 0; c < d; c++) out[Math.floor(tk / K) * d + c] += (g ? g[tk] : 1) * rows[position[tk] * d + c];
  return out;
}

function refUnpermuteBackward(dOut: ArrayLike<number>, y: ArrayLike<number>, position: number[], g: ArrayLike<number>, T: number, K: number, d: number) {
  const dy = new Array(T * K * d).fill(0), dg = new Array(T * K).fill(0);
  for (let tk = 0; tk < T * K; tk++) {
    const t = Math.floor(tk / K), p = position[tk];
    for (let c = 0; c < d; c++) {
      dy[p * d + c] = g[tk] * dOut[t * d + c];
      dg[tk] += dOut[t * d + c] * y[p * d + c];
    }
  }
  return { dy, dg };
}

t.test('invertPermutation inverts routeShared order', async (t) => {
  for (const [T, K] of [[37, 6], [1, 2], [100, 8], [0, 6]]) {
    const { r, position } = routing(T, K, T + K);
    const pos = ops.invertPermutation(r.order);
    exact(t, pos.toArray(), position, `T=${T} K=${K}: position[order[i]] = i`);
    r.dispose();
  }
});

for (const dtype of ['f32', 'bf16'] as const)
  t.test(`permute, unpermute and their backwards vs float64: ${dtype}`, async (t) => {
    const tol = dtype === 'f32' ? 1e-6 : 1e-2;
    for (const [T, K, d] of [[37, 6, 16], [5, 2, 1], [64, 8, 33], [0, 6, 4]]) {
      const what = `T=${T} K=${K} d=${d}`;
      const { r, order, position } = routing(T, K, 3 * T + d);
      const pos = ops.invertPermutation(r.order);
      const x = randomTensor([T, d], T + 1, { dtype });
      const xp = ops.permute(x.t, r.order, K);
      exact(t, xp.toArray(), refPermute(x.values, order, K, d), `${what}: permute is an exact gather`);
      const dxp = randomTensor([T * K, d], T + 2, { dtype });
      close(t, ops.permuteBackward(dxp.t, pos, K).toArray(), refCombine(dxp.values, position, null, T, K, d), tol, `${what}: permuteBackward`);
      const y = randomTensor([T * K, d], T + 3, { dtype });
      const g = Array.from(r.weights.toArray());
      close(t, ops.unpermute(y.t, pos, r.weights).toArray(), refCombine(y.values, position, g, T, K, d), tol, `${what}: unpermute`);
      const dOut = randomTensor([T, d], T + 4, { dtype });
      const b = ops.unpermuteBackward(dOut.t, y.t, pos, r.weights);
      const ref = refUnpermuteBackward(dOut.values, y.values, position, g, T, K, d);
      close(t, b.dy.toArray(), ref.dy, tol, `${what}: unpermuteBackward dy`);
      close(t, b.dg.toArray(), ref.dg, dtype === 'f32' ? 1e-5 : 1e-2, `${what}: unpermuteBackward dg`);
      t.equal(b.dg.dtype, 'f32', `${what}: dg is f32`);
      r.dispose();
    }
  });

t.test('permute -> identical experts -> unpermute gives x scaled by the row sums of g', async (t) => {
  const T = 29, K = 6, d = 12;
  const { r } = routing(T, K, 5);
  const pos = ops.invertPermutation(r.order);
  const x = randomTensor([T, d], 6);
  // normalized routing weights sum to 1: the MoE of equal experts is the identity here
  const same = ops.unpermute(ops.permute(x.t, r.order, K), pos, r.weights).toArray();
  close(t, same, x.values, 1e-6, 'routing weights: out = x');
  // arbitrary weights: out[t] = (sum_s g[t, s]) x[t]
  const g = Array.from(rng(7).array(T * K));
  const out = ops.unpermute(ops.permute(x.t, r.order, K), pos, Tensor.from(g, [T, K])).toArray();
  const want = x.values.map((v, i) => v * g.slice(Math.floor(i / d) * K, Math.floor(i / d) * K + K).reduce((a, b) => a + b, 0));
  close(t, out, want, 1e-6, 'out = rowsum(g) * x');
});

t.test('permuteBackward is the adjoint of permute; unpermute gradients match finite differences', async (t) => {
  const T = 9, K = 4, d = 5;
  const { r } = routing(T, K, 8);
  const pos = ops.invertPermutation(r.order);
  const x = randomTensor([T, d], 1), dxp = randomTensor([T * K, d], 2);
  const lhs = Array.from(ops.permute(x.t, r.order, K).toArray()).reduce((a, v, i) => a + v * dxp.values[i], 0);
  const rhs = Array.from(ops.permuteBackward(dxp.t, pos, K).toArray()).reduce((a, v, i) => a + v * x.values[i], 0);
  t.ok(Math.abs(lhs - rhs) < 1e-4 * Math.abs(lhs), `<permute(x), dxp> = <x, permuteBackward(dxp)> (${lhs} vs ${rhs})`);
  const y = Array.from(rng(3).array(T * K * d)), g = Array.from(rng(4).array(T * K)), dOut = Array.from(rng(5).array(T * d));
  const L = (yy: number[], gg: number[]) =>
    Array.from(ops.unpermute(Tensor.from(yy, [T * K, d]), pos, Tensor.from(gg, [T, K])).toArray()).reduce((a, v, i) => a + v * dOut[i], 0);
  const h = 1e-2;
  const fd = (arr: number[], which: 'y' | 'g') =>
    arr.map((_, i) => {
      const plus = [...arr], minus = [...arr];
      plus[i] += h;
      minus[i] -= h;
      return which === 'y' ? (L(plus, g) - L(minus, g)) / (2 * h) : (L(y, plus) - L(y, minus)) / (2 * h);
    });
  const b = ops.unpermuteBackward(Tensor.from(dOut, [T, d]), Tensor.from(y, [T * K, d]), pos, Tensor.from(g, [T, K]));
  close(t, b.dy.toArray(), fd(y, 'y'), 1e-3, 'dy');
  close(t, b.dg.toArray(), fd(g, 'g'), 1e-3, 'dg');
});

// ---- balance loss ----

function refCv2(x: number[]): number {
  const N = x.length;
  if (N < 2) return 0;
  const mean = x.reduce((a, b) => a + b, 0) / N;
  const v = x.reduce((a, b) => a + (b - mean) ** 2, 0) / (N - 1);
  return v / (mean * mean + 1e-10);
}

t.test('balance loss vs float64 (unbiased variance), N = 1, and finite differences', async (t) => {
  for (const N of [7, 2, 63]) {
    const R = rng(N);
    const imp = Array.from({ length: N }, () => R.next() * 10), load = Array.from({ length: N }, () => R.int(0, 50));
    for (const weight of [0.01, 1]) {
      const loss = ops.balanceLoss(Tensor.from(imp, [N]), Tensor.from(load, [N]), { weight }).toArray();
      close(t, loss, [weight * (refCv2(imp) + refCv2(load))], 1e-5, `N=${N} weight=${weight}: loss`);
    }
    const dLoss = 1.5;
    const g = ops.balanceLossBackward(Tensor.from(imp, [N]), Tensor.from(load, [N]), { weight: 0.5, dLoss });
    const h = 1e-3;
    const fd = (x: number[], other: number[], first: boolean) =>
      x.map((_, i) => {
        const p = [...x], m = [...x];
        p[i] += h;
        m[i] -= h;
        const f = (z: number[]) => 0.5 * dLoss * (first ? refCv2(z) + refCv2(other) : refCv2(other) + refCv2(z));
        return (f(p) - f(m)) / (2 * h);
      });
    close(t, g.dImportance.toArray(), fd(imp, load, true), 1e-4, `N=${N}: dImportance`);
    close(t, g.dLoad.toArray(), fd(load, imp, false), 1e-4, `N=${N}: dLoad`);
  }
  const one = ops.balanceLoss(Tensor.from([3], [1]), Tensor.from([5], [1]));
  t.equal(one.toArray()[0], 0, 'one expert: loss 0');
  const g1 = ops.balanceLossBackward(Tensor.from([3], [1]), Tensor.from([5], [1]));
  exact(t, [...g1.dImportance.toArray(), ...g1.dLoad.toArray()], [0, 0], 'one expert: zero gradients');
  const uniform = ops.balanceLoss(Tensor.full([7], 2), Tensor.full([7], 4));
  t.equal(uniform.toArray()[0], 0, 'perfectly balanced: loss 0');
  const idle = ops.balanceLoss(Tensor.zeros([7]), Tensor.zeros([7]));
  t.equal(idle.toArray()[0], 0, 'all zero: loss 0 (the 1e-10 keeps it finite)');
});

t.test('balance loss from routeShared, default weight 0.01', async (t) => {
  const r = ops.routeShared(Tensor.randn([200, 7], { seed: 1, std: 2 }), { topK: 3 });
  const imp = Array.from(r.importance.toArray()), load = Array.from(r.load.toArray());
  close(t, ops.balanceLoss(r.importance, r.load).toArray(), [0.01 * (refCv2(imp) + refCv2(load))], 1e-5, 'loss');
  r.dispose();
});

t.test('permutation and balance loss errors name the argument', async (t) => {
  const { r } = routing(6, 3, 1);
  const x = Tensor.randn([6, 4]);
  const pos = ops.invertPermutation(r.order);
  throwsCode(t, () => ops.permute(x, r.order, 4), 'XFT_SHAPE', /order.*\[T\*K\] = \[24\]/, 'order length vs T*K');
  throwsCode(t, () => ops.permute(x, r.order, 0), 'XFT_VALUE', /topK/, 'topK 0');
  throwsCode(t, () => ops.permute(x, Tensor.from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 16], [18], { dtype: 'i32' }), 3),
    'XFT_VALUE', /order holds 16 twice/, 'duplicate entry');
  throwsCode(t, () => ops.invertPermutation(Tensor.from([0, 5], [2], { dtype: 'i32' })), 'XFT_VALUE', /order\[1\] = 5.*\[0, 2\)/, 'out of range');
  throwsCode(t, () => ops.invertPermutation(Tensor.from([0, 1], [2])), 'XFT_DTYPE', /order.*i32/, 'f32 order');
  throwsCode(t, () => ops.permute(Tensor.zeros([6, 4], { dtype: 'i32' }), r.order, 3), 'XFT_DTYPE', /x to be a f32 or bf16/, 'i32 x');
  throwsCode(t, () => ops.permuteBackward(Tensor.randn([17, 4]), pos, 3), 'XFT_SHAPE', /17 rows.*topK = 3/, 'dxp rows');
  throwsCode(t, () => ops.unpermute(Tensor.randn([18, 4]), pos, Tensor.randn([5, 3])), 'XFT_SHAPE', /T\*K = 15 rows/, 'y rows vs g');
  throwsCode(t, () => ops.unpermute(Tensor.randn([18, 4]), pos, Tensor.randn([6, 3], { dtype: 'bf16' })), 'XFT_DTYPE', /\bg\b.*f32/, 'bf16 g');
  throwsCode(t, () => ops.unpermuteBackward(Tensor.randn([6, 5]), Tensor.randn([18, 4]), pos, r.weights), 'XFT_SHAPE', /dOut.*\[T, d\] = \[6, 4\]/, 'dOut shape');
  throwsCode(t, () => ops.unpermuteBackward(Tensor.randn([6, 4], { dtype: 'bf16' }), Tensor.randn([18, 4]), pos, r.weights), 'XFT_DTYPE', /dOut/, 'dOut dtype');
  throwsCode(t, () => ops.balanceLoss(Tensor.zeros([7]), Tensor.zeros([6])), 'XFT_SHAPE', /load.*\[N\] = \[7\]/, 'load length');
  throwsCode(t, () => ops.balanceLoss(Tensor.zeros([0]), Tensor.zeros([0])), 'XFT_SHAPE', /N >= 1/, 'no experts');
  throwsCode(t, () => ops.balanceLoss(Tensor.zeros([7]), Tensor.zeros([7]), { weight: NaN }), 'XFT_VALUE', /weight/, 'NaN weight');
  throwsCode(t, () => ops.balanceLossBackward(Tensor.zeros([7]), Tensor.zeros([7]), { dLoss: 'x' as never }), 'XFT_TYPE', /dLoss/, 'string dLoss');
  // unchecked, an out-of-range entry reads as a zero row
  const bad = Tensor.from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 99], [18], { dtype: 'i32' });
  const xp = ops.permute(x, bad, 3, { validate: false }).toArray();
  exact(t, xp.slice(17 * 4), [0, 0, 0, 0], 'unvalidated out-of-range order: zero row');
  r.dispose();
});
