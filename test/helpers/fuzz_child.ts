// One batch of the fuzz suite (test/13.fuzz.ts runs it in a child process so that a crash or a hang is
// counted): calls every public op, Tensor constructor and method, and library function, with valid
// arguments in which one or two are replaced by bad values (wrong types, null, undefined, NaN, negative,
// huge, fake tensors, disposed tensors, views, wrong dtypes and shapes, cyclic objects, sparse arrays,
// typed arrays of other kinds). Every call must return or throw an XftError.
//
// usage: fuzz_child.ts <seed> <batch> <first> <count> <mode>   mode: general | index-values
// (XFT_FUZZ_ENTRY=<regex>: only the entry points whose name matches)
// Call i is generated from (seed, batch, i) alone, so a batch can restart after a crashed call.
// Before each call its number and name go to stdout (written synchronously: the last line names the
// call that crashed); at the end one JSON line with the counts.
import * as fs from 'node:fs';
import {
  Tensor, XftError, ops, manualSeed, setDefaultDevice, disposeAll, memoryStats, synchronize, resetPeakMemory, backend,
  createDense, upcycle, mergeable, toDense, copyDense, countParameters, tinyConfig, llamaConfig, moeConfig, parameterCount,
  parseJsonl, formatPrompt, ByteTokenizer, countTargets, concatRows, encodeExample, shuffle, split, toRows, batches,
  pickToken, generate, train, evaluate, learningRate, adafactorState, zeroMany,
} from '../../lib/index';

const [seedArg, batchArg, firstArg, countArg, mode] = process.argv.slice(2);
const SEED = Number(seedArg), BATCH = Number(batchArg), FIRST = Number(firstArg), COUNT = Number(countArg);

/** mulberry32 seeded from (seed, batch, call) */
function rngFor(call: number) {
  let a = (Math.imul(SEED ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(BATCH + 1, 0xc2b2ae35) ^ Math.imul(call + 1, 0x27d4eb2f)) >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number) => Math.floor(next() * n);
  return { next, int, pick: <T>(xs: readonly T[]): T => xs[int(xs.length)], chance: (p: number) => next() < p };
}
type Rng = ReturnType<typeof rngFor>;

// ---- values ----

const created: unknown[] = [];
const keep = <T>(v: T): T => (created.push(v), v);
const f32 = (shape: number[], r: Rng) => keep(Tensor.from(Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => r.next() * 2 - 1), shape));
const i32 = (values: number[], shape = [values.length]) => keep(Tensor.from(values, shape, { dtype: 'i32' }));
const perm = (n: number, r: Rng) => {
  const p = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = r.int(i + 1);
    [p[i], p[j]] = [p[j], p[i]];
  }
  return p;
};

function cyclic(): object {
  const o: Record<string, unknown> = { a: 1 };
  o.self = o;
  o.list = [o, Tensor.zeros([1])];
  keep((o.list as unknown[])[1]);
  return o;
}

/** Set for entry points whose work grows with a count (train steps, generated tokens): a huge count
 * there is a valid request that takes forever, not a bad argument. */
let noHugeCounts = false;

/** A bad value: anything an argument should not be. */
function badValue(r: Rng): unknown {
  for (;;) {
    const v = anyBadValue(r);
    if (!(noHugeCounts && typeof v === 'number' && v > 1000 && Number.isFinite(v))) return v;
  }
}

