// The layer kernels (embedding, rmsnorm, rope, swiglu, elementwise) on CUDA against their CPU twins,
// on fresh random inputs (the seed is printed), with every new device allocation poisoned (NaN / -1)
// so that an output element left unwritten fails. Tolerances: fp32 1e-5, bf16 1e-2 relative
// (‖cuda − cpu‖ / ‖cpu‖). Shapes cover the 16-byte vector paths, the scalar fallbacks (sizes that are
// not a multiple of the vector width), tails, empty inputs and training-size tensors; the deterministic
// reductions are checked bit for bit run to run.
import t from 'tap';
import { Tensor, ops, type DType } from '../lib/index';
import { native } from '../lib/native';
import { SKIP_NO_CUDA, rng } from './helpers/ref';
import { close } from './helpers/check';
import { TOL, pair, seed, setupGpuTest } from './helpers/gpu';

const FLOATS = ['f32', 'bf16'] as const;
setupGpuTest(t);

type Test = tap.Test;

/** Bit-for-bit equality (NaN never equal: unwritten poisoned outputs fail), fast on large arrays. */
function exact(t: Test, got: ArrayLike<number>, want: ArrayLike<number>, what: string): void {
  if (got.length !== want.length) {
    t.fail(`${what}: ${got.length} values, expected ${want.length}`);
    return;
  }
  let first = -1, count = 0;
  for (let i = 0; i < got.length; i++)
    if (!(got[i] === want[i])) {
      if (first < 0) first = i;
      count++;
    }
  t.ok(count === 0, `${what}: ${count} of ${got.length} differ` + (first >= 0 ? ` (first [${first}]: ${got[first]}, expected ${want[first]})` : ''));
}


/** Random ids in [0, V) (or all equal to `only`) on both devices. */
function idsPair(shape: number[], V: number, only?: number) {
  const r = rng(seed());
  const n = shape.reduce((a, b) => a * b, 1);
  const cpu = Tensor.from(Array.from({ length: n }, () => only ?? r.int(0, V)), shape, { dtype: 'i32' });
  return { cpu, cuda: cpu.to('cuda') };
}

function disposeAll(...xs: (Tensor | null | undefined | { cpu: Tensor; cuda: Tensor })[]) {
  for (const x of xs) {
    if (!x) continue;
    if (x instanceof Tensor) x.dispose();
    else {
      x.cpu.dispose();
      x.cuda.dispose();
    }
  }
}


t.test('embedding: CUDA vs CPU', { skip: SKIP_NO_CUDA }, async (t) => {
  const cases: { shape: number[]; V: number; d: number; only?: number; what: string }[] = [
    { shape: [1], V: 1, d: 1, what: 'one id, d = 1' },
    { shape: [37], V: 11, d: 24, what: 'd = 24' },
    { shape: [3, 41], V: 50, d: 130, what: 'd = 130 (scalar path)' },
    { shape: [8, 1024], V: 32000, d: 64, what: '8192 tokens, V = 32000' },
    { shape: [4, 512], V: 1000, d: 2048, what: 'd = 2048' },
    { shape: [5000], V: 100, d: 2048, only: 7, what: 'every token the same id (one long run)' },
    { shape: [0], V: 5, d: 8, what: 'no tokens' },
  ];
  for (const dtype of FLOATS)
    for (const c of cases) {
      const what = `${dtype} ${c.what}`;
      const ids = idsPair(c.shape, c.V, c.only), table = pair([c.V, c.d], dtype);
      const a = ops.embedding(ids.cpu, table.cpu), b = ops.embedding(ids.cuda, table.cuda);
      exact(t, b.toArray(), a.toArray(), `${what}: rows`);
      const dOut = pair([...c.shape, c.d], dtype);
      const ga = ops.embeddingBackward(ids.cpu, dOut.cpu, c.V), gb = ops.embeddingBackward(ids.cuda, dOut.cuda, c.V);
      // both sum each row from zero in token order, then add: the same fp32 operations
      exact(t, gb.toArray(), ga.toArray(), `${what}: dTable bit-identical to the CPU`);
      const into = pair([c.V, c.d], 'f32');
      ops.embeddingBackward(ids.cpu, dOut.cpu, c.V, { into: into.cpu });
      ops.embeddingBackward(ids.cuda, dOut.cuda, c.V, { into: into.cuda });
      exact(t, into.cuda.toArray(), into.cpu.toArray(), `${what}: dTable accumulated`);
      const again = ops.embeddingBackward(ids.cuda, dOut.cuda, c.V);
      exact(t, again.toArray(), gb.toArray(), `${what}: deterministic run to run`);
      disposeAll(ids, table, a, b, dOut, ga, gb, into, again);
    }
});

