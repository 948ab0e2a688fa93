// CUDA graphs (lib/graph.ts, cuda/runtime.cu; the emulator records a capture and replays it,
// cuda/dev/emu/cuda_runtime.h): the device side of an optimizer step (the ledger's micro-batch sums
// and step end, multi-tensor AdamW with stochastic rounding and the control block, the zeroing)
// captured once and replayed over several steps equals the same ops run eagerly, bit for bit, with
// each step's inputs read from device memory (a non-finite step skipped alike); what a capture
// refuses (a read back, a synchronisation, an upload, on the emulator an allocation) fails clearly
// and leaves the stream usable; the CPU backend has no graphs (XFT_DEVICE). The whole training step
// captured (TrainOptions.cudaGraph, xft train --cuda-graph): N steps equal N steps without it bit for
// bit (dense and MoE, f32 and mixed bf16 with stochastic rounding, gradient accumulation, recompute, a
// non-finite step skipped), with no host sync between log points; what a replay could get wrong
// (a CPU model, data parallelism, Adafactor, MoE router noise) is refused with a typed error.
import t from 'tap';
import { Tensor, CudaGraph, StepLedger, zeroMany, backend, synchronize, ops, memoryStats, DataParallel, SoloGroup } from '../lib/index';
import { tinyConfig } from '../lib/config';
import { createDense, upcycle } from '../lib/xft';
import { Trainer, disposeState, type TrainOptions, type TrainState } from '../lib/train';
import { type Model } from '../lib/model';
import { CUDA, SKIP_NO_CUDA, rng } from './helpers/ref';
import { exact, throwsCode } from './helpers/check';
import { seed, setupGpuTest } from './helpers/gpu';

setupGpuTest(t);

const STEPS = 4;

/** Per-step inputs on the host: gradients, the gradients' sum of squares (NaN at step 2: skipped), cross-entropy rows. */
function inputs(step: number) {
  const R = rng(100 + step), rows = 40;
  return {
    g1: Array.from({ length: 50 * 37 }, () => R.normal()), g2: Array.from({ length: 300 }, () => R.normal()),
    sumsq: [step === 2 ? NaN : 1 + 4 * R.next()],
    losses: Array.from({ length: rows }, () => 3 * R.next()), preds: Array.from({ length: rows }, () => R.int(0, 5)),
    targets: Array.from({ length: rows }, (_, i) => (i % 5 === 0 ? -1 : R.int(0, 5))),
  };
}

function setup() {
  const d = { device: 'cuda' as const };
  const s = {
    p1: Tensor.randn([50, 37], { seed: 1, ...d, dtype: 'bf16' }), g1: Tensor.zeros([50, 37], { ...d, dtype: 'bf16' }),
    m1: Tensor.zeros([50, 37], d), v1: Tensor.zeros([50, 37], d),
    p2: Tensor.randn([300], { seed: 2, ...d }), g2: Tensor.zeros([300], d), m2: Tensor.zeros([300], d), v2: Tensor.zeros([300], d),
    copy2: Tensor.zeros([300], { ...d, dtype: 'bf16' }),
    sumsq: Tensor.zeros([1], d), losses: Tensor.zeros([40], d), preds: Tensor.zeros([40], { ...d, dtype: 'i32' }), targets: Tensor.zeros([40], { ...d, dtype: 'i32' }),
    ledger: new StepLedger('cuda', 1),
  };
  return s;
}
type Setup = ReturnType<typeof setup>;

/** Uploads step k's inputs into the fixed buffers (outside any capture). */
function upload(s: Setup, k: number) {
  const x = inputs(k);
  const put = (dst: Tensor, values: number[]) => {
    const h = Tensor.from(values, dst.shape, { dtype: dst.dtype === 'bf16' ? 'f32' : dst.dtype });
    dst.copy_(dst.dtype === 'bf16' ? h.to('cuda').cast('bf16') : h.to('cuda'));
    h.dispose();
  };
  put(s.g1, x.g1), put(s.g2, x.g2), put(s.sumsq, x.sumsq), put(s.losses, x.losses), put(s.preds, x.preds), put(s.targets, x.targets);
}

/** The device side of a step: no allocation, no read back. */
function body(s: Setup) {
  s.ledger.micro(s.losses, s.preds, s.targets, 1);
  s.ledger.end(s.sumsq, 0, 1.5, 4);
  ops.adamwMulti([{ params: s.p1, grads: s.g1, m: s.m1, v: s.v1 }, { params: s.p2, grads: s.g2, m: s.m2, v: s.v2, copyTo: s.copy2 }],
    { lr: 1e-2, step: 1, weightDecay: 0.01, stochasticRounding: true, seed: 9, control: s.ledger.control });
  zeroMany([s.g1, s.g2]);
}