function anyBadValue(r: Rng): unknown {
  const cases: (() => unknown)[] = [
    () => null, () => undefined, () => NaN, () => -1, () => 0, () => 1, () => 3, () => 1.5, () => -0, () => Infinity, () => -Infinity,
    () => 2 ** 31, () => 2 ** 32, () => 2 ** 53, () => 1e300, () => -(2 ** 31), () => 'x', () => '', () => 'f32', () => 'cpu', () => 'cuda', () => 'i32',
    () => true, () => false, () => ({}), () => [], () => [2, 3], () => [-1], () => [2 ** 40, 2 ** 40], () => [1.5], () => [NaN], () => ['2'],
    // eslint-disable-next-line no-sparse-arrays
    () => [1, , 3], () => new Array(4), () => cyclic(), () => { const a: unknown[] = [1]; a.push(a); return a; },
    () => Symbol('s'), () => 10n, () => () => 1, () => new BigInt64Array(4), () => new BigUint64Array(2), () => new Float64Array(4),
    () => new Int32Array(4), () => new Uint8Array(16), () => new Int8Array(3), () => new DataView(new ArrayBuffer(8)), () => new ArrayBuffer(8),
    () => Object.create(null), () => new Date(0), () => new Map([[1, 2]]), () => ({ length: 2 ** 32 }), () => ({ length: -1 }), () => ({ length: 2 }),
    () => Object.create(Tensor.prototype), () => ({ shape: [4], dtype: 'f32', device: 'cpu', offset: 0, numel: 4, rank: 1, disposed: false, storage: 1 }),
    () => { const t = Tensor.zeros([4]); t.dispose(); return t; },
    () => keep(Tensor.zeros([3, 4], { dtype: 'bf16' })), () => keep(Tensor.zeros([4], { dtype: 'i32' })), () => keep(Tensor.zeros([])),
    () => keep(Tensor.zeros([0, 4])), () => keep(Tensor.zeros([2, 3, 4])), () => keep(Tensor.zeros([4, 4]).narrow(1, 2)),
    () => keep(Tensor.full([5], NaN)), () => keep(Tensor.zeros([7, 1])),
  ];
  return r.pick(cases)();
}

/** A bad value, or a valid-looking value of the wrong kind for `v`. */
function mutate(v: unknown, r: Rng): unknown {
  if (v !== null && typeof v === 'object' && !Array.isArray(v) && !Tensor.isTensor(v) && r.chance(0.6)) {
    // an options object: one field replaced, removed, or a stray one added
    const o = { ...(v as Record<string, unknown>) };
    const keys = Object.keys(o);
    if (keys.length && r.chance(0.7)) {
      const k = r.pick(keys);
      if (r.chance(0.2)) delete o[k];
      else o[k] = badValue(r);
    } else o[r.pick(['validate', 'dtype', 'device', 'seed', 'topK', 'out', 'into', 'dw', 'eps', 'k'])] = badValue(r);
    return o;
  }
  if (Array.isArray(v) && v.length && r.chance(0.5)) {
    const a = [...v];
    a[r.int(a.length)] = badValue(r);
    return a;
  }
  return badValue(r);
}

// ---- the entry points, each with a builder of valid arguments ----

type Entry = [name: string, build: (r: Rng) => unknown[], call: (...args: unknown[]) => unknown];
const fn = (f: unknown) => f as (...args: unknown[]) => unknown;
const o = ops as unknown as Record<string, (...args: unknown[]) => unknown>;
const op = (name: string, build: (r: Rng) => unknown[]): Entry => [`ops.${name}`, build, (...a) => o[name](...a)];
const method = (name: string, build: (r: Rng) => unknown[]): Entry => [`Tensor#${name}`, build, (self, ...a) => (Tensor.prototype as unknown as Record<string, (...x: unknown[]) => unknown>)[name].apply(self, a)];
const getter = (name: string): Entry => [`Tensor#${name}`, (r) => [f32([2, 3], r)], (self) => Reflect.get(Tensor.prototype, name, self)];

const tiny = () => tinyConfig({ hidden_size: 8, intermediate_size: 16, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, vocab_size: 16 });
function denseModel() {
  return keep(createDense(tiny(), { seed: 1 }));
}
function moeModel() {
  const d = createDense(tiny(), { seed: 1 });
  const m = upcycle(d, { experts: 4, topK: 3 });
  d.dispose();
  return keep(m);
}

function routing(r: Rng) {
  const logits = f32([4, 3], r);
  return { logits, routing: keep(ops.routeShared(logits, { topK: 3 })) };
}

