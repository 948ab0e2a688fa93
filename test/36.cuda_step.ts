// The training step without host synchronisation (lib/ledger.ts, cuda/step.cu, binding/cpu/step.cc):
// the ledger kernels, multi-tensor AdamW and zeroing against their CPU twins; a CUDA step counted to
// make no host sync and one launch per optimizer / zeroing between log points; logEvery N equal to
// logEvery 1 bit for bit; a non-finite step caught on the device (no update written) and reported at
// the next read, as an unbroken run of logEvery 1 reports it. The device-independent tests also run
// on the CPU backend.
import t from 'tap';
import { Tensor, memoryStats } from '../lib/index';
import { tinyConfig } from '../lib/config';
import { createDense, upcycle } from '../lib/xft';
import { Trainer, disposeState, type TrainOptions, type TrainState } from '../lib/train';
import { type Model } from '../lib/model';
import { StepLedger, zeroMany } from '../lib/ledger';
import { adamw, adamwMulti } from '../lib/optim';
import { CUDA, SKIP_NO_CUDA, rng } from './helpers/ref';
import { close, exact } from './helpers/check';
import { TOL, seed, setupGpuTest } from './helpers/gpu';

setupGpuTest(t);

const DEVICES: ('cpu' | 'cuda')[] = CUDA ? ['cpu', 'cuda'] : ['cpu'];
const config = tinyConfig({ hidden_size: 32, intermediate_size: 48, num_attention_heads: 2, num_key_value_heads: 1, num_hidden_layers: 2 });

function rowsOf(s: number, n = 8, T = 8) {
  const R = rng(s);
  return Array.from({ length: n }, () => {
    const ids = Array.from({ length: T + 1 }, () => R.int(0, config.vocab_size));
    return { ids: ids.slice(0, -1), targets: ids.slice(1).map((x, i) => (i % 4 === 0 ? -1 : x)) };
  });
}

/** A dense model, or its 4-expert top-3 MoE with router noise (the step seeds the noise). */
function build(kind: 'dense' | 'moe', dtype: 'f32' | 'bf16', device: 'cpu' | 'cuda'): Model {
  const dense = createDense(config, { seed: 11, std: 0.1, dtype, device });
  if (kind === 'dense') return dense;
  const moe = upcycle(dense, { experts: 4, topK: 3, seed: 12, noise: true });
  dense.dispose();
  return moe;
}

const weights = (m: Model) => m.params().map((p) => p.value.toArray());
const stateOf = (s: TrainState) => [...s.m, ...s.v, ...(s.row ?? []), ...(s.col ?? []), ...(s.master ?? [])].map(([n, x]) => [n, x.toArray()] as const);

const syncs = () => memoryStats().hostSyncs ?? 0;
const launches = () => memoryStats().kernelLaunches ?? -1;

// ---- the kernels against their CPU twins ----

