// The fused SwiGLU FFN GEMMs on the CPU (gateUp, swigluDownBackward, gateUpBackward; cuda/grouped_gemm.cu
// kGateUp / kSwigluDown / kGateUpDx and their twins in binding/cpu/grouped_gemm.cc): against the unfused
// composition (groupedGemm, swiglu, groupedGemmBackward; exact where the order is the same), finite
// differences of a float64 reference, the gather, dx accumulation in the epilogue, and errors.
import t from 'tap';
import { Tensor, ops } from '../lib/index';
import { randomOffsets, randomTensor, relErr, rng } from './helpers/ref';
import { close, exact, throwsCode } from './helpers/check';

const TOL = { f32: 1e-5, bf16: 1e-2 };

/** rows of x [S, d] picked by gather / div (zero rows where out of range), as the kernels read them */
function gatherRows(x: number[], S: number, d: number, gather: number[] | null, div: number): number[] {
  if (!gather) return x.slice();
  const out: number[] = [];
  for (const g of gather) {
    const src = g >= 0 ? Math.floor(g / div) : -1;
    for (let i = 0; i < d; i++) out.push(src >= 0 && src < S ? x[src * d + i] : 0);
  }
  return out;
}

/** columns [c0, c0 + f) of each row of m [M, 2f] */
function half(m: ArrayLike<number>, M: number, f: number, c0: number): number[] {
  const out: number[] = [];
  for (let r = 0; r < M; r++) for (let j = 0; j < f; j++) out.push(m[r * 2 * f + c0 + j]);
  return out;
}

const cases: { S: number; M: number; f: number; d: number; E: number; gather: boolean; offsets?: number[]; what: string }[] = [
  { S: 37, M: 37, f: 19, d: 23, E: 1, gather: false, what: 'dense, odd sizes' },
  { S: 20, M: 60, f: 24, d: 16, E: 5, gather: true, what: 'MoE through a gather (K = 3)' },
  { S: 9, M: 27, f: 33, d: 40, E: 4, gather: true, offsets: [0, 0, 27, 27, 27], what: 'empty groups around a full one' },
  { S: 5, M: 0, f: 8, d: 8, E: 3, gather: true, offsets: [0, 0, 0, 0], what: 'no rows' },
  { S: 12, M: 12, f: 1, d: 1, E: 2, gather: false, what: 'f = d = 1' },
];

