// The train kernels (attention, cross-entropy, AdamW, Adafactor, MoE permutation, balance loss, load estimate) on CUDA
// against their CPU twins, on fresh random inputs (the seed is printed), with every new device
// allocation poisoned (NaN / -1) so that an output element left unwritten fails.
// Tolerances: fp32 1e-5, bf16 1e-2 relative (‖cuda − cpu‖ / ‖cpu‖); integer outputs exact.
import t from 'tap';
import { Tensor, ops, adafactorState, type DType } from '../lib/index';
import { native } from '../lib/native';
import { SKIP_NO_CUDA, rng } from './helpers/ref';
import { close, exact } from './helpers/check';
import { TOL, fastCases, pair, seed, setupGpuTest } from './helpers/gpu';

setupGpuTest(t);


function both(cpu: Tensor) {
  return { cpu, cuda: cpu.to('cuda') };
}


t.test('attention: CUDA vs CPU', { skip: SKIP_NO_CUDA }, async (t) => {
  // [B, T, H, Hkv, hd]: partial tiles, several tiles, GQA and MQA, every head-dimension chunk count
  const cases: [number, number, number, number, number][] = [
    [1, 1, 1, 1, 1], [1, 31, 2, 2, 16], [2, 33, 4, 2, 64], [1, 100, 3, 1, 33], [3, 65, 8, 4, 96],
    [2, 130, 4, 1, 128], [1, 257, 2, 2, 80], [2, 512, 8, 2, 64], [1, 7, 6, 3, 5], [2, 0, 2, 1, 8],
  ];
  const run = fastCases(t, cases, ([B, T, H, , hd]) => B * T * T * H * hd, 2e7);
  for (const dtype of ['f32', 'bf16'] as const)
    for (const [B, T, H, Hkv, hd] of run) {
      const what = `${dtype} B=${B} T=${T} H=${H} Hkv=${Hkv} hd=${hd}`;
      const opts = { batch: B, heads: H, kvHeads: Hkv };
      const q = pair([B * T, H * hd], dtype), k = pair([B * T, Hkv * hd], dtype), v = pair([B * T, Hkv * hd], dtype);
      const dOut = pair([B * T, H * hd], dtype);
      const a = ops.attention(q.cpu, k.cpu, v.cpu, opts), b = ops.attention(q.cuda, k.cuda, v.cuda, opts);
      close(t, b.out.toArray(), a.out.toArray(), TOL[dtype], `${what}: out`);
      close(t, b.lse.toArray(), a.lse.toArray(), TOL.f32, `${what}: lse`);
      // both backwards read the CPU forward's out and lse, so that only the backward kernels are compared
      const outG = a.out.to('cuda'), lseG = a.lse.to('cuda');
      const ga = ops.attentionBackward(q.cpu, k.cpu, v.cpu, a.out, a.lse, dOut.cpu, opts);
      const gb = ops.attentionBackward(q.cuda, k.cuda, v.cuda, outG, lseG, dOut.cuda, opts);
      close(t, gb.dq.toArray(), ga.dq.toArray(), TOL[dtype], `${what}: dq`);
      close(t, gb.dk.toArray(), ga.dk.toArray(), TOL[dtype], `${what}: dk`);
      close(t, gb.dv.toArray(), ga.dv.toArray(), TOL[dtype], `${what}: dv`);
      for (const x of [q, k, v, dOut]) x.cpu.dispose(), x.cuda.dispose();
      for (const x of [a.out, a.lse, b.out, b.lse, outG, lseG, ga.dq, ga.dk, ga.dv, gb.dq, gb.dk, gb.dv]) x.dispose();
    }
});