t.test('embedding on CUDA: out-of-range ids give zero rows, no gradient, and XFT_INDEX at the next sync', { skip: SKIP_NO_CUDA }, async (t) => {
  const V = 4, d = 9;
  const ids = Tensor.from([1, -1, 4, 2147483647, 3, -2147483648], [6], { dtype: 'i32', device: 'cuda' });
  const table = Tensor.from(Array.from({ length: V * d }, (_, i) => i + 1), [V, d], { device: 'cuda' });
  const outT = ops.embedding(ids, table);
  t.throws(() => outT.toArray(), { code: 'XFT_INDEX', message: /ids\[1\] = -1/ }, 'the first bad id is reported once');
  const out = outT.toArray();
  const row = (v: number) => Array.from({ length: d }, (_, c) => v * d + c + 1);
  const zero = new Array(d).fill(0);
  exact(t, out, [...row(1), ...zero, ...zero, ...zero, ...row(3), ...zero], 'zero rows for invalid ids');
  const dTableT = ops.embeddingBackward(ids, Tensor.ones([6, d], { device: 'cuda' }), V);
  t.throws(() => dTableT.toArray(), { code: 'XFT_INDEX' }, 'backward: reported at the next sync');
  exact(t, dTableT.toArray(), [...zero, ...new Array(d).fill(1), ...zero, ...new Array(d).fill(1)], 'invalid ids skipped');
});

t.test('rmsnorm: CUDA vs CPU', { skip: SKIP_NO_CUDA }, async (t) => {
  const shapes: [number, number][] = [[1, 1], [37, 48], [1000, 2050], [2, 130], [4096, 2048], [3, 8192], [9000, 64], [0, 64]];
  for (const dtype of FLOATS)
    for (const wdtype of FLOATS)
      for (const [R, d] of shapes) {
        const what = `x ${dtype} w ${wdtype} R=${R} d=${d}`;
        const x = pair([R, d], dtype, { std: 2 }), w = pair([d], wdtype), dy = pair([R, d], dtype);
        const eps = d === 1 ? 0.5 : 1e-6;
        const a = ops.rmsnorm(x.cpu, w.cpu, { eps }), b = ops.rmsnorm(x.cuda, w.cuda, { eps });
        close(t, b.y.toArray(), a.y.toArray(), TOL[dtype], `${what}: y`);
        close(t, b.rstd.toArray(), a.rstd.toArray(), TOL.f32, `${what}: rstd`);
        const ga = ops.rmsnormBackward(x.cpu, w.cpu, a.rstd, dy.cpu), gb = ops.rmsnormBackward(x.cuda, w.cuda, b.rstd, dy.cuda);
        close(t, gb.dx.toArray(), ga.dx.toArray(), TOL[dtype], `${what}: dx`);
        close(t, gb.dw!.toArray(), ga.dw!.toArray(), TOL.f32, `${what}: dw`);
        const into = pair([d], 'f32');
        ops.rmsnormBackward(x.cpu, w.cpu, a.rstd, dy.cpu, { dw: into.cpu });
        ops.rmsnormBackward(x.cuda, w.cuda, b.rstd, dy.cuda, { dw: into.cuda });
        close(t, into.cuda.toArray(), into.cpu.toArray(), TOL.f32, `${what}: dw accumulated`);
        const again = ops.rmsnormBackward(x.cuda, w.cuda, b.rstd, dy.cuda);
        exact(t, again.dw!.toArray(), gb.dw!.toArray(), `${what}: dw deterministic run to run`);
        const noDw = ops.rmsnormBackward(x.cuda, w.cuda, b.rstd, dy.cuda, { dw: false });
        exact(t, noDw.dx.toArray(), gb.dx.toArray(), `${what}: dx without dw`);
        disposeAll(x, w, dy, a.y, a.rstd, b.y, b.rstd, ga.dx, ga.dw, gb.dx, gb.dw, into, again.dx, again.dw, noDw.dx);
      }
});

