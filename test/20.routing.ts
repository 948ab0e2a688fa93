// routeShared / routeSharedBackward on the CPU: against XFT.md in float64, finite differences,
// invariants, ties, and errors.
import t from 'tap';
import { Tensor, ops } from '../lib/index';
import { refRoute, rng, softmax, randomTensor, refGroupedGemm } from './helpers/ref';
import { close, exact, throwsCode } from './helpers/check';

const shapes: [number, number, number][] = [
  [37, 7, 6], // XFT: E = 8, K = 6
  [1, 7, 6], // T = 1
  [20, 7, 2], // K = 2: one normal expert
  [15, 7, 8], // K = E: every normal expert
  [10, 1, 2], // E = 2
  [50, 15, 4],
  [0, 7, 6], // no tokens
];

for (const dtype of ['f32', 'bf16'] as const)
  for (const [normalize, shared] of [[true, true], [false, true], [true, false]] as const)
    t.test(`forward vs XFT.md: ${dtype}, normalize ${normalize}, shared ${shared}`, async (t) => {
      for (const [T, N, K0] of shapes) {
        const K = shared ? K0 : Math.min(K0, N);
        if (!shared && K < 1) continue;
        const { t: logits, values } = randomTensor([T, N], 1000 + T * 31 + N * 7 + K, { dtype, scale: 2 });
        const r = ops.routeShared(logits, { topK: K, normalize, shared });
        const ref = refRoute(values, T, N, K, normalize, shared);
        const what = `T=${T} N=${N} K=${K}`;
        exact(t, r.experts.toArray(), ref.experts, `${what} experts`);
        close(t, r.weights.toArray(), ref.weights, 1e-6, `${what} weights`);
        exact(t, r.counts.toArray(), ref.counts, `${what} counts`);
        exact(t, r.offsets.toArray(), ref.offsets, `${what} offsets`);
        exact(t, r.order.toArray(), ref.order, `${what} order`);
        close(t, r.importance.toArray(), ref.importance, 1e-6, `${what} importance`);
        exact(t, r.load.toArray(), ref.load, `${what} load`);
        t.same(r.experts.shape, [T, K]);
        t.same(r.order.shape, [T * K]);
        r.dispose();
        logits.dispose();
      }
    });

t.test('invariants: normalized weights sum to 1, g_0 = 1 - p_1, descending probabilities', async (t) => {
  const T = 64, N = 7, K = 6;
  const { t: logits, values } = randomTensor([T, N], 5, { scale: 3 });
  const r = ops.routeShared(logits, { topK: K });
  const w = r.weights.toArray(), ex = r.experts.toArray();
  let worstSum = 0, ok = true;
  for (let i = 0; i < T; i++) {
    const row = Array.from(w.slice(i * K, (i + 1) * K));
    worstSum = Math.max(worstSum, Math.abs(row.reduce((a, b) => a + b, 0) - 1));
    const p = softmax(values.slice(i * N, (i + 1) * N));
    const sel = Array.from(ex.slice(i * K, i * K + K - 1), (e) => p[e - 1]);
    if (Math.abs(row[K - 1] - (1 - sel[0])) > 1e-6) ok = false;
    for (let j = 1; j < sel.length; j++) if (sel[j] > sel[j - 1]) ok = false;
    if (ex[i * K + K - 1] !== 0) ok = false;
    if (new Set(ex.slice(i * K, (i + 1) * K)).size !== K) ok = false;
  }
  t.ok(worstSum < 1e-6, `rows sum to 1 (worst deviation ${worstSum})`);
  t.ok(ok, 'shared weight 1 - p_1, normal experts by descending p, distinct experts, shared expert last');
  const counts = r.counts.toArray();
  t.equal(counts[0], T, 'every token takes the shared expert');
  t.equal(Array.from(counts).reduce((a, b) => a + b, 0), T * K, 'counts add up to T * K');
});

