// The model and the XFT pipeline on the CPU: the upcycling and merging invariants of XFT.md,
// gradients of the whole model against finite differences.
import t from 'tap';
import { Tensor } from '../lib/index';
import { tinyConfig } from '../lib/config';
import { createDense, upcycle, mergeable, toDense } from '../lib/xft';
import { MergedFFN, type Model, type Param } from '../lib/model';
import { maxAbs, refMerge, relErr, rng } from './helpers/ref';
import { close } from './helpers/check';

const config = tinyConfig({ hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 50 });
const B = 2, T = 8;
const R = rng(1);
const ids = Tensor.from(Array.from({ length: B * T }, () => R.int(0, 50)), [B * T], { dtype: 'i32' });
const targets = Tensor.from(Array.from({ length: B * T }, (_, i) => (i % 3 === 0 ? -1 : R.int(0, 50))), [B * T], { dtype: 'i32' });

function logitsOf(m: Model): Float32Array {
  const l = m.logits(ids, B, T);
  const a = l.toArray() as Float32Array;
  l.dispose();
  return a;
}

t.test('an upcycled MoE computes the dense model, whatever the router', async (t) => {
  const dense = createDense(config, { seed: 1 });
  const want = logitsOf(dense);
  for (const [router, seed] of [['mlp', 1], ['mlp', 2], ['linear', 3]] as const) {
    const moe = upcycle(dense, { experts: 8, topK: 6, router, seed });
    const got = logitsOf(moe);
    let worst = 0;
    for (let i = 0; i < got.length; i++) worst = Math.max(worst, Math.abs(got[i] - want[i]) / Math.max(Math.abs(want[i]), 1e-3));
    t.ok(worst <= 1e-5, `${router} router (seed ${seed}): max relative error ${worst.toExponential(2)} <= 1e-5`);
    moe.dispose();
  }
  dense.dispose();
});

t.test('merging an untrained MoE returns the dense weights; λ = 1 returns the shared expert', async (t) => {
  const dense = createDense(config, { seed: 2 });
  const moe = upcycle(dense, { experts: 4, topK: 3, seed: 5 });
  for (const rate of [0.75, 0, null]) {
    const merged = toDense(mergeable(moe, { sharedRate: rate }));
    merged.params().forEach((p, i) => close(t, p.value.toArray(), dense.params()[i].value.toArray(), 1e-6, `sharedRate ${rate}: ${p.name}`));
    t.equal(merged.params().length, dense.params().length, 'same architecture as the dense model');
    merged.dispose();
  }
  // make the experts differ, then λ = 1 must give expert 0
  const ffn = moe.blocks[0].ffn as unknown as { gate: { value: Tensor } };
  const E0 = ffn.gate.value.narrow(0, 1).toArray();
  ffn.gate.value.narrow(1, 3).copy_(Tensor.randn([3, ...ffn.gate.value.shape.slice(1)], { seed: 9 }));
  const m1 = mergeable(moe, { sharedRate: 1 });
  const alpha = (m1.blocks[0].ffn as unknown as { alpha: { value: Tensor } }).alpha.value;
  alpha.copy_(Tensor.randn(alpha.shape, { seed: 3 }));
  const d1 = toDense(m1);
  t.same(d1.blocks[0].ffn.params()[0].value.toArray(), E0, 'λ = 1: the gate weights are the shared expert\'s');
  disposeModels(dense, moe, m1, d1);
});

