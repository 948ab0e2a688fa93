// Whole models on CUDA against the same models on the CPU (the counter-based initialisation gives
// the same weights on both devices): dense, MoE and merge models, f32 and bf16 (mixed precision);
// logits, the loss, every parameter gradient, and three training steps (AdamW; Adafactor on bf16 weights).
// Tolerances are those of compositions of kernels: f32 1e-4, bf16 3e-2 relative (‖cuda − cpu‖ / ‖cpu‖);
// each kernel alone is held to 1e-5 / 1e-2 by test/30-32.
import t from 'tap';
import { Tensor } from '../lib/index';
import { tinyConfig } from '../lib/config';
import { createDense, upcycle, mergeable } from '../lib/xft';
import { train, disposeState } from '../lib/train';
import { MergedFFN, MoeFFN, type Model } from '../lib/model';
import { SKIP_NO_CUDA, rng, relErr } from './helpers/ref';
import { close } from './helpers/check';
import { seed, setupGpuTest } from './helpers/gpu';

setupGpuTest(t);

const MODEL_TOL = { f32: 1e-4, bf16: 3e-2 } as const;
const config = tinyConfig({ hidden_size: 64, intermediate_size: 96, num_attention_heads: 4, num_key_value_heads: 2, num_hidden_layers: 2 });

function build(kind: 'dense' | 'moe' | 'merged', dtype: 'f32' | 'bf16', device: 'cpu' | 'cuda', s: number): Model {
  const dense = createDense(config, { seed: s, std: 0.1, dtype, device });
  if (kind === 'dense') return dense;
  // no router noise: the comparison is of the deterministic functions
  const moe = upcycle(dense, { experts: 4, topK: 3, seed: s, noise: false });
  dense.dispose();
  let e = 0;
  for (const b of moe.blocks) for (const p of b.ffn.params()) if (p.name.includes('experts')) p.value.copy_(Tensor.randn(p.value.shape, { seed: s * 100 + e++, std: 0.1, dtype, device }));
  if (kind === 'moe') return moe;
  const mg = mergeable(moe);
  mg.blocks.forEach((b, i) => (b.ffn as MergedFFN).alpha.value.copy_(Tensor.randn([3], { seed: s * 7 + i, device })));
  moe.dispose();
  return mg;
}

/**
 * The smallest top-k gap of the model's routing in its last forward, in ulps of the logits' dtype: the
 * k-th largest logit of a token minus the (k+1)-th, per MoE layer. A real GPU's tensor cores round the
 * router's GEMM differently from the CPU, so a bf16 logit can move by an ulp and a near-tie flip that
 * token's experts (an O(1) change of its output): the comparison runs on inputs with a clear margin.
 */
function routingMargin(m: Model, dtype: 'f32' | 'bf16'): number {
  const mantissa = dtype === 'bf16' ? 7 : 23;
  let worst = Infinity;
  for (const b of m.blocks) {
    if (!(b.ffn instanceof MoeFFN) || !b.ffn.routerLogits) continue;
    const logits = b.ffn.routerLogits, [rows, n] = logits.shape, k = b.ffn.selected, v = logits.toArray();
    if (k >= n) continue;
    for (let r = 0; r < rows; r++) {
      const row = Array.from(v.subarray(r * n, (r + 1) * n)).sort((a, c) => c - a);
      const ulp = 2 ** (Math.floor(Math.log2(Math.max(Math.abs(row[k - 1]), Math.abs(row[k]), 2 ** -126))) - mantissa);
      worst = Math.min(worst, (row[k - 1] - row[k]) / ulp);
    }
  }
  return worst;
}
/** Top-k gaps of at least this many ulps on the CPU: both devices route every token alike. */
const MIN_ROUTING_GAP_ULPS = 2;

