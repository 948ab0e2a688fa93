// embedding / embeddingBackward on the CPU: against float64 references, repeated and unused ids,
// accumulation, the kernels' handling of out-of-range ids, finite differences, and errors.
import t from 'tap';
import { Tensor, ops } from '../lib/index';
import { native } from '../lib/native';
import type { LayerNative } from '../lib/ops_layers';
import { randomTensor, rng } from './helpers/ref';
import { close, exact, throwsCode } from './helpers/check';

const TOL = { f32: 1e-6, bf16: 1e-2 };
const layer = native as unknown as LayerNative;

// unwritten outputs show up as NaN
t.before(() => native.setPoison(true));
t.teardown(() => native.setPoison(false));

function randomIds(n: number, V: number, seed: number): number[] {
  const r = rng(seed);
  return Array.from({ length: n }, () => r.int(0, V));
}

/** dTable[v] = sum of the dOut rows with id v, in float64. */
function refBackward(ids: number[], dOut: ArrayLike<number>, V: number, d: number): number[] {
  const out = new Array(V * d).fill(0);
  ids.forEach((id, r) => {
    for (let c = 0; c < d; c++) out[id * d + c] += dOut[r * d + c];
  });
  return out;
}

const cases: { shape: number[]; V: number; d: number; what: string }[] = [
  { shape: [37], V: 11, d: 24, what: 'rows of 24' },
  { shape: [3, 9], V: 50, d: 7, what: '[B, T] ids, odd d' },
  { shape: [64], V: 3, d: 16, what: 'many repeats of few ids' },
  { shape: [1], V: 1, d: 1, what: 'one id, one column' },
  { shape: [0], V: 5, d: 8, what: 'no tokens' },
];

for (const dtype of ['f32', 'bf16'] as const)
  t.test(`forward and backward vs float64: ${dtype}`, async (t) => {
    for (const [ci, c] of cases.entries()) {
      const R = c.shape.reduce((a, b) => a * b, 1);
      const idv = randomIds(R, c.V, 100 + ci);
      const ids = Tensor.from(idv, c.shape, { dtype: 'i32' });
      const table = randomTensor([c.V, c.d], 200 + ci, { dtype });
      const out = ops.embedding(ids, table.t);
      t.same(out.shape, [...c.shape, c.d], `${c.what}: shape`);
      t.equal(out.dtype, dtype);
      exact(t, out.toArray(), idv.flatMap((id) => table.values.slice(id * c.d, (id + 1) * c.d)), `${c.what}: rows copied exactly`);
      const dOut = randomTensor([...c.shape, c.d], 300 + ci, { dtype });
      const dTable = ops.embeddingBackward(ids, dOut.t, c.V);
      t.same(dTable.shape, [c.V, c.d]);
      t.equal(dTable.dtype, 'f32', 'table gradient is f32');
      const ref = refBackward(idv, dOut.values, c.V, c.d);
      close(t, dTable.toArray(), ref, TOL.f32, `${c.what}: dTable (unused rows zero)`);
      const into = Tensor.full([c.V, c.d], 0.5);
      const same = ops.embeddingBackward(ids, dOut.t, c.V, { into });
      t.equal(same, into, 'into is returned');
      close(t, into.toArray(), ref.map((v) => v + 0.5), TOL.f32, `${c.what}: accumulated into`);
    }
  });

t.test('backward sums in token order (the order the GPU uses)', async (t) => {
  // 1e8 + 1 - 1e8 in fp32, token order: (0 + 1e8 + 1) = 1e8, then - 1e8 = 0; another order would give 1
  const ids = Tensor.from([2, 2, 2], [3], { dtype: 'i32' });
  const dOut = Tensor.from([1e8, 1, -1e8], [3, 1]);
  exact(t, ops.embeddingBackward(ids, dOut, 3).toArray(), [0, 0, 0], 'fp32 sum from zero in token order');
});