t.test('lossStats and stepEnd: CUDA vs CPU ledger records (sums, counts, clipping, the non-finite budget)', { skip: SKIP_NO_CUDA }, async (t) => {
  const R = rng(seed() % 100000), rows = 1000;
  const lossesA = Array.from({ length: rows }, () => R.next() * 5), preds = Array.from({ length: rows }, () => R.int(0, 7));
  const targets = Array.from({ length: rows }, (_, i) => (i % 3 === 0 ? -1 : R.int(0, 7)));
  const records = (device: 'cpu' | 'cuda') => {
    const led = new StepLedger(device, 4);
    const l = Tensor.from(lossesA, [rows], { device }), p = Tensor.from(preds, [rows], { dtype: 'i32', device });
    const tg = Tensor.from(targets, [rows], { dtype: 'i32', device }), aux = Tensor.from([0.25], [1], { device });
    const sq = (x: number) => Tensor.from([x], [1], { device });
    const out: number[][] = [];
    // step 0: two micro-batches, clipped; 1: not clipped; 2: NaN, skipped (budget 1); 3: Inf, stopped
    for (const [k, sumsq] of [[0, 16], [1, 0.25], [2, NaN], [3, Infinity]] as const) {
      for (let mb = 0; mb < 2; mb++) {
        led.addAux(aux);
        led.micro(l, p, tg, 2);
      }
      const s = sq(sumsq);
      led.end(s, k, 1.5, 1);
      out.push([...led.control.toArray()]);
      s.dispose();
    }
    const recs = led.read(4);
    for (const x of [l, p, tg, aux]) x.dispose();
    led.dispose();
    return { recs, control: out };
  };
  const a = records('cpu'), b = records('cuda');
  t.same(b.recs.map((r) => r.status), ['applied', 'applied', 'skipped', 'stopped'], 'statuses: applied, applied, skipped (budget 1), stopped');
  t.same(a.recs.map((r) => r.status), b.recs.map((r) => r.status), 'the same statuses on the CPU');
  for (let k = 0; k < 4; k++) {
    const x = a.recs[k], y = b.recs[k];
    t.equal(y.tokens, x.tokens, `step ${k}: tokens ${y.tokens}`);
    t.equal(y.correct, x.correct, `step ${k}: correct ${y.correct}`);
    t.ok(Math.abs(y.loss - x.loss) <= 1e-12 * x.loss, `step ${k}: loss ${y.loss} vs ${x.loss} (fp64 sums in another order)`);
    t.equal(y.auxLoss, x.auxLoss, `step ${k}: balance loss ${y.auxLoss}`);
    t.same(Number.isNaN(y.gradNorm), Number.isNaN(x.gradNorm), `step ${k}: norm NaN alike`);
    if (!Number.isNaN(x.gradNorm)) t.equal(y.gradNorm, x.gradNorm, `step ${k}: gradient norm ${y.gradNorm}`);
  }
  t.equal(b.recs[0].gradNorm, 4, 'norm sqrt(16)');
  t.equal(b.recs[0].auxLoss, 0.25, 'balance loss: two micro-batches of 0.25 / 2');
  exact(t, b.control.flat(), a.control.flat(), 'control blocks (scale, skip) bit for bit');
  t.same(b.control, [[Math.fround(1.5 / 4), 0], [1, 0], [1, 1], [1, 1]], 'scale clip/norm when clipped, skip on non-finite steps');
});

t.test('zeroMany: every buffer zeroed in one launch (odd sizes, bf16, several chunks)', async (t) => {
  for (const device of DEVICES) {
    const ts = [Tensor.randn([7], { seed: 1, device }), Tensor.randn([33, 1001], { seed: 2, device, dtype: 'bf16' }), Tensor.randn([5000], { seed: 3, device }), Tensor.zeros([0], { device })];
    const keep = Tensor.randn([9], { seed: 4, device }), before = keep.toArray();
    const l0 = launches();
    zeroMany(ts);
    if (device === 'cuda' && l0 >= 0) t.equal(launches() - l0, 1, 'cuda: one launch');
    for (const x of ts) t.ok(x.toArray().every((v) => v === 0), `${device}: ${x.describe()} zeroed`);
    exact(t, keep.toArray(), before, `${device}: another tensor untouched`);
    [...ts, keep].forEach((x) => x.dispose());
  }
});

t.test('adamwMulti equals adamw per tensor, bit for bit (f32, bf16 stochastic, master copies); a control block scales or skips', async (t) => {
  for (const device of DEVICES) {
    const make = () => {
      const specs: [number[], 'f32' | 'bf16', boolean][] = [[[13], 'f32', false], [[40, 70], 'bf16', false], [[3000], 'f32', true], [[1], 'bf16', false]];
      return specs.map(([shape, dtype, master], i) => {
        const p = Tensor.randn(shape, { seed: 10 + i, device, dtype: master ? 'f32' : dtype });
        return {
          params: p, grads: Tensor.randn(shape, { seed: 20 + i, device, dtype }), m: Tensor.randn(shape, { seed: 30 + i, device, std: 0.01 }),
          v: Tensor.from(Array.from({ length: shape.reduce((x, y) => x * y, 1) }, (_, j) => ((j * 7919 + i) % 97) / 9700), shape, { device }), copyTo: master ? Tensor.zeros(shape, { device, dtype: 'bf16' }) : undefined, tensorIndex: 5 + i,
        };
      });
    };
    const o = { lr: 1e-2, step: 3, weightDecay: 0.1, stochasticRounding: true, seed: 7 };
    const dump = (es: ReturnType<typeof make>) => es.flatMap((e) => [e.params, e.m, e.v, ...(e.copyTo ? [e.copyTo] : [])].map((x) => x.toArray()));
    const a = make(), b = make(), c = make(), d = make();
    for (const e of a) adamw(e.params, e.grads, e.m, e.v, { ...o, gradScale: 0.5, copyTo: e.copyTo, tensorIndex: e.tensorIndex });
    adamwMulti(b, { ...o, gradScale: 0.5 });
    const scale = Tensor.from([0.5, 0], [2], { device }), skip = Tensor.from([0.5, 1], [2], { device });
    adamwMulti(c, { ...o, gradScale: 1, control: scale });
    const l0 = launches();
    adamwMulti(d, { ...o, control: skip });
    if (device === 'cuda' && l0 >= 0) t.equal(launches() - l0, 1, 'cuda: one launch for all tensors');
    const untouched = make();
    exact(t, dump(b).flatMap((x) => [...x]), dump(a).flatMap((x) => [...x]), `${device}: adamwMulti = adamw per tensor`);
    exact(t, dump(c).flatMap((x) => [...x]), dump(a).flatMap((x) => [...x]), `${device}: control scale 0.5 = gradScale 0.5`);
    exact(t, dump(d).flatMap((x) => [...x]), dump(untouched).flatMap((x) => [...x]), `${device}: control skip writes nothing`);
    for (const es of [a, b, c, d, untouched]) for (const e of es) [e.params, e.grads, e.m, e.v, e.copyTo].forEach((x) => x?.dispose());
    scale.dispose();
    skip.dispose();
  }
});