const entries: Entry[] = [
  // Tensor constructors
  ['Tensor.empty', () => [[2, 3], { dtype: 'f32', device: 'cpu' }], fn(Tensor.empty)],
  ['Tensor.from', (r) => [Array.from({ length: 6 }, () => r.next()), [2, 3], { dtype: r.pick(['f32', 'bf16', 'i32']) === 'i32' ? 'i32' : 'f32' }], fn(Tensor.from)],
  ['Tensor.from', () => [new Int32Array(4), [4], { dtype: 'i32' }], fn(Tensor.from)],
  ['Tensor.fromBytes', () => [new Uint8Array(8), [2], { dtype: 'f32' }], fn(Tensor.fromBytes)],
  ['Tensor.full', () => [[3], 2.5, { dtype: 'f32' }], fn(Tensor.full)],
  ['Tensor.zeros', () => [[3, 2], { dtype: 'i32' }], fn(Tensor.zeros)],
  ['Tensor.ones', () => [[3], { dtype: 'bf16' }], fn(Tensor.ones)],
  ['Tensor.randn', () => [[4], { seed: 3, mean: 0, std: 1, dtype: 'f32' }], fn(Tensor.randn)],
  ['Tensor.uniform', () => [[4], { seed: 3, low: -1, high: 1, dtype: 'f32' }], fn(Tensor.uniform)],
  ['Tensor.uniform', () => [[4], { seed: 3, low: 0, high: 9, dtype: 'i32' }], fn(Tensor.uniform)],
  ['Tensor.isTensor', (r) => [f32([2], r)], fn(Tensor.isTensor)],
  // Tensor methods and getters
  method('toArray', (r) => [f32([2, 3], r)]),
  method('toBytes', (r) => [f32([2, 3], r)]),
  method('item', (r) => [f32([1], r)]),
  method('to', (r) => [f32([2], r), 'cpu']),
  method('clone', (r) => [f32([2], r)]),
  method('cast', (r) => [f32([2], r), r.pick(['f32', 'bf16', 'i32'])]),
  method('reshape', (r) => [f32([2, 3], r), [3, -1]]),
  method('narrow', (r) => [f32([4, 2], r), 1, 2]),
  method('copy_', (r) => [f32([2, 3], r), f32([2, 3], r)]),
  method('fill_', (r) => [f32([2, 3], r), 1.5]),
  method('dispose', (r) => [f32([2], r)]),
  method('describe', (r) => [f32([2], r)]),
  method('toString', (r) => [f32([2], r)]),
  getter('numel'), getter('rank'), getter('bytes'), getter('disposed'), getter('storage'),
  // library functions
  ['manualSeed', () => [7], fn(manualSeed)],
  ['setDefaultDevice', () => ['cpu'], fn(setDefaultDevice)],
  ['disposeAll', (r) => [f32([2], r), [f32([1], r)], { a: f32([1], r) }], fn(disposeAll)],
  ['memoryStats', () => [], fn(memoryStats)],
  ['synchronize', () => [], fn(synchronize)],
  ['resetPeakMemory', () => [], fn(resetPeakMemory)],
  ['backend', () => [], fn(backend)],
  ['llamaConfig', () => [{ hidden_size: 8, intermediate_size: 16, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, vocab_size: 16 }], fn(llamaConfig)],
  ['moeConfig', () => [{ num_experts: 4, num_selects: 3 }], fn(moeConfig)],
  ['tinyConfig', () => [{ hidden_size: 8 }], fn(tinyConfig)],
  ['parameterCount', () => [tiny()], fn(parameterCount)],
  ['createDense', () => [tiny(), { seed: 1 }], fn(createDense)],
  ['upcycle', () => [denseModel(), { experts: 4, topK: 3 }], fn(upcycle)],
  ['mergeable', () => [moeModel(), {}], fn(mergeable)],
  ['toDense', () => [keep(mergeable(moeModel()))], fn(toDense)],
  ['copyDense', () => [denseModel()], fn(copyDense)],
  ['countParameters', () => [denseModel(), { trainableOnly: true }], fn(countParameters)],
  ['Model#logits', () => [denseModel(), i32([1, 2, 3, 4]), 1, 4], (m, ...a) => (m as { logits: (...x: unknown[]) => unknown }).logits(...a)],
  ['Model#forward', () => [moeModel(), i32([1, 2, 3, 4]), i32([2, 3, 4, -100]), 1, 4, { training: true, seed: 1n }],
    (m, ...a) => (m as { forward: (...x: unknown[]) => unknown }).forward(...a)],
  // data, generation and training
  ['parseJsonl', () => ['{"instruction":"a","response":"b"}\n{"problem":"c","solution":"d"}\n', 'src.jsonl'], fn(parseJsonl)],
  ['formatPrompt', () => ['Write a function.'], fn(formatPrompt)],
  ['ByteTokenizer#encode', () => [new ByteTokenizer(), 'abc'], (tk, ...a) => (tk as ByteTokenizer).encode(...(a as [string]))],
  ['ByteTokenizer#decode', () => [new ByteTokenizer(), [97, 98]], (tk, ...a) => (tk as ByteTokenizer).decode(...(a as [number[]]))],
  ['countTargets', () => [[1, -1, 2]], fn(countTargets)],
  ['concatRows', () => [[{ ids: [1, 2], targets: [2, 3] }, { ids: new Int32Array([4, 5]), targets: [5, -1] }], 'ids'], fn(concatRows)],
  ['encodeExample', () => [new ByteTokenizer(), { instruction: 'a', response: 'b' }], fn(encodeExample)],
  ['shuffle', () => [[1, 2, 3, 4], 7], fn(shuffle)],
  ['split', () => [[1, 2, 3, 4], 0.25, 7], fn(split)],
  ['toRows', () => [[{ ids: [1, 2, 3], targets: [2, 3, -1] }, { ids: [4, 5, 6], targets: [5, 6, 7] }], 4, 'pack', 0], fn(toRows)],
  ['batches', () => [[{ ids: [1, 2], targets: [2, 3] }, { ids: [4, 5], targets: [5, -1] }], 1, 3], (...a) => [...(batches as (...x: unknown[]) => Iterable<unknown>)(...a)]],
  ['pickToken', (r) => [[0.1, 2, -1, 0.5], 0.8, 0.9, () => r.next()], fn(pickToken)],
  ['learningRate', () => [3, 1e-3, 2, 10], fn(learningRate)],
  ['generate', () => [denseModel(), new ByteTokenizer(), 'ab', { maxNewTokens: 2, temperature: 0.5, topP: 0.9, seed: 1 }], fn(generate)],
  ['train', () => [denseModel(), [{ ids: [1, 2, 3, 4], targets: [2, 3, 4, -1] }, { ids: [5, 6, 7, 8], targets: [6, 7, 8, 9] }],
    { lr: 1e-3, batchSize: 1, steps: 1 }], (...a) => keep((train as (...x: unknown[]) => { state: unknown }).apply(null, a).state)],
  ['zeroMany', (r) => [[f32([3], r), f32([2, 5], r)]], fn(zeroMany)],
  ['evaluate', () => [denseModel(), [{ ids: [1, 2, 3, 4], targets: [2, 3, 4, -1] }], { batchSize: 1 }], fn(evaluate)],
  // the XFT ops
  op('routeShared', (r) => [f32([4, 3], r), { topK: 3, normalize: true, shared: true }]),
  op('routeSharedBackward', (r) => { const x = routing(r); return [x.logits, x.routing, f32([4, 3], r), { dImportance: f32([3], r) }]; }),
  op('groupedGemm', (r) => [f32([6, 8], r), f32([3, 5, 8], r), i32([0, 2, 4, 6]), { validate: true }]),
  op('groupedGemmBackward', (r) => [f32([6, 8], r), f32([3, 5, 8], r), i32([0, 2, 4, 6]), f32([6, 5], r), { dx: true, dw: f32([3, 5, 8], r) }]),
  op('mergeExperts', (r) => [[f32([3, 4, 5], r)], f32([2], r), 0.5]),
  op('mergeExpertsBackward', (r) => [[f32([3, 4, 5], r)], f32([2], r), 0.5, [f32([4, 5], r)], { into: f32([2], r) }]),
  // layer ops
  op('embedding', (r) => [i32([0, 3, 9, 1, 2, 4], [2, 3]), f32([10, 8], r)]),
  op('embeddingBackward', (r) => [i32([0, 3, 9, 1, 2, 4], [2, 3]), f32([2, 3, 8], r), 10, { into: f32([10, 8], r) }]),
  op('rmsnorm', (r) => [f32([4, 8], r), f32([8], r), { eps: 1e-6 }]),
  op('rmsnormBackward', (r) => [f32([4, 8], r), f32([8], r), f32([4], r), f32([4, 8], r), { dw: true }]),
  op('rope', (r) => [f32([4, 8], r), { headDim: 4, seqLen: 2, theta: 10000, scalingFactor: 1 }]),
  op('ropeBackward', (r) => [f32([2, 2, 8], r), { headDim: 4 }]),
  op('swiglu', (r) => [f32([4, 8], r), f32([4, 8], r)]),
  op('swigluBackward', (r) => [f32([4, 8], r), f32([4, 8], r), f32([4, 8], r)]),
  op('add', (r) => [f32([4, 8], r), f32([4, 8], r), {}]),
  op('axpby', (r) => [0.5, f32([6], r), 2, f32([6], r)]),
  op('tanh', (r) => [f32([4, 8], r)]),
  op('tanhBackward', (r) => [f32([4, 8], r), f32([4, 8], r)]),
  op('routerNoise', (r) => [f32([4, 3], r), f32([4, 3], r), { seed: 1, eps: 0.01 }]),
  op('routerNoiseBackward', (r) => [f32([4, 3], r), f32([4, 3], r), { seed: 1 }]),
  op('sumSquares', (r) => [[f32([4], r), f32([2, 2], r)]]),
  // train ops
  op('attention', (r) => [f32([4, 8], r), f32([4, 4], r), f32([4, 4], r), { batch: 2, heads: 2, kvHeads: 1 }]),
  op('attentionBackward', (r) => {
    const q = f32([4, 8], r), k = f32([4, 4], r), v = f32([4, 4], r), a = keep(ops.attention(q, k, v, { batch: 2, heads: 2, kvHeads: 1 }));
    return [q, k, v, a.out, a.lse, f32([4, 8], r), { batch: 2, heads: 2, kvHeads: 1 }];
  }),
  op('crossEntropy', (r) => [f32([4, 10], r), i32([1, -100, 9, 0]), { validate: true }]),
  op('crossEntropyBackward', (r) => [f32([4, 10], r), i32([1, -100, 9, 0]), f32([4], r), { inPlace: false }]),
  op('adamw', (r) => [f32([6], r), f32([6], r), f32([6], r), keep(Tensor.ones([6])), { lr: 1e-3, step: 1, weightDecay: 0.1, copyTo: f32([6], r) }]),
  op('adafactor', (r) => {
    const st = (shape: number[]) => {
      const s = adafactorState(shape, 'cpu');
      [s.row, s.col, s.v].forEach((x) => x && keep(x));
      return s;
    };
    return [[{ params: f32([3, 4], r), grads: f32([3, 4], r), state: st([3, 4]) }, { params: f32([2, 3, 2], r), grads: f32([2, 3, 2], r), state: st([2, 3, 2]), clipPerSlice: true },
      { params: f32([5], r), grads: f32([5], r), state: st([5]), copyTo: f32([5], r) }], { lr: 1e-3, step: 2, stochasticRounding: r.chance(0.5), seed: 3 }];
  }),
  op('adamwMulti', (r) => [[{ params: f32([6], r), grads: f32([6], r), m: f32([6], r), v: keep(Tensor.ones([6])) }, { params: f32([2, 3], r), grads: f32([2, 3], r), m: f32([2, 3], r), v: keep(Tensor.ones([2, 3])), copyTo: f32([6], r) }],
    { lr: 1e-3, step: 1, weightDecay: 0.1, control: keep(Tensor.from([1, 0], [2])) }]),
  op('invertPermutation', (r) => [i32(perm(6, r)), { validate: true }]),
  op('permute', (r) => [f32([3, 4], r), i32(perm(6, r)), 2, {}]),
  op('permuteBackward', (r) => [f32([6, 4], r), i32(perm(6, r)), 2, {}]),
  op('unpermute', (r) => [f32([6, 4], r), i32(perm(6, r)), f32([3, 2], r), {}]),
  op('unpermuteBackward', (r) => [f32([3, 4], r), f32([6, 4], r), i32(perm(6, r)), f32([3, 2], r), {}]),
  op('balanceLoss', (r) => [f32([3], r), f32([3], r), { weight: 0.01 }]),
  op('balanceLossBackward', (r) => [f32([3], r), f32([3], r), { weight: 0.01, dLoss: 1 }]),
  op('loadEstimate', (r) => [f32([4, 3], r), f32([4, 3], r), f32([4, 3], r), { k: 2, eps: 0.01 }]),
  op('loadEstimateBackward', (r) => [f32([4, 3], r), f32([4, 3], r), f32([4, 3], r), f32([3], r), { k: 2, seed: 5 }]),
];