t.test('toDense() logits equal the merge model\'s logits', async (t) => {
  const dense = createDense(config, { seed: 3 });
  const moe = upcycle(dense, { experts: 4, topK: 3, seed: 5 });
  for (const p of moe.params()) if (p.name.includes('experts')) p.value.copy_(Tensor.randn(p.value.shape, { seed: p.name.length, std: 0.05 }));
  const m = mergeable(moe, { sharedRate: 0.75 });
  for (const p of m.params()) if (p.name.endsWith('average_weights')) p.value.copy_(Tensor.randn(p.value.shape, { seed: 4 }));
  const d = toDense(m);
  // W̄ = λ W_0 + (1 − λ) Σ softmax(α)_i W_i, in float64 from the expert stacks (not through merged())
  m.blocks.forEach((b, i) => {
    const f = b.ffn as MergedFFN, alpha = Array.from(f.alpha.value.toArray());
    t.notSame(alpha, [0, 0, 0], `layer ${i}: alpha is not uniform`);
    const dense = d.blocks[i].ffn.params();
    [f.gate, f.up, f.down].forEach((stack, j) => {
      const want = refMerge(stack.value.toArray(), f.gate.value.shape[0], alpha, 0.75);
      close(t, dense[j].value.toArray(), want, 1e-6, `layer ${i}: toDense's ${dense[j].name} = the float64 merge of the experts`);
    });
  });
  close(t, logitsOf(d), logitsOf(m), 1e-6, 'merged dense model = merge model');
  disposeModels(dense, moe, m, d);
});

function disposeModels(...ms: Model[]) {
  ms.forEach((m) => m.dispose());
}

// loss(θ) through the whole model; gradients against central differences. Every trainable parameter
// that `pick` names must have a gradient (a missing one fails), exactly `expectParams` are checked,
// and a stacked tensor [E, ...] is sampled in every expert (start, middle, end of each).
function gradCheck(t: tap.Test, m: Model, what: string, pick: (name: string) => boolean, expectParams: number, withAux = false, h = 1e-2) {
  m.zeroGrad();
  m.forward(ids, targets, B, T, { training: true, seed: 5n });
  m.backward();
  const loss = () => {
    const f = m.forward(ids, targets, B, T, { training: true, seed: 5n });
    return withAux ? f.loss + f.auxLoss : f.loss;
  };
  // withAux: the balance loss's importance jumps where a top-k selection flips; a coordinate whose
  // central differences at h and h/2 disagree has a flip within reach and is left out (counted)
  let skipped = 0, checked = 0;
  const central = (p: Param, i: number, step: number) => {
    const v = p.value.toArray();
    const base = v[i];
    v[i] = base + step;
    p.value.copy_(Tensor.from(v, p.value.shape));
    const lp = loss();
    v[i] = base - step;
    p.value.copy_(Tensor.from(v, p.value.shape));
    const lm = loss();
    v[i] = base;
    p.value.copy_(Tensor.from(v, p.value.shape));
    return (lp - lm) / (2 * step);
  };
  const picked = m.trainableParams().filter((q) => pick(q.name));
  t.equal(picked.length, expectParams, `${what}: ${expectParams} trainable parameters checked`);
  for (const p of picked) {
    if (p.grad === null) {
      t.fail(`${what} ${p.name}: trainable but got no gradient`);
      continue;
    }
    const g = p.grad.toArray();
    const n = p.value.numel, stacks = p.name.includes('.experts.') ? p.value.shape[0] : 1, per = n / stacks;
    const idx = Array.from({ length: stacks }, (_, e) => [0, Math.floor(per / 2), per - 1].map((i) => e * per + i)).flat();
    const fd: number[] = [], an: number[] = [];
    for (const i of idx) {
      const d = central(p, i, h);
      if (withAux) {
        const d2 = central(p, i, h / 2);
        if (Math.abs(d - d2) > 0.1 * Math.max(Math.abs(d), Math.abs(d2), 1e-3)) {
          skipped++;
          continue;
        }
      }
      checked++;
      fd.push(d);
      an.push(g[i]);
    }
    if (fd.length === 0) continue;
    const e = relErr(an, fd);
    // a flat coordinate set passes only when the analytic gradient is flat there too
    const flat = Math.max(...fd.map(Math.abs), ...an.map(Math.abs)) < 1e-5;
    t.ok(e < 2e-2 || flat, `${what} ${p.name}: analytic ${an.map((x) => x.toExponential(2))} vs fd ${fd.map((x) => x.toExponential(2))}`);
  }
  if (withAux) t.ok(skipped <= checked / 4, `${checked} coordinates checked, ${skipped} left out next to a selection flip`);
  m.release();
}

