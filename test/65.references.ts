// Independent float64 references where correctness otherwise rests on "equals its twin": the CPU
// grouped GEMM at sizes that split it over several threads, and the whole model (dense, and the XFT
// MoE with distinct experts, every router kind, router noise and the noisy top-k load estimate in the
// balance loss) against the float64 forward of helpers/ref_model.ts.
import t from 'tap';

// several CPU threads whatever the machine (read by the addon at each call): the GEMM computes its
// output in 2-D blocks whatever the thread count (dW [192, 160] in two row blocks here), handed to
// several threads above a work threshold
process.env.XFT_CPU_THREADS ??= '3';

import { Tensor, ops } from '../lib/index';
import { tinyConfig } from '../lib/config';
import { createDense, upcycle } from '../lib/xft';
import type { Model } from '../lib/model';
import { refGroupedGemm, relErr, rng } from './helpers/ref';
import { refModelForward, type RefMoe } from './helpers/ref_model';
import { close } from './helpers/check';

t.test('CPU grouped GEMM above the multi-thread threshold, forward and backward, against float64', async (t) => {
  const n = 192, k = 160;
  // groups of 0, 70 (4.3e6 flops), 131 (8.0e6) and 7 rows
  const offsets = [0, 0, 70, 201, 208], M = 208, E = 4;
  const R = rng(65);
  const x = Array.from(R.array(M * k)), w = Array.from(R.array(E * n * k, 0.1)), dy = Array.from(R.array(M * n));
  for (const dtype of ['f32', 'bf16'] as const) {
    const X = Tensor.from(x, [M, k], { dtype }), W = Tensor.from(w, [E, n, k], { dtype }), DY = Tensor.from(dy, [M, n], { dtype });
    const O = Tensor.from(offsets, [E + 1], { dtype: 'i32' });
    const xs = Array.from(X.toArray()), ws = Array.from(W.toArray()), dys = Array.from(DY.toArray());
    const tol = dtype === 'f32' ? 1e-5 : 1e-2;
    const y = ops.groupedGemm(X, W, O);
    close(t, y.toArray(), refGroupedGemm(xs, ws, offsets, M, n, k), tol, `${dtype} y`);
    // per row too: a row left out of one chunk is one row in 208
    const ya = y.toArray(), yr = refGroupedGemm(xs, ws, offsets, M, n, k);
    let worst = 0;
    for (let r = 0; r < M; r++) worst = Math.max(worst, relErr(ya.subarray(r * n, (r + 1) * n), yr.slice(r * n, (r + 1) * n)));
    t.ok(worst <= 2 * tol, `${dtype} y: worst row ${worst.toExponential(2)}`);
    const g = ops.groupedGemmBackward(X, W, O, DY);
    // dx[r] = W_e^T dy[r]; dW_e = Σ_r dy[r] x[r]^T
    const dxr = new Array(M * k).fill(0), dwr = new Array(E * n * k).fill(0);
    for (let e = 0; e < E; e++)
      for (let r = offsets[e]; r < offsets[e + 1]; r++)
        for (let j = 0; j < n; j++) {
          const gy = dys[r * n + j];
          for (let i = 0; i < k; i++) {
            dxr[r * k + i] += ws[(e * n + j) * k + i] * gy;
            dwr[(e * n + j) * k + i] += gy * xs[r * k + i];
          }
        }
    close(t, g.dx!.toArray(), dxr, tol, `${dtype} dx`);
    close(t, g.dw!.toArray(), dwr, tol, `${dtype} dW`);
    [X, W, DY, O, y, g.dx!, g.dw!].forEach((a) => a.dispose());
  }
});

const config = tinyConfig({ hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 50, rope_theta: 5000 });
const refConfig = { ...config, ropeFactor: 1 };
const B = 2, T = 8;
const R = rng(650);
const idsArr = Array.from({ length: B * T }, () => R.int(0, 50));
const tgtArr = idsArr.map((_, i) => (i % 4 === 0 ? -1 : R.int(0, 50)));
const ids = Tensor.from(idsArr, [B * T], { dtype: 'i32' }), targets = Tensor.from(tgtArr, [B * T], { dtype: 'i32' });
t.teardown(() => [ids, targets].forEach((x) => x.dispose()));