// index values made bad while everything else is valid: the ops must validate them or ignore them safely
const corruptIndex = (r: Rng) => r.pick([1e6, -7, 0, 2 ** 31 - 1, -(2 ** 31), 5, 6, 3]);
const indexEntries: Entry[] = [
  op('routeSharedBackward', (r) => {
    const x = routing(r);
    if (r.chance(0.5)) x.routing.experts.fill_(corruptIndex(r));
    else x.routing.experts.narrow(r.int(4), 1).fill_(corruptIndex(r));
    return [x.logits, x.routing, f32([4, 3], r), r.chance(0.5) ? { dImportance: f32([3], r) } : {}];
  }),
  op('routeSharedBackward', (r) => [f32([4, 3], r), { experts: i32(Array.from({ length: 12 }, () => corruptIndex(r)), [4, 3]), weights: f32([4, 3], r),
    tokens: 4, topK: 3, numExperts: 4, normalize: true, shared: true }, f32([4, 3], r)]),
  op('groupedGemm', (r) => [f32([6, 8], r), f32([3, 5, 8], r), i32([r.pick([0, 2, -5, 1e6]), 2, r.pick([4, 1, 100]), r.pick([6, 5, 1e6, -1])]), { validate: false }]),
  op('groupedGemmBackward', (r) => [f32([6, 8], r), f32([3, 5, 8], r), i32([r.pick([0, -3, 1e6]), 4, 2, r.pick([6, 1e6, 3])]), f32([6, 5], r), { validate: false }]),
  op('invertPermutation', (r) => [i32(Array.from({ length: 6 }, () => r.chance(0.5) ? r.int(6) : corruptIndex(r))), { validate: false }]),
  op('permute', (r) => [f32([3, 4], r), i32(Array.from({ length: 6 }, () => r.chance(0.5) ? r.int(6) : corruptIndex(r))), 2, { validate: false }]),
  op('permuteBackward', (r) => [f32([6, 4], r), i32(Array.from({ length: 6 }, () => r.chance(0.5) ? r.int(6) : corruptIndex(r))), 2, { validate: false }]),
  op('unpermute', (r) => [f32([6, 4], r), i32(Array.from({ length: 6 }, () => r.chance(0.5) ? r.int(6) : corruptIndex(r))), f32([3, 2], r), { validate: false }]),
  op('unpermuteBackward', (r) => [f32([3, 4], r), f32([6, 4], r), i32(Array.from({ length: 6 }, () => r.chance(0.5) ? r.int(6) : corruptIndex(r))), f32([3, 2], r), { validate: false }]),
  op('embedding', (r) => [i32([0, corruptIndex(r), 9, 1, 2, 4], [2, 3]), f32([10, 8], r)]),
  op('embeddingBackward', (r) => [i32([0, corruptIndex(r), 9, 1, 2, 4], [2, 3]), f32([2, 3, 8], r), 10, {}]),
  op('crossEntropy', (r) => [f32([4, 10], r), i32([1, corruptIndex(r), 9, 0]), { validate: false }]),
  op('crossEntropyBackward', (r) => [f32([4, 10], r), i32([1, corruptIndex(r), 9, 0]), f32([4], r), { validate: false }]),
  ['Model#forward', (r) => [denseModel(), i32([1, corruptIndex(r), 3, 4]), i32([2, 3, corruptIndex(r), -100]), 1, 4, { training: false }],
    (m, ...a) => (m as { forward: (...x: unknown[]) => unknown }).forward(...a)],
];