/** An MoE's router (W0, W2, W_noise of every layer) is trainable. */
function routerTrainable(t: tap.Test, m: Model, perLayer: number) {
  const router = m.params().filter((p) => p.name.includes('.mlp.gate.'));
  t.equal(router.length, perLayer * m.blocks.length, `${router.length} router tensors`);
  t.ok(router.every((p) => p.trainable), 'every router tensor is trainable');
}

t.test('gradients of the dense model against finite differences', async (t) => {
  const m = createDense(config, { seed: 4, std: 0.2 });
  gradCheck(t, m, 'dense', () => true, 3 + 9 * config.num_hidden_layers);
  m.dispose();
});

t.test('gradients of the MoE (no noise, no balance loss) and of alpha against finite differences', async (t) => {
  const dense = createDense(config, { seed: 5, std: 0.2 });
  const moe = upcycle(dense, { experts: 4, topK: 3, seed: 6, noise: false, balanceLossWeight: 0 });
  for (const p of moe.params()) if (p.name.includes('experts')) p.value.copy_(Tensor.randn(p.value.shape, { seed: p.name.length, std: 0.2 }));
  routerTrainable(t, moe, 2); // W0, W2: a gate without noise has no W_noise
  // layer 1 (norms, attention, the three expert stacks) and the head
  gradCheck(t, moe, 'moe', (n) => (n.includes('layers.1.') || n.startsWith('lm_head')) && !n.includes('mlp.gate.'), 6 + 3 + 1);
  // the router, away from selection changes: every normal expert selected (K = E)
  const all = upcycle(dense, { experts: 4, topK: 4, seed: 7, noise: false, balanceLossWeight: 0 });
  for (const p of all.params()) if (p.name.includes('experts')) p.value.copy_(Tensor.randn(p.value.shape, { seed: p.name.length, std: 0.2 }));
  // W0 and W2 of both layers (W_noise has no gradient without noise and the balance loss)
  gradCheck(t, all, 'moe router', (n) => n.includes('mlp.gate.gate_network'), 4);
  all.dispose();
  const m = mergeable(moe, { sharedRate: 0.5 });
  for (const p of m.params()) if (p.name.endsWith('average_weights')) p.value.copy_(Tensor.randn(p.value.shape, { seed: 8 }));
  gradCheck(t, m, 'merge', () => true, config.num_hidden_layers);
  disposeModels(dense, moe, m);
});

t.test('router gradients of the balance loss under noise (the noisy top-k load estimate) against finite differences', async (t) => {
  // right after upcycling the experts are equal: the cross-entropy does not depend on the router, so
  // the router (W0, W2, W_noise) is driven by the balance loss alone: importance and the load estimate
  const dense = createDense(config, { seed: 9, std: 0.2 });
  for (const [experts, topK] of [[6, 3], [8, 6]] as const) {
    const moe = upcycle(dense, { experts, topK, seed: 10, noise: true, balanceLossWeight: 1 });
    for (const p of moe.params()) if (p.name.includes('weight_noise')) p.value.copy_(Tensor.randn(p.value.shape, { seed: 11, std: 0.3 }));
    const f = moe.forward(ids, targets, B, T, { training: true, seed: 5n });
    t.ok(f.auxLoss > 0, `balance loss ${f.auxLoss.toFixed(4)}`);
    moe.release();
    routerTrainable(t, moe, 3);
    gradCheck(t, moe, `E=${experts} K=${topK} router`, (n) => n.includes('mlp.gate.'), 3 * config.num_hidden_layers, true, 3e-3);
    const noiseGrad = moe.params().find((p) => p.name.endsWith('weight_noise.weight'))!;
    moe.zeroGrad();
    moe.forward(ids, targets, B, T, { training: true, seed: 5n });
    moe.backward();
    // the experts are equal, so W_noise's gradient comes from the load estimate alone: leftovers of
    // rounding (~1e-10) are not a gradient
    const biggest = maxAbs(noiseGrad.grad!.toArray());
    t.ok(biggest > 1e-4, `W_noise gets a gradient from the load estimate (largest ${biggest.toExponential(2)})`);
    moe.dispose();
  }
  dense.dispose();
});