t.test('gradient vs finite differences of <dOut, embedding(ids, table)>', async (t) => {
  const V = 6, d = 3, idv = [1, 4, 1, 0, 5, 1];
  const ids = Tensor.from(idv, [6], { dtype: 'i32' });
  const tab = Array.from(rng(7).array(V * d));
  const dOutV = Array.from(rng(8).array(idv.length * d));
  const loss = (tv: number[]) => {
    const y = ops.embedding(ids, Tensor.from(tv, [V, d])).toArray();
    return Array.from(y).reduce((a, v, i) => a + v * dOutV[i], 0);
  };
  const h = 1e-2;
  const fd = tab.map((_, i) => {
    const p = [...tab], m = [...tab];
    p[i] += h;
    m[i] -= h;
    return (loss(p) - loss(m)) / (2 * h);
  });
  close(t, ops.embeddingBackward(ids, Tensor.from(dOutV, [6, d]), V).toArray(), fd, 1e-4, 'dTable');
});

t.test('the kernels never touch the table outside [0, V): zero rows, skipped gradients', async (t) => {
  // straight to the native op (the wrapper rejects such ids on the CPU)
  const V = 4, d = 3;
  const ids = Tensor.from([1, -1, 4, 1000000, 3], [5], { dtype: 'i32' });
  const table = Tensor.from(Array.from({ length: V * d }, (_, i) => i + 1), [V, d]);
  const out = Tensor.empty([5, d]);
  layer.embeddingForward(ids.storage, table.storage, out.storage, 0, 5, V, d);
  exact(t, out.toArray(), [4, 5, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10, 11, 12], 'invalid ids give zero rows');
  const dOut = Tensor.ones([5, d]);
  const dTable = Tensor.empty([V, d]);
  layer.embeddingBackward(ids.storage, dOut.storage, dTable.storage, 0, 5, V, d, false);
  exact(t, dTable.toArray(), [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1], 'invalid ids contribute nothing');
});

t.test('embedding errors name the argument', async (t) => {
  const ids = Tensor.from([0, 1, 2], [3], { dtype: 'i32' });
  const table = Tensor.randn([5, 4]);
  throwsCode(t, () => ops.embedding(Tensor.from([0, 1], [2]), table), 'XFT_DTYPE', /ids.*i32/, 'f32 ids');
  throwsCode(t, () => ops.embedding(ids, Tensor.randn([20])), 'XFT_SHAPE', /table.*2-D.*\[V, d\]/, 'rank-1 table');
  throwsCode(t, () => ops.embedding(ids, Tensor.zeros([5, 4], { dtype: 'i32' })), 'XFT_DTYPE', /table.*f32 or bf16/, 'i32 table');
  throwsCode(t, () => ops.embedding(Tensor.from([0, 7, 1], [3], { dtype: 'i32' }), table), 'XFT_VALUE', /ids\[1\] = 7.*5 rows/, 'id too large');
  throwsCode(t, () => ops.embedding(Tensor.from([-1], [1], { dtype: 'i32' }), table), 'XFT_VALUE', /ids\[0\] = -1/, 'negative id');
  throwsCode(t, () => ops.embedding(ids, Tensor.randn([0, 4])), 'XFT_SHAPE', /non-empty table/, 'empty table');
  throwsCode(t, () => ops.embeddingBackward(ids, Tensor.randn([3, 5, 1]), 5), 'XFT_SHAPE', /dOut.*\[3, d\]/, 'dOut rank');
  throwsCode(t, () => ops.embeddingBackward(ids, Tensor.randn([4, 4]), 5), 'XFT_SHAPE', /dOut/, 'dOut rows');
  throwsCode(t, () => ops.embeddingBackward(ids, Tensor.randn([3, 4]), 0), 'XFT_VALUE', /vocabSize/, 'vocabSize 0');
  throwsCode(t, () => ops.embeddingBackward(ids, Tensor.randn([3, 4]), 2), 'XFT_VALUE', /ids\[2\] = 2/, 'id >= vocabSize');
  throwsCode(t, () => ops.embeddingBackward(ids, Tensor.randn([3, 4]), 5, { into: Tensor.zeros([5, 3]) }), 'XFT_SHAPE', /options.into.*\[5, 4\]/, 'into shape');
  throwsCode(t, () => ops.embeddingBackward(ids, Tensor.randn([3, 4]), 5, { into: Tensor.zeros([5, 4], { dtype: 'bf16' }) }), 'XFT_DTYPE', /options.into.*f32/, 'into dtype');
  const gone = Tensor.randn([5, 4]);
  gone.dispose();
  throwsCode(t, () => ops.embedding(ids, gone), 'XFT_DISPOSED', /table/, 'disposed table');
});
