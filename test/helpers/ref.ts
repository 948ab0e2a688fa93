// Plain TypeScript references (float64) for the ops, straight from ../shared/XFT.md, and test utilities.
import * as fs from 'node:fs';
import { Tensor, cudaAvailable } from '../../lib/index';

export const CUDA = cudaAvailable();
export const SKIP_NO_CUDA = CUDA ? false : 'no CUDA device (or a CPU-only build, or XFT_DEVICE=cpu)';

/**
 * The backend this run should have, decided without asking the backend (test/10 asserts it, so that
 * a GPU machine whose backend falls back to the CPU fails instead of skipping every CUDA test):
 * XFT_TEST_EXPECT_BACKEND (cpu|cuda; the emulated backend sets cuda), else cuda exactly when the addon
 * was compiled with CUDA, XFT_DEVICE is not 'cpu', and the NVIDIA driver's device node exists.
 */
export function expectedBackend(compiledWithCuda: boolean): 'cpu' | 'cuda' {
  const forced = process.env.XFT_TEST_EXPECT_BACKEND;
  if (forced === 'cpu' || forced === 'cuda') return forced;
  if (forced) throw new Error(`XFT_TEST_EXPECT_BACKEND must be cpu or cuda, got ${forced}`);
  return compiledWithCuda && process.env.XFT_DEVICE !== 'cpu' && fs.existsSync('/dev/nvidiactl') ? 'cuda' : 'cpu';
}

