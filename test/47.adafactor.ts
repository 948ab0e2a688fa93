// adafactor (and the bf16 / stochastic-rounding paths of adamw) against a float64 Adafactor written from
// the formulas of transformers' Adafactor (scale_parameter = relative_step = False, beta1 = None), over
// several steps, on the CPU and, where there is one, the CUDA backend (the emulated one included):
// factored matrices, vectors, 3-D expert stacks clipped per expert or over the tensor, many tensors per
// call, f32 / bf16 parameters and gradients, the master copy, stochastic rounding, and errors.
import t from 'tap';
import { Tensor, ops, type Device, adafactorState, type AdafactorState } from '../lib/index';
import { CUDA, rng, roundBf16 } from './helpers/ref';
import { close, exact, throwsCode } from './helpers/check';

const DEVICES: Device[] = CUDA ? ['cpu', 'cuda'] : ['cpu'];

interface Hyper {
  lr: number;
  gradScale: number;
  clipThreshold: number;
  eps1: number;
  decayRate: number;
}
const DEFAULTS: Hyper = { lr: 1e-2, gradScale: 1, clipThreshold: 1, eps1: 1e-30, decayRate: -0.8 };

/** float64 state of one tensor */
interface Ref {
  shape: number[];
  p: number[];
  row: number[];
  col: number[];
  v: number[];
  perSlice: boolean;
  /** groups clipped (rms > threshold) and not, over the run: both must occur for the test to mean something */
  clipped: number;
  unclipped: number;
}

function newRef(shape: number[], p: number[], perSlice = false): Ref {
  const n = p.length, fact = shape.length >= 2, C = shape.at(-1) ?? 1, R = fact ? shape.at(-2)! : 1, S = fact ? n / (R * C) : 1;
  return { shape, p: [...p], row: new Array(fact ? S * R : 0).fill(0), col: new Array(fact ? S * C : 0).fill(0), v: new Array(fact ? 0 : n).fill(0), perSlice, clipped: 0, unclipped: 0 };
}

/** One step of transformers' Adafactor in float64 (hyperparameters as the kernels see them: fp32). */
function refStep(r: Ref, grad: ArrayLike<number>, step: number, hyper: Hyper, roundTo?: 'bf16') {
  const h = Object.fromEntries(Object.entries(hyper).map(([k, x]) => [k, Math.fround(x)])) as unknown as Hyper;
  const beta = Math.fround(1 - step ** h.decayRate);
  const n = r.p.length, fact = r.shape.length >= 2, C = r.shape.at(-1) ?? 1, R = fact ? r.shape.at(-2)! : 1, S = fact ? n / (R * C) : 1;
  const gs = Array.from(grad, (x) => x * h.gradScale), upd = gs.map((x) => x * x + h.eps1);
  const u = new Array(n);
  if (fact) {
    for (let s = 0; s < S; s++) {
      for (let i = 0; i < R; i++) {
        let m = 0;
        for (let c = 0; c < C; c++) m += upd[(s * R + i) * C + c];
        r.row[s * R + i] = beta * r.row[s * R + i] + (1 - beta) * (m / C);
      }
      for (let c = 0; c < C; c++) {
        let m = 0;
        for (let i = 0; i < R; i++) m += upd[(s * R + i) * C + c];
        r.col[s * C + c] = beta * r.col[s * C + c] + (1 - beta) * (m / R);
      }
      let mean = 0;
      for (let i = 0; i < R; i++) mean += r.row[s * R + i] / R;
      for (let i = 0; i < R; i++)
        for (let c = 0; c < C; c++) {
          const k = (s * R + i) * C + c;
          u[k] = (1 / Math.sqrt(r.row[s * R + i] / mean)) * (1 / Math.sqrt(r.col[s * C + c])) * gs[k];
        }
    }
  } else
    for (let k = 0; k < n; k++) {
      r.v[k] = beta * r.v[k] + (1 - beta) * upd[k];
      u[k] = gs[k] / Math.sqrt(r.v[k]);
    }
  const groups = r.perSlice ? S : 1, gn = n / groups;
  for (let q = 0; q < groups; q++) {
    let sq = 0;
    for (let k = q * gn; k < (q + 1) * gn; k++) sq += u[k] * u[k];
    const rms = Math.sqrt(sq / gn), d = Math.max(1, rms / h.clipThreshold);
    if (rms > h.clipThreshold) r.clipped++;
    else r.unclipped++;
    for (let k = q * gn; k < (q + 1) * gn; k++) {
      r.p[k] -= (u[k] / d) * h.lr;
      if (roundTo === 'bf16') r.p[k] = roundBf16(r.p[k]);
    }
  }
}

