// CUDA graphs (lib/graph.ts, cuda/runtime.cu; the emulator records a capture and replays it,
// cuda/dev/emu/cuda_runtime.h): the device side of an optimizer step (the ledger's micro-batch sums
// and step end, multi-tensor AdamW with stochastic rounding and the control block, the zeroing)
// captured once and replayed over several steps equals the same ops run eagerly, bit for bit, with
// each step's inputs read from device memory (a non-finite step skipped alike); what a capture
// refuses (a read back, a synchronisation, an upload, on the emulator an allocation) fails clearly
// and leaves the stream usable; the CPU backend has no graphs (XFT_DEVICE).
import t from 'tap';
import { Tensor, CudaGraph, StepLedger, zeroMany, backend, synchronize, ops } from '../lib/index';
import { CUDA, SKIP_NO_CUDA, rng } from './helpers/ref';
import { exact, throwsCode } from './helpers/check';
import { setupGpuTest } from './helpers/gpu';

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