t.test('rope: CUDA vs CPU, in place', { skip: SKIP_NO_CUDA }, async (t) => {
  const cases: { B: number; T: number; H: number; hd: number; theta?: number; factor?: number }[] = [
    { B: 2, T: 7, H: 3, hd: 16 },
    { B: 1, T: 33, H: 2, hd: 6 },
    { B: 3, T: 5, H: 9, hd: 64 },
    { B: 1, T: 3, H: 1, hd: 2 },
    { B: 4, T: 512, H: 16, hd: 128 },
    { B: 1, T: 4096, H: 2, hd: 128, theta: 100000, factor: 4 },
    { B: 2, T: 16, H: 4, hd: 512, theta: 500000 },
    { B: 0, T: 4, H: 2, hd: 8 },
  ];
  for (const dtype of FLOATS)
    for (const c of cases) {
      const what = `${dtype} B=${c.B} T=${c.T} H=${c.H} hd=${c.hd}`;
      const opts = { seqLen: c.T, headDim: c.hd, theta: c.theta, scalingFactor: c.factor };
      const x = pair([c.B * c.T, c.H * c.hd], dtype);
      const a = ops.rope(x.cpu, opts), b = ops.rope(x.cuda, opts);
      close(t, b.toArray(), a.toArray(), TOL[dtype], `${what}: forward`);
      const da = ops.ropeBackward(x.cpu, opts), db = ops.ropeBackward(x.cuda, opts);
      close(t, db.toArray(), da.toArray(), TOL[dtype], `${what}: backward`);
      const inPlace = x.cuda.clone();
      ops.rope(inPlace, { ...opts, out: inPlace });
      exact(t, inPlace.toArray(), b.toArray(), `${what}: in place = out of place`);
      ops.ropeBackward(inPlace, { ...opts, out: inPlace });
      close(t, inPlace.toArray(), x.cpu.toArray(), dtype === 'f32' ? 1e-5 : 2e-2, `${what}: backward undoes forward`);
      disposeAll(x, a, b, da, db, inPlace);
    }
});

t.test('swiglu: CUDA vs CPU', { skip: SKIP_NO_CUDA }, async (t) => {
  for (const dtype of FLOATS)
    for (const shape of [[1], [37, 41], [2048, 5504], [3, 5, 7], [0, 5]]) {
      const what = `${dtype} ${JSON.stringify(shape)}`;
      const g = pair(shape, dtype, { std: 3 }), u = pair(shape, dtype), dh = pair(shape, dtype);
      const a = ops.swiglu(g.cpu, u.cpu), b = ops.swiglu(g.cuda, u.cuda);
      close(t, b.toArray(), a.toArray(), TOL[dtype], `${what}: h`);
      const ga = ops.swigluBackward(g.cpu, u.cpu, dh.cpu), gb = ops.swigluBackward(g.cuda, u.cuda, dh.cuda);
      close(t, gb.dg.toArray(), ga.dg.toArray(), TOL[dtype], `${what}: dg`);
      close(t, gb.du.toArray(), ga.du.toArray(), TOL[dtype], `${what}: du`);
      disposeAll(g, u, dh, a, b, ga.dg, ga.du, gb.dg, gb.du);
    }
});

