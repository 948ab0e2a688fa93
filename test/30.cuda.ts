// CUDA kernels against their CPU twins on fresh random inputs (the seed is printed), with every
// new device allocation poisoned (NaN / -1) so that an output element left unwritten fails.
// Tolerances: fp32 1e-5, bf16 1e-2 relative (‖cuda − cpu‖ / ‖cpu‖); integer outputs exact.
import t from 'tap';
import { Tensor, ops, type DType } from '../lib/index';
import { native } from '../lib/native';
import { SKIP_NO_CUDA, randomOffsets } from './helpers/ref';
import { close, exact } from './helpers/check';
import { TOL, fastCases, pair, seed, setupGpuTest } from './helpers/gpu';

setupGpuTest(t);



t.test('routing: CUDA vs CPU', { skip: SKIP_NO_CUDA }, async (t) => {
  const shapes: [number, number, number][] = [[1, 7, 6], [37, 7, 6], [16384, 7, 6], [1000, 7, 2], [513, 7, 8], [300, 1, 2], [777, 63, 9], [64, 300, 5], [0, 7, 6]];
  const run = fastCases(t, shapes, ([T, N]) => T * N, 1e4);
  for (const dtype of ['f32', 'bf16'] as const)
    for (const [normalize, shared] of [[true, true], [false, true], [true, false]] as const)
      for (const [T, N, K0] of run) {
        const K = shared ? K0 : Math.min(K0, N);
        const what = `${dtype} normalize=${normalize} shared=${shared} T=${T} N=${N} K=${K}`;
        const logits = pair([T, N], dtype, { std: 2 });
        const a = ops.routeShared(logits.cpu, { topK: K, normalize, shared });
        const b = ops.routeShared(logits.cuda, { topK: K, normalize, shared });
        exact(t, b.experts.toArray(), a.experts.toArray(), `${what}: experts`);
        close(t, b.weights.toArray(), a.weights.toArray(), TOL.f32, `${what}: weights`);
        exact(t, b.counts.toArray(), a.counts.toArray(), `${what}: counts`);
        exact(t, b.offsets.toArray(), a.offsets.toArray(), `${what}: offsets`);
        exact(t, b.order.toArray(), a.order.toArray(), `${what}: order`);
        close(t, b.importance.toArray(), a.importance.toArray(), TOL.f32, `${what}: importance`);
        exact(t, b.load.toArray(), a.load.toArray(), `${what}: load`);
        const dW = pair([T, K], 'f32'), dI = pair([N], 'f32');
        const ga = ops.routeSharedBackward(logits.cpu, a, dW.cpu, { dImportance: dI.cpu });
        const gb = ops.routeSharedBackward(logits.cuda, b, dW.cuda, { dImportance: dI.cuda });
        close(t, gb.toArray(), ga.toArray(), TOL[dtype], `${what}: dLogits`);
        const na = ops.routeSharedBackward(logits.cpu, a, dW.cpu), nb = ops.routeSharedBackward(logits.cuda, b, dW.cuda);
        close(t, nb.toArray(), na.toArray(), TOL[dtype], `${what}: dLogits without dImportance`);
        for (const x of [logits.cpu, logits.cuda, dW.cpu, dW.cuda, dI.cpu, dI.cuda, ga, gb, na, nb]) x.dispose();
        a.dispose();
        b.dispose();
      }
  // ties: identical logits must pick identical experts on both devices
  const ties = Tensor.from(Array.from({ length: 64 * 7 }, (_, i) => [0, 1, 1, 0, 2, 2, 1][i % 7] * ((i / 7) % 3 | 0)), [64, 7]);
  exact(t, ops.routeShared(ties.to('cuda'), { topK: 6 }).experts.toArray(), ops.routeShared(ties, { topK: 6 }).experts.toArray(), 'ties break alike');
});

t.test('routing is deterministic on CUDA', { skip: SKIP_NO_CUDA }, async (t) => {
  const logits = Tensor.randn([20000, 7], { seed: seed(), device: 'cuda' });
  for (const shared of [true, false]) {
    const a = ops.routeShared(logits, { topK: 6, shared }), b = ops.routeShared(logits, { topK: 6, shared });
    exact(t, b.importance.toArray(), a.importance.toArray(), `shared ${shared}: importance bit-identical run to run`);
    exact(t, b.order.toArray(), a.order.toArray(), `shared ${shared}: order identical run to run`);
  }
});

