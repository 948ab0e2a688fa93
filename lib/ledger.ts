/**
 * The training step's device ledger (kernels cuda/step.cu, CPU twin binding/cpu/step.cc, math in
 * cuda/step.h): a training step makes no host synchronisation. The loss sums, token and accuracy
 * counts and balance losses of its micro-batches accumulate in a device buffer; the step's end turns
 * the gradients' sum of squares into the gradient norm, the clipping factor and the non-finite check
 * on the device, writes a log record, and leaves a control block (gradient scale, skip flag) that
 * the optimizer kernels read. The host reads the records once per log interval (`read`).
 * Also `zeroMany`: every gradient buffer set to zero in one launch.
 */
import { XftError } from './errors';
import { native, type NativeStorage } from './native';
import { Tensor, dtypeBytes, type Device } from './tensor';

type S = NativeStorage;

/** The native functions of binding/step_ops.cc. */
export interface StepNative {
  lossStats(losses: S, predictions: S, targets: S, rows: number, auxDiv: number, ledger: S): void;
  statAdd(x: S, ledger: S, index: number): void;
  stepEnd(sumsq: S, ledger: S, control: S, slot: number, slots: number, clip: number, budget: number): void;
  zeroMany(storages: S[], bytes: number[]): void;
  adamwMulti(entries: [S, number, S, number, S, S, number, S | null, number, number][], lr: number, beta1: number, beta2: number, eps: number,
    weightDecay: number, step: number, gradScale: number, stochastic: number, seed: bigint, control: S | null): void;
}

export const stepNative = native as unknown as StepNative;

/** cuda/step.h: the ledger's layout (doubles) and the status of a record. */
const AUX_MICRO = 4, HEAD = 8, FIELDS = 6;
export const STEP_STATUS = ['applied', 'skipped', 'stopped', 'after-stop'] as const;
export type StepStatus = (typeof STEP_STATUS)[number];

/** One step's log record, as the device wrote it. */
export interface StepRecord {
  /** mean cross-entropy over the step's counted tokens */
  loss: number;
  /** balance loss (sum over the MoE layers, mean over micro-batches) */
  auxLoss: number;
  gradNorm: number;
  tokens: number;
  correct: number;
  /** applied; skipped (not finite, within the budget); stopped (not finite, budget spent); after-stop (a later step, not applied) */
  status: StepStatus;
}

export class StepLedger {
  /** f64 accumulators and `slots` log records (stored as pairs of f32) */
  readonly ledger: Tensor;
  /** f32 [2]: the gradient scale factor and the skip flag of the last step's end (the optimizers read it) */
  readonly control: Tensor;

  constructor(readonly device: Device, readonly slots: number) {
    if (!Number.isSafeInteger(slots) || slots < 1 || slots > 2 ** 24)
      throw new XftError(`StepLedger: expected slots, an integer in [1, 2^24], but received ${slots}`, 'XFT_VALUE');
    this.ledger = Tensor.zeros([2 * (HEAD + slots * FIELDS)], { device });
    this.control = Tensor.zeros([2], { device });
  }

  /** A layer's balance loss (f32 [1] on the device) into this micro-batch's sum. */
  addAux(loss: Tensor): void {
    stepNative.statAdd(loss.storage, this.ledger.storage, AUX_MICRO);
  }

  /** A micro-batch's cross-entropy rows into the step's sums; its balance losses enter divided by `auxDiv` (accumulation steps). */
  micro(losses: Tensor, predictions: Tensor, targets: Tensor, auxDiv: number): void {
    stepNative.lossStats(losses.storage, predictions.storage, targets.storage, targets.numel, auxDiv, this.ledger.storage);
  }

  /** The step's end: record `slot` from the gradients' sum of squares (f32 [1]), the control block; clip 0: none; budget: non-finite steps that may be skipped. */
  end(sumsq: Tensor, slot: number, clip: number, budget: number): void {
    stepNative.stepEnd(sumsq.storage, this.ledger.storage, this.control.storage, slot, this.slots, clip, budget);
  }

  /** The first `count` records (one device -> host copy: a synchronisation). */
  read(count: number): StepRecord[] {
    const raw = this.ledger.toArray() as Float32Array;
    const d = new Float64Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength));
    return Array.from({ length: count }, (_, k) => {
      const r = d.subarray(HEAD + k * FIELDS, HEAD + (k + 1) * FIELDS);
      return { loss: r[0], auxLoss: r[1], gradNorm: r[2], tokens: r[3], correct: r[4], status: STEP_STATUS[r[5]] ?? 'after-stop' };
    });
  }

  dispose(): void {
    this.ledger.dispose();
    this.control.dispose();
  }
}

/** Every tensor's elements set to zero, in one launch (they must be on one device). */
export function zeroMany(tensors: readonly Tensor[]): void {
  if (tensors.length === 0) return;
  stepNative.zeroMany(tensors.map((t) => t.storage), tensors.map((t) => t.numel * dtypeBytes(t.dtype)));
}
