// The noisy top-k load estimate on the CPU: against a float64 reference written from Shazeer et al.
// (with the same noise, from a TypeScript port of the generator), gradients against finite
// differences of that reference (through the probabilities and the thresholds), the zero-noise limit
// (the estimate becomes the hard top-k counts of routing), edge cases, bf16, errors.
import t from 'tap';
import { Tensor, ops } from '../lib/index';
import { native } from '../lib/native';
import { refNormal, rng } from './helpers/ref';
import { close, throwsCode } from './helpers/check';

t.before(() => native.setPoison(true));
t.teardown(() => native.setPoison(false));

const softplus = (z: number) => (z > 20 ? z : Math.log1p(Math.exp(z)));

/** erfc with relative error < 1.2e-7 (Numerical Recipes' erfcc, Chebyshev fit). */
function erfc(x: number): number {
  const z = Math.abs(x), t = 1 / (1 + 0.5 * z);
  const r = t * Math.exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (0.27886807 +
    t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))));
  return x >= 0 ? r : 2 - r;
}
const Phi = (u: number) => 0.5 * erfc(-u / Math.SQRT2);

/** load [N] in float64 from clean, z [T*N] and the noise n [T*N]. */
function refLoad(clean: number[], z: number[], n: number[], T: number, N: number, k: number, eps: number): number[] {
  const load = new Array<number>(N).fill(0);
  for (let t = 0; t < T; t++) {
    const c = Array.from({ length: N }, (_, i) => softplus(z[t * N + i]) + eps);
    const noisy = Array.from({ length: N }, (_, i) => clean[t * N + i] + n[t * N + i] * c[i]);
    const order = [...noisy.keys()].sort((a, b) => noisy[b] - noisy[a] || a - b);
    const thrOut = noisy[order[k - 1]], thrIn = noisy[order[k]];
    for (let i = 0; i < N; i++) load[i] += Phi((clean[t * N + i] - (noisy[i] > thrIn ? thrIn : thrOut)) / c[i]);
  }
  return load;
}

function setup(T: number, N: number, seed: number, dtype: 'f32' | 'bf16' = 'f32') {
  const R = rng(seed);
  const clean = Array.from({ length: T * N }, () => R.normal());
  const z = Array.from({ length: T * N }, () => R.normal() - 1);
  const ct = Tensor.from(clean, [T, N], { dtype }), zt = Tensor.from(z, [T, N], { dtype });
  const noiseSeed = BigInt(seed) * 7919n + 3n;
  const noisy = ops.routerNoise(ct, zt, { seed: noiseSeed });
  const n = Array.from({ length: T * N }, (_, i) => refNormal(noiseSeed, i));
  const c = Array.from(ct.toArray()), zz = Array.from(zt.toArray()); // as the kernel sees them (bf16: rounded)
  return { ct, zt, noisy, clean: c, z: zz, n, noiseSeed };
}

t.test('load matches the float64 reference (k = 1, middle, N - 1; T = 1; many tokens)', async (t) => {
  for (const [T, N, k] of [[1, 2, 1], [5, 7, 5], [64, 7, 1], [64, 7, 6], [33, 15, 4], [200, 63, 10]] as const) {
    const s = setup(T, N, T * 31 + N);
    const { load, prob } = ops.loadEstimate(s.ct, s.zt, s.noisy, { k });
    close(t, load.toArray(), refLoad(s.clean, s.z, s.n, T, N, k, 0.01), 1e-5, `T=${T} N=${N} k=${k}`);
    const p = prob.toArray();
    t.ok(p.every((v) => v >= 0 && v <= 1), 'probabilities in [0, 1]');
    [s.ct, s.zt, s.noisy, load, prob].forEach((x) => x.dispose());
  }
});

t.test('no tokens: zero load', async (t) => {
  const e = Tensor.zeros([0, 5]);
  const { load } = ops.loadEstimate(e, e, e, { k: 2 });
  t.same(Array.from(load.toArray()), [0, 0, 0, 0, 0]);
});