t.test('grouped GEMM: CUDA vs CPU', { skip: SKIP_NO_CUDA }, async (t) => {
  const cases: [number, number, number, number, boolean][] = [
    [1, 1, 1, 1, false], [37, 19, 23, 8, true], [256, 128, 64, 1, false], [1000, 96, 80, 8, true],
    [4096, 512, 384, 8, true], [3000, 33, 65, 5, true], [513, 130, 258, 3, false], [0, 16, 16, 4, true], [2048, 1024, 512, 8, false],
  ];
  const run = fastCases(t, cases, ([M, n, k]) => M * n * k, 2e7);
  for (const dtype of ['f32', 'bf16'] as const)
    for (const [M, n, k, E, empty] of run) {
      const what = `${dtype} M=${M} n=${n} k=${k} E=${E}`;
      const offs = randomOffsets(M, E, seed(), empty);
      const offsets = Tensor.from(offs, [E + 1], { dtype: 'i32' });
      const og = offsets.to('cuda');
      const x = pair([M, k], dtype), w = pair([E, n, k], dtype, { std: 0.1 }), dy = pair([M, n], dtype);
      const ya = ops.groupedGemm(x.cpu, w.cpu, offsets), yb = ops.groupedGemm(x.cuda, w.cuda, og, { validate: false });
      close(t, yb.toArray(), ya.toArray(), TOL[dtype], `${what}: y`);
      const ga = ops.groupedGemmBackward(x.cpu, w.cpu, offsets, dy.cpu), gb = ops.groupedGemmBackward(x.cuda, w.cuda, og, dy.cuda);
      close(t, gb.dx!.toArray(), ga.dx!.toArray(), TOL[dtype], `${what}: dx`);
      close(t, gb.dw!.toArray(), ga.dw!.toArray(), TOL[dtype], `${what}: dw`);
      const acc = w.cuda.clone(), accCpu = w.cpu.clone();
      ops.groupedGemmBackward(x.cuda, w.cuda, og, dy.cuda, { dx: false, dw: acc });
      ops.groupedGemmBackward(x.cpu, w.cpu, offsets, dy.cpu, { dx: false, dw: accCpu });
      close(t, acc.toArray(), accCpu.toArray(), TOL[dtype], `${what}: dw accumulated`);
      if (dtype === 'bf16') {
        // f32 gradients of bf16 weights (the mixed-precision model): unrounded fp32 sums, poisoned first
        const g32 = Tensor.randn([E, n, k], { seed: seed() }), g32g = g32.to('cuda');
        ops.groupedGemmBackward(x.cuda, w.cuda, og, dy.cuda, { dx: false, dw: g32g });
        ops.groupedGemmBackward(x.cpu, w.cpu, offsets, dy.cpu, { dx: false, dw: g32 });
        close(t, g32g.toArray(), g32.toArray(), TOL.f32, `${what}: f32 dw accumulated`);
        g32.dispose();
        g32g.dispose();
      }
      for (const v of [offsets, og, x.cpu, x.cuda, w.cpu, w.cuda, dy.cpu, dy.cuda, ya, yb, ga.dx!, ga.dw!, gb.dx!, gb.dw!, acc, accCpu]) v.dispose();
    }
});

