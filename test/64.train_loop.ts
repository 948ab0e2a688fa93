// The training loop's arithmetic on the CPU, against what a step should compute: gradient
// accumulation over micro-batches equals one pass over the batch (losses, gradient norms, updated
// weights), the step's gradient is the mean over the step's response tokens even when micro-batches
// hold unequal token counts, clipping (the norm before, the norm after, the clipped update), and
// several AdamW steps against a float64 AdamW fed the gradients of the full batch.
// (Adafactor does not exist in xft yet; when it does, its steps belong here too.)
import t from 'tap';
import { Tensor } from '../lib/index';
import { tinyConfig } from '../lib/config';
import { createDense, upcycle } from '../lib/xft';
import { Trainer, train, disposeState } from '../lib/train';
import type { Model } from '../lib/model';
import type { Sample } from '../lib/data';
import { relErr, rng } from './helpers/ref';

const config = tinyConfig({ hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 50 });
const SEQ = 16, ROWS = 8;
const R = rng(64);
// row r masks its first 2r targets: 16, 14, ..., 2 response tokens, so micro-batches differ in tokens
const rows: Sample[] = Array.from({ length: ROWS }, (_, r) => {
  const ids = Int32Array.from({ length: SEQ }, () => R.int(0, 50));
  const targets = Int32Array.from({ length: SEQ }, (_, i) => (i < 2 * r ? -1 : R.int(0, 50)));
  return { ids, targets };
});
const tokensOf = (rs: Sample[]) => rs.reduce((a, r) => a + r.targets.filter((x) => x >= 0).length, 0);

const weights = (m: Model) => m.trainableParams().map((p) => Float64Array.from(p.value.toArray()));

/** The gradient of the mean loss over all response tokens of `part`, from one forward and backward. */
function batchGradient(m: Model, part: Sample[]): { loss: number; grads: Float64Array[] } {
  const flat = (k: 'ids' | 'targets') => Tensor.from(part.flatMap((r) => Array.from(r[k])), [part.length * SEQ], { dtype: 'i32' });
  const ids = flat('ids'), targets = flat('targets');
  m.zeroGrad();
  const f = m.forward(ids, targets, part.length, SEQ, { training: true, seed: 0n });
  m.backward();
  const grads = m.trainableParams().map((p) => Float64Array.from(p.grad ? p.grad.toArray() : new Float32Array(p.value.numel)));
  m.zeroGrad();
  ids.dispose();
  targets.dispose();
  return { loss: f.loss, grads };
}

const norm = (gs: Float64Array[]) => Math.sqrt(gs.reduce((a, g) => a + g.reduce((b, x) => b + x * x, 0), 0));

const models: [string, () => Model][] = [
  ['dense', () => createDense(config, { seed: 1, std: 0.1 })],
  ['moe', () => {
    const dense = createDense(config, { seed: 2, std: 0.1 });
    // no noise, no balance loss: both are per forward pass, so only then is the step the batch's mean
    const m = upcycle(dense, { experts: 4, topK: 3, seed: 3, noise: false, balanceLossWeight: 0 });
    dense.dispose();
    for (const p of m.params()) if (p.name.includes('experts')) p.value.copy_(Tensor.randn(p.value.shape, { seed: p.name.length, std: 0.1 }));
    return m;
  }],
];

for (const [kind, make] of models)
  t.test(`${kind}: micro-batches of unequal token counts accumulate to the full batch's step`, async (t) => {
    const run = (microBatch: number) => {
      const m = make();
      const norms: number[] = [];
      const r = train(m, rows, { lr: 1e-2, batchSize: 4, microBatch, steps: 4, warmupSteps: 1, weightDecay: 0.1, seed: 7, clip: 0, onStep: (s) => norms.push(s.gradNorm) });
      const w = weights(m);
      m.dispose();
      disposeState(r.state);
      return { losses: r.losses, norms, w };
    };
    const full = run(4);
    for (const micro of [1, 2]) {
      const part = run(micro);
      t.ok(relErr(part.losses, full.losses) <= 1e-5, `microBatch ${micro}: losses ${part.losses.map((x) => x.toFixed(4))} = one pass's ${full.losses.map((x) => x.toFixed(4))}`);
      t.ok(relErr(part.norms, full.norms) <= 1e-4, `microBatch ${micro}: gradient norms ${part.norms.map((x) => x.toFixed(4))} = one pass's ${full.norms.map((x) => x.toFixed(4))}`);
      const e = Math.max(...part.w.map((w, i) => relErr(w, full.w[i])));
      t.ok(e <= 1e-5, `microBatch ${micro}: updated weights, worst relative error ${e.toExponential(2)} <= 1e-5`);
    }
  });

// With β1 = β2 = 0 and lr = eps = E ≫ |g|, AdamW moves p by g' E / (|g'| + E) ≈ g' (1 − |g'|/E),
// g' = g · clip scale: the step shows the gradient it used, to ~|g|/E.
const REVEAL = 1e3;
function revealedGradient(m: Model, microBatch: number, clip: number): { grads: Float64Array[]; gradNorm: number; loss: number } {
  const before = weights(m);
  const r = new Trainer(m, rows, { lr: REVEAL, eps: REVEAL, beta1: 0, beta2: 0, batchSize: ROWS, microBatch, steps: 1, clip, seed: 1 });
  const info = r.step()!; // logEvery 1: every step is a log point
  const after = weights(m);
  disposeState(r.state);
  return { grads: before.map((b, i) => b.map((x, j) => x - after[i][j])), gradNorm: info.gradNorm, loss: info.loss };
}