/** Gradients of step `step` for slice-varying scales: slice s of a stack gets (s + 1)^(step % 3) times, so the per-slice RMS differ. */
function gradsFor(shape: number[], seed: number, step: number): number[] {
  const n = shape.reduce((a, b) => a * b, 1), R = rng(seed * 100 + step), g = Array.from(R.array(n));
  const per = shape.length >= 3 ? n / shape[0] : n;
  // heavy tails: some rows much larger, so the update's RMS lands both above and below the threshold
  return g.map((x, k) => x * (1 + 20 * Number(R.next() < 0.02)) * (Math.floor(k / per) + 1) ** (step % 3));
}

function tensorsOf(state: AdafactorState): Tensor[] {
  return [state.row, state.col, state.v].filter((x): x is Tensor => x !== undefined);
}

for (const device of DEVICES)
  t.test(`${device}: five steps over many tensors in one call vs float64 Adafactor`, async (t) => {
    // matrices (one row, one column, several chunks), vectors, expert stacks clipped per expert and over the stack
    const specs: { shape: number[]; perSlice?: boolean }[] = [
      { shape: [7, 13] }, { shape: [37] }, { shape: [1] }, { shape: [3, 5, 33], perSlice: true }, { shape: [2, 4, 9] },
      { shape: [1, 300] }, { shape: [300, 1] }, { shape: [161, 40] }, { shape: [2, 2, 3, 4] }, { shape: [4, 3, 70], perSlice: true },
    ];
    const hyper: Hyper = { ...DEFAULTS, lr: 3e-2, gradScale: 0.7 };
    const refs = specs.map((s, i) => newRef(s.shape, Array.from(rng(i + 1).array(s.shape.reduce((a, b) => a * b, 1))), s.perSlice));
    const P = refs.map((r) => Tensor.from(r.p, r.shape, { device }));
    const states = specs.map((s) => adafactorState(s.shape, device));
    for (let step = 1; step <= 5; step++) {
      const grads = specs.map((s, i) => gradsFor(s.shape, i, step));
      refs.forEach((r, i) => refStep(r, grads[i], step, hyper));
      const G = grads.map((g, i) => Tensor.from(g, specs[i].shape, { device }));
      ops.adafactor(specs.map((s, i) => ({ params: P[i], grads: G[i], state: states[i], clipPerSlice: s.perSlice })), { ...hyper, step });
      G.forEach((g) => g.dispose());
    }
    specs.forEach((s, i) => {
      const r = refs[i], what = `[${s.shape}]${s.perSlice ? ' per slice' : ''}`;
      close(t, P[i].toArray(), r.p, 2e-6, `${what}: params`);
      if (states[i].v) close(t, states[i].v!.toArray(), r.v, 2e-6, `${what}: v`);
      else close(t, states[i].row!.toArray(), r.row, 2e-6, `${what}: row`), close(t, states[i].col!.toArray(), r.col, 2e-6, `${what}: col`);
    });
    const clipped = refs.reduce((a, r) => a + r.clipped, 0), unclipped = refs.reduce((a, r) => a + r.unclipped, 0);
    t.ok(clipped > 0 && unclipped > 0, `the update's RMS was clipped (${clipped} times) and not (${unclipped})`);
    // the expert stack clipped over the whole tensor ends elsewhere than per expert: the test tells them apart
    const other = newRef(specs[3].shape, Array.from(rng(4).array(3 * 5 * 33)), false);
    for (let step = 1; step <= 5; step++) refStep(other, gradsFor(specs[3].shape, 3, step), step, hyper);
    const apart = Math.max(...other.p.map((x, k) => Math.abs(x - refs[3].p[k])));
    t.ok(apart > 1e-3, `per-expert and whole-stack clipping differ (max |Δp| ${apart.toExponential(2)})`);
    [...P, ...states.flatMap(tensorsOf)].forEach((x) => x.dispose());
  });

