/**
 * The AdamW op (torch.optim.AdamW semantics) over one tensor: kernel cuda/adamw.cu, CPU twin
 * binding/cpu/adamw.cc. The parameter is an f32 master copy (mixed precision, or an f32 run) or the
 * bf16 weights themselves, updated in place (the `bf16` precision: no master; written back rounded to
 * nearest even, or stochastically with `stochasticRounding`); gradients f32 or bf16; fp32 math.
 */
import { XftError } from '../errors';
import { native, type NativeStorage } from '../native';
import { FLOAT, expectTensor, sameDevice } from '../ops_check';
import { Tensor, dtypeCode, formatShape } from '../tensor';
import { expectBool, expectInt, expectNumber, expectRequiredOptions as expectOptions, expectSeed } from '../validate';

type S = NativeStorage;

/** The native optimizer functions of binding/train_ops.cc (dtype codes: 0 f32, 1 bf16). */
export interface OptimNative {
  adamw(params: S, paramsDtype: number, grads: S, gradsDtype: number, m: S, v: S, n: number, lr: number, beta1: number, beta2: number,
    eps: number, weightDecay: number, step: number, gradScale: number, copyTo: S | null, copyDtype: number, stochastic: number,
    seed: bigint, tensorIndex: number): void;
  adafactor(entries: [S, number, S, number, S | null, S | null, S | null, S | null, number, number, number, number, number, number][],
    lr: number, eps1: number, clipThreshold: number, decayRate: number, step: number, gradScale: number, stochastic: number, seed: bigint): void;
}

export const optimNative = native as unknown as OptimNative;

/** The rounding of a bf16 parameter written in place: seed and tensor index pick the stochastic-rounding stream. */
export interface RoundingOptions {
  /** round the bf16 parameters written in place stochastically (default false: to nearest even) */
  stochasticRounding?: boolean;
  /** seed of the stochastic rounding (with the step and tensorIndex); default 0 */
  seed?: number | bigint;
}

export interface AdamWOptions extends RoundingOptions {
  /** learning rate (>= 0) */
  lr: number;
  /** step t >= 1 (the bias corrections use it) */
  step: number;
  /** default 0.9 */
  beta1?: number;
  /** default 0.999 */
  beta2?: number;
  /** default 1e-8 */
  eps?: number;
  /** decoupled weight decay (torch.optim.AdamW), default 0 */
  weightDecay?: number;
  /** multiplies the gradients first: a clipping factor and/or 1 / accumulation steps. Default 1. */
  gradScale?: number;
  /** also write the updated parameters here (f32 or bf16, params' element count): the compute copy */
  copyTo?: Tensor;
  /** this tensor's index in the run (its stochastic-rounding stream); default 0 */
  tensorIndex?: number;
}

/** Checks the rounding options; returns [stochastic, seed]. */
export function roundingOf(op: string, o: RoundingOptions): [boolean, bigint] {
  return [expectBool(op, 'stochasticRounding', o.stochasticRounding, false), o.seed === undefined ? 0n : expectSeed(op, o.seed)];
}

/**
 * One AdamW step, in place: m = β1 m + (1-β1) g', v = β2 v + (1-β2) g'², p -= lr (m̂ / (√v̂ + eps) +
 * weightDecay p), g' = g gradScale. m, v f32 of params' shape; params f32 or bf16; grads f32 or bf16.
 */
export function adamw(params: Tensor, grads: Tensor, m: Tensor, v: Tensor, options: AdamWOptions): void {
  const op = 'adamw';
  const o = expectOptions<AdamWOptions>(op, options, 'an object with lr and step');
  const p = expectTensor(op, 'params', params, { dtype: FLOAT });
  const shape = { shape: p.shape, shapeName: formatShape(p.shape) };
  const g = expectTensor(op, 'grads', grads, { dtype: FLOAT, ...shape });
  expectTensor(op, 'm', m, { dtype: ['f32'], ...shape });
  expectTensor(op, 'v', v, { dtype: ['f32'], ...shape });
  const lr = expectNumber(op, 'lr', o.lr, 'a finite number >= 0', (x) => x >= 0);
  const step = expectInt(op, 'step', o.step, 1, 2147483647);
  const unit = (x: number) => x >= 0 && x < 1;
  const beta1 = o.beta1 === undefined ? 0.9 : expectNumber(op, 'beta1', o.beta1, 'a number in [0, 1)', unit);
  const beta2 = o.beta2 === undefined ? 0.999 : expectNumber(op, 'beta2', o.beta2, 'a number in [0, 1)', unit);
  const eps = o.eps === undefined ? 1e-8 : expectNumber(op, 'eps', o.eps, 'a finite number >= 0', (x) => x >= 0);
  const wd = o.weightDecay === undefined ? 0 : expectNumber(op, 'weightDecay', o.weightDecay, 'a finite number >= 0', (x) => x >= 0);
  const gradScale = o.gradScale === undefined ? 1 : expectNumber(op, 'gradScale', o.gradScale, 'a finite number', () => true);
  const index = o.tensorIndex === undefined ? 0 : expectInt(op, 'tensorIndex', o.tensorIndex, 0, 2 ** 24 - 1);
  const [stochastic, seed] = roundingOf(op, o);
  let copy: Tensor | null = null;
  if (o.copyTo !== undefined) {
    copy = expectTensor(op, 'copyTo', o.copyTo, { dtype: FLOAT });
    if (copy.numel !== p.numel)
      throw new XftError(`${op}: copyTo ${copy.describe()} must have as many elements as params ${p.describe()}`, 'XFT_SHAPE');
  }
  sameDevice(op, { params, grads, m, v, copyTo: copy });
  optimNative.adamw(p.storage, dtypeCode(p.dtype), g.storage, dtypeCode(g.dtype), m.storage, v.storage, p.numel, lr, beta1, beta2, eps, wd,
    step, gradScale, copy ? copy.storage : null, dtypeCode(copy ? copy.dtype : 'f32'), stochastic ? 1 : 0, seed, index);
}
