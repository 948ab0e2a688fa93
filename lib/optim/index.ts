/**
 * The optimizers as a training run uses them: AdamW (lib/optim/adamw.ts) or Adafactor
 * (lib/optim/adafactor.ts) over a model's trainable parameters, in one of three precisions:
 *   f32    f32 weights updated in place
 *   mixed  bf16 weights for compute, an f32 master copy updated and rounded into them
 *   bf16   bf16 weights updated in place (no master; fp32 math in registers; rounded to nearest, or
 *          stochastically with stochasticRounding), as the XFT reference runs (`--bf16`, bf16 weights)
 * and their state: named tensors for checkpoints (prefixes m., v., row., col., master.).
 */
import { XftError } from '../errors';
import { Tensor, type Device } from '../tensor';
import { adamwMulti, type AdamWEntry } from './adamw';
import { adafactor, adafactorState, type AdafactorEntry } from './adafactor';

export * from './adamw';
export * from './adafactor';

export const OPTIMIZERS = ['adamw', 'adafactor'] as const;
export type OptimizerKind = (typeof OPTIMIZERS)[number];

/** Optimizer state of a run, per trainable parameter name. */
export interface OptimizerState {
  /** 'adamw' when absent (states saved before Adafactor existed) */
  optimizer?: OptimizerKind;
  /** AdamW: first moments */
  m: Map<string, Tensor>;
  /** AdamW: second moments; Adafactor: the full second moment of vectors */
  v: Map<string, Tensor>;
  /** Adafactor: row and column statistics of the tensors of >= 2 dims */
  row?: Map<string, Tensor>;
  col?: Map<string, Tensor>;
  /** f32 master weights of the bf16 parameters (mixed precision) */
  master?: Map<string, Tensor>;
}

/** The checkpoint name prefixes of the state maps. */
export const STATE_MAPS = ['m', 'v', 'row', 'col', 'master'] as const;
type StateMap = (typeof STATE_MAPS)[number];

/** A parameter as the optimizer sees it (lib/model.ts Param). */
export interface OptimParam {
  readonly name: string;
  readonly value: Tensor;
  readonly grad: Tensor | null;
}

export interface StepHyper {
  lr: number;
  /** t >= 1 */
  step: number;
  /** gradient clipping factor (1: none) */
  gradScale: number;
  /** AdamW */
  beta1?: number;
  beta2?: number;
  eps?: number;
  weightDecay?: number;
  /** bf16 weights written in place: stochastic rounding, from this seed */
  stochasticRounding?: boolean;
  seed?: number;
  /** a training step's device control block (lib/ledger.ts): scales the gradients further and can skip the update, read on the device */
  control?: Tensor;
  /** AdamW: f32 [4] on the device (lr, bc1, bc2, step) read instead of lr and step (a captured step's replay) */
  hyper?: Tensor;
}

export function optimizerOf(state: OptimizerState): OptimizerKind {
  return state.optimizer ?? 'adamw';
}

/**
 * Completes `state` for `params` (zeros where a tensor is missing; master copies of bf16 parameters
 * when `masterWeights`). A state of another optimizer, or with master weights where the run has none
 * (or the reverse, once it has taken steps), is refused (XFT_VALUE): its moments would not mean what
 * this run reads them as.
 */
export function prepareState(kind: OptimizerKind, params: readonly OptimParam[], state: OptimizerState, device: Device, masterWeights: boolean, step: number): void {
  // a state without the field (saved before Adafactor existed) is AdamW's once it has taken steps
  const saved = state.optimizer ?? (step > 0 ? 'adamw' : undefined);
  if (saved !== undefined && saved !== kind)
    throw new XftError(`train: the state to resume was saved by a '${optimizerOf(state)}' run; this run uses '${kind}' (resume with the same optimizer, or start a new run)`, 'XFT_VALUE');
  state.optimizer = kind;
  state.row ??= new Map();
  state.col ??= new Map();
  state.master ??= new Map();
  const bf16 = params.some((p) => p.value.dtype === 'bf16');
  if (step > 0 && bf16 && masterWeights !== state.master.size > 0)
    throw new XftError(`train: the state to resume ${state.master.size > 0 ? 'has f32 master weights (precision mixed)' : 'has no master weights (precision bf16)'}; ` +
      `this run ${masterWeights ? 'keeps master weights (mixed)' : 'has none (bf16)'}: resume with the same precision`, 'XFT_VALUE');
  if (kind === 'adafactor' && state.m.size > 0) throw new XftError('train: an Adafactor state holds no first moments (m.*)', 'XFT_VALUE');
  for (const p of params) {
    if (kind === 'adamw') {
      if (!state.m.has(p.name)) state.m.set(p.name, Tensor.zeros(p.value.shape, { device }));
      if (!state.v.has(p.name)) state.v.set(p.name, Tensor.zeros(p.value.shape, { device }));
    } else if (!state.row.has(p.name) && !state.v.has(p.name)) {
      const s = adafactorState(p.value.shape, device);
      if (s.v) state.v.set(p.name, s.v);
      else state.row.set(p.name, s.row!), state.col.set(p.name, s.col!);
    }
    if (masterWeights && p.value.dtype !== 'f32' && !state.master.has(p.name)) state.master.set(p.name, p.value.cast('f32'));
  }
}