for (const device of DEVICES)
  t.test(`${device}: one call over many tensors gives the bits of one call per tensor`, async (t) => {
    const shapes = [[9, 70], [33], [3, 17, 5], [0, 4], [2, 1, 600]];
    const one = shapes.map((s, i) => Tensor.randn(s, { seed: i + 1, device }));
    const each = one.map((x) => x.clone());
    const grads = shapes.map((s, i) => Tensor.randn(s, { seed: 50 + i, device }));
    const s1 = shapes.map((s) => adafactorState(s, device)), s2 = shapes.map((s) => adafactorState(s, device));
    for (let step = 1; step <= 2; step++) {
      ops.adafactor(shapes.map((s, i) => ({ params: one[i], grads: grads[i], state: s1[i], clipPerSlice: s.length >= 3 })), { lr: 0.1, step });
      shapes.forEach((s, i) => ops.adafactor([{ params: each[i], grads: grads[i], state: s2[i], clipPerSlice: s.length >= 3, tensorIndex: i }], { lr: 0.1, step }));
    }
    shapes.forEach((s, i) => exact(t, one[i].toArray(), each[i].toArray(), `[${s}]`));
    [...one, ...each, ...grads, ...s1.flatMap(tensorsOf), ...s2.flatMap(tensorsOf)].forEach((x) => x.dispose());
  });

for (const device of DEVICES)
  t.test(`${device}: bf16 weights in place, bf16 gradients, and the master copy`, async (t) => {
    const shape = [24, 40], n = 960, hyper: Hyper = { ...DEFAULTS, lr: 0.05 };
    const init = Array.from(rng(7).array(n), roundBf16);
    // bf16 parameters updated in place (the reference rounds after every step, as the kernel writes)
    const inPlace = newRef(shape, init), master = newRef(shape, init);
    const Pb = Tensor.from(init, shape, { dtype: 'bf16', device }), Pm = Tensor.from(init, shape, { device }), copy = Tensor.zeros(shape, { dtype: 'bf16', device });
    const sb = adafactorState(shape, device), sm = adafactorState(shape, device);
    for (let step = 1; step <= 3; step++) {
      const g = gradsFor(shape, 9, step).map(roundBf16);
      refStep(inPlace, g, step, hyper, 'bf16');
      refStep(master, g, step, hyper);
      const G = Tensor.from(g, shape, { dtype: 'bf16', device });
      ops.adafactor([{ params: Pb, grads: G, state: sb }], { ...hyper, step });
      ops.adafactor([{ params: Pm, grads: G, state: sm, copyTo: copy }], { ...hyper, step });
      G.dispose();
    }
    close(t, Pb.toArray(), inPlace.p, 1e-4, 'bf16 weights updated in place');
    t.ok(Array.from(Pb.toArray()).every((x) => x === roundBf16(x)), 'the weights stay bf16 values');
    close(t, Pm.toArray(), master.p, 2e-6, 'f32 master from bf16 gradients');
    exact(t, copy.toArray(), Array.from(Pm.toArray(), roundBf16), 'the bf16 copy is the master rounded to nearest');
    [Pb, Pm, copy, ...tensorsOf(sb), ...tensorsOf(sm)].forEach((x) => x.dispose());
  });

/** bf16 weights 1.5 (ulp 2^-7), an update of 0.3 ulp: lost by round to nearest, kept on average by stochastic rounding. */
function subUlpRun(device: Device, optimizer: 'adamw' | 'adafactor', stochastic: boolean, seed: number) {
  const n = 20000, ulp = 2 ** -7, lr = 0.3 * ulp;
  const P = Tensor.full([n], 1.5, { dtype: 'bf16', device }), G = Tensor.full([n], 0.5, { device });
  if (optimizer === 'adamw') {
    const m = Tensor.zeros([n], { device }), v = Tensor.zeros([n], { device });
    ops.adamw(P, G, m, v, { lr, step: 1, stochasticRounding: stochastic, seed, tensorIndex: 3 });
    m.dispose(), v.dispose();
  } else {
    const s = adafactorState([n], device);
    ops.adafactor([{ params: P, grads: G, state: s, tensorIndex: 3 }], { lr, step: 1, stochasticRounding: stochastic, seed });
    tensorsOf(s).forEach((x) => x.dispose());
  }
  const out = Array.from(P.toArray());
  P.dispose(), G.dispose();
  return { out, ulp, expected: 1.5 - lr };
}