function snapshot(s: Setup) {
  const rec = s.ledger.read(1)[0];
  return { tensors: [s.p1, s.m1, s.v1, s.p2, s.m2, s.v2, s.copy2, s.g1, s.g2].map((x) => [...x.toArray()]), rec };
}

function dispose(s: Setup) {
  for (const [k, v] of Object.entries(s)) if (k !== 'ledger') (v as Tensor).dispose();
  s.ledger.dispose();
}

t.test('a captured optimizer step, replayed over several steps, equals the eager steps bit for bit', { skip: SKIP_NO_CUDA }, async (t) => {
  const eager = setup(), graphed = setup();
  // a warm-up step on both (uploads the multi-tensor tables: nothing is uploaded inside the capture)
  for (const s of [eager, graphed]) upload(s, 0), body(s);
  const graph = CudaGraph.capture(() => body(graphed));
  for (let k = 1; k <= STEPS; k++) {
    upload(eager, k);
    body(eager);
    upload(graphed, k);
    graph.launch();
    const a = snapshot(eager), b = snapshot(graphed);
    t.same(b.rec, a.rec, `step ${k}: the ledger record (${a.rec.status}, loss ${a.rec.loss.toFixed(4)}, norm ${a.rec.gradNorm.toFixed(4)})`);
    exact(t, b.tensors.flat(), a.tensors.flat(), `step ${k}: parameters, moments, compute copy, zeroed gradients`);
  }
  t.equal(snapshot(eager).rec.status, 'applied', 'the last step applied');
  graph.dispose();
  throwsCode(t, () => graph.launch(), 'XFT_DISPOSED', /disposed/, 'a disposed graph does not launch');
  dispose(eager);
  dispose(graphed);
});

t.test('inside a capture: a read back, a synchronisation or an upload fails clearly; the stream works after', { skip: SKIP_NO_CUDA }, async (t) => {
  const x = Tensor.from([1, 2, 3], [3], { device: 'cuda' });
  throwsCode(t, () => CudaGraph.capture(() => x.toArray()), 'XFT_CUDA', /capturing/, 'toArray inside a capture');
  throwsCode(t, () => CudaGraph.capture(() => synchronize()), 'XFT_CUDA', /capturing/, 'synchronize inside a capture');
  const host = Tensor.from([7, 8, 9], [3]);
  throwsCode(t, () => CudaGraph.capture(() => x.copy_(host)), 'XFT_CUDA', /capturing/, 'an upload through the staging buffers inside a capture');
  if (/emulation/.test(backend().name ?? ''))
    throwsCode(t, () => CudaGraph.capture(() => Tensor.zeros([4], { device: 'cuda' })), 'XFT_CUDA', /capturing|memory/, 'emulator: an allocation inside a capture');
  t.same([...x.toArray()], [1, 2, 3], 'the stream runs ops again after a failed capture');
  x.copy_(host);
  t.same([...x.toArray()], [7, 8, 9], 'and uploads');
  const g = CudaGraph.capture(() => undefined);
  g.launch();
  g.dispose();
  t.pass('an empty capture replays');
  x.dispose();
  host.dispose();
});

t.test('the CPU backend has no graphs: XFT_DEVICE', { skip: CUDA ? 'the CUDA backend is in use' : false }, async (t) => {
  throwsCode(t, () => CudaGraph.capture(() => undefined), 'XFT_DEVICE', /CUDA graphs need the CUDA backend/, 'capture on the CPU backend');
});

// ---- the whole training step in a graph (TrainOptions.cudaGraph) ----

const config = tinyConfig({ hidden_size: 32, intermediate_size: 48, num_attention_heads: 2, num_key_value_heads: 1, num_hidden_layers: 2 });

function rowsOf(s: number, n = 8, T = 8) {
  const R = rng(s);
  return Array.from({ length: n }, () => {
    const ids = Array.from({ length: T + 1 }, () => R.int(0, config.vocab_size));
    return { ids: ids.slice(0, -1), targets: ids.slice(1).map((x, i) => (i % 4 === 0 ? -1 : x)) };
  });
}

/** A dense model, or its 4-expert top-3 MoE (router noise on or off). */
function build(kind: 'dense' | 'moe', dtype: 'f32' | 'bf16', device: 'cpu' | 'cuda', noise = false): Model {
  const dense = createDense(config, { seed: 11, std: 0.1, dtype, device });
  if (kind === 'dense') return dense;
  const moe = upcycle(dense, { experts: 4, topK: 3, seed: 12, noise });
  dense.dispose();
  return moe;
}

const stateOf = (s: TrainState) => [...s.m, ...s.v, ...(s.master ?? [])].map(([n, x]) => [n, x.toArray()] as const);

