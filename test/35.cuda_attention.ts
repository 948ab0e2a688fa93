// The tensor-core attention kernels (cuda/attention.cu flash_*: bf16, head dims 64 and 128) against
// the CPU twin, end to end (the GPU backward reads the GPU forward's out and lse): head dims 64, 128
// and others (the fp32-math fallback), GQA ratios 1, 2, 4 and multi-query, lengths that are not a
// multiple of the 64-row tile, B > 1; f32 (the fallback) on the same shapes; causality bit for bit;
// determinism. Fresh random inputs from a printed seed, poisoned device allocations (setupGpuTest).
// Tolerances: bf16 1e-2, fp32 1e-5 relative (‖cuda − cpu‖ / ‖cpu‖); lse 1e-5.
import t from 'tap';
import { Tensor, ops } from '../lib/index';
import { SKIP_NO_CUDA } from './helpers/ref';
import { close, exact } from './helpers/check';
import { TOL, fastCases, pair, seed, setupGpuTest } from './helpers/gpu';

setupGpuTest(t);

type Case = [B: number, T: number, H: number, Hkv: number, hd: number];

// [B, T, H, Hkv, hd]
const cases: Case[] = [
  [1, 1, 2, 1, 64], // one token
  [2, 77, 4, 4, 64], // G = 1, a partial second tile, B = 2
  [1, 130, 4, 2, 64], // G = 2, three tiles
  [1, 200, 2, 1, 64], // multi-query, four tiles
  [3, 40, 2, 2, 128], // B = 3, one partial tile
  [1, 64, 2, 1, 128], // exactly one tile
  [2, 65, 8, 2, 128], // G = 4, one row into the second tile
  [1, 100, 4, 1, 128], // multi-query
  [1, 70, 4, 2, 64], // small multi-tile cases kept by XFT_TEST_FAST: G = 2 at hd 64, MQA G = 4 at hd 128
  [1, 66, 4, 1, 128],
  [2, 50, 4, 2, 96], // other head dims: the fallback
  [1, 70, 2, 1, 32],
];

t.test('attention forward and backward: CUDA vs CPU', { skip: SKIP_NO_CUDA }, async (t) => {
  const run = fastCases(t, cases, ([B, T, H, , hd]) => B * T * T * H * hd, 3e6);
  // XFT_TEST_FAST (shake, asan): bf16 only; f32 runs the fallback, which test/32 covers there too
  const dtypes = process.env.XFT_TEST_FAST === '1' ? (['bf16'] as const) : (['bf16', 'f32'] as const);
  for (const dtype of dtypes)
    for (const [B, T, H, Hkv, hd] of run) {
      if (dtype === 'f32' && hd !== 64 && hd !== 128) continue;  // f32 on the flash shapes only
      const what = `${dtype} B=${B} T=${T} H=${H} Hkv=${Hkv} hd=${hd}`;
      const opts = { batch: B, heads: H, kvHeads: Hkv };
      const q = pair([B * T, H * hd], dtype), k = pair([B * T, Hkv * hd], dtype), v = pair([B * T, Hkv * hd], dtype);
      const dOut = pair([B * T, H * hd], dtype);
      const a = ops.attention(q.cpu, k.cpu, v.cpu, opts), b = ops.attention(q.cuda, k.cuda, v.cuda, opts);
      close(t, b.out.toArray(), a.out.toArray(), TOL[dtype], `${what}: out`);
      close(t, b.lse.toArray(), a.lse.toArray(), TOL.f32, `${what}: lse`);
      const ga = ops.attentionBackward(q.cpu, k.cpu, v.cpu, a.out, a.lse, dOut.cpu, opts);
      const gb = ops.attentionBackward(q.cuda, k.cuda, v.cuda, b.out, b.lse, dOut.cuda, opts);
      close(t, gb.dq.toArray(), ga.dq.toArray(), TOL[dtype], `${what}: dq`);
      close(t, gb.dk.toArray(), ga.dk.toArray(), TOL[dtype], `${what}: dk`);
      close(t, gb.dv.toArray(), ga.dv.toArray(), TOL[dtype], `${what}: dv`);
      for (const x of [q, k, v, dOut]) x.cpu.dispose(), x.cuda.dispose();
      for (const x of [a.out, a.lse, b.out, b.lse, ga.dq, ga.dk, ga.dv, gb.dq, gb.dk, gb.dv]) x.dispose();
    }
});