for (const device of DEVICES)
  for (const optimizer of ['adamw', 'adafactor'] as const)
    t.test(`${device} ${optimizer}: stochastic rounding keeps sub-ulp updates on average; deterministic per seed`, async (t) => {
      const rn = subUlpRun(device, optimizer, false, 0);
      t.ok(rn.out.every((x) => x === 1.5), 'round to nearest: every weight stays 1.5 (the update is lost)');
      const sr = subUlpRun(device, optimizer, true, 11);
      t.ok(sr.out.every((x) => x === 1.5 || x === 1.5 - sr.ulp), 'stochastic: each weight is one of the two neighbours');
      const mean = sr.out.reduce((a, b) => a + b, 0) / sr.out.length, sigma = (sr.ulp * Math.sqrt(0.3 * 0.7)) / Math.sqrt(sr.out.length);
      t.ok(Math.abs(mean - sr.expected) < 5 * sigma, `stochastic: mean ${mean.toFixed(7)} is the exact ${sr.expected.toFixed(7)} (± ${(5 * sigma).toExponential(1)})`);
      exact(t, subUlpRun(device, optimizer, true, 11).out, sr.out, 'the same seed, step and tensor: the same bits');
      const other = subUlpRun(device, optimizer, true, 12).out;
      t.ok(other.some((x, i) => x !== sr.out[i]), 'another seed: other draws');
    });

if (CUDA)
  t.test('stochastic rounding draws the same bits on the CPU and on CUDA', async (t) => {
    for (const optimizer of ['adamw', 'adafactor'] as const)
      exact(t, subUlpRun('cuda', optimizer, true, 5).out, subUlpRun('cpu', optimizer, true, 5).out, optimizer);
  });

t.test('adamw: bf16 weights in place and bf16 gradients vs float64', async (t) => {
  const n = 500, init = Array.from(rng(3).array(n), roundBf16);
  const P = Tensor.from(init, [n], { dtype: 'bf16' }), m = Tensor.zeros([n]), v = Tensor.zeros([n]);
  const p = [...init], mm = new Array(n).fill(0), vv = new Array(n).fill(0);
  const b1 = Math.fround(0.9), b2 = Math.fround(0.999), lr = Math.fround(0.01);
  for (let step = 1; step <= 3; step++) {
    const g = Array.from(rng(10 + step).array(n), roundBf16);
    for (let i = 0; i < n; i++) {
      mm[i] = b1 * mm[i] + (1 - b1) * g[i];
      vv[i] = b2 * vv[i] + (1 - b2) * g[i] * g[i];
      p[i] = roundBf16(p[i] - lr * (mm[i] / (1 - b1 ** step) / (Math.sqrt(vv[i] / (1 - b2 ** step)) + Math.fround(1e-8))));
    }
    ops.adamw(P, Tensor.from(g, [n], { dtype: 'bf16' }), m, v, { lr: 0.01, step });
  }
  close(t, P.toArray(), p, 1e-4, 'bf16 weights');
  close(t, m.toArray(), mm, 1e-6, 'm');
});