t.test('with the noise scale going to 0, the estimate becomes the top-k counts', async (t) => {
  const T = 50, N = 7, k = 5, R = rng(4);
  const clean = Tensor.from(Array.from({ length: T * N }, () => R.normal()), [T, N]);
  const z = Tensor.full([T, N], -40);
  const noisy = ops.routerNoise(clean, z, { seed: 1, eps: 1e-7 });
  const { load } = ops.loadEstimate(clean, z, noisy, { k, eps: 1e-7 });
  const r = ops.routeShared(clean, { topK: k + 1 });
  close(t, load.toArray(), Array.from(r.load.toArray()).slice(0), 1e-6, 'load = routing counts of the normal experts');
});

t.test('gradients: dClean and dz against finite differences of the float64 reference', async (t) => {
  for (const [T, N, k] of [[3, 5, 2], [4, 7, 5], [2, 4, 1]] as const) {
    const s = setup(T, N, 100 + T * N);
    const R = rng(9);
    const w = Array.from({ length: N }, () => R.normal());
    const f = (clean: number[], z: number[]) => refLoad(clean, z, s.n, T, N, k, 0.01).reduce((a, v, i) => a + w[i] * v, 0);
    const h = 1e-5;
    const fdClean = s.clean.map((_, j) => {
      const p = [...s.clean], m = [...s.clean];
      p[j] += h;
      m[j] -= h;
      return (f(p, s.z) - f(m, s.z)) / (2 * h);
    });
    const fdZ = s.z.map((_, j) => {
      const p = [...s.z], m = [...s.z];
      p[j] += h;
      m[j] -= h;
      return (f(s.clean, p) - f(s.clean, m)) / (2 * h);
    });
    const dLoad = Tensor.from(w, [N]);
    const g = ops.loadEstimateBackward(s.ct, s.zt, s.noisy, dLoad, { k, seed: s.noiseSeed });
    close(t, g.dClean.toArray(), fdClean, 1e-4, `T=${T} N=${N} k=${k}: dClean (thresholds included)`);
    close(t, g.dz.toArray(), fdZ, 1e-4, `T=${T} N=${N} k=${k}: dz`);
  }
});

t.test('bf16 inputs', async (t) => {
  const T = 40, N = 7, k = 5;
  const s = setup(T, N, 77, 'bf16');
  const { load } = ops.loadEstimate(s.ct, s.zt, s.noisy, { k });
  // the kernel reads the bf16-rounded noisy logits; the reference recomputes them in float64
  close(t, load.toArray(), refLoad(s.clean, s.z, s.n, T, N, k, 0.01), 1e-2, 'bf16 load');
  const g = ops.loadEstimateBackward(s.ct, s.zt, s.noisy, Tensor.ones([N]), { k, seed: s.noiseSeed });
  t.equal(g.dClean.dtype, 'bf16');
  t.equal(g.dz.dtype, 'bf16');
});

t.test('errors name the argument', async (t) => {
  const a = Tensor.zeros([4, 7]), b = Tensor.zeros([4, 6]), h = Tensor.zeros([4, 7], { dtype: 'bf16' });
  throwsCode(t, () => ops.loadEstimate(a, a, a, { k: 7 }), 'XFT_VALUE', /k/, 'k = N');
  throwsCode(t, () => ops.loadEstimate(a, a, a, { k: 0 }), 'XFT_VALUE', /k/, 'k = 0');
  throwsCode(t, () => ops.loadEstimate(a, b, a, { k: 2 }), 'XFT_SHAPE', /z/, 'z of another shape');
  throwsCode(t, () => ops.loadEstimate(a, a, h, { k: 2 }), 'XFT_DTYPE', /noisy/, 'noisy of another dtype');
  throwsCode(t, () => ops.loadEstimate(Tensor.zeros([4, 1]), Tensor.zeros([4, 1]), Tensor.zeros([4, 1]), { k: 1 }), 'XFT_SHAPE', /N/, 'one expert');
  throwsCode(t, () => ops.loadEstimateBackward(a, a, a, Tensor.zeros([6]), { k: 2, seed: 1 }), 'XFT_SHAPE', /dLoad/, 'dLoad of another size');
});