for (const [kind, make] of models)
  t.test(`${kind}: the step's gradient is the mean over the step's response tokens`, async (t) => {
    const m0 = make();
    const want = batchGradient(m0, rows);
    m0.dispose();
    t.ok(tokensOf(rows.slice(0, 4)) !== tokensOf(rows.slice(4)), 'the micro-batches differ in tokens');
    for (const micro of [8, 2, 1]) {
      const m = make();
      const got = revealedGradient(m, micro, 0);
      m.dispose();
      t.ok(Math.abs(got.loss - want.loss) <= 1e-5 * want.loss, `microBatch ${micro}: loss ${got.loss.toFixed(5)} = ${want.loss.toFixed(5)}`);
      t.ok(Math.abs(got.gradNorm - norm(want.grads)) <= 1e-4 * norm(want.grads), `microBatch ${micro}: gradient norm ${got.gradNorm.toExponential(4)} = ${norm(want.grads).toExponential(4)}`);
      const e = relErr(got.grads.flatMap((g) => Array.from(g)), want.grads.flatMap((g) => Array.from(g)));
      t.ok(e <= 5e-4, `microBatch ${micro}: the gradient the update used, relative error ${e.toExponential(2)} <= 5e-4`);
    }
  });

t.test('clipping: the norm before is reported, the update uses the gradient scaled to the clip norm', async (t) => {
  const m0 = models[0][1]();
  const g = batchGradient(m0, rows).grads;
  m0.dispose();
  const n = norm(g);
  t.ok(n > 0.5, `the gradient norm ${n.toFixed(3)} is large enough to clip at a fraction of it`);
  for (const clip of [n / 4, n * 2]) {
    const m = models[0][1]();
    const got = revealedGradient(m, 2, clip);
    m.dispose();
    t.ok(Math.abs(got.gradNorm - n) <= 1e-4 * n, `clip ${clip.toFixed(3)}: the reported norm is the one before clipping (${got.gradNorm.toFixed(4)} = ${n.toFixed(4)})`);
    const scale = Math.min(1, clip / n), after = norm(got.grads);
    t.ok(Math.abs(after - n * scale) <= 2e-3 * n * scale, `clip ${clip.toFixed(3)}: the norm after is ${after.toFixed(4)} (want ${(n * scale).toFixed(4)})`);
    const e = relErr(got.grads.flatMap((x) => Array.from(x)), g.flatMap((x) => Array.from(x, (v) => v * scale)));
    t.ok(e <= 2e-3, `clip ${clip.toFixed(3)}: the update is the gradient times ${scale.toFixed(3)}, relative error ${e.toExponential(2)}`);
  }
});

t.test('three AdamW steps (warmup, decay, weight decay, clipping) against a float64 AdamW on the full batch\'s gradients', async (t) => {
  const o = { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-6, weightDecay: 0.1, clip: 0.5, warmupSteps: 1, steps: 3 };
  const m = models[0][1]();
  const w0 = weights(m), p64 = weights(m), m64 = p64.map((p) => new Float64Array(p.length)), v64 = p64.map((p) => new Float64Array(p.length));
  const run = new Trainer(m, rows, { ...o, batchSize: ROWS, microBatch: 4, seed: 2 });
  // HF's linear schedule: warmup 1 step to lr, then linear decay to 0 at step 3
  const lrs = [o.lr, o.lr, o.lr / 2];
  for (let step = 1; step <= o.steps; step++) {
    const { grads: g } = batchGradient(m, rows);
    const info = run.step()!;
    const n = norm(g), scale = Math.min(1, o.clip / n);
    t.ok(Math.abs(info.gradNorm - n) <= 1e-4 * n, `step ${step}: gradient norm ${info.gradNorm.toFixed(4)} = ${n.toFixed(4)}`);
    t.ok(Math.abs(info.lr - lrs[step - 1]) <= 1e-12, `step ${step}: lr ${info.lr}`);
    const lr = lrs[step - 1], f = Math.fround;
    const b1 = f(o.beta1), b2 = f(o.beta2);
    p64.forEach((p, i) => {
      for (let j = 0; j < p.length; j++) {
        const gs = g[i][j] * scale;
        m64[i][j] = b1 * m64[i][j] + (1 - b1) * gs;
        v64[i][j] = b2 * v64[i][j] + (1 - b2) * gs * gs;
        const mhat = m64[i][j] / (1 - b1 ** step), vhat = v64[i][j] / (1 - b2 ** step);
        p[j] -= lr * (mhat / (Math.sqrt(vhat) + f(o.eps)) + f(o.weightDecay) * p[j]);
      }
    });
    // the updates so far (not the weights, which would hide a wrong update under their size)
    const got = weights(m).flatMap((w, i) => Array.from(w, (x, j) => x - w0[i][j]));
    const e = relErr(got, p64.flatMap((p, i) => Array.from(p, (x, j) => x - w0[i][j])));
    t.ok(e <= 1e-4, `step ${step}: the updates vs float64 AdamW, relative error ${e.toExponential(2)} <= 1e-4`);
  }
  t.equal(run.done, true);
  disposeState(run.state);
  m.dispose();
});