/**
 * One optimizer step over the parameters that have gradients (their position in `params` is their
 * stochastic-rounding stream), in one multi-tensor launch (AdamW) or five (Adafactor). A bf16
 * parameter with a master copy: the master is updated and the parameter receives it rounded to
 * nearest; without one, the parameter is updated in place.
 */
export function optimizerStep(kind: OptimizerKind, params: readonly OptimParam[], state: OptimizerState, h: StepHyper): void {
  const rounding = { stochasticRounding: h.stochasticRounding ?? false, seed: h.seed ?? 0 };
  const entries: AdafactorEntry[] = [], adam: AdamWEntry[] = [];
  params.forEach((p, index) => {
    if (p.grad === null) return;
    const master = state.master?.get(p.name);
    const target = master ?? p.value, copyTo = master ? p.value : undefined;
    if (kind === 'adamw') adam.push({ params: target, grads: p.grad, m: state.m.get(p.name)!, v: state.v.get(p.name)!, copyTo, tensorIndex: index });
    else
      entries.push({
        params: target, grads: p.grad, copyTo, tensorIndex: index,
        state: { row: state.row?.get(p.name), col: state.col?.get(p.name), v: state.v.get(p.name) },
        // an expert stack [E, R, C]: the reference's experts are separate parameters, each clipped by its own RMS
        clipPerSlice: p.value.shape.length >= 3,
      });
  });
  if (kind === 'adamw')
    adamwMulti(adam, { lr: h.lr, step: h.step, beta1: h.beta1, beta2: h.beta2, eps: h.eps, weightDecay: h.weightDecay ?? 0, gradScale: h.gradScale, control: h.control, hyper: h.hyper, ...rounding });
  else adafactor(entries, { lr: h.lr, step: h.step, gradScale: h.gradScale, control: h.control, ...rounding });
}

/** The state's tensors under their checkpoint names (`m.<param>`, `row.<param>`, ...). */
export function stateTensors(state: OptimizerState): [string, Tensor][] {
  return STATE_MAPS.flatMap((k) => [...(state[k] ?? new Map<string, Tensor>())].map(([name, t]) => [`${k}.${name}`, t] as [string, Tensor]));
}

/** Puts a tensor named by stateTensors into `state`; false when the name has no known prefix. */
export function setStateTensor(state: OptimizerState, name: string, t: Tensor): boolean {
  const k = STATE_MAPS.find((p) => name.startsWith(`${p}.`)) as StateMap | undefined;
  if (!k) return false;
  (state[k] ??= new Map()).set(name.slice(k.length + 1), t);
  return true;
}

export function disposeOptimizerState(state: OptimizerState): void {
  for (const k of STATE_MAPS) state[k]?.forEach((t) => t.dispose());
}

export type Precision = 'f32' | 'mixed' | 'bf16';
export const PRECISIONS: readonly Precision[] = ['mixed', 'bf16', 'f32'];

/**
 * Device bytes per trainable parameter element of a training step, by category (what `xft plan`
 * estimates): weights (the compute copy), gradients (f32, or bf16 with gradDtype 'bf16'), optimizer
 * state (AdamW: m and v, f32; Adafactor: f32 statistics, `stateElements` per element: (R + C)/(R C)
 * for a matrix, 1 for a vector) and the f32 master copy (mixed only).
 */
export function bytesPerParameter(kind: OptimizerKind, precision: Precision, stateElements = 0, gradDtype: 'f32' | 'bf16' = 'f32'): { weights: number; grads: number; optimizer: number; master: number } {
  return {
    weights: precision === 'f32' ? 4 : 2,
    grads: gradDtype === 'bf16' ? 2 : 4,
    optimizer: kind === 'adamw' ? 8 : 4 * stateElements,
    master: precision === 'mixed' ? 4 : 0,
  };
}