/** ‖a − b‖ / ‖b‖ (both as float64); NaN anywhere gives Infinity. */
export function relErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} != ${b.length}`);
  let num = 0, den = 0;
  for (let i = 0; i < a.length; i++) {
    if (Number.isNaN(a[i]) || Number.isNaN(b[i])) return Infinity;
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return den === 0 ? Math.sqrt(num) : Math.sqrt(num / den);
}

export function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

/** Seeded float64 generator (mulberry32) for host-side test data. */
export function rng(seed: number) {
  let s = seed >>> 0;
  const next = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 15), z | 1);
    z ^= z + Math.imul(z ^ (z >>> 7), z | 61);
    return ((z ^ (z >>> 14)) >>> 0) / 4294967296;
  };
  const normal = () => Math.sqrt(-2 * Math.log(1 - next())) * Math.cos(2 * Math.PI * next());
  return {
    next,
    normal,
    array: (n: number, scale = 1) => Float64Array.from({ length: n }, () => normal() * scale),
    int: (lo: number, hi: number) => lo + Math.floor(next() * (hi - lo)),
  };
}

/** bf16 round to nearest even, in TypeScript (independent of the native one). */
export function roundBf16(x: number): number {
  const f = new Float32Array([x]);
  const u = new Uint32Array(f.buffer);
  if (Number.isNaN(f[0])) return NaN;
  const lsb = (u[0] >>> 16) & 1;
  u[0] = ((u[0] + 0x7fff + lsb) >>> 16) << 16;
  return f[0];
}

export function f32(a: ArrayLike<number>): Float32Array {
  return Float32Array.from(a);
}

export function softmax(z: ArrayLike<number>): number[] {
  const m = Math.max(...Array.from(z));
  const e = Array.from(z, (v) => Math.exp(v - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

/** Indices of the s largest values, descending, ties toward the lower index. */
export function topIndices(z: ArrayLike<number>, s: number): number[] {
  return Array.from({ length: z.length }, (_, i) => i)
    .sort((a, b) => (z[b] - z[a]) || (a - b))
    .slice(0, s);
}

export interface RefRouting {
  experts: number[];
  weights: number[];
  counts: number[];
  offsets: number[];
  order: number[];
  importance: number[];
  load: number[];
}

/** XFT.md routing, per token, in float64. logits row-major [T, N]. */
export function refRoute(logits: ArrayLike<number>, T: number, N: number, K: number, normalize = true, shared = true): RefRouting {
  const S = shared ? K - 1 : K, E = shared ? N + 1 : N;
  const experts: number[] = [], weights: number[] = [];
  const importance = new Array(N).fill(0), load = new Array(N).fill(0);
  for (let t = 0; t < T; t++) {
    const z = Array.from(logits).slice(t * N, (t + 1) * N);
    const p = softmax(z);
    const sel = topIndices(z, S);
    // importance sums each selected expert's score: p with a shared expert (TopKUniversalBalanced*NoisyGate),
    // the top-K renormalized weight g without (TopKBalancedNoisyGate), as the reference's gates
    let score: number[];
    if (shared) {
      const p1 = p[sel[0]];
      const g = normalize ? softmax(sel.map((i) => p[i])).map((q) => p1 * q) : sel.map((i) => p[i]);
      experts.push(...sel.map((i) => i + 1), 0);
      weights.push(...g, 1 - p1);
      score = sel.map((i) => p[i]);
    } else {
      score = softmax(sel.map((i) => z[i]));
      experts.push(...sel);
      weights.push(...score);
    }
    sel.forEach((i, j) => {
      importance[i] += score[j];
      load[i] += 1;
    });
  }
  const counts = new Array(E).fill(0);
  for (const e of experts) counts[e]++;
  const offsets = [0];
  for (let e = 0; e < E; e++) offsets.push(offsets[e] + counts[e]);
  const pairs = experts.map((e, i) => ({ e, i }));
  pairs.sort((a, b) => a.e - b.e || a.i - b.i);
  return { experts, weights, counts, offsets, order: pairs.map((p) => p.i), importance, load };
}

/** y[r] = W[e] x[r] per group, float64. x [M, k], w [E, n, k]. */
export function refGroupedGemm(x: ArrayLike<number>, w: ArrayLike<number>, offsets: number[], M: number, n: number, k: number): number[] {
  const y = new Array(M * n).fill(0);
  for (let e = 0; e + 1 < offsets.length; e++)
    for (let r = offsets[e]; r < offsets[e + 1]; r++)
      for (let j = 0; j < n; j++) {
        let s = 0;
        for (let i = 0; i < k; i++) s += x[r * k + i] * w[(e * n + j) * k + i];
        y[r * n + j] = s;
      }
  return y;
}

/** Mixing coefficients of XFT.md: c_0 = λ, c_i = (1 − λ) softmax(α)_i; λ null: c = softmax(α). */
export function refCoefficients(alpha: ArrayLike<number>, sharedRate: number | null): number[] {
  const s = softmax(alpha);
  return sharedRate === null ? s : [sharedRate, ...s.map((v) => (1 - sharedRate) * v)];
}

export function refMerge(w: ArrayLike<number>, E: number, alpha: ArrayLike<number>, sharedRate: number | null): number[] {
  const c = refCoefficients(alpha, sharedRate);
  const n = w.length / E;
  return Array.from({ length: n }, (_, j) => c.reduce((acc, ce, e) => acc + ce * w[e * n + j], 0));
}

/** Random float tensor and its host values (already rounded to the dtype). */
export function randomTensor(shape: number[], seed: number, options: { dtype?: 'f32' | 'bf16'; device?: 'cpu' | 'cuda'; scale?: number } = {}) {
  const n = shape.reduce((a, b) => a * b, 1);
  const values = rng(seed).array(n, options.scale ?? 1);
  const t = Tensor.from(values, shape, { dtype: options.dtype ?? 'f32', device: options.device ?? 'cpu' });
  return { t, values: Array.from(t.toArray()) };
}

/** Offsets [E + 1] for a random partition of M rows into E groups (some empty when asked). */
export function randomOffsets(M: number, E: number, seed: number, emptyGroups = true): number[] {
  const r = rng(seed);
  const cuts = Array.from({ length: E - 1 }, () => r.int(0, M + 1)).sort((a, b) => a - b);
  if (!emptyGroups && M >= E) for (let i = 0; i < cuts.length; i++) cuts[i] = Math.round(((i + 1) * M) / E);
  return [0, ...cuts, M];
}

/** xft_normal(seed, i) of cuda/xft_math.h in float64: splitmix64 of (seed, i), then Box-Muller. */
export function refNormal(seed: bigint, i: number): number {
  const M = (v: bigint) => BigInt.asUintN(64, v);
  let z = M(seed * 0x9e3779b97f4a7c15n + BigInt(i) * 0xd1b54a32d192ed03n + 0x632be59bd9b4e019n);
  z = M((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n);
  z = M((z ^ (z >> 27n)) * 0x94d049bb133111ebn);
  const h = z ^ (z >> 31n);
  const u1 = (Number(h >> 40n) + 1) / 16777216, u2 = Number((h >> 16n) & 0xffffffn) / 16777216;
  return Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * u2);
}
