// The small-N router linears (cuda/router_linear.cu) on CUDA against their CPU twin
// (binding/cpu/router_linear.cc), on fresh random inputs (the seed is printed), with every new device
// allocation poisoned (NaN / -1) so that an output element left unwritten fails. Tolerances: fp32 1e-5,
// bf16 1e-2 relative. Shapes cover every padded N (4, 8, 16, 32), the 16-byte vector and scalar paths
// (d a multiple of the vector width or not), partial warps and blocks (T not a multiple of 16), dW over
// one and several token slices (T > 256), and no tokens; dW is checked bit for bit run to run.
// Then UpIT's routing-vector loss (cuda/routing_probe.cu) against its twin: dh, the accumulated stats,
// and the stats bit for bit run to run.
import t from 'tap';
import { Tensor, ops } from '../lib/index';
import { SKIP_NO_CUDA } from './helpers/ref';
import { close, exact } from './helpers/check';
import { TOL, fastCases, pair, setupGpuTest } from './helpers/gpu';

setupGpuTest(t);

const CASES: { T: number; N: number; d: number; what: string }[] = [
  { T: 1, N: 1, d: 1, what: 'one token, N = d = 1' },
  { T: 37, N: 7, d: 64, what: 'N = 7 (8 experts), vector path' },
  { T: 45, N: 15, d: 70, what: 'N = 15, d not a multiple of 8 (scalar path for bf16)' },
  { T: 17, N: 3, d: 36, what: 'N = 3, d a multiple of 4 only' },
  { T: 33, N: 32, d: 40, what: 'N = 32' },
  { T: 20, N: 7, d: 7, what: 'the mlp router second layer (d = N = 7)' },
  { T: 300, N: 4, d: 16, what: 'two dW token slices (T > 256)' },
  { T: 600, N: 3, d: 8, what: 'three dW token slices, N = 3, bf16 vector path' },
  { T: 1100, N: 7, d: 136, what: 'five dW slices, vector path' },
  { T: 0, N: 7, d: 16, what: 'no tokens' },
];

for (const dtype of ['f32', 'bf16'] as const)
  t.test(`router linear: CUDA vs CPU, ${dtype}`, { skip: SKIP_NO_CUDA }, async (t) => {
    for (const c of fastCases(t, CASES, (c) => c.T * c.d * c.N, 60000)) {
      const x = pair([c.T, c.d], dtype), w = pair([c.N, c.d], dtype), dy = pair([c.T, c.N], dtype);
      const yc = ops.routerLinear(x.cpu, w.cpu), yg = ops.routerLinear(x.cuda, w.cuda);
      close(t, yg.toArray(), yc.toArray(), TOL[dtype], `${c.what}: y`);
      const bc = ops.routerLinearBackward(x.cpu, w.cpu, dy.cpu), bg = ops.routerLinearBackward(x.cuda, w.cuda, dy.cuda);
      close(t, bg.dx!.toArray(), bc.dx!.toArray(), TOL[dtype], `${c.what}: dx`);
      const dwg = bg.dw!.toArray();
      if (c.T > 0) close(t, dwg, bc.dw!.toArray(), TOL[dtype], `${c.what}: dw`);
      else t.ok(dwg.every((v) => v === 0), `${c.what}: dw is zero`);
      // f32 gradient of the weights, accumulated twice onto a start value; and bit-for-bit run to run
      const accC = Tensor.full([c.N, c.d], 0.25), accG = Tensor.full([c.N, c.d], 0.25, { device: 'cuda' });
      for (let i = 0; i < 2; i++) {
        ops.routerLinearBackward(x.cpu, w.cpu, dy.cpu, { dx: false, dw: accC });
        ops.routerLinearBackward(x.cuda, w.cuda, dy.cuda, { dx: false, dw: accG });
      }
      close(t, accG.toArray(), accC.toArray(), TOL[dtype], `${c.what}: dw accumulated into f32`);
      const again = ops.routerLinearBackward(x.cuda, w.cuda, dy.cuda, { dx: false });
      exact(t, again.dw!.toArray(), dwg, `${c.what}: dw bit for bit run to run`);
      [x, w, dy].forEach((p) => { p.cpu.dispose(); p.cuda.dispose(); });
      [yc, yg, bc.dx, bc.dw, bg.dx, bg.dw, accC, accG, again.dw].forEach((v) => v?.dispose());
    }
  });

t.test('router linear: inputs on two devices are an XFT_DEVICE error', { skip: SKIP_NO_CUDA }, async (t) => {
  const x = Tensor.zeros([4, 8]), w = Tensor.zeros([3, 8], { device: 'cuda' });
  t.throws(() => ops.routerLinear(x, w), { code: 'XFT_DEVICE' });
  x.dispose();
  w.dispose();
});

// UpIT's routing-vector loss (cuda/routing_probe.cu vs binding/cpu/routing_probe.cc): one block strides
// over N (N > 512: several tokens per thread), fp64 partials in a fixed order; stats accumulate (+=).
const PROBE_CASES: { N: number; what: string }[] = [
  { N: 0, what: 'no tokens' },
  { N: 1, what: 'one token' },
  { N: 37, what: 'a partial warp' },
  { N: 1500, what: 'N > 512: several tokens per thread' },
];

for (const dtype of ['f32', 'bf16'] as const)
  t.test(`routing probe loss: CUDA vs CPU, ${dtype}`, { skip: SKIP_NO_CUDA }, async (t) => {
    for (const c of PROBE_CASES) {
      const h = pair([c.N, 1], dtype, { std: 4 });
      const tv = Array.from({ length: c.N }, (_, i) => (i % 5 === 2 ? -100 : i % 7));
      const tc = Tensor.from(tv, [c.N], { dtype: 'i32' }), tg = tc.to('cuda');
      const sc = Tensor.full([3], 0.5), sg = Tensor.full([3], 0.5, { device: 'cuda' });
      const dc = ops.routingProbeLoss(h.cpu, tc, { stats: sc, scale: 0.3 })!, dg = ops.routingProbeLoss(h.cuda, tg, { stats: sg, scale: 0.3 })!;
      close(t, dg.toArray(), dc.toArray(), TOL[dtype], `${c.what}: dh`);
      t.ok(tv.every((v, i) => v >= 0 || dg.toArray()[i] === 0), `${c.what}: dh is 0 on ignored tokens (every element written)`);
      close(t, sg.toArray(), sc.toArray(), 1e-6, `${c.what}: stats`);
      const again = Tensor.full([3], 0.5, { device: 'cuda' });
      ops.routingProbeLoss(h.cuda, tg, { stats: again, dh: false });
      exact(t, again.toArray(), sg.toArray(), `${c.what}: stats bit for bit run to run, without dh`);
      [h.cpu, h.cuda, tc, tg, sc, sg, dc, dg, again].forEach((v) => v.dispose());
    }
  });
