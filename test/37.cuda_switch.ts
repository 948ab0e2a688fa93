// The Switch balance loss of UpIT on CUDA against its CPU twin (cuda/routing.cu, binding/cpu/routing.cc):
// routeShared's probs (the per-column sum of the full softmax over tokens), routeSharedBackward with
// dProbs (alone and with dWeights and dImportance), switchLoss and switchLossBackward, on fresh random
// inputs with poisoned device allocations. Shapes cover every group width (N = 1..32 lanes, and 2, 16,
// 32 columns per lane), partial groups and blocks, shared and no shared expert, several forward blocks,
// and no tokens; probs and the loss are checked bit for bit run to run. Tolerances: test/helpers/gpu.ts.
import t from 'tap';
import { Tensor, ops } from '../lib/index';
import { SKIP_NO_CUDA } from './helpers/ref';
import { close, exact } from './helpers/check';
import { TOL, fastCases, pair, setupGpuTest } from './helpers/gpu';

setupGpuTest(t);

const CASES: { T: number; N: number; K: number; shared: boolean; what: string }[] = [
  { T: 37, N: 8, K: 2, shared: false, what: 'UpIT: 8 experts, top-2' },
  { T: 21, N: 7, K: 6, shared: true, what: 'XFT routing (shared expert) with the Switch loss' },
  { T: 1, N: 1, K: 1, shared: false, what: 'one token, one expert' },
  { T: 50, N: 16, K: 4, shared: false, what: 'N = 16' },
  { T: 33, N: 64, K: 2, shared: false, what: 'two columns per lane' },
  { T: 9, N: 600, K: 3, shared: false, what: 'N = 600 (32 columns per lane)' },
  { T: 3000, N: 4, K: 2, shared: false, what: 'several forward blocks' },
  { T: 0, N: 8, K: 2, shared: false, what: 'no tokens' },
];

for (const dtype of ['f32', 'bf16'] as const)
  t.test(`switch loss: CUDA vs CPU, ${dtype}`, { skip: SKIP_NO_CUDA }, async (t) => {
    // the cost under emulation: tokens x columns x columns per lane (N = 600: 19 per lane, minutes under asan)
    for (const c of fastCases(t, CASES, (c) => c.T * c.N * Math.ceil(c.N / 32), 6000)) {
      const z = pair([c.T, c.N], dtype, { std: 2 });
      const opts = { topK: c.K, shared: c.shared, probs: true };
      const rc = ops.routeShared(z.cpu, opts), rg = ops.routeShared(z.cuda, opts);
      exact(t, rg.experts.toArray(), rc.experts.toArray(), `${c.what}: experts`);
      exact(t, rg.load.toArray(), rc.load.toArray(), `${c.what}: load`);
      if (c.T > 0) close(t, rg.probs!.toArray(), rc.probs!.toArray(), TOL.f32, `${c.what}: probs`);
      else t.ok(rg.probs!.toArray().every((v) => v === 0), `${c.what}: probs zero`);
      const again = ops.routeShared(z.cuda, opts);
      exact(t, again.probs!.toArray(), rg.probs!.toArray(), `${c.what}: probs bit for bit run to run`);
      const S = c.shared ? c.K - 1 : c.K, so = { tokens: c.T, selected: S, weight: 0.37 };
      const lc = ops.switchLoss(rc.probs!, rc.load, so), lg = ops.switchLoss(rg.probs!, rg.load, so);
      close(t, lg.toArray(), lc.toArray(), TOL.f32, `${c.what}: loss`);
      exact(t, ops.switchLoss(rg.probs!, rg.load, so).toArray(), lg.toArray(), `${c.what}: loss bit for bit run to run`);
      const dpc = ops.switchLossBackward(rc.load, { ...so, dLoss: 1.5 }), dpg = ops.switchLossBackward(rg.load, { ...so, dLoss: 1.5 });
      close(t, dpg.toArray(), dpc.toArray(), TOL.f32, `${c.what}: dprobs`);
      // the backward with dProbs, alone and with the other two gradients
      const dW = pair([c.T, c.K], 'f32'), dI = pair([c.N], 'f32');
      const zeroC = Tensor.zeros([c.T, c.K]), zeroG = Tensor.zeros([c.T, c.K], { device: 'cuda' });
      const onlyC = ops.routeSharedBackward(z.cpu, rc, zeroC, { dProbs: dpc }), onlyG = ops.routeSharedBackward(z.cuda, rg, zeroG, { dProbs: dpg });
      // dz_j = p_j (dP_j - <p, dP>) cancels where the load is near uniform: its rounding error is on the
      // scale of dP (|dz_j| <= 2 max|dP|), so it is bounded against that scale, not against |dz|
      if (c.T > 0) {
        const got = onlyG.toArray(), want = onlyC.toArray(), scale = Math.max(...Array.from(dpc.toArray(), Math.abs));
        let worst = 0;
        for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i] - want[i]));
        t.ok(worst <= TOL[dtype] * scale, `${c.what}: dlogits from dProbs: max |cuda - cpu| ${worst.toExponential(2)} <= ${TOL[dtype]} max|dP| (${scale.toExponential(2)})`);
      }
      const allC = ops.routeSharedBackward(z.cpu, rc, dW.cpu, { dProbs: dpc, dImportance: dI.cpu });
      const allG = ops.routeSharedBackward(z.cuda, rg, dW.cuda, { dProbs: dpg, dImportance: dI.cuda });
      if (c.T > 0) close(t, allG.toArray(), allC.toArray(), TOL[dtype], `${c.what}: dlogits from dWeights, dImportance and dProbs`);
      t.ok(Array.from(allG.toArray()).every(Number.isFinite), `${c.what}: every dlogit written`);
      [z, dW, dI].forEach((p) => { p.cpu.dispose(); p.cuda.dispose(); });
      [rc, rg, again].forEach((r) => r.dispose());
      [lc, lg, dpc, dpg, zeroC, zeroG, onlyC, onlyG, allC, allG].forEach((x) => x.dispose());
    }
  });

t.test('switch loss: inputs on two devices are an XFT_DEVICE error', { skip: SKIP_NO_CUDA }, async (t) => {
  const p = Tensor.zeros([4]), l = Tensor.zeros([4], { device: 'cuda' });
  t.throws(() => ops.switchLoss(p, l, { tokens: 1, selected: 1 }), { code: 'XFT_DEVICE' });
  [p, l].forEach((x) => x.dispose());
});