t.test('attention backward is deterministic on CUDA', { skip: SKIP_NO_CUDA }, async (t) => {
  const opts = { batch: 2, heads: 8, kvHeads: 2 };
  const q = Tensor.randn([2 * 300, 8 * 64], { seed: seed(), device: 'cuda', dtype: 'bf16' });
  const k = Tensor.randn([2 * 300, 2 * 64], { seed: seed(), device: 'cuda', dtype: 'bf16' });
  const v = Tensor.randn([2 * 300, 2 * 64], { seed: seed(), device: 'cuda', dtype: 'bf16' });
  const d = Tensor.randn([2 * 300, 8 * 64], { seed: seed(), device: 'cuda', dtype: 'bf16' });
  const f = ops.attention(q, k, v, opts);
  const g1 = ops.attentionBackward(q, k, v, f.out, f.lse, d, opts), g2 = ops.attentionBackward(q, k, v, f.out, f.lse, d, opts);
  exact(t, g2.dq.toArray(), g1.dq.toArray(), 'dq bit-identical run to run');
  exact(t, g2.dk.toArray(), g1.dk.toArray(), 'dk bit-identical run to run');
  exact(t, g2.dv.toArray(), g1.dv.toArray(), 'dv bit-identical run to run');
});

t.test('cross-entropy: CUDA vs CPU', { skip: SKIP_NO_CUDA }, async (t) => {
  const shapes: [number, number][] = [[1, 1], [37, 1000], [64, 32000], [5, 50257], [300, 7], [0, 10]];
  for (const dtype of ['f32', 'bf16'] as const)
    for (const [R, V] of shapes) {
      const what = `${dtype} R=${R} V=${V}`;
      const g = rng(seed());
      const targets = both(Tensor.from(Array.from({ length: R }, (_, r) => (r % 4 === 3 ? -100 : g.int(0, V))), [R], { dtype: 'i32' }));
      const logits = pair([R, V], dtype, { std: 3 });
      const a = ops.crossEntropy(logits.cpu, targets.cpu), b = ops.crossEntropy(logits.cuda, targets.cuda, { validate: false });
      close(t, b.losses.toArray(), a.losses.toArray(), TOL.f32, `${what}: losses`);
      exact(t, b.predictions.toArray(), a.predictions.toArray(), `${what}: predictions`);
      const dLoss = pair([R], 'f32');
      const da = ops.crossEntropyBackward(logits.cpu, targets.cpu, dLoss.cpu);
      const db = ops.crossEntropyBackward(logits.cuda, targets.cuda, dLoss.cuda, { validate: false });
      close(t, db.toArray(), da.toArray(), TOL[dtype], `${what}: dLogits`);
      const inPlace = ops.crossEntropyBackward(logits.cuda, targets.cuda, dLoss.cuda, { validate: false, inPlace: true });
      exact(t, inPlace.toArray(), db.toArray(), `${what}: in place equals out of place`);
      for (const x of [targets, logits, dLoss]) x.cpu.dispose(), x.cuda.dispose();
      for (const x of [a.losses, a.predictions, b.losses, b.predictions, da, db]) x.dispose();
    }
  const ties = both(Tensor.from([0, 0, 0, 0, 1, 3, 3, 2, 2, 2, 7, 7], [3, 4], { dtype: 'bf16' }));
  const tt = both(Tensor.from([0, 1, 2], [3], { dtype: 'i32' }));
  exact(t, ops.crossEntropy(ties.cuda, tt.cuda).predictions.toArray(), [0, 1, 2], 'argmax ties toward the lower index');
});

t.test('adamw: CUDA vs CPU over three steps', { skip: SKIP_NO_CUDA }, async (t) => {
  for (const n of [1, 1000, (1 << 20) + 3])
    for (const copyDtype of [null, 'f32', 'bf16'] as const) {
      const what = `n=${n} copy=${copyDtype}`;
      const p = pair([n], 'f32'), m = both(Tensor.zeros([n])), v = both(Tensor.zeros([n]));
      const copy = copyDtype ? both(Tensor.zeros([n], { dtype: copyDtype })) : null;
      for (let step = 1; step <= 3; step++) {
        const g = pair([n], 'f32', { std: step });
        const o = { lr: 1e-2, step, weightDecay: 0.1, gradScale: 0.5, beta2: 0.95 };
        ops.adamw(p.cpu, g.cpu, m.cpu, v.cpu, { ...o, copyTo: copy?.cpu });
        ops.adamw(p.cuda, g.cuda, m.cuda, v.cuda, { ...o, copyTo: copy?.cuda });
        g.cpu.dispose();
        g.cuda.dispose();
      }
      close(t, p.cuda.toArray(), p.cpu.toArray(), TOL.f32, `${what}: params`);
      close(t, m.cuda.toArray(), m.cpu.toArray(), TOL.f32, `${what}: m`);
      close(t, v.cuda.toArray(), v.cpu.toArray(), TOL.f32, `${what}: v`);
      if (copy) close(t, copy.cuda.toArray(), copy.cpu.toArray(), TOL[copyDtype!], `${what}: copy`);
      for (const x of [p, m, v, copy]) if (x) x.cpu.dispose(), x.cuda.dispose();
    }
});

