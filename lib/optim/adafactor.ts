/**
 * The Adafactor op: one step over many tensors in one native call (kernel cuda/adafactor.cu, CPU twin
 * binding/cpu/adafactor.cc), as transformers' Adafactor that the HF Trainer builds for `--optim
 * adafactor` (scale_parameter = relative_step = warmup_init = False, the given lr, beta1 = None,
 * eps = (1e-30, 1e-3), clip_threshold 1.0, decay_rate -0.8, weight_decay 0).
 *
 * State per tensor: a weight of >= 2 dims [..., R, C] keeps row statistics [..., R] and column
 * statistics [..., C] (factored over the last two dims, as transformers); a vector keeps a full
 * second moment v. A 3-D expert stack [E, R, C] clips the update's RMS per expert with
 * `clipPerSlice` (the reference's experts are separate 2-D parameters), else over the whole tensor.
 */
import { XftError, invalidArgument } from '../errors';
import { FLOAT, expectTensor, sameDevice } from '../ops_check';
import { Tensor, dtypeCode, formatShape, type Device, type Shape } from '../tensor';
import { expectArray, expectBool, expectInt, expectNumber, expectRequiredOptions as expectOptions } from '../validate';
import { type ControlOption, controlOf, optimNative, roundingOf, type RoundingOptions } from './adamw';

/** The second-moment statistics of one tensor: row + col (>= 2 dims) or v (a vector). */
export interface AdafactorState {
  row?: Tensor;
  col?: Tensor;
  v?: Tensor;
}

export interface AdafactorEntry {
  /** f32 (a master copy, or an f32 run) or bf16 (updated in place) */
  params: Tensor;
  /** f32 or bf16, params' shape */
  grads: Tensor;
  /** from adafactorState(params.shape) */
  state: AdafactorState;
  /** also write the updated parameters here (f32 or bf16, params' element count): the compute copy */
  copyTo?: Tensor;
  /** RMS clipping per slice of a >= 3-D tensor (per expert) instead of over the tensor; default false */
  clipPerSlice?: boolean;
  /** this tensor's index in the run (its stochastic-rounding stream); default its position in the list */
  tensorIndex?: number;
}

export interface AdafactorOptions extends RoundingOptions, ControlOption {
  /** learning rate (>= 0) */
  lr: number;
  /** step t >= 1: beta2t = 1 - t^decayRate */
  step: number;
  /** added to g² (transformers' eps[0]); default 1e-30 */
  eps1?: number;
  /** the update's RMS is clipped to this; default 1 */
  clipThreshold?: number;
  /** default -0.8 */
  decayRate?: number;
  /** multiplies the gradients first: a clipping factor and/or 1 / accumulation steps. Default 1. */
  gradScale?: number;
}

/** Whether a tensor of this shape keeps factored (row, col) statistics: >= 2 dims, as transformers. */
export function isFactored(shape: Shape): boolean {
  return shape.length >= 2;
}

/** The shapes of the statistics of a tensor of `shape`. */
export function adafactorStateShapes(shape: Shape): { row: Shape; col: Shape } | { v: Shape } {
  return isFactored(shape) ? { row: shape.slice(0, -1), col: [...shape.slice(0, -2), shape[shape.length - 1]] } : { v: shape };
}

/** Zero statistics for a tensor of `shape` (f32 on `device`). */
export function adafactorState(shape: Shape, device: Device): AdafactorState {
  const s = adafactorStateShapes(shape);
  return 'v' in s ? { v: Tensor.zeros(s.v, { device }) } : { row: Tensor.zeros(s.row, { device }), col: Tensor.zeros(s.col, { device }) };
}

/** f32 elements of state per parameter element: (R + C) / (R C) factored, 1 for a vector. */
export function adafactorStateElements(shape: Shape): number {
  const n = shape.reduce((a, b) => a * b, 1);
  if (!isFactored(shape)) return n;
  const R = shape[shape.length - 2], C = shape[shape.length - 1];
  return (n / (R * C)) * (R + C);
}

/**
 * One Adafactor step over `entries`, in place (parameters and statistics). All tensors on one device;
 * a parameter at most once. Semantics: cuda/adafactor.cu.
 */