t.test('adamwMulti: CUDA vs CPU (bf16 stochastic rounding, control)', { skip: SKIP_NO_CUDA }, async (t) => {
  const run = (device: 'cpu' | 'cuda') => {
    const p = Tensor.randn([300, 17], { seed: 1, device, dtype: 'bf16' }), g = Tensor.randn([300, 17], { seed: 2, device, dtype: 'bf16' });
    const m = Tensor.zeros([300, 17], { device }), v = Tensor.zeros([300, 17], { device }), control = Tensor.from([0.25, 0], [2], { device });
    const p2 = Tensor.randn([5001], { seed: 3, device }), g2 = Tensor.randn([5001], { seed: 4, device }), m2 = Tensor.zeros([5001], { device }), v2 = Tensor.zeros([5001], { device });
    adamwMulti([{ params: p, grads: g, m, v }, { params: p2, grads: g2, m: m2, v: v2 }], { lr: 1e-2, step: 1, stochasticRounding: true, seed: 3, control });
    const out = [p, m, v, p2, m2, v2].map((x) => x.toArray());
    [p, g, m, v, p2, g2, m2, v2, control].forEach((x) => x.dispose());
    return out;
  };
  const a = run('cpu'), b = run('cuda');
  exact(t, b[0], a[0], 'bf16 params (stochastic rounding) bit for bit');
  for (let i = 1; i < a.length; i++) close(t, b[i], a[i], TOL.f32, `tensor ${i}`);
});

// ---- the training step ----

// XFT_TEST_FAST=1 (the shake and asan emulation runs): the MoE cases only
const STEP_CASES = ([['moe', 'adamw'], ['moe', 'adafactor'], ['dense', 'adamw']] as const).filter(([kind]) => process.env.XFT_TEST_FAST !== '1' || kind === 'moe');
for (const [kind, optimizer] of STEP_CASES)
    t.test(`${kind}, ${optimizer}: no host sync between log points, and logEvery 2 = logEvery 1 bit for bit`, async (t) => {
      const rows = rowsOf(seed() % 100000);
      const dtype = optimizer === 'adafactor' ? 'bf16' : 'f32';
      const o: TrainOptions = { lr: 3e-3, batchSize: 4, microBatch: 2, steps: 4, seed: 5, optimizer, clip: 0.5, warmupSteps: 2 };
      if (optimizer === 'adafactor') Object.assign(o, { masterWeights: false, stochasticRounding: true, gradDtype: 'bf16' });
      for (const device of DEVICES) {
        const run = (logEvery: number) => {
          const m = build(kind, dtype, device);
          const infos: number[] = [];
          const r = new Trainer(m, rows, { ...o, logEvery, onStep: (s) => infos.push(s.step) });
          const perStep: { syncs: number; launches: number }[] = [];
          while (!r.done) {
            const s0 = syncs(), l0 = launches();
            r.step();
            perStep.push({ syncs: syncs() - s0, launches: launches() - l0 });
          }
          const out = { losses: [...r.losses], weights: weights(m), state: stateOf(r.state), perStep, infos };
          r.dispose();
          disposeState(r.state);
          m.dispose();
          return out;
        };
        const one = run(1), two = run(2);
        t.same(two.infos, [1, 2, 3, 4], `${device}: onStep ran for every step, in order`);
        exact(t, two.losses, one.losses, `${device}: losses`);
        t.ok(one.losses.every(Number.isFinite), `${device}: finite losses ${one.losses.map((x) => x.toFixed(4)).join(' ')}`);
        exact(t, two.weights.flatMap((w) => [...w]), one.weights.flatMap((w) => [...w]), `${device}: weights`);
        exact(t, two.state.flatMap(([, x]) => [...x]), one.state.flatMap(([, x]) => [...x]), `${device}: optimizer state`);
        if (device === 'cuda') {
          t.same(two.perStep.map((s) => s.syncs), [0, 1, 0, 1], 'cuda: host syncs per step (logEvery 2): none but the read at each log point');
          t.same(one.perStep.map((s) => s.syncs), [1, 1, 1, 1], 'cuda: logEvery 1: one read per step');
          const l = two.perStep[1].launches;
          t.comment(`cuda ${kind} ${optimizer}: ${l} kernel launches per step (2 micro-batches, ${config.num_hidden_layers} layers)`);
          if (l >= 0) t.ok(two.perStep.slice(1).every((s) => s.launches === l), 'the same launches every step');
        }
      }
    });

