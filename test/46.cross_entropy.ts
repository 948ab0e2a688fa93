// crossEntropy / crossEntropyBackward on the CPU: against float64, the loss mask, argmax ties,
// finite differences, in-place backward, bf16, and errors.
import t from 'tap';
import { Tensor, ops } from '../lib/index';
import { randomTensor, rng, softmax } from './helpers/ref';
import { close, exact, throwsCode } from './helpers/check';

function refCrossEntropy(z: ArrayLike<number>, targets: number[], R: number, V: number, dLoss: number[] | null) {
  const losses: number[] = [], predictions: number[] = [], dLogits: number[] = [];
  for (let r = 0; r < R; r++) {
    const row = Array.from(z).slice(r * V, (r + 1) * V);
    let best = 0;
    for (let j = 1; j < V; j++) if (row[j] > row[best]) best = j;
    predictions.push(best);
    const y = targets[r], ignored = y < 0 || y >= V;
    const m = Math.max(...row);
    const lse = m + Math.log(row.reduce((a, x) => a + Math.exp(x - m), 0));
    losses.push(ignored ? 0 : lse - row[y]);
    if (dLoss) {
      const p = softmax(row);
      for (let j = 0; j < V; j++) dLogits.push(ignored ? 0 : (p[j] - (j === y ? 1 : 0)) * dLoss[r]);
    }
  }
  return { losses, predictions, dLogits };
}

/** targets in [0, V) with every third row masked (-1 or -100). */
function maskedTargets(R: number, V: number, seed: number): number[] {
  const g = rng(seed);
  return Array.from({ length: R }, (_, r) => (r % 3 === 1 ? (r % 2 ? -1 : -100) : g.int(0, V)));
}

for (const dtype of ['f32', 'bf16'] as const)
  t.test(`forward and backward vs float64: ${dtype}`, async (t) => {
    for (const [R, V] of [[1, 1], [13, 37], [6, 1000], [3, 32000], [0, 5]] as const) {
      const what = `R=${R} V=${V}`;
      const { t: logits, values } = randomTensor([R, V], R * 7 + V, { dtype, scale: 3 });
      const targets = maskedTargets(R, V, R + V);
      const dLoss = Array.from(rng(V).array(R));
      const tt = Tensor.from(targets, [R], { dtype: 'i32' });
      const ref = refCrossEntropy(values, targets, R, V, dLoss);
      const { losses, predictions } = ops.crossEntropy(logits, tt);
      close(t, losses.toArray(), ref.losses, 1e-5, `${what}: losses`);
      exact(t, predictions.toArray(), ref.predictions, `${what}: predictions`);
      const dLogits = ops.crossEntropyBackward(logits, tt, Tensor.from(dLoss, [R]));
      t.equal(dLogits.dtype, dtype, `${what}: dlogits in the logits dtype`);
      close(t, dLogits.toArray(), ref.dLogits, dtype === 'f32' ? 1e-5 : 1e-2, `${what}: dLogits`);
    }
  });

t.test('masked rows: zero loss and zero gradient, whatever dLoss says', async (t) => {
  const logits = Tensor.randn([4, 9], { seed: 3 });
  const targets = Tensor.from([-1, 2, -100, 8], [4], { dtype: 'i32' });
  const { losses } = ops.crossEntropy(logits, targets);
  const l = losses.toArray();
  t.equal(l[0], 0);
  t.equal(l[2], 0);
  t.ok(l[1] > 0 && l[3] > 0, 'unmasked rows have positive loss');
  const g = ops.crossEntropyBackward(logits, targets, Tensor.ones([4])).toArray();
  exact(t, g.slice(0, 9), new Array(9).fill(0), 'row 0 is zero');
  exact(t, g.slice(18, 27), new Array(9).fill(0), 'row 2 is zero');
  const rowSum = Array.from(g.slice(9, 18)).reduce((a, b) => a + b, 0);
  t.ok(Math.abs(rowSum) < 1e-6, `an unmasked gradient row sums to 0 (${rowSum})`);
});

t.test('argmax ties break toward the lower index', async (t) => {
  const rows = [[0, 0, 0, 0], [1, 3, 3, 2], [-1, -5, -1, -1], [2, 2, 7, 7]];
  for (const dtype of ['f32', 'bf16'] as const) {
    const { predictions } = ops.crossEntropy(Tensor.from(rows.flat(), [4, 4], { dtype }), Tensor.from([0, 1, 2, 3], [4], { dtype: 'i32' }));
    exact(t, predictions.toArray(), [0, 1, 0, 2], `${dtype} predictions`);
  }
});