t.test('causal: a later token changes no earlier output, bit for bit (bf16, both head dims)', { skip: SKIP_NO_CUDA }, async (t) => {
  for (const hd of [64, 128]) {
    const B = 2, T = 70, H = 4, Hkv = 2, last = 66;  // token `last` of sequence 0 sits in the second tile
    const opts = { batch: B, heads: H, kvHeads: Hkv };
    const q = Tensor.randn([B * T, H * hd], { seed: seed(), dtype: 'bf16' });
    const k = Tensor.randn([B * T, Hkv * hd], { seed: seed(), dtype: 'bf16' });
    const v = Tensor.randn([B * T, Hkv * hd], { seed: seed(), dtype: 'bf16' });
    const k2 = k.toArray().slice(), v2 = v.toArray().slice();
    for (let c = 0; c < Hkv * hd; c++) {
      k2[last * Hkv * hd + c] += 2;
      v2[last * Hkv * hd + c] -= 2;
    }
    const dev = (x: Tensor) => x.to('cuda');
    const a = ops.attention(dev(q), dev(k), dev(v), opts).out.toArray();
    const b = ops.attention(dev(q), Tensor.from(k2, k.shape, { dtype: 'bf16', device: 'cuda' }),
      Tensor.from(v2, v.shape, { dtype: 'bf16', device: 'cuda' }), opts).out.toArray();
    const width = H * hd;
    const rowsSame = (r0: number, r1: number) => exact(t, b.slice(r0 * width, r1 * width), a.slice(r0 * width, r1 * width), `hd=${hd}: rows ${r0}..${r1 - 1} unchanged`);
    rowsSame(0, last);  // earlier rows of sequence 0, both tiles
    rowsSame(T, 2 * T);  // the other sequence
    let changed = false;
    for (let c = 0; c < width; c++) if (a[last * width + c] !== b[last * width + c]) changed = true;
    t.ok(changed, `hd=${hd}: the perturbed token's own row changes (the test can fail)`);
  }
});

t.test('tensor-core backward is deterministic', { skip: SKIP_NO_CUDA }, async (t) => {
  for (const hd of [64, 128]) {
    const opts = { batch: 2, heads: 4, kvHeads: 1 };
    const q = Tensor.randn([2 * 90, 4 * hd], { seed: seed(), device: 'cuda', dtype: 'bf16' });
    const k = Tensor.randn([2 * 90, hd], { seed: seed(), device: 'cuda', dtype: 'bf16' });
    const v = Tensor.randn([2 * 90, hd], { seed: seed(), device: 'cuda', dtype: 'bf16' });
    const d = Tensor.randn([2 * 90, 4 * hd], { seed: seed(), device: 'cuda', dtype: 'bf16' });
    const f1 = ops.attention(q, k, v, opts), f2 = ops.attention(q, k, v, opts);
    exact(t, f2.out.toArray(), f1.out.toArray(), `hd=${hd}: out bit-identical run to run`);
    const g1 = ops.attentionBackward(q, k, v, f1.out, f1.lse, d, opts), g2 = ops.attentionBackward(q, k, v, f1.out, f1.lse, d, opts);
    exact(t, g2.dq.toArray(), g1.dq.toArray(), `hd=${hd}: dq bit-identical run to run`);
    exact(t, g2.dk.toArray(), g1.dk.toArray(), `hd=${hd}: dk bit-identical run to run`);
    exact(t, g2.dv.toArray(), g1.dv.toArray(), `hd=${hd}: dv bit-identical run to run`);
  }
});
