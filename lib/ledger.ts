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
import { expectTensor } from './ops_check';
import { expectArray, expectInt, expectNumber } from './validate';

type S = NativeStorage;

/** The native functions of binding/step_ops.cc. */
export interface StepNative {
  lossStats(losses: S, predictions: S, targets: S, rows: number, auxDiv: number, ledger: S): void;
  statAdd(x: S, ledger: S, index: number): void;
  ledgerFlag(ledger: S, out: S): void;
  stepEnd(sumsq: S, ledger: S, control: S, slot: number, slots: number, clip: number, budget: number, nonfinite: S | null): void;
  zeroMany(storages: S[], bytes: number[]): void;
  adamwMulti(entries: [S, number, S, number, S, S, number, S | null, number, number][], lr: number, beta1: number, beta2: number, eps: number,
    weightDecay: number, step: number, gradScale: number, stochastic: number, seed: bigint, control: S | null, hyper?: S | null): void;
  adamwBiasCorrection(beta: number, step: number): number;
}

export const stepNative = native as unknown as StepNative;

/** cuda/step.h: the ledger's layout (doubles) and the status of a record. */
const AUX_MICRO = 4, NEXT = 7, HEAD = 8, FIELDS = 6;
export const STEP_STATUS = ['applied', 'skipped', 'stopped', 'after-stop'] as const;
export type StepStatus = (typeof STEP_STATUS)[number];

/** One step's log record, as the device wrote it. */
export interface StepRecord {
  /** mean cross-entropy over the step's counted tokens: lossSum / tokens (0 without tokens) */
  loss: number;
  /** sum over the step's counted tokens of their cross-entropy (a data-parallel rank: over its own) */
  lossSum: number;
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
    if (device !== 'cpu' && device !== 'cuda') throw new XftError(`StepLedger: expected device 'cpu' or 'cuda' but received ${String(device)}`, 'XFT_VALUE');
    expectInt('StepLedger', 'slots', slots, 1, 2 ** 24);
    this.ledger = Tensor.zeros([2 * (HEAD + slots * FIELDS)], { device });
    this.control = Tensor.zeros([2], { device });
  }

  /** A layer's balance loss (f32 [1] on the device) into this micro-batch's sum. */
  addAux(loss: Tensor): void {
    const l = expectTensor('StepLedger.addAux', 'loss', loss, { dtype: ['f32'], shape: [1], shapeName: '[1]' });
    this.#same('StepLedger.addAux', l);
    stepNative.statAdd(l.storage, this.ledger.storage, AUX_MICRO);
  }

  /** A micro-batch's cross-entropy rows into the step's sums; its balance losses enter divided by `auxDiv` (accumulation steps). */
  micro(losses: Tensor, predictions: Tensor, targets: Tensor, auxDiv: number): void {
    const op = 'StepLedger.micro';
    const tg = expectTensor(op, 'targets', targets, { dtype: ['i32'], rank: 1, shapeName: '[R]' });
    const like = { shape: tg.shape, shapeName: `[R] = [${tg.numel}]` };
    const l = expectTensor(op, 'losses', losses, { dtype: ['f32'], ...like }), p = expectTensor(op, 'predictions', predictions, { dtype: ['i32'], ...like });
    expectNumber(op, 'auxDiv', auxDiv, 'a finite number > 0', (x) => x > 0);
    for (const x of [l, p, tg]) this.#same(op, x);
    stepNative.lossStats(l.storage, p.storage, tg.storage, tg.numel, auxDiv, this.ledger.storage);
  }

  /** `out` (f32 [1]) = 1 when the step so far has a non-finite loss or balance loss, else 0 (data parallel: summed over ranks, then given to `end`). */
  nonFinite(out: Tensor): void {
    const o = expectTensor('StepLedger.nonFinite', 'out', out, { dtype: ['f32'], shape: [1], shapeName: '[1]' });
    this.#same('StepLedger.nonFinite', o);
    stepNative.ledgerFlag(this.ledger.storage, o.storage);
  }

  /**
   * The step's end: record `slot` from the gradients' sum of squares (f32 [1]), the control block; slot 'next': the slot
   * after the last one written since the last `read`, counted on the device (a captured step replays alike); clip 0: none; budget:
   * non-finite steps that may be skipped; nonfinite (data parallel): the ranks' `nonFinite` flags summed, any set skips the step.
   */
  end(sumsq: Tensor, slot: number | 'next', clip: number, budget: number, nonfinite?: Tensor): void {
    const op = 'StepLedger.end';
    const sq = expectTensor(op, 'sumsq', sumsq, { dtype: ['f32'], shape: [1], shapeName: '[1]' });
    this.#same(op, sq);
    const flag = nonfinite === undefined ? null : expectTensor(op, 'nonfinite', nonfinite, { dtype: ['f32'], shape: [1], shapeName: '[1]' });
    if (flag) this.#same(op, flag);
    if (slot !== 'next') expectInt(op, 'slot', slot, 0, this.slots - 1);
    expectNumber(op, 'clip', clip, 'a finite number >= 0', (x) => x >= 0);
    expectNumber(op, 'budget', budget, 'a finite number >= 0', (x) => x >= 0);
    if (slot === 'next') this.#countedOnDevice = true;
    stepNative.stepEnd(sq.storage, this.ledger.storage, this.control.storage, slot === 'next' ? -1 : slot, this.slots, clip, budget, flag?.storage ?? null);
  }

  /** The first `count` records (one device -> host copy: a synchronisation); the 'next' slot starts again at 0. */
  read(count: number): StepRecord[] {
    expectInt('StepLedger.read', 'count', count, 0, this.slots);
    const raw = this.ledger.toArray() as Float32Array;
    if (this.#countedOnDevice) this.ledger.narrow(2 * NEXT, 2).fill_(0); // a view: the ledger's own memory
    const d = new Float64Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength));
    return Array.from({ length: count }, (_, k) => {
      const r = d.subarray(HEAD + k * FIELDS, HEAD + (k + 1) * FIELDS);
      return { loss: r[3] > 0 ? r[0] / r[3] : 0, lossSum: r[0], auxLoss: r[1], gradNorm: r[2], tokens: r[3], correct: r[4], status: STEP_STATUS[r[5]] ?? 'after-stop' };
    });
  }

  dispose(): void {
    this.ledger.dispose();
    this.control.dispose();
  }

  /** end('next') was used (a captured step calls it once, its replays after): each read sets the device counter back to 0 */
  #countedOnDevice = false;

  #same(op: string, t: Tensor): void {
    if (t.device !== this.device) throw new XftError(`${op}: a tensor is on ${t.device} but the ledger is on ${this.device}`, 'XFT_DEVICE');
  }
}

/** Every tensor's elements set to zero, in one launch (they must be on one device). */
export function zeroMany(tensors: readonly Tensor[]): void {
  const list = expectArray<unknown>('zeroMany', 'tensors', tensors, 'an array of tensors').map((t, i) => expectTensor('zeroMany', `tensors[${i}]`, t, {}));
  if (list.length === 0) return;
  if (list.some((t) => t.device !== list[0].device)) throw new XftError('zeroMany: expected tensors on one device', 'XFT_DEVICE');
  stepNative.zeroMany(list.map((t) => t.storage), list.map((t) => t.numel * dtypeBytes(t.dtype)));
}