t.test('adafactor errors name the argument', async (t) => {
  const P = Tensor.zeros([4, 6]), G = Tensor.zeros([4, 6]), st = adafactorState([4, 6], 'cpu'), V = Tensor.zeros([5]);
  const e = (over: object = {}) => [{ params: P, grads: G, state: st, ...over }];
  const o = { lr: 1e-3, step: 1 };
  throwsCode(t, () => ops.adafactor(e(), { lr: 1e-3, step: 0 }), 'XFT_VALUE', /step/, 'step 0');
  throwsCode(t, () => ops.adafactor(e(), { lr: -1, step: 1 }), 'XFT_VALUE', /lr/, 'negative lr');
  throwsCode(t, () => ops.adafactor(e(), { ...o, clipThreshold: 0 }), 'XFT_VALUE', /clipThreshold/, 'clip threshold 0');
  throwsCode(t, () => ops.adafactor(e(), { ...o, decayRate: 0.5 }), 'XFT_VALUE', /decayRate/, 'positive decay rate');
  throwsCode(t, () => ops.adafactor(e(), { ...o, eps1: NaN }), 'XFT_VALUE', /eps1/, 'NaN eps1');
  throwsCode(t, () => ops.adafactor(e(), { ...o, stochasticRounding: 1 as never }), 'XFT_TYPE', /stochasticRounding/, 'non-boolean stochasticRounding');
  throwsCode(t, () => ops.adafactor(e(), { ...o, seed: 1.5 }), 'XFT_TYPE', /seed/, 'fractional seed');
  throwsCode(t, () => ops.adafactor({} as never, o), 'XFT_TYPE', /entries/, 'entries not an array');
  throwsCode(t, () => ops.adafactor([null as never], o), 'XFT_TYPE', /entries\[0\]/, 'null entry');
  throwsCode(t, () => ops.adafactor(e({ grads: Tensor.zeros([6, 4]) }), o), 'XFT_SHAPE', /grads/, 'grads shape');
  throwsCode(t, () => ops.adafactor(e({ grads: Tensor.zeros([4, 6], { dtype: 'i32' }) }), o), 'XFT_DTYPE', /grads/, 'i32 grads');
  throwsCode(t, () => ops.adafactor(e({ params: Tensor.zeros([4, 6], { dtype: 'i32' }) }), o), 'XFT_DTYPE', /params/, 'i32 params');
  throwsCode(t, () => ops.adafactor(e({ state: { v: Tensor.zeros([24]) } }), o), 'XFT_TYPE', /state\.row/, 'a matrix without row statistics');
  throwsCode(t, () => ops.adafactor(e({ state: { row: Tensor.zeros([6]), col: Tensor.zeros([6]) } }), o), 'XFT_SHAPE', /state\.row/, 'row statistics of the wrong length');
  throwsCode(t, () => ops.adafactor(e({ state: { row: Tensor.zeros([4], { dtype: 'bf16' }), col: Tensor.zeros([6]) } }), o), 'XFT_DTYPE', /state\.row/, 'bf16 statistics');
  throwsCode(t, () => ops.adafactor([{ params: V, grads: Tensor.zeros([5]), state: {} }], o), 'XFT_TYPE', /state\.v/, 'a vector without v');
  throwsCode(t, () => ops.adafactor(e({ copyTo: Tensor.zeros([5], { dtype: 'bf16' }) }), o), 'XFT_SHAPE', /copyTo/, 'copyTo size');
  throwsCode(t, () => ops.adafactor(e({ clipPerSlice: 'yes' }), o), 'XFT_TYPE', /clipPerSlice/, 'non-boolean clipPerSlice');
  throwsCode(t, () => ops.adafactor([...e(), ...e()], o), 'XFT_VALUE', /twice/, 'a parameter twice');
  if (CUDA)
    throwsCode(t, () => ops.adafactor([...e(), { params: Tensor.zeros([3], { device: 'cuda' }), grads: Tensor.zeros([3], { device: 'cuda' }), state: adafactorState([3], 'cuda') }], o),
      'XFT_DEVICE', /entries\[1\]/, 'entries on two devices');
  exact(t, P.toArray(), new Array(24).fill(0), 'nothing was written by the refused calls');
});

t.test('adamw: bf16 parameters and gradients are accepted; errors still name the argument', async (t) => {
  const P = Tensor.zeros([8], { dtype: 'bf16' }), G = Tensor.zeros([8], { dtype: 'bf16' }), M = Tensor.zeros([8]), V = Tensor.zeros([8]);
  ops.adamw(P, G, M, V, { lr: 1e-3, step: 1 });
  t.pass('bf16 params and grads');
  throwsCode(t, () => ops.adamw(P, Tensor.zeros([8], { dtype: 'i32' }), M, V, { lr: 1e-3, step: 1 }), 'XFT_DTYPE', /grads/, 'i32 grads');
  throwsCode(t, () => ops.adamw(P, G, M, V, { lr: 1e-3, step: 1, tensorIndex: -1 }), 'XFT_VALUE', /tensorIndex/, 'negative tensorIndex');
  throwsCode(t, () => ops.adamw(P, G, M, V, { lr: 1e-3, step: 1, stochasticRounding: 'no' as never }), 'XFT_TYPE', /stochasticRounding/, 'string stochasticRounding');
});