t.test('grouped GEMM: fused SwiGLU gate/up (gather, down backward, dx of both), CUDA vs CPU', { skip: SKIP_NO_CUDA }, async (t) => {
  // [S source rows, K (gather divisor; 0: no gather), f, d, E, uncovered rows at both ends]
  const cases: [number, number, number, number, number, boolean][] = [
    [37, 0, 19, 23, 1, false], [50, 3, 136, 64, 4, false], [20, 2, 24, 40, 3, true], [9, 3, 8, 16, 2, true], [256, 2, 264, 128, 8, false],
  ];
  const run = fastCases(t, cases, ([S, K, f, d]) => S * Math.max(K, 1) * f * d, 2e6);
  for (const dtype of ['f32', 'bf16'] as const)
    for (const [S, K, f, d, E, uncovered] of run) {
      const M = S * Math.max(K, 1);
      const what = `${dtype} S=${S} K=${K} f=${f} d=${d} E=${E}${uncovered ? ' uncovered rows' : ''}`;
      const offs = randomOffsets(M, E, seed(), true);
      if (uncovered) {
        offs[0] = 2;
        offs[E] = M - 3;
      }
      const offsets = Tensor.from(offs, [E + 1], { dtype: 'i32' }), og = offsets.to('cuda');
      const x = pair([S, d], dtype), wg = pair([E, f, d], dtype, { std: 0.2 }), wu = pair([E, f, d], dtype, { std: 0.2 });
      const wd = pair([E, d, f], dtype, { std: 0.2 }), dy = pair([M, d], dtype), dx0 = pair([M, d], dtype);
      const gv = Array.from({ length: M }, (_, i) => (i * 7919) % M);
      if (K > 0 && M > 4) [gv[1], gv[3]] = [-1, S * K + 2]; // out of range: zero rows on both devices
      const gather = K > 0 ? Tensor.from(gv, [M], { dtype: 'i32' }) : null;
      const ga = gather ? { gather, gatherDiv: K, validate: false } : { validate: false };
      const gb = gather ? { gather: gather.to('cuda'), gatherDiv: K, validate: false } : { validate: false };
      const fa = ops.gateUp(x.cpu, wg.cpu, wu.cpu, offsets, ga), fb = ops.gateUp(x.cuda, wg.cuda, wu.cuda, og, gb);
      close(t, fb.gu.toArray(), fa.gu.toArray(), TOL[dtype], `${what}: gu`);
      close(t, fb.h.toArray(), fa.h.toArray(), TOL[dtype], `${what}: h`);
      // the backward from the CPU's gu on both devices (the same inputs)
      const guB = fa.gu.to('cuda');
      const sa = ops.swigluDownBackward(dy.cpu, wd.cpu, offsets, fa.gu, { validate: false });
      const sb = ops.swigluDownBackward(dy.cuda, wd.cuda, og, guB, { validate: false });
      close(t, sb.dgu.toArray(), sa.dgu.toArray(), TOL[dtype], `${what}: dgu`);
      close(t, sb.h.toArray(), sa.h.toArray(), TOL[dtype], `${what}: h recomputed`);
      const dguB = sa.dgu.to('cuda');
      const ba = ops.gateUpBackward(x.cpu, wg.cpu, wu.cpu, offsets, sa.dgu, ga), bb = ops.gateUpBackward(x.cuda, wg.cuda, wu.cuda, og, dguB, gb);
      close(t, bb.dx!.toArray(), ba.dx!.toArray(), TOL[dtype], `${what}: dx`);
      close(t, bb.dwGate!.toArray(), ba.dwGate!.toArray(), TOL[dtype], `${what}: dW_gate`);
      close(t, bb.dwUp!.toArray(), ba.dwUp!.toArray(), TOL[dtype], `${what}: dW_up`);
      // accumulation: dx in the epilogue, dW into f32 gradients (of bf16 weights too)
      const acc = [dx0.cpu.clone(), dx0.cuda.clone()];
      const g32 = [Tensor.randn([E, f, d], { seed: 5 }), Tensor.randn([E, f, d], { seed: 6 })];
      const g32b = g32.map((v) => v.to('cuda'));
      ops.gateUpBackward(x.cpu, wg.cpu, wu.cpu, offsets, sa.dgu, { ...ga, dx: acc[0], dw: [g32[0], g32[1]] });
      ops.gateUpBackward(x.cuda, wg.cuda, wu.cuda, og, dguB, { ...gb, dx: acc[1], dw: [g32b[0], g32b[1]] });
      close(t, acc[1].toArray(), acc[0].toArray(), TOL[dtype], `${what}: dx accumulated`);
      close(t, g32b[0].toArray(), g32[0].toArray(), TOL.f32 * (dtype === 'bf16' ? 10 : 1), `${what}: dW_gate into f32`);
      close(t, g32b[1].toArray(), g32[1].toArray(), TOL.f32 * (dtype === 'bf16' ? 10 : 1), `${what}: dW_up into f32`);
      // the plain grouped GEMM's dx accumulated in its epilogue (q, k, v)
      const acc2 = [dx0.cpu.clone(), dx0.cuda.clone()];
      const dh = pair([M, f], dtype);
      ops.groupedGemmBackward(dy.cpu, wg.cpu, offsets, dh.cpu, { dx: acc2[0], dw: false, validate: false });
      ops.groupedGemmBackward(dy.cuda, wg.cuda, og, dh.cuda, { dx: acc2[1], dw: false, validate: false });
      close(t, acc2[1].toArray(), acc2[0].toArray(), TOL[dtype], `${what}: groupedGemmBackward dx accumulated`);
      for (const v of [offsets, og, x.cpu, x.cuda, wg.cpu, wg.cuda, wu.cpu, wu.cuda, wd.cpu, wd.cuda, dy.cpu, dy.cuda, dx0.cpu, dx0.cuda,
        gather, gb.gather, fa.gu, fa.h, fb.gu, fb.h, guB, sa.dgu, sa.h, sb.dgu, sb.h, dguB, ba.dx, ba.dwGate, ba.dwUp, bb.dx, bb.dwGate, bb.dwUp,
        ...acc, ...g32, ...g32b, ...acc2, dh.cpu, dh.cuda]) v?.dispose();
    }
});

