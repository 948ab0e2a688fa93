/**
 * The UpIT expansion ops (../shared/UPIT.md stage 2), one typed wrapper per native op: check tensors and
 * options (XftErrors naming the argument), allocate outputs, dispatch to the CPU or CUDA twin.
 * Kernels: cuda/expand.cu (math and reduction order), CPU twin binding/cpu/expand.cc; the two give the
 * same bits for the same inputs.
 *
 *   deltaDots(base, a, others)  Σ_i (a_i − base_i)(o_i − base_i) for each o of others, in fp64
 *   dareMerge(base, a, b, o)    base + α·DARE_p(a − base) + β·DARE_p(b − base), DARE_p(Δ) = M ⊙ Δ / (1 − p),
 *                               M ~ Bernoulli(1 − p) from a counter-based hash of (seed, tensorId, parent, i)
 */
import { XftError, invalidArgument } from '../errors';
import { native } from '../native';
import { type DType, Tensor, dtypeCode, formatShape } from '../tensor';
import { expectArray, expectInt, expectNumber, expectOneOf, expectOptions, expectSeed } from '../validate';
import { FLOAT, expectTensor, sameDevice } from '../ops_check';

/** Checks that `t` is a float tensor with the shape and dtype of `like` (the base). */
function expectLike(op: string, name: string, t: unknown, like: Tensor): Tensor {
  return expectTensor(op, name, t, { dtype: [like.dtype], shape: like.shape, shapeName: `${formatShape(like.shape)} (the shape of base)` });
}

/**
 * Delta dot products: out[q] = Σ_i (a_i − base_i)(others[q]_i − base_i) (a Float64Array of others.length),
 * the differences, products and sums in fp64 in a fixed order (the same bits on CPU and CUDA, run after
 * run). Pass `a` among `others` for its squared norm Σ(a − base)². Tensors: f32 or bf16, one dtype and
 * shape, one device.
 */
export function deltaDots(base: Tensor, a: Tensor, others: readonly Tensor[]): Float64Array {
  const op = 'deltaDots';
  const b = expectTensor(op, 'base', base, { dtype: FLOAT });
  const x = expectLike(op, 'a', a, b);
  const list = expectArray<Tensor>(op, 'others', others, 'an array of tensors shaped like base').map((t, i) => expectLike(op, `others[${i}]`, t, b));
  sameDevice(op, Object.fromEntries([['base', b], ['a', x], ...list.map((t, i) => [`others[${i}]`, t])]));
  if (list.length === 0) return new Float64Array(0);
  const out = Tensor.empty([2 * list.length], { dtype: 'i32', device: b.device });
  try {
    native.expandDeltaDots(b.storage, x.storage, list.map((t) => t.storage), dtypeCode(b.dtype), b.numel, out.storage);
    const words = Int32Array.from(out.toArray() as Int32Array);
    return new Float64Array(words.buffer, 0, list.length);
  } finally {
    out.dispose();
  }
}

export interface DareMergeOptions {
  /** weight of parent a's delta (UpIT's α) */
  alpha: number;
  /** weight of parent b's delta (UpIT's β = 1 − α) */
  beta: number;
  /** DARE drop rate p in [0, 1): each delta entry is dropped with probability p, kept ones scaled by 1/(1 − p) */
  dropRate: number;
  /** seed of the keep masks (a safe integer >= 0 or a bigint) */
  seed: number | bigint;
  /** which tensor of the model this is (0 <= tensorId < 2^32): each tensor gets its own masks */
  tensorId: number;
  /** output dtype (default: the inputs'); the fp64 result is rounded once */
  dtype?: DType;
}

/**
 * UpIT's child: base + (α·DARE_p(a − base) + β·DARE_p(b − base)), elementwise in fp64, rounded once to
 * `dtype`. The masks of a (parent slot 0) and b (slot 1) are independent, and depend only on (seed,
 * tensorId, slot, element index): the same bits on CPU and CUDA. With p = 0 nothing is dropped; a kept
 * entry of a's term is exactly (a_i − base_i) / (1 − p) in fp64.
 */
export function dareMerge(base: Tensor, a: Tensor, b: Tensor, options: DareMergeOptions): Tensor {
  const op = 'dareMerge';
  const t0 = expectTensor(op, 'base', base, { dtype: FLOAT });
  const ta = expectLike(op, 'a', a, t0), tb = expectLike(op, 'b', b, t0);
  const o = expectOptions<DareMergeOptions>(op, options, 'an options object { alpha, beta, dropRate, seed, tensorId, dtype? }');
  const alpha = expectNumber(op, 'alpha', o.alpha);
  const beta = expectNumber(op, 'beta', o.beta);
  const p = expectNumber(op, 'dropRate', o.dropRate, 'a number in [0, 1)', (v) => v >= 0 && v < 1);
  if (o.seed === undefined) throw invalidArgument(op, 'seed', 'an integer (a safe integer or a bigint)', undefined, 'XFT_TYPE');
  if (typeof o.seed === 'number' && o.seed < 0) throw invalidArgument(op, 'seed', 'an integer >= 0', o.seed);
  const seed = expectSeed(op, o.seed);
  const tensorId = expectInt(op, 'tensorId', o.tensorId, 0, 2 ** 32 - 1);
  const dtype = o.dtype === undefined ? t0.dtype : expectOneOf(op, 'dtype', o.dtype, FLOAT, 'XFT_DTYPE');
  const device = sameDevice(op, { base: t0, a: ta, b: tb });
  const out = Tensor.empty(t0.shape, { dtype, device });
  try {
    native.expandChild(t0.storage, ta.storage, tb.storage, dtypeCode(t0.dtype), t0.numel, out.storage, dtypeCode(dtype),
      alpha, beta, p, BigInt.asIntN(64, seed), tensorId);
  } catch (err) {
    out.dispose();
    throw err;
  }
  return out;
}

/** DARE alone: base + scale·DARE_p(x − base) (dareMerge with b = x and β = 0; x takes parent slot 0's mask). */
export function dare(base: Tensor, x: Tensor, options: { dropRate: number; seed: number | bigint; tensorId: number; scale?: number; dtype?: DType }): Tensor {
  const o = expectOptions<{ dropRate: number; seed: number | bigint; tensorId: number; scale?: number; dtype?: DType }>('dare', options);
  if (o.scale !== undefined && (typeof o.scale !== 'number' || !Number.isFinite(o.scale)))
    throw invalidArgument('dare', 'scale', 'a finite number', o.scale, typeof o.scale === 'number' ? 'XFT_VALUE' : 'XFT_TYPE');
  return dareMerge(base, x, x, { alpha: o.scale ?? 1, beta: 0, dropRate: o.dropRate, seed: o.seed, tensorId: o.tensorId, dtype: o.dtype });
}

/** Cosine similarity of two deltas from their products: dot / sqrt(‖a‖²·‖b‖²), clamped to [−1, 1]; both zero: 1, one zero: 0. */
export function cosineFromDots(dot: number, normA: number, normB: number): number {
  if (!(normA >= 0 && normB >= 0)) throw new XftError(`cosineFromDots: squared norms must be >= 0, got ${normA} and ${normB}`, 'XFT_VALUE');
  if (normA === 0 || normB === 0) return normA === normB ? 1 : 0;
  return Math.max(-1, Math.min(1, dot / Math.sqrt(normA * normB)));
}
