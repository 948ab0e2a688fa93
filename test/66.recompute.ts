// Activation recomputation: a training forward that keeps only each block's input, and a backward
// that recomputes the block first, gives the same loss and bitwise the same gradients as a run that
// keeps everything (same kernels, same order, the same router noise drawn again from the step's seed),
// for dense, MoE (router noise, the noisy load estimate of the balance loss) and merge models, on the
// CPU and, where there is one, on the CUDA backend; it keeps less memory; train() with it matches too.
import t from 'tap';
import { Tensor, memoryStats, resetPeakMemory, synchronize } from '../lib/index';
import { tinyConfig } from '../lib/config';
import { createDense, upcycle, mergeable } from '../lib/xft';
import { train, disposeState } from '../lib/train';
import { MergedFFN, type Model } from '../lib/model';
import { SKIP_NO_CUDA } from './helpers/ref';

const config = tinyConfig({ hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 2, num_hidden_layers: 3, vocab_size: 61 });
const B = 2, T = 12;
const DEVICES: ('cpu' | 'cuda')[] = ['cpu', ...(SKIP_NO_CUDA ? [] : ['cuda' as const])];

function build(kind: 'dense' | 'moe' | 'merged', dtype: 'f32' | 'bf16', device: 'cpu' | 'cuda', router: 'mlp' | 'linear' = 'mlp'): Model {
  const dense = createDense(config, { seed: 3, std: 0.1, dtype, device });
  if (kind === 'dense') return dense;
  // router noise on (its weights random, so that the noise matters), balance loss on
  const moe = upcycle(dense, { experts: 4, topK: 3, seed: 3, router, balanceLossWeight: 0.05 });
  dense.dispose();
  let e = 0;
  for (const b of moe.blocks) for (const p of b.ffn.params()) if (!p.name.includes('gate_network')) p.value.copy_(Tensor.randn(p.value.shape, { seed: 50 + e++, std: 0.1, dtype, device }));
  if (kind === 'moe') return moe;
  const mg = mergeable(moe);
  mg.blocks.forEach((b, i) => (b.ffn as MergedFFN).alpha.value.copy_(Tensor.randn([3], { seed: 90 + i, device })));
  moe.dispose();
  return mg;
}

function batch(device: 'cpu' | 'cuda') {
  const ids = Array.from({ length: B * T }, (_, i) => (i * 17 + 5) % config.vocab_size);
  const tg = ids.map((x, i) => (i % 4 === 0 ? -100 : (x * 7 + 1) % config.vocab_size));
  return { ids: Tensor.from(ids, [B * T], { dtype: 'i32', device }), tg: Tensor.from(tg, [B * T], { dtype: 'i32', device }) };
}

/** Loss, aux loss, every gradient (as arrays) and the peak bytes of one training forward + backward. */
function step(m: Model, device: 'cpu' | 'cuda', recompute: boolean, seed: bigint) {
  const { ids, tg } = batch(device);
  synchronize();
  resetPeakMemory();
  const base = memoryStats();
  const f = m.forward(ids, tg, B, T, { training: true, seed, recompute });
  m.backward({ auxScale: 0.5 });
  synchronize();
  const s = memoryStats();
  const peak = device === 'cuda' ? s.cudaPeakBytes - base.cudaBytes : s.hostPeakBytes - base.hostBytes;
  const grads = new Map(m.trainableParams().filter((p) => p.grad).map((p) => [p.name, p.grad!.toArray()]));
  m.zeroGrad();
  ids.dispose();
  tg.dispose();
  return { loss: f.loss, aux: f.auxLoss, grads, peak };
}

function sameBits(a: Float32Array | Int32Array, b: Float32Array | Int32Array): boolean {
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length), y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  return x.length === y.length && x.every((v, i) => v === y[i]);
}

type Kind = 'dense' | 'moe' | 'merged';
const ALL: ['f32' | 'bf16', Kind, 'mlp' | 'linear'][] = [];
for (const dtype of ['f32', 'bf16'] as const)
  for (const [kind, router] of [['dense', 'mlp'], ['moe', 'mlp'], ['moe', 'linear'], ['merged', 'mlp']] as const) ALL.push([dtype, kind, router]);
/** the emulated GPU is slow: each kind once, the MoE (its router noise, load estimate, routing) in both dtypes */
const ON_CUDA = ALL.filter(([dtype, kind, router]) => (kind === 'moe' && router === 'mlp') || (kind === 'dense' && dtype === 'f32') || (kind === 'merged' && dtype === 'bf16') || (kind === 'moe' && router === 'linear' && dtype === 'f32'));

for (const device of DEVICES)
  for (const [dtype, kind, router] of device === 'cpu' ? ALL : ON_CUDA)
    t.test(`${device} ${dtype} ${kind}${kind === 'moe' ? ` (${router} router, noise, balance loss)` : ''}: recomputation gives identical gradients`, async (t) => {
      const m = build(kind, dtype, device, router);
      const keep = step(m, device, false, 11n);
      const again = step(m, device, true, 11n);
      t.equal(again.loss, keep.loss, 'same loss');
      t.equal(again.aux, keep.aux, 'same balance loss');
      t.same([...again.grads.keys()], [...keep.grads.keys()], 'the same parameters have gradients');
      const differ = [...keep.grads].filter(([name, g]) => !sameBits(g, again.grads.get(name)!)).map(([name]) => name);
      t.same(differ, [], 'every gradient bitwise identical');
      t.ok(again.peak < keep.peak, `recomputation keeps less: peak ${again.peak} vs ${keep.peak} bytes`);
      if (kind === 'moe') {
        // the router noise matters: another seed changes the router's gradients, so replaying the seed is what makes them equal
        const other = step(m, device, true, 12n);
        const router0 = [...keep.grads.keys()].find((n) => n.includes('gate_network'))!;
        t.notOk(sameBits(other.grads.get(router0)!, keep.grads.get(router0)!), 'another noise seed gives other router gradients');
      }
      m.dispose();
    });

for (const device of DEVICES)
  t.test(`${device}: train() with recompute matches train() without (MoE, accumulation, bf16)`, async (t) => {
    const rows = Array.from({ length: 4 }, (_, i) => {
      const ids = Array.from({ length: T }, (_, j) => (i * 11 + j * 5) % config.vocab_size);
      return { ids, targets: ids.map((x, j) => (j % 3 ? (x + 1) % config.vocab_size : -100)) };
    });
    const run = (recompute: boolean) => {
      const m = build('moe', 'bf16', device);
      const r = train(m, rows, { lr: 1e-2, batchSize: 2, microBatch: 1, steps: device === 'cpu' ? 2 : 1, seed: 4, recompute });
      const weights = m.params().map((p) => p.value.toArray());
      disposeState(r.state);
      m.dispose();
      return { losses: r.losses, weights };
    };
    const a = run(false), b = run(true);
    t.same(b.losses, a.losses, `losses ${a.losses.map((l) => l.toFixed(5)).join(', ')}`);
    t.ok(a.weights.every((w, i) => sameBits(w, b.weights[i])), 'weights after the steps (of 2 accumulated micro-batches) bitwise identical');
    t.throws(() => train(build('dense', 'f32', device), rows, { lr: 1e-2, batchSize: 4, recompute: 'yes' as unknown as boolean }), { code: 'XFT_VALUE' });
  });