t.test('elementwise: CUDA vs CPU', { skip: SKIP_NO_CUDA }, async (t) => {
  for (const dtype of FLOATS)
    for (const n of [1, 7, 4099, 1000003]) {
      const what = `${dtype} n=${n}`;
      const a = pair([n], dtype), b = pair([n], dtype);
      const sa = ops.add(a.cpu, b.cpu), sb = ops.add(a.cuda, b.cuda);
      close(t, sb.toArray(), sa.toArray(), TOL[dtype], `${what}: add`);
      const ya = ops.tanh(a.cpu), yb = ops.tanh(a.cuda);
      close(t, yb.toArray(), ya.toArray(), TOL[dtype], `${what}: tanh`);
      const ta = ops.tanhBackward(ya, b.cpu), tb = ops.tanhBackward(yb, b.cuda);
      close(t, tb.toArray(), ta.toArray(), TOL[dtype], `${what}: tanh backward`);
      const z = pair([n], dtype, { std: 3 });
      const s = BigInt(seed());
      const na = ops.routerNoise(a.cpu, z.cpu, { seed: s }), nb = ops.routerNoise(a.cuda, z.cuda, { seed: s });
      close(t, nb.toArray(), na.toArray(), TOL[dtype], `${what}: router noise`);
      const ba = ops.routerNoiseBackward(z.cpu, b.cpu, { seed: s }), bb = ops.routerNoiseBackward(z.cuda, b.cuda, { seed: s });
      exact(t, bb.dClean.toArray(), ba.dClean.toArray(), `${what}: router noise dClean`);
      close(t, bb.dz.toArray(), ba.dz.toArray(), TOL[dtype], `${what}: router noise dz`);
      ops.add(a.cuda, b.cuda, { out: a.cuda });
      exact(t, a.cuda.toArray(), sb.toArray(), `${what}: add in place`);
      disposeAll(a, b, sa, sb, ya, yb, ta, tb, z, na, nb, ba.dClean, ba.dz, bb.dClean, bb.dz);
    }
  for (const xd of FLOATS)
    for (const yd of FLOATS)
      for (const [alpha, beta] of [[1, 1], [0.5, -2], [3, 0]])
        for (const n of [5, 4099, 1000003]) {
          const what = `axpby x ${xd} y ${yd} alpha=${alpha} beta=${beta} n=${n}`;
          const x = pair([n], xd);
          // beta = 0: y starts poisoned (NaN) and must not be read
          const y = beta === 0 ? { cpu: Tensor.full([n], NaN, { dtype: yd }), cuda: Tensor.empty([n], { dtype: yd, device: 'cuda' }) } : pair([n], yd);
          ops.axpby(alpha, x.cpu, beta, y.cpu);
          ops.axpby(alpha, x.cuda, beta, y.cuda);
          close(t, y.cuda.toArray(), y.cpu.toArray(), TOL[xd === 'bf16' || yd === 'bf16' ? 'bf16' : 'f32'], what);
          disposeAll(x, y);
        }
});

t.test('sumSquares: CUDA vs CPU, deterministic', { skip: SKIP_NO_CUDA }, async (t) => {
  const lists: [number[], DType][][] = [
    [[[1], 'f32']],
    [[[3, 5], 'f32'], [[17], 'bf16'], [[0], 'f32'], [[2048, 2048], 'bf16'], [[1000003], 'f32']],
    Array.from({ length: 150 }, (_, i) => [[i * 37 + 1], i % 3 ? 'f32' : 'bf16'] as [number[], DType]),
  ];
  for (const [li, list] of lists.entries()) {
    const ts = list.map(([shape, dtype]) => pair(shape, dtype));
    const a = ops.sumSquares(ts.map((p) => p.cpu)), b = ops.sumSquares(ts.map((p) => p.cuda));
    close(t, b.toArray(), a.toArray(), TOL.f32, `list ${li} (${list.length} tensors): sum of squares`);
    const again = ops.sumSquares(ts.map((p) => p.cuda));
    exact(t, again.toArray(), b.toArray(), `list ${li}: bit-identical run to run`);
    disposeAll(...ts, a, b, again);
  }
});

t.test('layer kernels leave the pool as they found it', { skip: SKIP_NO_CUDA }, async (t) => {
  native.synchronize();
  const before = native.memoryStats();
  const dev = { device: 'cuda' as const };
  const ids = Tensor.uniform([2048], { ...dev, dtype: 'i32', low: 0, high: 500, seed: 1 });
  const table = Tensor.randn([500, 256], { ...dev, dtype: 'bf16', seed: 2 });
  const x = Tensor.randn([2048, 256], { ...dev, dtype: 'bf16', seed: 3 }), w = Tensor.ones([256], dev);
  for (let i = 0; i < 20; i++) {
    const e = ops.embedding(ids, table);
    const g = ops.embeddingBackward(ids, e, 500);
    const n = ops.rmsnorm(x, w);
    const b = ops.rmsnormBackward(x, w, n.rstd, x);
    const r = ops.rope(x, { seqLen: 512, headDim: 64 });
    const s = ops.sumSquares([x, g, b.dw!]);
    for (const v of [e, g, n.y, n.rstd, b.dx, b.dw, r, s]) v?.dispose();
  }
  for (const v of [ids, table, x, w]) v.dispose();
  native.synchronize();
  const after = native.memoryStats();
  t.equal(after.cudaTensors, before.cudaTensors, 'no tensor left');
  t.equal(after.poolUsedBytes, before.poolUsedBytes, 'scratch memory returned to the pool');
});