const weightsOf = (m: Model) => new Map(m.params().map((p) => [p.name, Float64Array.from(p.value.toArray())]));

function xftLogits(m: Model): Float32Array {
  const l = m.logits(ids, B, T);
  const a = l.toArray() as Float32Array;
  l.dispose();
  return a;
}

t.test('the dense model against the float64 forward', async (t) => {
  const m = createDense(config, { seed: 31, std: 0.2 });
  const ref = refModelForward(weightsOf(m), refConfig, idsArr, tgtArr, B, T);
  close(t, xftLogits(m), ref.logits, 1e-5, 'logits');
  const f = m.forward(ids, targets, B, T, { training: false });
  t.ok(Math.abs(f.loss - ref.loss) <= 1e-5 * ref.loss, `loss ${f.loss} = ${ref.loss}`);
  m.dispose();
});

const moes: [string, RefMoe][] = [
  ['mlp router, normalized, shared expert', { experts: 6, topK: 4, router: 'mlp', normalize: true, shared: true, balanceLossWeight: 0.5 }],
  ['linear router, not normalized, shared expert', { experts: 5, topK: 3, router: 'linear', normalize: false, shared: true, balanceLossWeight: 0.5 }],
  ['mlp router, no shared expert', { experts: 5, topK: 2, router: 'mlp', normalize: true, shared: false, balanceLossWeight: 0.5 }],
];

for (const [what, moe] of moes)
  t.test(`an MoE with distinct experts (${what}) against the float64 forward, with and without noise`, async (t) => {
    const dense = createDense(config, { seed: 32, std: 0.2 });
    const m = upcycle(dense, { experts: moe.experts, topK: moe.topK, router: moe.router, normalize: moe.normalize, sharedExpert: moe.shared, noise: true, balanceLossWeight: moe.balanceLossWeight, seed: 4 });
    dense.dispose();
    let s = 100;
    for (const p of m.params()) {
      if (p.name.includes('.experts.')) p.value.copy_(Tensor.randn(p.value.shape, { seed: s++, std: 0.3 }));
      if (p.name.includes('.gate.')) p.value.copy_(Tensor.randn(p.value.shape, { seed: s++, std: p.name.includes('noise') ? 0.3 : 1 }));
    }
    const w = weightsOf(m);
    // eval: no noise, no balance loss
    const evalRef = refModelForward(w, refConfig, idsArr, tgtArr, B, T, { moe });
    t.ok(evalRef.selectionMargin > 1e-4, `no router selection within rounding (margin ${evalRef.selectionMargin.toExponential(2)})`);
    close(t, xftLogits(m), evalRef.logits, 1e-5, 'eval logits');
    // the experts differ: a model that ignored the routing would not pass
    const upcycled = refModelForward(new Map([...w].map(([n, v]) => [n, n.includes('.experts.') ? v.map((_, i) => v[i % (v.length / moe.experts)]) : v])), refConfig, idsArr, tgtArr, B, T, { moe });
    t.ok(relErr(upcycled.logits, evalRef.logits) > 1e-2, 'the experts matter');
    // training: noise from the step's seed, the balance loss with the noisy top-k load estimate
    for (const seed of [5n, 77n]) {
      const trainRef = refModelForward(w, refConfig, idsArr, tgtArr, B, T, { moe, training: true, noiseSeed: seed });
      t.ok(trainRef.selectionMargin > 1e-4, `seed ${seed}: no noisy selection within rounding (margin ${trainRef.selectionMargin.toExponential(2)})`);
      const f = m.forward(ids, targets, B, T, { training: true, seed });
      m.release();
      t.ok(Math.abs(f.loss - trainRef.loss) <= 1e-5 * trainRef.loss, `seed ${seed}: training loss ${f.loss.toFixed(6)} = ${trainRef.loss.toFixed(6)} (eval ${evalRef.loss.toFixed(6)})`);
      t.ok(Math.abs(f.auxLoss - trainRef.aux) <= 1e-4 * trainRef.aux, `seed ${seed}: balance loss ${f.auxLoss.toFixed(6)} = ${trainRef.aux.toFixed(6)}`);
    }
    m.dispose();
  });