for (const dtype of ['f32', 'bf16'] as const)
  for (const kind of ['dense', 'moe', 'merged'] as const)
    t.test(`${kind} model, ${dtype}: CUDA vs CPU (logits, loss, gradients)`, { skip: SKIP_NO_CUDA }, async (t) => {
      const s0 = seed() % 100000;
      let s = s0, cpu!: ReturnType<typeof run>;
      const B = 2, T = 24;
      let ids: number[] = [], tg: number[] = [];
      const inputs = () => {
        const R = rng(s);
        ids = Array.from({ length: B * T }, () => R.int(0, config.vocab_size));
        tg = Array.from({ length: B * T }, (_, i) => (i % 5 === 0 ? -1 : R.int(0, config.vocab_size)));
      };
      const run = (device: 'cpu' | 'cuda') => {
        const m = build(kind, dtype, device, s);
        const idsT = Tensor.from(ids, [B * T], { dtype: 'i32', device }), tgT = Tensor.from(tg, [B * T], { dtype: 'i32', device });
        const logits = m.logits(idsT, B, T);
        const l = logits.toArray();
        logits.dispose();
        const f = m.forward(idsT, tgT, B, T, { training: true, seed: 5n });
        const margin = routingMargin(m, dtype);
        m.backward();
        // a parameter the step did not use has no gradient (the same ones on both devices)
        const grads = new Map(m.trainableParams().filter((p) => p.grad).map((p) => [p.name, p.grad!.toArray()]));
        const noGrad = m.trainableParams().filter((p) => !p.grad).map((p) => p.name);
        m.dispose();
        idsT.dispose();
        tgT.dispose();
        return { logits: l, loss: f.loss, aux: f.auxLoss, grads, noGrad, margin };
      };
      // inputs (the seed's weights and tokens) whose routing has no near-tie, found deterministically from the seed
      for (let attempt = 0; ; attempt++) {
        inputs();
        cpu = run('cpu');
        if (cpu.margin >= MIN_ROUTING_GAP_ULPS) break;
        if (attempt === 49) throw new Error(`no seed from ${s0} on gives a routing margin of ${MIN_ROUTING_GAP_ULPS} ulps`);
        s = (s + 7919) % 100000;
      }
      if (kind === 'moe') t.ok(cpu.margin >= MIN_ROUTING_GAP_ULPS, `seed ${s}: every top-k gap is >= ${MIN_ROUTING_GAP_ULPS} ulps (smallest ${cpu.margin.toFixed(1)})`);
      const gpu = run('cuda');
      close(t, gpu.logits, cpu.logits, MODEL_TOL[dtype], 'logits');
      t.ok(Math.abs(gpu.loss - cpu.loss) <= MODEL_TOL[dtype] * cpu.loss, `loss ${gpu.loss} vs ${cpu.loss}`);
      t.ok(Math.abs(gpu.aux - cpu.aux) <= MODEL_TOL[dtype] * Math.max(cpu.aux, 1e-6), `balance loss ${gpu.aux} vs ${cpu.aux}`);
      t.same(gpu.noGrad, cpu.noGrad, 'the same parameters have no gradient on both devices');
      t.same([...gpu.grads.keys()], [...cpu.grads.keys()], 'the same parameters have gradients');
      let worst = 0, name = '';
      for (const [n, g] of cpu.grads) {
        const e = relErr(gpu.grads.get(n)!, g);
        if (e > worst) [worst, name] = [e, n];
      }
      t.ok(worst <= MODEL_TOL[dtype], `gradients of ${cpu.grads.size} parameters: worst ${worst.toExponential(2)} (${name})`);
    });

t.test('three training steps of the MoE, f32 and bf16: CUDA vs CPU losses', { skip: SKIP_NO_CUDA }, async (t) => {
  const R = rng(seed() % 100000);
  const rows = Array.from({ length: 8 }, () => {
    const ids = Array.from({ length: 17 }, () => R.int(0, config.vocab_size));
    return { ids: ids.slice(0, -1), targets: ids.slice(1) };
  });
  for (const dtype of ['f32', 'bf16'] as const) {
    const losses = (device: 'cpu' | 'cuda') => {
      const m = build('moe', dtype, device, 3);
      const r = train(m, rows, { lr: 1e-3, batchSize: 4, steps: 3, seed: 1 });
      m.dispose();
      disposeState(r.state);
      return r.losses;
    };
    close(t, losses('cuda'), losses('cpu'), MODEL_TOL[dtype], `${dtype} losses`);
  }
});

t.test('two Adafactor steps of the MoE: bf16 weights in place (stochastic rounding, bf16 gradients) and mixed, CUDA vs CPU', { skip: SKIP_NO_CUDA }, async (t) => {
  const R = rng(seed() % 100000);
  const rows = Array.from({ length: 8 }, () => {
    const ids = Array.from({ length: 17 }, () => R.int(0, config.vocab_size));
    return { ids: ids.slice(0, -1), targets: ids.slice(1) };
  });
  for (const mode of ['bf16', 'mixed'] as const) {
    const run = (device: 'cpu' | 'cuda') => {
      const m = build('moe', 'bf16', device, 4);
      const r = train(m, rows, {
        lr: 1e-3, batchSize: 4, microBatch: 2, steps: 2, seed: 1, optimizer: 'adafactor', clip: 0,
        masterWeights: mode === 'mixed', stochasticRounding: mode === 'bf16', gradDtype: mode === 'bf16' ? 'bf16' : 'f32',
      });
      const w = m.params().flatMap((p) => Array.from(p.value.toArray()));
      m.dispose();
      disposeState(r.state);
      return { losses: r.losses, w };
    };
    const a = run('cuda'), b = run('cpu');
    close(t, a.losses, b.losses, MODEL_TOL.bf16, `${mode}: losses`);
    close(t, a.w, b.w, MODEL_TOL.bf16, `${mode}: weights after two steps`);
  }
});