export function adafactor(entries: readonly AdafactorEntry[], options: AdafactorOptions): void {
  const op = 'adafactor';
  const list = expectArray<AdafactorEntry>(op, 'entries', entries, 'an array of { params, grads, state }');
  const o = expectOptions<AdafactorOptions>(op, options, 'an object with lr and step');
  const lr = expectNumber(op, 'lr', o.lr, 'a finite number >= 0', (x) => x >= 0);
  const step = expectInt(op, 'step', o.step, 1, 2147483647);
  const eps1 = o.eps1 === undefined ? 1e-30 : expectNumber(op, 'eps1', o.eps1, 'a finite number >= 0', (x) => x >= 0);
  const clip = o.clipThreshold === undefined ? 1 : expectNumber(op, 'clipThreshold', o.clipThreshold, 'a finite number > 0', (x) => x > 0);
  const decay = o.decayRate === undefined ? -0.8 : expectNumber(op, 'decayRate', o.decayRate, 'a finite number < 0', (x) => x < 0);
  const gradScale = o.gradScale === undefined ? 1 : expectNumber(op, 'gradScale', o.gradScale, 'a finite number', () => true);
  const [stochastic, seed] = roundingOf(op, o);
  const seen = new Set<Tensor>();
  let device: Device | null = null;
  const rows = list.map((e, k) => {
    const at = `entries[${k}]`;
    if (e === null || typeof e !== 'object') throw invalidArgument(op, at, 'an object { params, grads, state }', e, 'XFT_TYPE');
    const p = expectTensor(op, `${at}.params`, e.params, { dtype: FLOAT });
    if (seen.has(p)) throw new XftError(`${op}: ${at}.params ${p.describe()} appears twice (one update per parameter)`, 'XFT_VALUE');
    seen.add(p);
    const g = expectTensor(op, `${at}.grads`, e.grads, { dtype: FLOAT, shape: p.shape, shapeName: formatShape(p.shape) });
    const st = e.state as AdafactorState;
    if (st === null || typeof st !== 'object') throw invalidArgument(op, `${at}.state`, 'an AdafactorState (adafactorState(params.shape))', st, 'XFT_TYPE');
    const want = adafactorStateShapes(p.shape);
    const stat = (name: 'row' | 'col' | 'v', shape: Shape) =>
      expectTensor(op, `${at}.state.${name}`, st[name], { dtype: ['f32'], shape, shapeName: formatShape(shape) });
    const row = 'row' in want ? stat('row', want.row) : null, col = 'col' in want ? stat('col', want.col) : null, v = 'v' in want ? stat('v', want.v) : null;
    let copy: Tensor | null = null;
    if (e.copyTo !== undefined) {
      copy = expectTensor(op, `${at}.copyTo`, e.copyTo, { dtype: FLOAT });
      if (copy.numel !== p.numel) throw new XftError(`${op}: ${at}.copyTo ${copy.describe()} must have as many elements as params ${p.describe()}`, 'XFT_SHAPE');
    }
    const perSlice = expectBool(op, `${at}.clipPerSlice`, e.clipPerSlice, false);
    const index = e.tensorIndex === undefined ? k : expectInt(op, `${at}.tensorIndex`, e.tensorIndex, 0, 2 ** 24 - 1);
    const d = sameDevice(op, { params: p, grads: g, row, col, v, copyTo: copy });
    if (device !== null && d !== device) throw new XftError(`${op}: ${at} is on ${d}, entries[0] on ${device}: all tensors on one device`, 'XFT_DEVICE');
    device = d;
    const sh = p.shape, R = sh.length >= 2 ? sh[sh.length - 2] : 1, C = sh.length >= 1 ? sh[sh.length - 1] : 1;
    const slices = sh.length >= 2 ? p.numel / (R * C) || 0 : 1;
    return [p.storage, dtypeCode(p.dtype), g.storage, dtypeCode(g.dtype), row?.storage ?? null, col?.storage ?? null, v?.storage ?? null,
      copy?.storage ?? null, dtypeCode(copy ? copy.dtype : 'f32'), slices, sh.length >= 2 ? R : 1, sh.length >= 2 ? C : p.numel, perSlice ? 1 : 0, index] as
      Parameters<typeof optimNative.adafactor>[0][number];
  });
  if (rows.length === 0) return;
  const control = controlOf(op, o.control, device!);
  optimNative.adafactor(rows, lr, eps1, clip, decay, step, gradScale, stochastic ? 1 : 0, seed, control?.storage ?? null);
}