t.test('grouped GEMM: fused q/k/v projection, CUDA vs CPU', { skip: SKIP_NO_CUDA }, async (t) => {
  // [M, nq, nk, d]: odd sizes (scalar path, pairs straddling q/k/v), GQA shapes, a column tile boundary inside k
  const cases: [number, number, number, number][] = [[37, 19, 5, 23], [70, 64, 16, 32], [33, 200, 40, 16], [200, 256, 64, 64]];
  const run = fastCases(t, cases, ([M, nq, nk, d]) => M * (nq + 2 * nk) * d, 2e6);
  for (const dtype of ['f32', 'bf16'] as const)
    for (const [M, nq, nk, d] of run) {
      const what = `${dtype} M=${M} nq=${nq} nk=${nk} d=${d}`;
      const x = pair([M, d], dtype), wq = pair([nq, d], dtype, { std: 0.2 }), wk = pair([nk, d], dtype, { std: 0.2 }), wv = pair([nk, d], dtype, { std: 0.2 });
      for (const offs of [[0, M], [2, M - 3]]) {
        const offsets = Tensor.from(offs, [2], { dtype: 'i32' }), og = offsets.to('cuda');
        const a = ops.qkv(x.cpu, wq.cpu, wk.cpu, wv.cpu, offsets, { validate: false }), b = ops.qkv(x.cuda, wq.cuda, wk.cuda, wv.cuda, og, { validate: false });
        for (const n of ['q', 'k', 'v'] as const) close(t, b[n].toArray(), a[n].toArray(), TOL[dtype], `${what} rows ${offs}: ${n}`);
        for (const v of [offsets, og, a.q, a.k, a.v, b.q, b.k, b.v]) v.dispose();
      }
      for (const v of [x, wq, wk, wv]) for (const u of [v.cpu, v.cuda]) u.dispose();
    }
});

t.test('merge: CUDA vs CPU', { skip: SKIP_NO_CUDA }, async (t) => {
  for (const dtype of ['f32', 'bf16'] as const)
    for (const rate of [0.75, 0, 1, null])
      for (const E of [2, 8, 17]) {
        const what = `${dtype} sharedRate=${rate} E=${E}`;
        const shapes = [[E, 257, 129], [E, 129, 257], [E, 1], [E, 4099]];
        const stacks = shapes.map((s) => pair(s, dtype));
        const alpha = pair([rate === null ? E : E - 1], 'f32', { std: 2 });
        const ma = ops.mergeExperts(stacks.map((s) => s.cpu), alpha.cpu, rate);
        const mb = ops.mergeExperts(stacks.map((s) => s.cuda), alpha.cuda, rate);
        mb.forEach((m, i) => close(t, m.toArray(), ma[i].toArray(), TOL[dtype], `${what}: merged[${i}]`));
        const grads = shapes.map((s) => pair(s.slice(1), dtype));
        const da = ops.mergeExpertsBackward(stacks.map((s) => s.cpu), alpha.cpu, rate, grads.map((g) => g.cpu));
        const db = ops.mergeExpertsBackward(stacks.map((s) => s.cuda), alpha.cuda, rate, grads.map((g) => g.cuda));
        close(t, db.toArray(), da.toArray(), rate === 1 ? 0 : TOL[dtype], `${what}: dAlpha`);
      }
});

t.test('kernels leave the pool as they found it', { skip: SKIP_NO_CUDA }, async (t) => {
  const before = native.memoryStats();
  const x = Tensor.randn([512, 64], { seed: 1, device: 'cuda', dtype: 'bf16' });
  const w = Tensor.randn([8, 32, 64], { seed: 2, device: 'cuda', dtype: 'bf16' });
  const logits = Tensor.randn([512, 7], { seed: 3, device: 'cuda' });
  const offsets = Tensor.from([0, 64, 128, 192, 256, 320, 384, 448, 512], [9], { dtype: 'i32', device: 'cuda' });
  for (let i = 0; i < 50; i++) {
    const r = ops.routeShared(logits, { topK: 6 });
    const y = ops.groupedGemm(x, w, offsets, { validate: false });
    y.dispose();
    r.dispose();
  }
  for (const v of [x, w, logits, offsets]) v.dispose();
  native.synchronize();
  const after = native.memoryStats();
  t.equal(after.cudaTensors, before.cudaTensors, 'no tensor left');
  t.equal(after.poolUsedBytes, before.poolUsedBytes, 'kernel scratch memory returned to the pool');
});
