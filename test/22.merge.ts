// mergeExperts / mergeExpertsBackward on the CPU: against XFT.md in float64, finite differences,
// the λ = 1 and equal-experts invariants, and errors.
import t from 'tap';
import { Tensor, ops } from '../lib/index';
import { randomTensor, refCoefficients, refMerge, rng } from './helpers/ref';
import { close, exact, throwsCode } from './helpers/check';

const E = 8;
const shapes = [[E, 12, 10], [E, 10, 12], [E, 7]]; // gate, up, down (and an odd one)

for (const dtype of ['f32', 'bf16'] as const)
  for (const rate of [0.75, 0, 1, null])
    t.test(`forward and backward vs XFT.md: ${dtype}, sharedRate ${rate}`, async (t) => {
      const stacks = shapes.map((s, i) => randomTensor(s, 40 + i, { dtype }));
      const A = rate === null ? E : E - 1;
      const alphaValues = Array.from(rng(3).array(A));
      const alpha = Tensor.from(alphaValues, [A]);
      const merged = ops.mergeExperts(stacks.map((s) => s.t), alpha, rate);
      merged.forEach((m, i) => {
        t.same(m.shape, shapes[i].slice(1));
        close(t, m.toArray(), refMerge(stacks[i].values, E, alphaValues, rate), dtype === 'f32' ? 1e-6 : 1e-2, `merged[${i}]`);
      });
      // dα from G_i = Σ_W <dW̄, W_i>: the closed form of XFT.md
      const grads = shapes.map((s, i) => randomTensor(s.slice(1), 60 + i, { dtype }));
      const dAlpha = ops.mergeExpertsBackward(stacks.map((s) => s.t), alpha, rate, grads.map((g) => g.t));
      const G = new Array(E).fill(0);
      stacks.forEach((s, ti) => {
        const n = s.values.length / E;
        for (let e = 0; e < E; e++) for (let j = 0; j < n; j++) G[e] += grads[ti].values[j] * s.values[e * n + j];
      });
      const sm = refCoefficients(alphaValues, null);
      let want: number[];
      if (rate === null) {
        const mean = sm.reduce((a, c, i) => a + c * G[i], 0);
        want = sm.map((c, i) => c * (G[i] - mean));
      } else {
        const mean = sm.reduce((a, c, i) => a + c * G[i + 1], 0);
        want = sm.map((c, i) => (1 - rate) * c * (G[i + 1] - mean));
      }
      if (rate === 1) t.ok(dAlpha.toArray().every((v) => v === 0), 'λ = 1: α has no effect, zero gradient');
      else close(t, dAlpha.toArray(), want, 1e-5, 'dAlpha');
      const into = Tensor.full([A], 0.5);
      ops.mergeExpertsBackward(stacks.map((s) => s.t), alpha, rate, grads.map((g) => g.t), { into });
      close(t, into.toArray(), want.map((v) => v + 0.5), 1e-5, 'dAlpha accumulated');
    });

t.test('backward vs finite differences', async (t) => {
  for (const rate of [0.75, 0.3, null]) {
    const stacks = shapes.map((s, i) => randomTensor(s, 80 + i));
    const A = rate === null ? E : E - 1;
    const alphaValues = Array.from(rng(9).array(A));
    const grads = shapes.map((s, i) => randomTensor(s.slice(1), 90 + i));
    const L = (a: number[]) =>
      ops.mergeExperts(stacks.map((s) => s.t), Tensor.from(a, [A]), rate)
        .reduce((acc, m, i) => acc + Array.from(m.toArray()).reduce((s, v, j) => s + v * grads[i].values[j], 0), 0);
    const h = 1e-2;
    const fd = alphaValues.map((_, i) => {
      const p = [...alphaValues], m = [...alphaValues];
      p[i] += h;
      m[i] -= h;
      return (L(p) - L(m)) / (2 * h);
    });
    const dAlpha = ops.mergeExpertsBackward(stacks.map((s) => s.t), Tensor.from(alphaValues, [A]), rate, grads.map((g) => g.t));
    close(t, dAlpha.toArray(), fd, 1e-3, `sharedRate ${rate}`);
  }
});

t.test('λ = 1 returns the shared expert; equal experts return the dense weights', async (t) => {
  const stack = randomTensor([E, 6, 5], 1);
  const alpha = Tensor.randn([E - 1], { seed: 2, std: 3 });
  exact(t, ops.mergeExperts([stack.t], alpha, 1)[0].toArray(), stack.values.slice(0, 30), 'λ = 1: expert 0, exactly');
  const dense = Array.from(rng(4).array(30));
  const copies = Tensor.from(Array.from({ length: E }, () => dense).flat(), [E, 6, 5]);
  for (const rate of [0.75, 0, 0.5, null]) {
    const a = Tensor.randn([rate === null ? E : E - 1], { seed: 5, std: 2 });
    close(t, ops.mergeExperts([copies], a, rate)[0].toArray(), dense, 1e-6, `equal experts, sharedRate ${rate}: the dense FFN`);
  }
});

t.test('merge errors name the argument', async (t) => {
  const w = Tensor.randn([E, 4, 3]);
  const alpha = Tensor.zeros([E - 1]);
  throwsCode(t, () => ops.mergeExperts([], alpha, 0.75), 'XFT_TYPE', /weights/, 'empty list');
  throwsCode(t, () => ops.mergeExperts([w], Tensor.zeros([E]), 0.75), 'XFT_SHAPE', /alpha.*\[E-1\] = \[7\]/, 'alpha length');
  throwsCode(t, () => ops.mergeExperts([w], alpha, null), 'XFT_SHAPE', /alpha.*\[E\] = \[8\]/, 'alpha length without shared rate');
  throwsCode(t, () => ops.mergeExperts([w], alpha, 1.5), 'XFT_VALUE', /sharedRate/, 'sharedRate > 1');
  throwsCode(t, () => ops.mergeExperts([w], alpha, '0.7' as never), 'XFT_TYPE', /sharedRate/, 'string sharedRate');
  throwsCode(t, () => ops.mergeExperts([w, Tensor.randn([E - 1, 3])], alpha, 0.75), 'XFT_SHAPE', /weights\[1\].*E = 8/, 'expert count mismatch');
  throwsCode(t, () => ops.mergeExperts([w, Tensor.randn([E, 3], { dtype: 'bf16' })], alpha, 0.75), 'XFT_DTYPE', /weights\[1\]/, 'dtype mismatch');
  throwsCode(t, () => ops.mergeExperts([w], alpha.cast('bf16'), 0.75), 'XFT_DTYPE', /alpha.*f32/, 'bf16 alpha');
  throwsCode(t, () => ops.mergeExperts([Tensor.randn([1, 4])], Tensor.zeros([0]), 0.75), 'XFT_SHAPE', /at least 2 experts/, 'one expert');
  throwsCode(t, () => ops.mergeExpertsBackward([w], alpha, 0.75, [Tensor.randn([4, 4])]), 'XFT_SHAPE', /dMerged\[0\]/, 'dMerged shape');
  throwsCode(t, () => ops.mergeExpertsBackward([w], alpha, 0.75, []), 'XFT_TYPE', /dMerged/, 'dMerged count');
});