t.test('a non-finite step: caught on the device, nothing written, reported at the next read as logEvery 1 reports it', async (t) => {
  const rows = rowsOf(seed() % 100000);
  for (const device of DEVICES)
    for (const budget of [0, 1]) {
      const o: TrainOptions = { lr: 3e-3, batchSize: 4, microBatch: 2, steps: 5, seed: 5, skipNonFinite: budget };
      // two good steps, then the embedding is poisoned (NaN): step 3 on is not finite
      const run = (logEvery: number) => {
        const m = build('moe', 'f32', device);
        const warnings: string[] = [];
        const r = new Trainer(m, rows, { ...o, logEvery, onWarning: (w) => warnings.push(w) });
        r.step(), r.step();
        m.embed.value.fill_(NaN);
        let err: unknown = null;
        try {
          while (!r.done) r.step();
          r.flush();
        } catch (e) {
          err = e;
        }
        const out = { err: err as { code?: string; message?: string } | null, step: r.state.step, losses: [...r.losses], warnings, skipped: r.skipped,
          weights: m.params().filter((p) => p !== m.embed).map((p) => p.value.toArray()), state: stateOf(r.state) };
        r.dispose();
        disposeState(r.state);
        m.dispose();
        return out;
      };
      const a = run(1), b = run(4);
      const what = `${device}, skipNonFinite ${budget}`;
      t.equal(a.err?.code, 'XFT_NONFINITE', `${what}: logEvery 1 stops with XFT_NONFINITE`);
      t.equal(b.err?.code, 'XFT_NONFINITE', `${what}: logEvery 4 stops with XFT_NONFINITE (at its read)`);
      t.equal(b.err?.message, a.err?.message, `${what}: the same message (${a.err?.message?.slice(0, 60)}...)`);
      t.equal(b.step, 2 + budget, `${what}: the state is that of step ${2 + budget}`);
      t.equal(a.step, b.step, `${what}: as logEvery 1 leaves it`);
      t.same(b.warnings, a.warnings, `${what}: the same warnings (${b.warnings.length})`);
      t.equal(b.skipped, budget, `${what}: ${budget} step(s) skipped`);
      t.same(b.losses.map(String), a.losses.map(String), `${what}: the same losses (${b.losses.length}; NaN where skipped)`);
      exact(t, b.weights.flatMap((w) => [...w]), a.weights.flatMap((w) => [...w]), `${what}: weights of the last good step (no non-finite update written)`);
      exact(t, b.state.flatMap(([, x]) => [...x]), a.state.flatMap(([, x]) => [...x]), `${what}: optimizer state of the last good step`);
      t.ok(b.state.every(([, x]) => x.every(Number.isFinite)), `${what}: the optimizer state is finite`);
    }
});

t.test('CUDA vs CPU: four steps of the MoE with router noise, logEvery 2', { skip: SKIP_NO_CUDA }, async (t) => {
  const rows = rowsOf(seed() % 100000);
  const run = (device: 'cpu' | 'cuda') => {
    const m = build('moe', 'f32', device);
    const r = new Trainer(m, rows, { lr: 1e-3, batchSize: 4, microBatch: 2, steps: 4, seed: 2, logEvery: 2 });
    while (!r.done) r.step();
    const out = { losses: [...r.losses], weights: weights(m) };
    r.dispose();
    disposeState(r.state);
    m.dispose();
    return out;
  };
  const a = run('cpu'), b = run('cuda');
  close(t, b.losses, a.losses, 1e-4, 'losses');
  close(t, b.weights.flatMap((w) => [...w]), a.weights.flatMap((w) => [...w]), 1e-4, 'weights');
});