t.test('ties break toward the lower expert index', async (t) => {
  const rows = [
    [0, 0, 0, 0, 0, 0, 0],
    [1, 2, 2, 1, 2, 0, 0],
    [5, 5, -1, 5, -1, 5, 5],
  ];
  const r = ops.routeShared(Tensor.from(rows.flat(), [3, 7]), { topK: 4 });
  exact(t, r.experts.toArray(), [1, 2, 3, 0, 2, 3, 5, 0, 1, 2, 4, 0], 'experts by descending logit, ties by index');
  close(t, r.weights.toArray().slice(0, 4), [1 / 21, 1 / 21, 1 / 21, 6 / 7], 1e-6, 'all-equal logits: p = 1/7, shared 6/7');
  const bf = ops.routeShared(Tensor.from(rows.flat(), [3, 7], { dtype: 'bf16' }), { topK: 4 });
  exact(t, bf.experts.toArray(), r.experts.toArray(), 'the same ties in bf16');
});

t.test('equal experts: the routed MoE output equals the single FFN, whatever the router says', async (t) => {
  const T = 23, d = 16, f = 24, E = 8, K = 6, N = E - 1;
  const R = rng(77);
  const x = R.array(T * d), wg = R.array(f * d, 0.3), wu = R.array(f * d, 0.3), wd = R.array(d * f, 0.3);
  const silu = (v: number) => v / (1 + Math.exp(-v));
  const ffn = (rows: number[], M: number, stack: (w: Float64Array, n: number, k: number) => Tensor, offs: Tensor) => {
    const xs = Tensor.from(rows, [M, d]);
    const g = ops.groupedGemm(xs, stack(wg, f, d), offs).toArray();
    const u = ops.groupedGemm(xs, stack(wu, f, d), offs).toArray();
    const h = Tensor.from(Array.from(g, (v, i) => silu(v) * u[i]), [M, f]);
    return ops.groupedGemm(h, stack(wd, d, f), offs).toArray();
  };
  const dense = ffn(Array.from(x), T, (w, n, k) => Tensor.from(w, [1, n, k]), Tensor.from([0, T], [2], { dtype: 'i32' }));
  for (const seed of [1, 2, 3]) {
    const logits = Tensor.randn([T, N], { seed, std: 3 });
    const r = ops.routeShared(logits, { topK: K });
    const order = r.order.toArray(), g = r.weights.toArray();
    const gathered = Array.from(order).flatMap((pair) => Array.from(x.slice(Math.floor(pair / K) * d, Math.floor(pair / K) * d + d)));
    const copies = (w: Float64Array, n: number, k: number) => Tensor.from(Array.from({ length: E }, () => Array.from(w)).flat(), [E, n, k]);
    const y = ffn(gathered, T * K, copies, r.offsets);
    const out = new Float64Array(T * d);
    order.forEach((pair, i) => {
      const tok = Math.floor(pair / K);
      for (let j = 0; j < d; j++) out[tok * d + j] += g[pair] * y[i * d + j];
    });
    close(t, out, dense, 1e-5, `router seed ${seed}: MoE(x) = FFN(x)`);
  }
  void refGroupedGemm;
});

// finite differences of L = <dW, weights> + <dI, importance> through the CPU op itself
function lossOf(values: number[], T: number, N: number, K: number, normalize: boolean, shared: boolean, dW: number[], dI: number[] | null) {
  const r = ops.routeShared(Tensor.from(values, [T, N]), { topK: K, normalize, shared });
  const w = r.weights.toArray(), imp = r.importance.toArray();
  let L = 0;
  for (let i = 0; i < w.length; i++) L += dW[i] * w[i];
  if (dI) for (let i = 0; i < imp.length; i++) L += dI[i] * imp[i];
  r.dispose();
  return L;
}

