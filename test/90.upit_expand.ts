// UpIT stage 2, expert expansion (lib/upit/expand.ts, the expand ops lib/upit/ops.ts, kernels cuda/expand.cu with
// the CPU twin binding/cpu/expand.cc): the ops against plain-TypeScript references written from the math in
// cuda/expand.cu (the dots bit for bit in the documented reduction order, the child bit for bit with its
// counter-based masks), UPIT.md §7.2 (crossover of identical parents, α = 1, DARE statistics) and §7.3
// (similarity, parent choice, rounds, determinism, resume), and bad arguments.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Tensor, XftError } from '../lib/index';
import { tinyConfig } from '../lib/config';
import { createDense } from '../lib/xft';
import { loadModel, saveModel } from '../lib/checkpoint';
import { SafetensorsReader } from '../lib/safetensors';
import { cosineFromDots, dare, dareMerge, deltaDots } from '../lib/upit/ops';
import { expandPool } from '../lib/upit/expand';
import { exact, throwsCode } from './helpers/check';
import { rng } from './helpers/ref';

// ---- references, from cuda/expand.cu's comment ----

const U64 = (v: bigint) => BigInt.asUintN(64, v);
function refHash(seed: bigint, index: bigint): bigint {
  let z = U64(seed * 0x9e3779b97f4a7c15n + index * 0xd1b54a32d192ed03n + 0x632be59bd9b4e019n);
  z = U64((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n);
  z = U64((z ^ (z >> 27n)) * 0x94d049bb133111ebn);
  return z ^ (z >> 31n);
}
/** keep mask of parent slot `slot` (0: a, 1: b) of a tensor: u = 53 bits / 2^53 >= p */
function refMask(seed: bigint, tensorId: number, slot: number, n: number, p: number): boolean[] {
  const stream = refHash(refHash(seed, BigInt(tensorId)), BigInt(slot));
  return Array.from({ length: n }, (_, i) => Number(refHash(stream, BigInt(i)) >> 11n) / 2 ** 53 >= p);
}
/** fp64 -> bf16 value, one rounding to nearest even (by the bf16 grid around x). */
function refBf16(x: number): number {
  if (Number.isNaN(x) || x === 0 || !Number.isFinite(x)) return x;
  const ax = Math.abs(x);
  let e = Math.floor(Math.log2(ax));
  while (2 ** e > ax) e--;
  while (2 ** (e + 1) <= ax) e++;
  const ulp = 2 ** (Math.max(e, -126) - 7), q = ax / ulp, fl = Math.floor(q), d = q - fl;
  const r = d > 0.5 || (d === 0.5 && fl % 2 === 1) ? fl + 1 : fl;
  const v = r * ulp;
  return Math.sign(x) * (v >= 2 ** 128 ? Infinity : v);
}
/** The child of cuda/expand.cu: round(θ0 + (α·t_a + β·t_b)), t = m (x − θ0) / (1 − p), in fp64. */
function refChild(b0: ArrayLike<number>, a: ArrayLike<number>, b: ArrayLike<number>, alpha: number, beta: number, p: number, seed: bigint, tensorId: number, dtype: 'f32' | 'bf16') {
  const n = b0.length, ma = refMask(seed, tensorId, 0, n, p), mb = refMask(seed, tensorId, 1, n, p), keep = 1 - p;
  return Array.from({ length: n }, (_, i) => {
    const ta = ma[i] ? (a[i] - b0[i]) / keep : 0, tb = mb[i] ? (b[i] - b0[i]) / keep : 0;
    const y = b0[i] + (alpha * ta + beta * tb);
    return dtype === 'bf16' ? refBf16(y) : Math.fround(y);
  });
}
/** The delta dots in the kernels' order: G·256 lanes (G = ⌈⌈n/4⌉/256⌉ <= 256) over groups of 4, then xor butterflies per warp and block. */
function refDot(b0: ArrayLike<number>, a: ArrayLike<number>, o: ArrayLike<number>): number {
  const BLOCK = 256, GROUP = 4, n = b0.length, GRID = Math.min(256, Math.max(1, Math.ceil(Math.ceil(n / GROUP) / BLOCK))), LANES = BLOCK * GRID;
  const lanes = new Float64Array(LANES);
  for (let i = 0; i < n; i++) {
    const lane = Math.floor(i / GROUP) % LANES;
    lanes[lane] += (a[i] - b0[i]) * (o[i] - b0[i]);
  }
  const w = new Float64Array(32), tmp = new Float64Array(32);
  const warp = (v: ArrayLike<number>, at: number) => {
    for (let l = 0; l < 32; l++) w[l] = v[at + l];
    for (let s = 16; s > 0; s >>= 1) {
      for (let l = 0; l < 32; l++) tmp[l] = w[l] + w[l ^ s];
      w.set(tmp);
    }
    return w[0];
  };
  const block = (v: ArrayLike<number>, at: number) => {
    const red = new Float64Array(32);
    for (let k = 0; k < BLOCK / 32; k++) red[k] = warp(v, at + k * 32);
    return warp(red, 0);
  };
  const partial = new Float64Array(BLOCK);
  for (let b = 0; b < GRID; b++) partial[b] = block(lanes, b * BLOCK);
  return block(partial, 0);
}

const vals = (x: Tensor) => Array.from(x.toArray());
const randomT = (n: number, seed: number, dtype: 'f32' | 'bf16' = 'f32', scale = 1) => Tensor.randn([n], { seed, dtype, std: scale });

// ---- the ops ----

t.test('deltaDots: the documented reduction order bit for bit, f32 and bf16, tails and lane wrap-around, chunks of others', async (t) => {
  for (const dtype of ['f32', 'bf16'] as const)
    for (const n of [1, 7, 1000, 1025, 5000, 4 * 65536 + 3]) {
      const b0 = randomT(n, 1, dtype), a = randomT(n, 2, dtype), others = Array.from({ length: n < 1000 ? 10 : 2 }, (_, q) => randomT(n, 10 + q, dtype));
      const got = deltaDots(b0, a, [a, ...others]);
      const B = vals(b0), A = vals(a);
      const want = [refDot(B, A, A), ...others.map((o) => refDot(B, A, vals(o)))];
      exact(t, got, want, `${dtype} n=${n}: ${others.length + 1} products (over ${Math.ceil((others.length + 1) / 8)} passes) equal the reference's bits`);
      let plain = 0;
      for (let i = 0; i < n; i++) plain += (A[i] - B[i]) ** 2;
      t.ok(Math.abs(got[0] - plain) <= 1e-12 * plain, `${dtype} n=${n}: the squared norm agrees with a plain sum`);
      [b0, a, ...others].forEach((x) => x.dispose());
    }
  const z = Tensor.zeros([0]);
  t.same(Array.from(deltaDots(z, z, [z])), [0], 'no elements: 0');
  t.same(Array.from(deltaDots(z, z, [])), [], 'no others: an empty result');
  z.dispose();
});

t.test('deltaDots: similarity is symmetric, S(a, a) = 1, scale-invariant, the same bits on any thread count', async (t) => {
  const n = 5000, b0 = randomT(n, 3), a = randomT(n, 4), b = randomT(n, 5);
  const [aa, ab] = deltaDots(b0, a, [a, b]), [ba, bb] = deltaDots(b0, b, [a, b]);
  t.equal(ab, ba, '<Δa, Δb> = <Δb, Δa> bit for bit');
  t.equal(cosineFromDots(aa, aa, aa), 1, 'S(a, a) = 1 exactly');
  const s = cosineFromDots(ab, aa, bb);
  t.ok(s > -1 && s < 1, `S(a, b) = ${s} in (-1, 1)`);
  // Δ scaled by 2 (exact in fp32 with a zero base) and by 3 (rounded)
  const zero = Tensor.zeros([n]), A = vals(a), B = vals(b);
  for (const k of [2, 3]) {
    const ka = Tensor.from(A.map((v) => v * k), [n]);
    const [d1, n1, n2] = [...deltaDots(zero, ka, [b]), ...deltaDots(zero, ka, [ka]), ...deltaDots(zero, b, [b])];
    const [e1, m1] = [...deltaDots(zero, a, [b]), ...deltaDots(zero, a, [a])];
    const s1 = cosineFromDots(d1, n1, n2), s0 = cosineFromDots(e1, m1, n2);
    if (k === 2) t.equal(s1, s0, 'S(2a, b) = S(a, b) exactly');
    else t.ok(Math.abs(s1 - s0) < 1e-6, `S(3a, b) = S(a, b) within the fp32 rounding of 3a (${s1} vs ${s0})`);
    ka.dispose();
  }
  const threads = process.env.XFT_NUM_THREADS;
  try {
    const big = 4 * 65536 + 17, x0 = randomT(big, 6), x1 = randomT(big, 7), x2 = randomT(big, 8);
    const runs = ['1', '2', '3'].map((n) => {
      process.env.XFT_NUM_THREADS = n;
      return Array.from(deltaDots(x0, x1, [x1, x2]));
    });
    t.same(runs[1], runs[0], '2 threads: the bits of 1');
    t.same(runs[2], runs[0], '3 threads: the bits of 1');
    [x0, x1, x2].forEach((x) => x.dispose());
  } finally {
    if (threads === undefined) delete process.env.XFT_NUM_THREADS;
    else process.env.XFT_NUM_THREADS = threads;
  }
  [b0, a, b, zero].forEach((x) => x.dispose());
});

t.test('dareMerge: bit for bit the reference (masks, fp64 math, one rounding), f32 and bf16 in and out', async (t) => {
  const n = 3001;
  for (const dtype of ['f32', 'bf16'] as const)
    for (const out of ['f32', 'bf16'] as const)
      for (const [alpha, p, seed, id] of [[0.37, 0.5, 11, 0], [0.9, 0.3, 12, 5], [0.5, 0, 13, 2 ** 32 - 1], [1, 0.9, 2 ** 53 - 1, 7]] as const) {
        const b0 = randomT(n, 20, dtype, 0.02), a = randomT(n, 21, dtype, 0.02), b = randomT(n, 22, dtype, 0.02);
        const c = dareMerge(b0, a, b, { alpha, beta: 1 - alpha, dropRate: p, seed, tensorId: id, dtype: out });
        t.equal(c.dtype, out);
        exact(t, vals(c), refChild(vals(b0), vals(a), vals(b), alpha, 1 - alpha, p, BigInt(seed), id, out), `${dtype} -> ${out}, α ${alpha}, p ${p}, seed ${seed}, tensor ${id}`);
        [b0, a, b, c].forEach((x) => x.dispose());
      }
  // a bigint seed of 64 bits and the output dtype defaulting to the inputs'
  const b0 = randomT(100, 30, 'bf16'), a = randomT(100, 31, 'bf16');
  const seed = (1n << 64n) - 5n, c = dareMerge(b0, a, a, { alpha: 0.25, beta: 0.75, dropRate: 0.5, seed, tensorId: 3 });
  t.equal(c.dtype, 'bf16', 'output dtype: the inputs\'');
  exact(t, vals(c), refChild(vals(b0), vals(a), vals(a), 0.25, 0.75, 0.5, seed, 3, 'bf16'), 'a 64-bit bigint seed');
  [b0, a, c].forEach((x) => x.dispose());
  // rounding once: a value half-way between two bf16 numbers after fp32 rounding, not before
  const x = 1 + 2 ** -8 + 2 ** -30; // fp32 rounds it to 1 + 2^-8 (a tie for bf16: even -> 1); once: 1 + 2^-7
  const z = Tensor.zeros([1]), one = Tensor.from([1 + 2 ** -8], [1]), two = Tensor.from([2 ** -30], [1]);
  const r = dareMerge(z, one, two, { alpha: 1, beta: 1, dropRate: 0, seed: 0, tensorId: 0, dtype: 'bf16' });
  t.equal(Math.fround(x), 1 + 2 ** -8, 'through fp32 the sum is 1 + 2^-8, a bf16 tie that rounds to 1');
  t.equal(r.item(), 1 + 2 ** -7, 'fp64 1 + 2^-8 + 2^-30 rounds once to bf16 1 + 2^-7');
  [z, one, two, r].forEach((x) => x.dispose());
});

t.test('UPIT.md 7.2: crossover of identical parents, α = 1, DARE statistics', async (t) => {
  const n = 20000, b0 = randomT(n, 40, 'f32', 0.02), parent = randomT(n, 41, 'f32', 0.02);
  for (const alpha of [0, 0.3, 0.5, 0.77, 1, 0.123456789])
    for (const dtype of ['f32', 'bf16'] as const) {
      const x0 = dtype === 'f32' ? b0 : b0.cast(dtype), xp = dtype === 'f32' ? parent : parent.cast(dtype);
      const c = dareMerge(x0, xp, xp, { alpha, beta: 1 - alpha, dropRate: 0, seed: 1, tensorId: 0 });
      exact(t, vals(c), vals(xp), `identical parents, p = 0, α ${alpha}, ${dtype}: the parent bit for bit`);
      c.dispose();
      if (dtype === 'bf16') [x0, xp].forEach((x) => x.dispose());
    }
  const other = randomT(n, 42, 'f32', 0.02);
  const c1 = dareMerge(b0, parent, other, { alpha: 1, beta: 0, dropRate: 0, seed: 2, tensorId: 1 });
  exact(t, vals(c1), vals(parent), 'α = 1, p = 0: parent j bit for bit');
  c1.dispose();
  // p > 0: zeroed fraction, kept entries, independence of the two masks
  const zero = Tensor.zeros([n]), B = vals(parent);
  for (const p of [0.1, 0.3, 0.5, 0.9]) {
    const c = dare(zero, parent, { dropRate: p, seed: 3, tensorId: 4 }), C = vals(c);
    const zeros = C.filter((v) => v === 0).length, sd = Math.sqrt(n * p * (1 - p));
    t.ok(Math.abs(zeros - n * p) <= 5 * sd, `p ${p}: ${zeros} of ${n} zeroed, within 5σ (${sd.toFixed(1)}) of ${n * p}`);
    let kept = 0, bad = -1;
    C.forEach((v, i) => {
      if (v === 0) return;
      kept++;
      if (v !== Math.fround(B[i] / (1 - p)) && bad < 0) bad = i;
    });
    t.ok(kept > 0 && bad < 0, `p ${p}: every kept entry is Δ/(1 − p) exactly${bad >= 0 ? ` (not at ${bad})` : ''}`);
    c.dispose();
  }
  const ca = dareMerge(zero, parent, parent, { alpha: 1, beta: 0, dropRate: 0.5, seed: 5, tensorId: 0 });
  const cb = dareMerge(zero, parent, parent, { alpha: 0, beta: 1, dropRate: 0.5, seed: 5, tensorId: 0 });
  const cc = dareMerge(zero, parent, parent, { alpha: 1, beta: 0, dropRate: 0.5, seed: 5, tensorId: 1 });
  const A = vals(ca), Bm = vals(cb), Cm = vals(cc);
  const both = A.filter((v, i) => v === 0 && Bm[i] === 0).length, sameT = A.filter((v, i) => (v === 0) === (Cm[i] === 0)).length;
  t.ok(Math.abs(both / n - 0.25) < 0.02, `the two parents' masks are independent: ${(both / n).toFixed(3)} dropped by both (0.25)`);
  t.ok(Math.abs(sameT / n - 0.5) < 0.02, `another tensor id draws another mask: ${(sameT / n).toFixed(3)} agree (0.5)`);
  const again = dareMerge(zero, parent, parent, { alpha: 1, beta: 0, dropRate: 0.5, seed: 5, tensorId: 0 });
  exact(t, vals(again), A, 'the same seed: the same bits');
  [ca, cb, cc, again].forEach((x) => x.dispose());
  // the mean child over 64 seeds approaches the parent (E[DARE(Δ)] = Δ); its error shrinks like 1/√seeds
  const sum = new Float64Array(n), P = vals(parent), Z = vals(b0);
  for (let s = 0; s < 64; s++) {
    const c = dareMerge(b0, parent, parent, { alpha: 0.5, beta: 0.5, dropRate: 0.5, seed: 100 + s, tensorId: 9 });
    vals(c).forEach((v, i) => (sum[i] += v / 64));
    c.dispose();
  }
  let err = 0, norm = 0;
  for (let i = 0; i < n; i++) {
    err += (sum[i] - P[i]) ** 2;
    norm += (P[i] - Z[i]) ** 2;
  }
  const rel = Math.sqrt(err / norm);
  t.ok(rel < 0.12, `‖mean of 64 children − parent‖ / ‖Δ‖ = ${rel.toFixed(4)} < 0.12 (expected ≈ ${Math.sqrt(0.5 / 64).toFixed(3)})`);
  [b0, parent, other, zero].forEach((x) => x.dispose());
});

t.test('the ops: bad arguments are XftErrors naming them', async (t) => {
  const a = randomT(8, 1), b = randomT(8, 2), c = randomT(9, 3), h = randomT(8, 4, 'bf16'), i = Tensor.zeros([8], { dtype: 'i32' });
  const o = { alpha: 0.5, beta: 0.5, dropRate: 0.5, seed: 1, tensorId: 0 };
  throwsCode(t, () => dareMerge(a, b, c, o), 'XFT_SHAPE', /\bb\b.*\[8\]/, 'b of another shape');
  throwsCode(t, () => dareMerge(a, h, b, o), 'XFT_DTYPE', /\ba\b/, 'a of another dtype');
  throwsCode(t, () => dareMerge(i, i, i, o), 'XFT_DTYPE', /base/, 'i32 tensors');
  throwsCode(t, () => dareMerge(a, b, b, { ...o, dropRate: 1 }), 'XFT_VALUE', /dropRate/, 'dropRate 1');
  throwsCode(t, () => dareMerge(a, b, b, { ...o, dropRate: -0.1 }), 'XFT_VALUE', /dropRate/, 'dropRate < 0');
  throwsCode(t, () => dareMerge(a, b, b, { ...o, alpha: NaN }), 'XFT_VALUE', /alpha/, 'alpha NaN');
  throwsCode(t, () => dareMerge(a, b, b, { ...o, beta: '1' as never }), 'XFT_TYPE', /beta/, 'beta a string');
  throwsCode(t, () => dareMerge(a, b, b, { ...o, seed: -1 }), 'XFT_VALUE', /seed/, 'a negative seed');
  throwsCode(t, () => dareMerge(a, b, b, { ...o, seed: 'x' as never }), 'XFT_TYPE', /seed/, 'seed a string');
  throwsCode(t, () => dareMerge(a, b, b, { ...o, tensorId: 2 ** 32 }), 'XFT_VALUE', /tensorId/, 'tensorId 2^32');
  throwsCode(t, () => dareMerge(a, b, b, { ...o, dtype: 'i32' as never }), 'XFT_DTYPE', /dtype/, 'an i32 output');
  throwsCode(t, () => dareMerge(a, b, b, null as never), 'XFT_TYPE', /options/, 'no options');
  throwsCode(t, () => deltaDots(a, b, c as never), 'XFT_TYPE', /others/, 'others not an array');
  throwsCode(t, () => deltaDots(a, b, [b, c]), 'XFT_SHAPE', /others\[1\]/, 'others[1] of another shape');
  throwsCode(t, () => deltaDots(a, 5 as never, []), 'XFT_TYPE', /\ba\b/, 'a not a tensor');
  const gone = randomT(8, 5);
  gone.dispose();
  throwsCode(t, () => deltaDots(a, b, [gone]), 'XFT_DISPOSED', /others\[0\]/, 'a disposed tensor');
  [a, b, c, h, i].forEach((x) => x.dispose());
});

// ---- expandPool on tiny checkpoints ----

const config = tinyConfig({ hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 40, num_hidden_layers: 2 });
const FFN = /\.mlp\.(gate|up|down)_proj\.weight$/;

function workspace(t: tap.Test) {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-upit-expand-'));
  t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
  const at = (n: string) => path.join(tmp, n);
  const base = createDense(config, { seed: 1 });
  saveModel(base, at('base'));
  fs.writeFileSync(at('base/tokenizer_config.json'), '{"model_max_length": 64}\n');
  /** a member: the base plus, per tensor, delta(name, n) (FFN) or small noise (the rest) */
  const member = (name: string, delta: (tensor: string, n: number) => Float64Array, seed: number) => {
    const m = loadModel(at('base'));
    const r = rng(seed);
    for (const p of m.params()) {
      const v = p.value.toArray(), d = FFN.test(p.name) ? delta(p.name, v.length) : r.array(v.length, 0.001);
      p.value.copy_(Tensor.from(Array.from(v, (x, i) => x + d[i]), p.value.shape));
    }
    saveModel(m, at(name));
    m.dispose();
    return at(name);
  };
  base.dispose();
  return { tmp, at, member };
}

/** u and v per FFN tensor, fixed by the tensor's name */
const seedOf = (name: string) => [...name].reduce((h, c) => (h * 31 + c.charCodeAt(0)) >>> 0, 7);
const U = (name: string, n: number) => rng(seedOf(name)).array(n, 0.01);
const V = (name: string, n: number) => rng(seedOf(name) + 1).array(n, 0.01);
const planted = (w: (u: number, v: number) => number) => (name: string, n: number) => {
  const u = U(name, n), v = V(name, n);
  return Float64Array.from(u, (x, i) => w(x, v[i]));
};

function tensorBytes(dir: string): Map<string, string> {
  const r = new SafetensorsReader(dir);
  return new Map(r.names().map((n) => [n, Buffer.from(r.readBytes(n)).toString('base64')]));
}

t.test('UPIT.md 7.3: the planted least-similar pair, one child per round up to E, complete children, determinism, resume', async (t) => {
  const { at, member } = workspace(t);
  const pool = [
    member('m0', planted((u) => u), 10),
    member('m1', planted((u, v) => v), 11),
    member('m2', planted((u, v) => u + 0.1 * v), 12),
    member('m3', planted((u) => -u), 13),
  ];
  const lines: string[] = [];
  const r = expandPool({ base: at('base'), pool, experts: 7, out: at('out'), seed: 5, onLog: (l) => lines.push(l) });
  t.equal(r.rounds.length, 3, 'E − n = 3 rounds');
  t.equal(r.pool.length, 7, 'the pool ends with E members');
  t.same(r.pool.slice(0, 4), pool, 'the inputs first');
  t.same(r.rounds[0].parents, [0, 3], 'round 1 takes the planted most dissimilar pair (Δ3 = −Δ0)');
  t.ok(Math.abs(r.rounds[0].similarity + 1) < 1e-6, `its cosine is −1 (${r.rounds[0].similarity})`);
  r.rounds.forEach((x, i) => {
    t.equal(x.child, path.join(at('out'), `child-${4 + i}`), `round ${i + 1} writes child-${4 + i}`);
    t.ok(x.alpha >= 0 && x.alpha < 1, `α ${x.alpha} in [0, 1)`);
    t.ok(x.parents[0] < x.parents[1] && x.parents[1] < 4 + i, `round ${i + 1}: parents ${x.parents} among the ${4 + i} members`);
  });
  t.same(fs.readdirSync(at('out')).filter((n) => !n.startsWith('.')).sort(), ['child-4', 'child-5', 'child-6'], 'one folder per round, nothing else');
  const child = loadModel(r.rounds[0].child);
  t.equal(child.kind, 'dense', 'a child loads as a dense model');
  child.dispose();
  const cfg = JSON.parse(fs.readFileSync(path.join(r.rounds[0].child, 'config.json'), 'utf8'));
  t.match(cfg.xft_upit, { round: 0, parents: [0, 3], alpha: r.rounds[0].alpha, beta: 1 - r.rounds[0].alpha, drop_rate: 0.5, seed: 5, parent_selection: 'least-similar', similarity_metric: 'cosine' },
    'config.json records parents, α, p and the seed');
  t.ok(fs.existsSync(path.join(r.rounds[0].child, 'tokenizer_config.json')), 'the base\'s tokenizer files are copied');
  t.ok(lines.length === 3 && /parents 0, 3/.test(lines[0]), `one log line per round: ${lines[0]}`);
  // a rerun: every child reused, nothing rewritten; a fresh run: bit-identical children
  const mtimes = r.rounds.map((x) => fs.statSync(path.join(x.child, 'model.safetensors')).mtimeMs);
  const again: string[] = [];
  const r2 = expandPool({ base: at('base'), pool, experts: 7, out: at('out'), seed: 5, onLog: (l) => again.push(l) });
  t.same(r2, r, 'a rerun returns the same rounds');
  t.ok(again.every((l) => /reused/.test(l)), 'and reuses every child');
  t.same(r.rounds.map((x) => fs.statSync(path.join(x.child, 'model.safetensors')).mtimeMs), mtimes, 'without rewriting one');
  fs.rmSync(at('out/child-6'), { recursive: true });
  const r3 = expandPool({ base: at('base'), pool, experts: 7, out: at('out'), seed: 5 });
  t.same(r3, r, 'a run stopped after 2 rounds resumes with the third');
  const fresh = expandPool({ base: at('base'), pool, experts: 7, out: at('fresh'), seed: 5 });
  for (let i = 0; i < 3; i++) t.same(tensorBytes(fresh.rounds[i].child), tensorBytes(r.rounds[i].child), `child ${4 + i} is bit-identical in a fresh folder`);
  const other = expandPool({ base: at('base'), pool, experts: 5, out: at('other'), seed: 6 });
  t.not(other.rounds[0].alpha, r.rounds[0].alpha, 'another seed draws another α');
  t.same(other.rounds[0].parents, [0, 3], 'the same parents (no randomness in the choice)');
  // a folder written with other options is an error, not silently reused
  throwsCode(t, () => expandPool({ base: at('base'), pool, experts: 7, out: at('out'), seed: 5, dropRate: 0.3 }), 'XFT_VALUE', /child-4 exists but was not written by this expansion.*drop_rate/, 'another drop rate on the same out');
  // n >= E: zero rounds, nothing written
  const none = expandPool({ base: at('base'), pool, experts: 4, out: at('none') });
  t.same(none, { pool, rounds: [] }, 'n = E: zero rounds');
  t.notOk(fs.existsSync(at('none')), 'and no folder');
  t.same(expandPool({ base: at('base'), pool, experts: 2, out: at('none') }).rounds, [], 'n > E: zero rounds');
});

t.test('expandPool: p = 0 children follow θ0 + α(θj − θ0) + (1 − α)(θk − θ0); l2, random parents, excluded pairs', async (t) => {
  const { at, member } = workspace(t);
  const pool = [member('a', planted((u) => u), 20), member('b', planted((u, v) => 10 * v), 21), member('c', planted((u) => -0.1 * u), 22)];
  const r = expandPool({ base: at('base'), pool, experts: 4, out: at('p0'), seed: 3, dropRate: 0 });
  const [j, k] = r.rounds[0].parents, alpha = r.rounds[0].alpha;
  t.same([j, k], [0, 2], 'cosine: the least similar pair of the three (opposite directions)');
  const rb = new SafetensorsReader(at('base')), rj = new SafetensorsReader(pool[j]), rk = new SafetensorsReader(pool[k]), rc = new SafetensorsReader(r.rounds[0].child);
  let bad = '';
  for (const n of rb.names()) {
    const b0 = rb.readF32(n), a = rj.readF32(n), b = rk.readF32(n), c = rc.readF32(n);
    for (let i = 0; i < c.length && !bad; i++) if (c[i] !== Math.fround(b0[i] + (alpha * (a[i] - b0[i]) + (1 - alpha) * (b[i] - b0[i])))) bad = `${n}[${i}]`;
  }
  t.equal(bad, '', 'every tensor, trunk included, is the crossover (fp64, rounded once)');
  const l2 = expandPool({ base: at('base'), pool, experts: 4, out: at('l2'), similarity: 'l2' });
  t.same(l2.rounds[0].parents, [0, 1], 'l2: the pair farthest apart (a and the long orthogonal b)');
  t.ok(l2.rounds[0].similarity < 0, 'its similarity is the negative distance');
  const rnd = expandPool({ base: at('base'), pool, experts: 6, out: at('rnd'), parents: 'random', seed: 9 });
  const rnd2 = expandPool({ base: at('base'), pool, experts: 6, out: at('rnd2'), parents: 'random', seed: 9 });
  t.same(rnd2.rounds.map((x) => x.parents), rnd.rounds.map((x) => x.parents), 'random parents: deterministic under the seed');
  const ex = expandPool({ base: at('base'), pool, experts: 6, out: at('ex'), excludeUsedPairs: true, dropRate: 0 });
  const keys = ex.rounds.map((x) => x.parents.join(','));
  t.equal(new Set(keys).size, keys.length, `excludeUsedPairs: no pair twice (${keys.join(' ')})`);
  // a single member: its child is a DARE mutation of it
  const one = expandPool({ base: at('base'), pool: [pool[0]], experts: 2, out: at('one'), dropRate: 0 });
  t.same(one.rounds[0].parents, [0, 0], 'one member: both parents are it');
  t.same(tensorBytes(one.rounds[0].child), tensorBytes(pool[0]), 'p = 0: the child equals it bit for bit');
});

t.test('expandPool: bad arguments are XftErrors naming them', async (t) => {
  const { at, member } = workspace(t);
  const m = member('m', planted((u) => u), 30);
  const ok = { base: at('base'), pool: [m], experts: 2, out: at('out') };
  throwsCode(t, () => expandPool(undefined as never), 'XFT_TYPE', /options/, 'no options');
  throwsCode(t, () => expandPool({ ...ok, base: 3 as never }), 'XFT_TYPE', /base/, 'base not a string');
  throwsCode(t, () => expandPool({ ...ok, pool: [] }), 'XFT_TYPE', /pool/, 'an empty pool');
  throwsCode(t, () => expandPool({ ...ok, pool: [5 as never] }), 'XFT_TYPE', /pool\[0\]/, 'a pool entry not a string');
  throwsCode(t, () => expandPool({ ...ok, experts: 0 }), 'XFT_VALUE', /experts/, 'experts 0');
  throwsCode(t, () => expandPool({ ...ok, experts: 2.5 }), 'XFT_VALUE', /experts/, 'experts 2.5');
  throwsCode(t, () => expandPool({ ...ok, dropRate: 1 }), 'XFT_VALUE', /dropRate/, 'dropRate 1');
  throwsCode(t, () => expandPool({ ...ok, seed: -1 }), 'XFT_VALUE', /seed/, 'seed -1');
  throwsCode(t, () => expandPool({ ...ok, parents: 'best' as never }), 'XFT_VALUE', /parents/, 'parents "best"');
  throwsCode(t, () => expandPool({ ...ok, similarity: 'dot' as never }), 'XFT_VALUE', /similarity/, 'similarity "dot"');
  throwsCode(t, () => expandPool({ ...ok, excludeUsedPairs: 1 as never }), 'XFT_TYPE', /excludeUsedPairs/, 'excludeUsedPairs 1');
  throwsCode(t, () => expandPool({ ...ok, device: 'tpu' as never }), 'XFT_DEVICE', /device/, 'device "tpu"');
  throwsCode(t, () => expandPool({ ...ok, onLog: 'x' as never }), 'XFT_TYPE', /onLog/, 'onLog not a function');
  throwsCode(t, () => expandPool({ ...ok, pool: [at('nothing')] }), 'XFT_IO', /nothing/, 'a pool folder that does not exist');
  const big = createDense(tinyConfig({ ...config, intermediate_size: 64 }), { seed: 2 });
  saveModel(big, at('big'));
  big.dispose();
  throwsCode(t, () => expandPool({ ...ok, pool: [m, at('big')], experts: 3 }), 'XFT_SHAPE', /pool\[1\].*big/, 'a member of another architecture');
  t.ok(new XftError('x', 'XFT_VALUE') instanceof Error);
});