t.test('backward vs finite differences of the CPU forward', async (t) => {
  const R = 5, V = 11;
  const values = Array.from(rng(9).array(R * V, 2));
  const targets = [3, -1, 0, 10, 7];
  const dLoss = [0.5, 2, -1, 1, 0.25];
  const tt = Tensor.from(targets, [R], { dtype: 'i32' });
  const L = (z: number[]) => {
    const l = Array.from(ops.crossEntropy(Tensor.from(z, [R, V]), tt).losses.toArray());
    return l.reduce((a, x, r) => a + x * dLoss[r], 0);
  };
  const h = 1e-2;
  const fd = values.map((_, i) => {
    const plus = [...values], minus = [...values];
    plus[i] += h;
    minus[i] -= h;
    return (L(plus) - L(minus)) / (2 * h);
  });
  close(t, ops.crossEntropyBackward(Tensor.from(values, [R, V]), tt, Tensor.from(dLoss, [R])).toArray(), fd, 1e-3, 'dLogits');
});

t.test('in-place backward writes over the logits', async (t) => {
  for (const dtype of ['f32', 'bf16'] as const) {
    const logits = Tensor.randn([7, 50], { seed: 5, dtype });
    const targets = Tensor.from([1, -1, 49, 0, 3, 3, -1], [7], { dtype: 'i32' });
    const dLoss = Tensor.full([7], 1 / 5);
    const expected = ops.crossEntropyBackward(logits, targets, dLoss).toArray();
    const result = ops.crossEntropyBackward(logits, targets, dLoss, { inPlace: true });
    t.equal(result, logits, `${dtype}: returns the logits tensor`);
    exact(t, logits.toArray(), expected, `${dtype}: same values as out of place`);
  }
});

t.test('cross-entropy errors name the argument', async (t) => {
  const logits = Tensor.randn([4, 10]);
  const targets = Tensor.from([1, 2, -1, 9], [4], { dtype: 'i32' });
  throwsCode(t, () => ops.crossEntropy(logits, Tensor.from([1, 2, 10, 0], [4], { dtype: 'i32' })), 'XFT_VALUE', /targets\[2\] = 10.*V = 10/, 'target >= V');
  throwsCode(t, () => ops.crossEntropy(logits, Tensor.from([1, 2, 3, 0], [4])), 'XFT_DTYPE', /targets.*i32/, 'f32 targets');
  throwsCode(t, () => ops.crossEntropy(logits, Tensor.from([1, 2, 3], [3], { dtype: 'i32' })), 'XFT_SHAPE', /targets.*\[R\] = \[4\]/, 'targets length');
  throwsCode(t, () => ops.crossEntropy(Tensor.randn([4, 10, 1]), targets), 'XFT_SHAPE', /logits.*2-D/, 'rank 3 logits');
  throwsCode(t, () => ops.crossEntropy(Tensor.zeros([4, 10], { dtype: 'i32' }), targets), 'XFT_DTYPE', /logits.*f32 or bf16/, 'i32 logits');
  throwsCode(t, () => ops.crossEntropy(Tensor.randn([4, 0]), targets), 'XFT_SHAPE', /V >= 1/, 'empty vocabulary');
  throwsCode(t, () => ops.crossEntropyBackward(logits, targets, Tensor.ones([5])), 'XFT_SHAPE', /dLoss/, 'dLoss length');
  throwsCode(t, () => ops.crossEntropyBackward(logits, targets, Tensor.ones([4], { dtype: 'bf16' })), 'XFT_DTYPE', /dLoss/, 'dLoss dtype');
  throwsCode(t, () => ops.crossEntropyBackward(logits, targets, Tensor.ones([4]), { inPlace: 1 as never }), 'XFT_TYPE', /inPlace/, 'inPlace not boolean');
  throwsCode(t, () => ops.crossEntropy(logits, targets, { validate: 'no' as never }), 'XFT_TYPE', /validate/, 'validate not boolean');
  // unchecked, an out-of-range target ignores its row instead of reading out of bounds
  const { losses } = ops.crossEntropy(logits, Tensor.from([1, 2, 99, 0], [4], { dtype: 'i32' }), { validate: false });
  t.equal(losses.toArray()[2], 0, 'unvalidated target >= V: row ignored');
});