// XFT_TEST_FAST=1 (the shake and asan emulation runs): the dense case and the MoE one with a skipped step
const ALL_GRAPH_CASES: { name: string; kind: 'dense' | 'moe'; dtype: 'f32' | 'bf16'; o: Partial<TrainOptions>; poison?: boolean }[] = [
  { name: 'dense f32, clip, warmup, logEvery 2', kind: 'dense', dtype: 'f32', o: { clip: 0.5, warmupSteps: 2, logEvery: 2 } },
  { name: 'MoE bf16 mixed, stochastic rounding, bf16 gradients, recompute, logEvery 3', kind: 'moe', dtype: 'bf16',
    o: { stochasticRounding: true, gradDtype: 'bf16', recompute: true, logEvery: 3, weightDecay: 0.01 } },
  { name: 'MoE f32, a non-finite step skipped (skipNonFinite 1), logEvery 5', kind: 'moe', dtype: 'f32', o: { skipNonFinite: 1, logEvery: 5 }, poison: true },
];
const GRAPH_CASES = ALL_GRAPH_CASES.filter((c) => process.env.XFT_TEST_FAST !== '1' || c.dtype === 'f32');

for (const c of GRAPH_CASES)
  t.test(`a captured training step (${c.name}): 5 steps equal 5 steps without the graph, bit for bit`, { skip: SKIP_NO_CUDA }, async (t) => {
    const rows = rowsOf(seed() % 100000);
    const run = (cudaGraph: boolean) => {
      const m = build(c.kind, c.dtype, 'cuda');
      const warnings: string[] = [];
      const r = new Trainer(m, rows, { lr: 3e-3, batchSize: 4, microBatch: 2, steps: 5, seed: 5, ...c.o, cudaGraph, onWarning: (w) => warnings.push(w) });
      const syncs: number[] = [];
      while (!r.done) {
        // step 5 reads a poisoned embedding (NaN loss): skipped on the device, in a replay as without the graph
        if (c.poison && r.state.step === 4) m.embed.value.fill_(NaN);
        const s0 = memoryStats().hostSyncs ?? 0;
        r.step();
        syncs.push((memoryStats().hostSyncs ?? 0) - s0);
      }
      r.flush();
      const out = { losses: [...r.losses], weights: m.params().filter((p) => !c.poison || p !== m.embed).map((p) => p.value.toArray()), state: stateOf(r.state), syncs, warnings, skipped: r.skipped };
      r.dispose();
      disposeState(r.state);
      m.dispose();
      return out;
    };
    const eager = run(false), graphed = run(true);
    t.same(graphed.losses.map(String), eager.losses.map(String), `losses ${eager.losses.map((x) => x.toFixed(4)).join(' ')}`);
    exact(t, graphed.weights.flatMap((w) => [...w]), eager.weights.flatMap((w) => [...w]), 'weights');
    exact(t, graphed.state.flatMap(([, x]) => [...x]), eager.state.flatMap(([, x]) => [...x]), 'optimizer state (moments, masters)');
    t.same(graphed.warnings, eager.warnings, `the same warnings (${eager.warnings.length})`);
    t.equal(graphed.skipped, c.poison ? 1 : 0, `${graphed.skipped} step(s) skipped, as without the graph`);
    const every = c.o.logEvery ?? 1;
    const expected = graphed.syncs.map((_, i) => ((i + 1) % every === 0 || i === 4 ? 1 : 0));
    t.same(graphed.syncs.slice(2), expected.slice(2), `host syncs per replayed step: only the read at each log point (${graphed.syncs.join(' ')})`);
  });

t.test('cudaGraph refusals: a typed error before anything is allocated, never a wrong replay', async (t) => {
  const rows = rowsOf(3);
  const o: TrainOptions = { lr: 1e-3, batchSize: 4, microBatch: 2, steps: 2, cudaGraph: true };
  const cpu = build('dense', 'f32', 'cpu');
  throwsCode(t, () => new Trainer(cpu, rows, o), 'XFT_DEVICE', /cudaGraph: CUDA graphs need the CUDA backend/, 'a CPU model');
  throwsCode(t, () => new Trainer(cpu, rows, { ...o, cudaGraph: 1 as unknown as boolean }), 'XFT_VALUE', /cudaGraph/, 'cudaGraph not a boolean');
  cpu.dispose();
  if (!CUDA) return;
  const noisy = build('moe', 'f32', 'cuda', true);
  throwsCode(t, () => new Trainer(noisy, rows, o), 'XFT_VALUE', /router noise/, 'MoE with router noise (per-step seeds are launch arguments)');
  noisy.dispose();
  const m = build('dense', 'f32', 'cuda');
  throwsCode(t, () => new Trainer(m, rows, { ...o, optimizer: 'adafactor' }), 'XFT_VALUE', /only AdamW/, 'Adafactor');
  throwsCode(t, () => new Trainer(m, rows, { ...o, parallel: new DataParallel(new SoloGroup()) }), 'XFT_VALUE', /data parallelism/, 'data parallel');
  m.dispose();
});