for (const dtype of ['f32', 'bf16'] as const)
  t.test(`gateUp, swigluDownBackward, gateUpBackward vs the unfused ops: ${dtype}`, async (t) => {
    for (const [ci, c] of cases.entries()) {
      const { S, M, f, d, E } = c;
      const K = c.gather ? Math.max(1, M / S) : 1;
      const offs = c.offsets ?? randomOffsets(M, E, ci + 3);
      const offsets = Tensor.from(offs, [E + 1], { dtype: 'i32' });
      const x = randomTensor([S, d], 100 + ci, { dtype });
      const wg = randomTensor([E, f, d], 200 + ci, { dtype, scale: 0.5 }), wu = randomTensor([E, f, d], 300 + ci, { dtype, scale: 0.5 });
      const wd = randomTensor([E, d, f], 400 + ci, { dtype, scale: 0.5 });
      const dy = randomTensor([M, d], 500 + ci, { dtype });
      // a gather like routing.order (a permutation of t*K + s), with two entries out of range
      const r = rng(600 + ci);
      const gatherValues = c.gather ? Array.from({ length: M }, (_, i) => i).sort(() => r.next() - 0.5) : null;
      if (gatherValues && M > 4) {
        gatherValues[1] = -3;
        gatherValues[3] = S * K + 5;
      }
      const gather = gatherValues ? Tensor.from(gatherValues, [M], { dtype: 'i32' }) : undefined;
      const g = gather ? { gather, gatherDiv: K } : {};
      const xp = Tensor.from(gatherRows(x.values, S, d, gatherValues, K), [M, d], { dtype });
      const what = `${c.what}`;

      // forward: gu = [g | u], h = swiglu(g, u), exactly
      const { gu, h } = ops.gateUp(x.t, wg.t, wu.t, offsets, g);
      t.same(gu.shape, [M, 2 * f]);
      t.same(h.shape, [M, f]);
      const gRef = ops.groupedGemm(xp, wg.t, offsets), uRef = ops.groupedGemm(xp, wu.t, offsets), hRef = ops.swiglu(gRef, uRef);
      const guv = gu.toArray();
      exact(t, half(guv, M, f, 0), gRef.toArray(), `${what}: g`);
      exact(t, half(guv, M, f, f), uRef.toArray(), `${what}: u`);
      exact(t, h.toArray(), hRef.toArray(), `${what}: h`);

      // down backward with the SwiGLU backward in its epilogue: exactly dh, then swigluBackward
      const sd = ops.swigluDownBackward(dy.t, wd.t, offsets, gu);
      const dh = ops.groupedGemmBackward(hRef, wd.t, offsets, dy.t, { dw: false }).dx!;
      const sRef = ops.swigluBackward(gRef, uRef, dh);
      const dguv = sd.dgu.toArray();
      exact(t, half(dguv, M, f, 0), sRef.dg.toArray(), `${what}: dg`);
      exact(t, half(dguv, M, f, f), sRef.du.toArray(), `${what}: du`);
      exact(t, sd.h.toArray(), hRef.toArray(), `${what}: h recomputed`);

      // gate/up backward: dx as one sum over 2f (rounded once), dW exactly the grouped GEMM's
      const b = ops.gateUpBackward(x.t, wg.t, wu.t, offsets, sd.dgu, g);
      const bg = ops.groupedGemmBackward(xp, wg.t, offsets, sRef.dg), bu = ops.groupedGemmBackward(xp, wu.t, offsets, sRef.du);
      const dxRef = ops.add(bg.dx!, bu.dx!);
      close(t, b.dx!.toArray(), dxRef.toArray(), TOL[dtype], `${what}: dx of gate and up`);
      exact(t, b.dwGate!.toArray(), bg.dw!.toArray(), `${what}: dW_gate`);
      exact(t, b.dwUp!.toArray(), bu.dw!.toArray(), `${what}: dW_up`);
      // accumulation: dW into given tensors (f32 too for bf16), dx in the epilogue
      const accG = Tensor.from(wg.values, wg.t.shape), accU = Tensor.from(wu.values, wu.t.shape);
      const dx0 = randomTensor([M, d], 700 + ci, { dtype });
      const into = dx0.t.clone();
      const b2 = ops.gateUpBackward(x.t, wg.t, wu.t, offsets, sd.dgu, { ...g, dx: into, dw: [accG, accU] });
      t.equal(b2.dx, into, 'dx accumulated in place');
      const dxAcc = Array.from(b.dx!.toArray()).map((v, i) => v + dx0.values[i]);
      close(t, into.toArray(), dxAcc, TOL[dtype], `${what}: dx added in the epilogue`);
      const f32Ref = (v: Tensor) => ops.groupedGemmBackward(xp.cast('f32'), v.cast('f32'), offsets, v === wg.t ? sRef.dg.cast('f32') : sRef.du.cast('f32'), { dx: false }).dw!.toArray();
      close(t, accG.toArray(), Array.from(f32Ref(wg.t)).map((v, i) => v + wg.values[i]), TOL.f32 * 10, `${what}: dW_gate added into f32`);
      close(t, accU.toArray(), Array.from(f32Ref(wu.t)).map((v, i) => v + wu.values[i]), TOL.f32 * 10, `${what}: dW_up added into f32`);
      const none = ops.gateUpBackward(x.t, wg.t, wu.t, offsets, sd.dgu, { ...g, dx: false, dw: false });
      t.same([none.dx, none.dwGate, none.dwUp], [null, null, null], 'nothing asked, nothing computed');

      // the grouped GEMM's dx accumulated in its epilogue (q, k, v)
      const into2 = dx0.t.clone();
      ops.groupedGemmBackward(xp, wg.t, offsets, sRef.dg, { dx: into2, dw: false });
      close(t, into2.toArray(), Array.from(bg.dx!.toArray()).map((v, i) => v + dx0.values[i]), TOL[dtype], `${what}: groupedGemmBackward dx accumulated`);
      for (const v of [offsets, x.t, wg.t, wu.t, wd.t, dy.t, gather, xp, gu, h, gRef, uRef, hRef, sd.dgu, sd.h, dh, sRef.dg, sRef.du, b.dx, b.dwGate, b.dwUp,
        bg.dx, bg.dw, bu.dx, bu.dw, dxRef, accG, accU, dx0.t, into, into2]) v?.dispose();
    }
  });