// ---- the run ----

const KNOWN_CODES = new Set(['XFT_SHAPE', 'XFT_DTYPE', 'XFT_DEVICE', 'XFT_DISPOSED', 'XFT_VALUE', 'XFT_TYPE', 'XFT_OOM', 'XFT_CUDA', 'XFT_IO', 'XFT_FORMAT', 'XFT_NATIVE', 'XFT_INDEX', 'XFT_NONFINITE', 'XFT_BUSY']);
const counts = { calls: 0, returned: 0, xftErrors: 0, otherErrors: 0, leakedTensors: 0 };
const leaks: Record<string, number> = {};
const others: { call: number; name: string; error: string }[] = [];
// XFT_FUZZ_ENTRY=<regex> keeps only the entry points whose name matches (to chase one failure)
const only = process.env.XFT_FUZZ_ENTRY ? new RegExp(process.env.XFT_FUZZ_ENTRY) : null;
const list = (mode === 'index-values' ? indexEntries : entries).filter(([name]) => !only || only.test(name));

for (let call = FIRST; call < FIRST + COUNT; call++) {
  const r = rngFor(call);
  const [name, build, invoke] = list[r.int(list.length)];
  noHugeCounts = name === 'train' || name === 'generate';
  fs.writeSync(1, `call ${call} ${name}\n`);
  let args: unknown[] = [];
  try {
    args = build(r);
    if (mode !== 'index-values') {
      // mostly one or two bad arguments; sometimes all valid, sometimes one missing or one extra
      const roll = r.next();
      if (roll < 0.08) { /* valid */ } else if (roll < 0.14 && args.length) args = args.slice(0, Math.max(/^(Model|ByteTokenizer)#/.test(name) ? 1 : 0, r.int(args.length)));
      else if (roll < 0.18) args = [...args, badValue(r)];
      else {
        const n = r.chance(0.25) ? 2 : 1;
        const from = /^(Model|ByteTokenizer)#/.test(name) ? 1 : 0; // a model or tokenizer method keeps its receiver
        for (let i = 0; i < n && args.length > from; i++) {
          const at = from + r.int(args.length - from);
          args[at] = mutate(args[at], r);
        }
      }
    }
  } catch (err) {
    // building valid arguments must not fail
    counts.otherErrors++;
    others.push({ call, name: `${name} (building its arguments)`, error: String((err as Error)?.stack ?? err) });
    continue;
  }
  counts.calls++;
  const liveBefore = memoryStats().hostTensors;
  let outcome = 'returned';
  try {
    const result = invoke(...args);
    counts.returned++;
    keep(result);
  } catch (err) {
    outcome = err instanceof XftError ? err.code : 'other';
    if (err instanceof XftError && KNOWN_CODES.has(err.code)) counts.xftErrors++;
    else {
      counts.otherErrors++;
      if (others.length < 50) others.push({ call, name, error: String(err instanceof Error ? `${err.name}: ${err.message}` : err) });
    }
  }
  // free what the call made and took (disposing a model, routing or tensor twice is allowed)
  for (const v of created.splice(0)) {
    try {
      if (v && typeof (v as { dispose?: unknown }).dispose === 'function' && !Tensor.isTensor(v)) (v as { dispose(): void }).dispose();
      disposeAll(v);
    } catch {
      /* a half-made value */
    }
  }
  disposeAll(args);
  // what the call allocated and did not hand back (a call that throws must allocate nothing)
  const leaked = memoryStats().hostTensors - liveBefore;
  if (leaked > 0) {
    counts.leakedTensors += leaked;
    leaks[`${name} (${outcome})`] = (leaks[`${name} (${outcome})`] ?? 0) + leaked;
  }
}
fs.writeSync(1, `${JSON.stringify({ done: true, ...counts, others, leaks })}\n`);