/** prob [T*N] in float64: Φ((clean − threshold) / scale) per token and expert, the noise from n. */
function refProb(clean: number[], z: number[], n: number[], T: number, N: number, k: number, eps: number): number[] {
  const prob: number[] = [];
  for (let t = 0; t < T; t++) {
    const c = Array.from({ length: N }, (_, i) => softplus(z[t * N + i]) + eps);
    const noisy = Array.from({ length: N }, (_, i) => clean[t * N + i] + n[t * N + i] * c[i]);
    const order = [...noisy.keys()].sort((a, b) => noisy[b] - noisy[a] || a - b);
    const thrOut = noisy[order[k - 1]], thrIn = noisy[order[k]];
    for (let i = 0; i < N; i++) prob.push(Phi((clean[t * N + i] - (noisy[i] > thrIn ? thrIn : thrOut)) / c[i]));
  }
  return prob;
}

t.test('prob, per token and expert, matches the float64 reference (f32 and bf16)', async (t) => {
  for (const [T, N, k, dtype] of [[5, 7, 5, 'f32'], [64, 7, 1, 'f32'], [33, 15, 4, 'f32'], [40, 7, 5, 'bf16'], [30, 15, 10, 'bf16']] as const) {
    const s = setup(T, N, T * 13 + N + k, dtype);
    const { load, prob } = ops.loadEstimate(s.ct, s.zt, s.noisy, { k });
    t.same(prob.shape, [T, N], `${dtype} T=${T} N=${N} k=${k}: prob [T, N]`);
    const want = refProb(s.clean, s.z, s.n, T, N, k, 0.01);
    // bf16: the kernel reads the bf16-rounded noisy logits, the reference recomputes them in float64
    close(t, prob.toArray(), want, dtype === 'f32' ? 1e-5 : 1e-2, `${dtype} T=${T} N=${N} k=${k}: prob`);
    const p = prob.toArray(), l = load.toArray();
    const sums = Array.from({ length: N }, (_, i) => Array.from({ length: T }, (_, r) => p[r * N + i]).reduce((a, b) => a + b, 0));
    close(t, l, sums, 1e-6, `${dtype} T=${T} N=${N} k=${k}: load is prob summed over tokens`);
    [s.ct, s.zt, s.noisy, load, prob].forEach((x) => x.dispose());
  }
});

t.test('bf16 backward: dClean and dz against finite differences of the float64 reference', async (t) => {
  for (const [T, N, k] of [[6, 5, 2], [8, 7, 5]] as const) {
    const s = setup(T, N, 300 + T * N, 'bf16');
    const R = rng(19);
    const w = Array.from({ length: N }, () => R.normal());
    const f = (clean: number[], z: number[]) => refLoad(clean, z, s.n, T, N, k, 0.01).reduce((a, v, i) => a + w[i] * v, 0);
    const h = 1e-5;
    const fd = (base: number[], at: (v: number[]) => number) => base.map((_, j) => {
      const p = [...base], m = [...base];
      p[j] += h;
      m[j] -= h;
      return (at(p) - at(m)) / (2 * h);
    });
    const fdClean = fd(s.clean, (c) => f(c, s.z)), fdZ = fd(s.z, (z) => f(s.clean, z));
    const g = ops.loadEstimateBackward(s.ct, s.zt, s.noisy, Tensor.from(w, [N]), { k, seed: s.noiseSeed });
    t.equal(g.dClean.dtype, 'bf16');
    close(t, g.dClean.toArray(), fdClean, 2e-2, `bf16 T=${T} N=${N} k=${k}: dClean`);
    close(t, g.dz.toArray(), fdZ, 2e-2, `bf16 T=${T} N=${N} k=${k}: dz`);
  }
});
