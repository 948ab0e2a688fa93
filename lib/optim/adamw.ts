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
    lr: number, eps1: number, clipThreshold: number, decayRate: number, step: number, gradScale: number, stochastic: number, seed: bigint,
    control?: S | null): void;
  adamwMulti(entries: [S, number, S, number, S, S, number, S | null, number, number][], lr: number, beta1: number, beta2: number, eps: number,
    weightDecay: number, step: number, gradScale: number, stochastic: number, seed: bigint, control: S | null, hyper?: S | null): void;
  adamwBiasCorrection(beta: number, step: number): number;
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

/** The device control block of a training step (lib/ledger.ts, cuda/step.h): f32 [2], gradient scale factor and skip flag. */
export interface ControlOption {
  /** read by the kernels from device memory: the gradient scale is multiplied by control[0]; control[1] != 0 skips the update (nothing written) */
  control?: Tensor;
}

/** A step's values on the device, for a captured CUDA graph's replay (lib/train.ts): f32 [4] lr, bc1, bc2, step. */
export interface HyperOption {
  /** read by the kernel instead of lr and step (bias corrections 1 - beta^step from adamwBiasCorrection; step below 2^24) */
  hyper?: Tensor;
}

/** AdamW's bias correction 1 - beta^step, as the kernels' launchers compute it (f32): for a `hyper` block. */
export function adamwBiasCorrection(beta: number, step: number): number {
  return optimNative.adamwBiasCorrection(beta, step);
}

/** The control block, checked: f32 [2] on `device`. */
export function controlOf(op: string, control: unknown, device: string): Tensor | null {
  if (control === undefined) return null;
  const c = expectTensor(op, 'control', control, { dtype: ['f32'], shape: [2], shapeName: '[2] (scale, skip)' });
  if (c.device !== device) throw new XftError(`${op}: control is on ${c.device} but the parameters are on ${device}`, 'XFT_DEVICE');
  return c;
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
  const { lr, step, beta1, beta2, eps, wd, gradScale } = hyperOf(op, o);
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

/** AdamW's hyper-parameters of `o`, checked (defaults as torch.optim.AdamW), for adamw and adamwMulti alike. */
function hyperOf(op: string, o: AdamWOptions) {
  const lr = expectNumber(op, 'lr', o.lr, 'a finite number >= 0', (x) => x >= 0);
  const step = expectInt(op, 'step', o.step, 1, 2147483647);
  const unit = (x: number) => x >= 0 && x < 1;
  const beta1 = o.beta1 === undefined ? 0.9 : expectNumber(op, 'beta1', o.beta1, 'a number in [0, 1)', unit);
  const beta2 = o.beta2 === undefined ? 0.999 : expectNumber(op, 'beta2', o.beta2, 'a number in [0, 1)', unit);
  const eps = o.eps === undefined ? 1e-8 : expectNumber(op, 'eps', o.eps, 'a finite number >= 0', (x) => x >= 0);
  const wd = o.weightDecay === undefined ? 0 : expectNumber(op, 'weightDecay', o.weightDecay, 'a finite number >= 0', (x) => x >= 0);
  const gradScale = o.gradScale === undefined ? 1 : expectNumber(op, 'gradScale', o.gradScale, 'a finite number', () => true);
  return { lr, step, beta1, beta2, eps, wd, gradScale };
}

/** One parameter of a multi-tensor AdamW step. */
export interface AdamWEntry {
  params: Tensor;
  grads: Tensor;
  m: Tensor;
  v: Tensor;
  copyTo?: Tensor;
  /** its stochastic-rounding stream; default its position in the list */
  tensorIndex?: number;
}

/**
 * One AdamW step over many tensors in one launch (the update of `adamw` per element, bit for bit).
 * All tensors on one device, a parameter at most once; `control` (a training step's device control
 * block) scales the gradients and can skip the whole update without a host synchronisation.
 */
export function adamwMulti(entries: readonly AdamWEntry[], options: Omit<AdamWOptions, 'copyTo' | 'tensorIndex'> & ControlOption & HyperOption): void {
  const op = 'adamwMulti';
  if (!Array.isArray(entries)) throw new XftError(`${op}: expected entries, an array of { params, grads, m, v }`, 'XFT_TYPE');
  const o = expectOptions<AdamWOptions & ControlOption & HyperOption>(op, options, 'an object with lr and step');
  const { lr, step, beta1, beta2, eps, wd, gradScale } = hyperOf(op, o);
  const [stochastic, seed] = roundingOf(op, o);
  const seen = new Set<Tensor>();
  let device: string | null = null;
  const rows = entries.map((e, k) => {
    const at = `entries[${k}]`;
    if (e === null || typeof e !== 'object') throw new XftError(`${op}: expected ${at}, an object { params, grads, m, v }`, 'XFT_TYPE');
    const p = expectTensor(op, `${at}.params`, e.params, { dtype: FLOAT });
    if (seen.has(p)) throw new XftError(`${op}: ${at}.params ${p.describe()} appears twice (one update per parameter)`, 'XFT_VALUE');
    seen.add(p);
    const shape = { shape: p.shape, shapeName: formatShape(p.shape) };
    const g = expectTensor(op, `${at}.grads`, e.grads, { dtype: FLOAT, ...shape });
    const m = expectTensor(op, `${at}.m`, e.m, { dtype: ['f32'], ...shape });
    const v = expectTensor(op, `${at}.v`, e.v, { dtype: ['f32'], ...shape });
    let copy: Tensor | null = null;
    if (e.copyTo !== undefined) {
      copy = expectTensor(op, `${at}.copyTo`, e.copyTo, { dtype: FLOAT });
      if (copy.numel !== p.numel) throw new XftError(`${op}: ${at}.copyTo ${copy.describe()} must have as many elements as params ${p.describe()}`, 'XFT_SHAPE');
    }
    const index = e.tensorIndex === undefined ? k : expectInt(op, `${at}.tensorIndex`, e.tensorIndex, 0, 2 ** 24 - 1);
    const d = sameDevice(op, { params: p, grads: g, m, v, copyTo: copy });
    if (device !== null && d !== device) throw new XftError(`${op}: ${at} is on ${d}, entries[0] on ${device}: all tensors on one device`, 'XFT_DEVICE');
    device = d;
    return [p.storage, dtypeCode(p.dtype), g.storage, dtypeCode(g.dtype), m.storage, v.storage, p.numel, copy?.storage ?? null,
      dtypeCode(copy ? copy.dtype : 'f32'), index] as Parameters<typeof optimNative.adamwMulti>[0][number];
  });
  if (rows.length === 0) return;
  const control = controlOf(op, o.control, device!);
  let hyper: Tensor | null = null;
  if (o.hyper !== undefined) {
    hyper = expectTensor(op, 'hyper', o.hyper, { dtype: ['f32'], shape: [4], shapeName: '[4] (lr, bc1, bc2, step)' });
    if (hyper.device !== device) throw new XftError(`${op}: hyper is on ${hyper.device} but the parameters are on ${device}`, 'XFT_DEVICE');
  }
  optimNative.adamwMulti(rows, lr, beta1, beta2, eps, wd, step, gradScale, stochastic ? 1 : 0, seed, control?.storage ?? null, hyper?.storage ?? null);
}