t.test('adafactor: CUDA vs CPU over two steps, many tensors per call (f32 and bf16 weights, stochastic rounding)', { skip: SKIP_NO_CUDA }, async (t) => {
  // a large expert stack and a long vector (many blocks per launch) beside small and odd shapes
  const shapes = fastCases(t, [[4, 257, 513], [100003], [3, 1000], [1, 7], [5]], (s) => s.reduce((a, b) => a * b, 1), 5000);
  for (const dtype of ['f32', 'bf16'] as const) {
    const what = (s: number[]) => `${dtype} [${s}]`;
    const p = shapes.map((s) => pair(s, dtype)), st = shapes.map((s) => ({ cpu: adafactorState(s, 'cpu'), cuda: adafactorState(s, 'cuda') }));
    for (let step = 1; step <= 2; step++) {
      const g = shapes.map((s) => pair(s, 'f32', { std: step }));
      const o = { lr: 1e-2, step, gradScale: 0.5, stochasticRounding: dtype === 'bf16', seed: 9 };
      for (const dev of ['cpu', 'cuda'] as const)
        ops.adafactor(shapes.map((s, i) => ({ params: p[i][dev], grads: g[i][dev], state: st[i][dev], clipPerSlice: s.length >= 3 })), o);
      g.forEach((x) => (x.cpu.dispose(), x.cuda.dispose()));
    }
    shapes.forEach((s, i) => {
      close(t, p[i].cuda.toArray(), p[i].cpu.toArray(), TOL[dtype], `${what(s)}: params`);
      for (const k of ['row', 'col', 'v'] as const)
        if (st[i].cpu[k]) close(t, st[i].cuda[k]!.toArray(), st[i].cpu[k]!.toArray(), TOL.f32, `${what(s)}: ${k}`);
    });
    p.forEach((x) => (x.cpu.dispose(), x.cuda.dispose()));
    st.forEach((x) => [x.cpu, x.cuda].forEach((y) => [y.row, y.col, y.v].forEach((z) => z?.dispose())));
  }
});

t.test('MoE permutation: CUDA vs CPU', { skip: SKIP_NO_CUDA }, async (t) => {
  const cases: [number, number, number][] = [[1, 2, 1], [37, 6, 16], [1000, 6, 512], [513, 2, 33], [300, 8, 7], [4096, 6, 1024], [0, 6, 8]];
  for (const dtype of ['f32', 'bf16'] as const)
    for (const [T, K, d] of cases) {
      const what = `${dtype} T=${T} K=${K} d=${d}`;
      // the routing on the CPU, so that this test depends on the permutation kernels only
      const r = ops.routeShared(Tensor.randn([T, 7], { seed: seed(), std: 2 }), { topK: K });
      const order = both(r.order), g = both(r.weights);
      const pa = ops.invertPermutation(order.cpu), pb = ops.invertPermutation(order.cuda, { validate: false });
      exact(t, pb.toArray(), pa.toArray(), `${what}: position`);
      const noCheck = { validate: false };
      const x = pair([T, d], dtype);
      exact(t, ops.permute(x.cuda, order.cuda, K, noCheck).toArray(), ops.permute(x.cpu, order.cpu, K).toArray(), `${what}: permute`);
      const dxp = pair([T * K, d], dtype);
      close(t, ops.permuteBackward(dxp.cuda, pb, K, noCheck).toArray(), ops.permuteBackward(dxp.cpu, pa, K).toArray(), TOL[dtype], `${what}: permuteBackward`);
      const y = pair([T * K, d], dtype);
      close(t, ops.unpermute(y.cuda, pb, g.cuda, noCheck).toArray(), ops.unpermute(y.cpu, pa, g.cpu).toArray(), TOL[dtype], `${what}: unpermute`);
      const dOut = pair([T, d], dtype);
      const ba = ops.unpermuteBackward(dOut.cpu, y.cpu, pa, g.cpu), bb = ops.unpermuteBackward(dOut.cuda, y.cuda, pb, g.cuda, noCheck);
      close(t, bb.dy.toArray(), ba.dy.toArray(), TOL[dtype], `${what}: dy`);
      close(t, bb.dg.toArray(), ba.dg.toArray(), dtype === 'f32' ? TOL.f32 : 1e-3, `${what}: dg`);
      r.dispose();
    }
});