for (const [normalize, shared, withImportance] of [[true, true, false], [true, true, true], [false, true, true], [true, false, true]] as const)
  t.test(`backward vs finite differences: normalize ${normalize}, shared ${shared}, importance ${withImportance}`, async (t) => {
    for (const [T, N, K0] of [[6, 7, 6], [4, 7, 2], [3, 7, 8], [3, 1, 2], [5, 12, 5]] as const) {
      const K = shared ? K0 : Math.min(K0, N);
      const R = rng(T * 100 + N * 10 + K);
      // well-separated logits so that a step of h never changes the selection
      const values = Array.from({ length: T * N }, (_, i) => (i % N) * 0.37 * (R.next() < 0.5 ? 1 : -1) + R.normal() * 0.05 + (i % N) * 0.01);
      const dW = Array.from(R.array(T * K));
      const dI = withImportance ? Array.from(R.array(N)) : null;
      const logits = Tensor.from(values, [T, N]);
      const r = ops.routeShared(logits, { topK: K, normalize, shared });
      const dLogits = ops.routeSharedBackward(logits, r, Tensor.from(dW, [T, K]), dI ? { dImportance: Tensor.from(dI, [N]) } : {}).toArray();
      const h = 1e-2;
      const fd = values.map((_, i) => {
        const plus = [...values], minus = [...values];
        plus[i] += h;
        minus[i] -= h;
        return (lossOf(plus, T, N, K, normalize, shared, dW, dI) - lossOf(minus, T, N, K, normalize, shared, dW, dI)) / (2 * h);
      });
      close(t, dLogits, fd, 2e-3, `T=${T} N=${N} K=${K}: dLogits`);
    }
  });

t.test('backward in bf16 follows the f32 backward', async (t) => {
  const { values } = randomTensor([16, 7], 9, { dtype: 'bf16', scale: 2 });
  const dW = Tensor.randn([16, 6], { seed: 3 });
  const grads = (['f32', 'bf16'] as const).map((dtype) => {
    const logits = Tensor.from(values, [16, 7], { dtype });
    return ops.routeSharedBackward(logits, ops.routeShared(logits, { topK: 6 }), dW).toArray();
  });
  close(t, grads[1], grads[0], 1e-2, 'bf16 dLogits');
});

t.test('routing errors name the argument', async (t) => {
  const logits = Tensor.randn([4, 7]);
  throwsCode(t, () => ops.routeShared(Tensor.randn([4, 7, 1]), { topK: 6 }), 'XFT_SHAPE', /logits.*2-D.*\[T, E-1\]/, 'rank 3 logits');
  throwsCode(t, () => ops.routeShared(Tensor.zeros([4, 7], { dtype: 'i32' }), { topK: 6 }), 'XFT_DTYPE', /logits.*f32 or bf16/, 'i32 logits');
  throwsCode(t, () => ops.routeShared(logits, { topK: 9 }), 'XFT_VALUE', /topK/, 'topK > E');
  throwsCode(t, () => ops.routeShared(logits, { topK: 1 }), 'XFT_VALUE', /topK/, 'topK 1 with a shared expert');
  throwsCode(t, () => ops.routeShared(logits, { topK: 2.5 }), 'XFT_VALUE', /topK/, 'fractional topK');
  throwsCode(t, () => ops.routeShared(logits, { topK: 6, normalize: 'yes' as never }), 'XFT_TYPE', /normalize/, 'non-boolean normalize');
  throwsCode(t, () => ops.routeShared(logits, undefined as never), 'XFT_TYPE', /options/, 'missing options');
  throwsCode(t, () => ops.routeShared(Tensor.randn([4, 0]), { topK: 2 }), 'XFT_SHAPE', /columns/, 'no experts');
  const r = ops.routeShared(logits, { topK: 6 });
  throwsCode(t, () => ops.routeSharedBackward(logits, r, Tensor.randn([4, 5])), 'XFT_SHAPE', /dWeights/, 'dWeights shape');
  throwsCode(t, () => ops.routeSharedBackward(Tensor.randn([5, 7]), r, Tensor.randn([5, 6])), 'XFT_SHAPE', /5 tokens.*4/, 'token count mismatch');
  throwsCode(t, () => ops.routeSharedBackward(logits, r, Tensor.randn([4, 6]), { dImportance: Tensor.randn([8]) }), 'XFT_SHAPE', /dImportance/, 'dImportance shape');
  throwsCode(t, () => ops.routeSharedBackward(logits, {} as never, Tensor.randn([4, 6])), 'XFT_TYPE', /routing/, 'not a routing');
});