t.test('the fused FFN: finite differences of a float64 reference', async (t) => {
  // L = <down(silu(x Wg^T) * (x Wu^T)), R> over 2 experts, x read through a gather
  const S = 6, K = 2, M = S * K, f = 5, d = 4, E = 2;
  const offs = [0, 5, M];
  const gatherValues = Array.from({ length: M }, (_, i) => (i * 7) % M);
  const x = randomTensor([S, d], 1), wg = randomTensor([E, f, d], 2), wu = randomTensor([E, f, d], 3), wd = randomTensor([E, d, f], 4);
  const R = randomTensor([M, d], 5);
  const loss = (xv: number[], g: number[], u: number[], dn: number[]) => {
    let L = 0;
    for (let i = 0; i < M; i++) {
      const e = i < offs[1] ? 0 : 1, src = Math.floor(gatherValues[i] / K);
      const hv: number[] = [];
      for (let j = 0; j < f; j++) {
        let a = 0, b = 0;
        for (let k = 0; k < d; k++) {
          a += xv[src * d + k] * g[(e * f + j) * d + k];
          b += xv[src * d + k] * u[(e * f + j) * d + k];
        }
        hv.push((a / (1 + Math.exp(-a))) * b);
      }
      for (let k = 0; k < d; k++) {
        let y = 0;
        for (let j = 0; j < f; j++) y += hv[j] * dn[(e * d + k) * f + j];
        L += y * R.values[i * d + k];
      }
    }
    return L;
  };
  const offsets = Tensor.from(offs, [E + 1], { dtype: 'i32' }), gather = Tensor.from(gatherValues, [M], { dtype: 'i32' });
  const { gu, h } = ops.gateUp(x.t, wg.t, wu.t, offsets, { gather, gatherDiv: K });
  const sd = ops.swigluDownBackward(R.t, wd.t, offsets, gu);
  const dWd = ops.groupedGemmBackward(sd.h, wd.t, offsets, R.t, { dx: false }).dw!;
  const b = ops.gateUpBackward(x.t, wg.t, wu.t, offsets, sd.dgu, { gather, gatherDiv: K });
  // dx rows are per GEMM row: sum them per source row (the MoE's permuteBackward)
  const dxRows = b.dx!.toArray(), dx = new Array(S * d).fill(0);
  for (let i = 0; i < M; i++) for (let k = 0; k < d; k++) dx[Math.floor(gatherValues[i] / K) * d + k] += dxRows[i * d + k];
  const args = [x.values, wg.values, wu.values, wd.values];
  const analytic = [dx, Array.from(b.dwGate!.toArray()), Array.from(b.dwUp!.toArray()), Array.from(dWd.toArray())];
  const names = ['dx', 'dW_gate', 'dW_up', 'dW_down'];
  const eps = 1e-5;
  for (let a = 0; a < 4; a++) {
    const num: number[] = [];
    for (let i = 0; i < args[a].length; i++) {
      const p = args.map((v) => v.slice()), m = args.map((v) => v.slice());
      p[a][i] += eps;
      m[a][i] -= eps;
      num.push((loss(p[0], p[1], p[2], p[3]) - loss(m[0], m[1], m[2], m[3])) / (2 * eps));
    }
    t.ok(relErr(analytic[a], num) < 1e-4, `${names[a]}: relative error ${relErr(analytic[a], num).toExponential(2)} < 1e-4`);
  }
  for (const v of [offsets, gather, x.t, wg.t, wu.t, wd.t, R.t, gu, h, sd.dgu, sd.h, dWd, b.dx, b.dwGate, b.dwUp]) v?.dispose();
});