t.test('balance loss: CUDA vs CPU', { skip: SKIP_NO_CUDA }, async (t) => {
  for (const N of [1, 2, 7, 63, 1000]) {
    const g = rng(seed());
    const imp = both(Tensor.from(Array.from({ length: N }, () => g.next() * 10), [N]));
    const load = both(Tensor.from(Array.from({ length: N }, () => g.int(0, 100)), [N]));
    close(t, ops.balanceLoss(imp.cuda, load.cuda).toArray(), ops.balanceLoss(imp.cpu, load.cpu).toArray(), TOL.f32, `N=${N}: loss`);
    const a = ops.balanceLossBackward(imp.cpu, load.cpu, { dLoss: 2 }), b = ops.balanceLossBackward(imp.cuda, load.cuda, { dLoss: 2 });
    close(t, b.dImportance.toArray(), a.dImportance.toArray(), TOL.f32, `N=${N}: dImportance`);
    close(t, b.dLoad.toArray(), a.dLoad.toArray(), TOL.f32, `N=${N}: dLoad`);
  }
});

t.test('load estimate: CUDA vs CPU', { skip: SKIP_NO_CUDA }, async (t) => {
  for (const dtype of ['f32', 'bf16'] as const)
    for (const [T, N, k] of [[1, 2, 1], [100, 7, 5], [1000, 7, 1], [257, 15, 14], [4096, 63, 8], [33, 256, 100]] as const) {
      const what = `${dtype} T=${T} N=${N} k=${k}`;
      const clean = pair([T, N], dtype), z = pair([T, N], dtype);
      const s = seed();
      const noisy = ops.routerNoise(clean.cpu, z.cpu, { seed: s });
      const noisyG = noisy.to('cuda');
      const a = ops.loadEstimate(clean.cpu, z.cpu, noisy, { k }), b = ops.loadEstimate(clean.cuda, z.cuda, noisyG, { k });
      close(t, b.prob.toArray(), a.prob.toArray(), TOL.f32, `${what}: prob`);
      close(t, b.load.toArray(), a.load.toArray(), TOL.f32, `${what}: load`);
      const dLoad = both(Tensor.randn([N], { seed: seed() }));
      const ga = ops.loadEstimateBackward(clean.cpu, z.cpu, noisy, dLoad.cpu, { k, seed: s });
      const gb = ops.loadEstimateBackward(clean.cuda, z.cuda, noisyG, dLoad.cuda, { k, seed: s });
      close(t, gb.dClean.toArray(), ga.dClean.toArray(), TOL[dtype], `${what}: dClean`);
      close(t, gb.dz.toArray(), ga.dz.toArray(), TOL[dtype], `${what}: dz`);
    }
});

t.test('train kernels leave the pool as they found it', { skip: SKIP_NO_CUDA }, async (t) => {
  native.synchronize();
  const before = native.memoryStats();
  const opts = { batch: 2, heads: 4, kvHeads: 2 };
  const q = Tensor.randn([256, 256], { seed: 1, device: 'cuda', dtype: 'bf16' });
  const k = Tensor.randn([256, 128], { seed: 2, device: 'cuda', dtype: 'bf16' });
  for (let i = 0; i < 20; i++) {
    const f = ops.attention(q, k, k, opts);
    const g = ops.attentionBackward(q, k, k, f.out, f.lse, q, opts);
    for (const x of [f.out, f.lse, g.dq, g.dk, g.dv]) x.dispose();
  }
  q.dispose();
  k.dispose();
  native.synchronize();
  const after = native.memoryStats();
  t.equal(after.cudaTensors, before.cudaTensors, 'no tensor left');
  t.equal(after.poolUsedBytes, before.poolUsedBytes, 'attention backward scratch returned to the pool');
});