t.test('qkv: one GEMM for q, k, v, exactly the three grouped GEMMs', async (t) => {
  for (const dtype of ['f32', 'bf16'] as const)
    for (const [M, nq, nk, d] of [[13, 24, 8, 16], [5, 7, 3, 9], [1, 1, 1, 1]]) {
      const x = randomTensor([M, d], 1, { dtype }), wq = randomTensor([nq, d], 2, { dtype }), wk = randomTensor([nk, d], 3, { dtype }), wv = randomTensor([nk, d], 4, { dtype });
      const offsets = Tensor.from([0, M], [2], { dtype: 'i32' });
      const r = ops.qkv(x.t, wq.t, wk.t, wv.t, offsets);
      for (const [name, out, w] of [['q', r.q, wq.t], ['k', r.k, wk.t], ['v', r.v, wv.t]] as const) {
        const ref = ops.groupedGemm(x.t, w.reshape([1, ...w.shape]), offsets);
        t.same(out.shape, ref.shape, `${dtype} ${name}: shape`);
        exact(t, out.toArray(), ref.toArray(), `${dtype} M=${M} nq=${nq} nk=${nk} d=${d}: ${name}`);
        ref.dispose();
      }
      for (const v of [x.t, wq.t, wk.t, wv.t, offsets, r.q, r.k, r.v]) v.dispose();
    }
  const x = Tensor.zeros([4, 8]), offsets = Tensor.from([0, 4], [2], { dtype: 'i32' });
  throwsCode(t, () => ops.qkv(x, Tensor.zeros([8, 8]), Tensor.zeros([4, 8]), Tensor.zeros([2, 8]), offsets), 'XFT_SHAPE', /wv/, 'wv of another shape');
  throwsCode(t, () => ops.qkv(x, Tensor.zeros([8, 7]), Tensor.zeros([4, 8]), Tensor.zeros([4, 8]), offsets), 'XFT_SHAPE', /wq/, 'wq of another width');
  throwsCode(t, () => ops.qkv(x, Tensor.zeros([8, 8]), Tensor.zeros([4, 8]), Tensor.zeros([4, 8]), Tensor.from([0, 3], [2], { dtype: 'i32' })), 'XFT_VALUE', /offsets/, 'offsets not [0, M]');
  x.dispose();
  offsets.dispose();
});

t.test('the fused FFN ops: errors', async (t) => {
  const x = Tensor.zeros([4, 8]), w = Tensor.zeros([2, 6, 8]), wd = Tensor.zeros([2, 8, 6]);
  const offsets = Tensor.from([0, 2, 4], [3], { dtype: 'i32' });
  throwsCode(t, () => ops.gateUp(x, w, Tensor.zeros([2, 5, 8]), offsets), 'XFT_SHAPE', /wUp/, 'wUp of another shape');
  throwsCode(t, () => ops.gateUp(x, w, w.cast('bf16'), offsets), 'XFT_DTYPE', /wUp/, 'wUp of another dtype');
  throwsCode(t, () => ops.gateUp(x, Tensor.zeros([2, 6, 7]), Tensor.zeros([2, 6, 7]), offsets), 'XFT_SHAPE', /d differs/, 'd differs');
  throwsCode(t, () => ops.gateUp(x, w, w, offsets, { gatherDiv: 2 }), 'XFT_VALUE', /gatherDiv/, 'gatherDiv without gather');
  throwsCode(t, () => ops.gateUp(x, w, w, offsets, { gather: Tensor.zeros([4]) }), 'XFT_DTYPE', /gather/, 'an f32 gather');
  throwsCode(t, () => ops.gateUp(x, w, w, offsets, { gather: Tensor.zeros([4], { dtype: 'i32' }), gatherDiv: 0 }), 'XFT_VALUE', /gatherDiv/, 'gatherDiv 0');
  throwsCode(t, () => ops.gateUp(x, w, w, Tensor.from([0, 3, 2], [3], { dtype: 'i32' })), 'XFT_VALUE', /offsets/, 'decreasing offsets');
  throwsCode(t, () => ops.gateUp(x, w, w, offsets, { gather: Tensor.zeros([6], { dtype: 'i32' }) }), 'XFT_VALUE', /offsets must end at M = 6/, 'offsets against the gathered rows');
  const { gu } = ops.gateUp(x, w, w, offsets);
  throwsCode(t, () => ops.swigluDownBackward(x, wd, offsets, Tensor.zeros([4, 6])), 'XFT_SHAPE', /gu/, 'gu of [M, f]');
  throwsCode(t, () => ops.swigluDownBackward(x, w, offsets, gu), 'XFT_SHAPE', /wDown/, 'wDown transposed');
  throwsCode(t, () => ops.gateUpBackward(x, w, w, offsets, Tensor.zeros([4, 6])), 'XFT_SHAPE', /dgu/, 'dgu of [M, f]');
  throwsCode(t, () => ops.gateUpBackward(x, w, w, offsets, gu, { dw: [w] as unknown as [Tensor, Tensor] }), 'XFT_TYPE', /options\.dw/, 'one dW');
  throwsCode(t, () => ops.gateUpBackward(x, w, w, offsets, gu, { dx: Tensor.zeros([4, 7]) }), 'XFT_SHAPE', /options\.dx/, 'dx of another shape');
  throwsCode(t, () => ops.groupedGemmBackward(x, w, offsets, Tensor.zeros([4, 6]), { dx: Tensor.zeros([4, 8], { dtype: 'bf16' }) }), 'XFT_DTYPE', /options\.dx/, 'dx of another dtype');
  for (const v of [x, w, wd, offsets, gu]) v.dispose();
});
