/**
 * UpIT option `jointRouter` (UPIT.md A6; not from the paper): after assembly, the router alone trains
 * against every expert's bucket at once. Stage 3b trains each routing vector r_e on its own bucket with
 * positives only, so no r_e ever sees another expert's rows; here the assembled router W^(l) = [r_1; …; r_E]
 * of every layer learns to tell the buckets apart, with the softmax cross-entropy of the bucket labels:
 *
 *   L = mean over layers l and response tokens t of seed row i of  −log softmax(W^(l) x_t^(l))[bucket(i)]
 *
 * x^(l) is the FFN input of layer l (post_attention_layernorm's output: what the router reads), from an
 * eval forward of the MoE itself (Model.forward's ffnInput probe). L does not back-propagate into x
 * (stop-gradient): dW^(l) = Σ_t (softmax(W^(l) x_t) − onehot(bucket))ᵀ x_t / (L·tokens), on the router
 * linear kernels (cuda/router_linear.cu; the grouped GEMM above 32 experts, as the MoE routes) and the
 * fused cross-entropy (cuda/cross_entropy.cu). Only the
 * routers train: AdamW, linear decay of the lr to 0, global gradient-norm clipping; every other tensor is
 * written back as read. Default one pass over the seed rows (A6).
 *
 * The output folder: the MoE checkpoint with the trained routers, and joint_router.json with the router's
 * top-1 accuracy and loss on the seed labels before and after (token-level, every layer).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { XftError, invalidArgument } from '../errors';
import { Tensor, DEVICES, type Device, disposeAll } from '../tensor';
import { expectBool, expectInt, expectNumber, expectOneOf, expectOptions, expectString, expectFunction } from '../validate';
import * as lops from '../ops_layers';
import * as rops from '../ops_router';
import * as xops from '../ops';
import { crossEntropy, crossEntropyBackward } from '../ops_train';
import { MoeFFN, type Model, type Param } from '../model';
import { type Sample, concatRows, countTargets, expectSamples, shuffle } from '../data';
import { disposeOptimizerState, optimizerStep, prepareState } from '../optim';
import { learningRate, useMasterWeights, type TrainState } from '../train';
import { checkOutputFolder, checkWritable } from '../folder';
import { loadModel, readCheckpointInfo, saveModel } from '../checkpoint';

/** The report inside a trainJointRouter output folder. */
export const JOINT_ROUTER_FILE = 'joint_router.json';
/** One pass over the seed rows (UPIT.md A6). */
export const JOINT_ROUTER_EPOCHS = 1;

export interface JointRouterOptions {
  /** peak lr of the routers (AdamW, linear decay to 0) */
  lr: number;
  /** passes over the rows (default 1) */
  epochs?: number;
  /** rows per optimizer step (default 8, at most the rows) */
  batchSize?: number;
  /** rows per forward (default batchSize; must divide it) */
  microBatch?: number;
  /** shuffles the rows each epoch (default 0) */
  seed?: number;
  device?: Device;
  /** the dtype the MoE computes in (default 'f32'; bf16 keeps f32 masters of the routers) */
  dtype?: 'f32' | 'bf16';
  /** global gradient-norm clip (default 1; 0: none) */
  clip?: number;
  weightDecay?: number;
  onLog?: (line: string) => void;
  overwrite?: boolean;
}

export interface RouterFit {
  /** share of counted tokens (every layer) whose top-1 router logit is their row's bucket */
  accuracy: number;
  /** mean cross-entropy of the bucket labels over the same tokens */
  loss: number;
}

export interface JointRouterResult {
  steps: number;
  before: RouterFit;
  after: RouterFit;
}

type Checked = Required<Omit<JointRouterOptions, 'onLog'>> & { log: (line: string) => void };

function checkOptions(op: string, options: JointRouterOptions, rows: number): Checked {
  const o = expectOptions<JointRouterOptions>(op, options, 'an options object { lr, epochs?, batchSize?, ... }');
  const nonNegative = (name: string, v: unknown, fallback: number) => (v === undefined ? fallback : expectNumber(op, name, v, 'a number >= 0', (x) => x >= 0));
  const batchSize = o.batchSize === undefined ? Math.max(1, Math.min(8, rows)) : expectInt(op, 'options.batchSize', o.batchSize, 1);
  const microBatch = o.microBatch === undefined ? batchSize : expectInt(op, 'options.microBatch', o.microBatch, 1, batchSize);
  if (batchSize % microBatch !== 0) throw invalidArgument(op, 'options.microBatch', `a divisor of batchSize ${batchSize}`, microBatch);
  return {
    lr: expectNumber(op, 'options.lr', o.lr, 'a number > 0', (x) => x > 0),
    epochs: o.epochs === undefined ? JOINT_ROUTER_EPOCHS : expectInt(op, 'options.epochs', o.epochs, 1),
    batchSize,
    microBatch,
    seed: o.seed === undefined ? 0 : expectInt(op, 'options.seed', o.seed, 0),
    device: o.device === undefined ? 'cpu' : expectOneOf(op, 'options.device', o.device, DEVICES, 'XFT_DEVICE'),
    dtype: o.dtype === undefined ? 'f32' : expectOneOf(op, 'options.dtype', o.dtype, ['f32', 'bf16'] as const, 'XFT_DTYPE'),
    clip: nonNegative('options.clip', o.clip, 1),
    weightDecay: nonNegative('options.weightDecay', o.weightDecay, 0),
    overwrite: expectBool(op, 'options.overwrite', o.overwrite, false),
    log: expectFunction<(line: string) => void>(op, 'options.onLog', o.onLog) ?? (() => {}),
  };
}

interface Labelled { row: Sample; label: number }

/**
 * One eval forward of `part` with the cross-entropy of every layer's router logits against the rows'
 * buckets; with `gradScale`, dW of every router is added into its gradient buffer (scaled). Returns the
 * loss sum, the correct top-1 count and the counted tokens (over layers).
 */
function runMicroBatch(model: Model, routers: readonly Param[], part: readonly Labelled[], gradScale: number | null): { lossSum: number; correct: number; count: number } {
  const T = part[0].row.ids.length, B = part.length;
  const rows = part.map((p) => p.row);
  const targets = concatRows(rows, 'targets');
  // a token's label: its row's bucket where it is a response token (targets >= 0), else -1 (not counted)
  const labelValues = new Int32Array(B * T);
  for (let b = 0; b < B; b++) for (let t = 0; t < T; t++) labelValues[b * T + t] = targets[b * T + t] >= 0 ? part[b].label : -1;
  const device = model.device;
  const ids = Tensor.from(concatRows(rows, 'ids'), [B * T], { dtype: 'i32', device });
  const lmTargets = Tensor.from(targets, [B * T], { dtype: 'i32', device });
  const labels = Tensor.from(labelValues, [B * T], { dtype: 'i32', device });
  const dLoss = gradScale === null ? null : Tensor.full([B * T], gradScale, { device });
  // the kernels the MoE routes with: the small-N router linear, the grouped GEMM (one group of B T rows) above 32 experts
  const wide = routers[0].value.shape[0] > rops.ROUTER_LINEAR_MAX_N;
  const offsets = wide ? Tensor.from([0, B * T], [2], { dtype: 'i32', device }) : null;
  let lossSum = 0, correct = 0, count = 0;
  try {
    model.forward(ids, lmTargets, B, T, {
      training: false,
      ffnInput: (l, x) => {
        const w = routers[l].value;
        const w3 = wide ? w.reshape([1, w.shape[0], w.shape[1]]) : null;
        const logits = wide ? xops.groupedGemm(x, w3!, offsets!, { validate: false }) : rops.routerLinear(x, w);
        const { losses, predictions } = crossEntropy(logits, labels, { validate: false });  // labels checked against E above
        try {
          const lv = losses.toArray(), pv = predictions.toArray();
          for (let i = 0; i < lv.length; i++)
            if (labelValues[i] >= 0) {
              lossSum += lv[i];
              correct += pv[i] === labelValues[i] ? 1 : 0;
              count++;
            }
          if (dLoss) {
            const dLogits = crossEntropyBackward(logits, labels, dLoss, { inPlace: true, validate: false });
            if (wide) xops.groupedGemmBackward(x, w3!, offsets!, dLogits, { dx: false, dw: routers[l].gradBuffer().reshape(w3!.shape), validate: false });
            else rops.routerLinearBackward(x, w, dLogits, { dx: false, dw: routers[l].gradBuffer() });
          }
        } finally {
          disposeAll(logits, losses, predictions);
        }
      },
    });
    return { lossSum, correct, count };
  } finally {
    disposeAll(ids, lmTargets, labels);
    dLoss?.dispose();
    offsets?.dispose();
    model.release();
  }
}

function fitOf(model: Model, routers: readonly Param[], rows: readonly Labelled[], micro: number): RouterFit {
  let lossSum = 0, correct = 0, count = 0;
  for (let i = 0; i < rows.length; i += micro) {
    const r = runMicroBatch(model, routers, rows.slice(i, i + micro), null);
    lossSum += r.lossSum;
    correct += r.correct;
    count += r.count;
  }
  return { accuracy: count ? correct / count : NaN, loss: count ? lossSum / count : NaN };
}

/**
 * Trains the linear routers of the MoE checkpoint `moe` jointly on `rows` (padded rows of one length)
 * labelled with their buckets `labels` (expert indices), and writes the MoE with the trained routers to
 * `out` (see the file comment). The MoE must have a linear gate and no shared expert (UpIT's).
 */
export function trainJointRouter(moe: string, rows: readonly Sample[], labels: ArrayLike<number>, out: string, options: JointRouterOptions): JointRouterResult {
  const op = 'trainJointRouter';
  expectString(op, 'moe', moe, 'an MoE checkpoint folder');
  expectString(op, 'out', out, 'an output folder');
  const all = expectSamples(op, 'rows', rows, true);
  if (!(Array.isArray(labels) || (ArrayBuffer.isView(labels) && !(labels instanceof DataView))) || labels.length !== all.length)
    throw invalidArgument(op, 'labels', `an array of ${all.length} expert indices (one per row)`, labels, 'XFT_TYPE');
  const o = checkOptions(op, options, all.length);
  if (!fs.existsSync(moe)) throw new XftError(`${op}: moe ${moe} does not exist`, 'XFT_IO');
  const info = readCheckpointInfo(moe);
  if (info.kind !== 'moe' || !info.moe) throw invalidArgument(op, 'moe', 'an MoE checkpoint folder', `a ${info.kind} checkpoint (${moe})`);
  if (info.moe.gate_type !== 'linear' || info.moe.shared_expert)
    throw invalidArgument(op, 'moe', "an MoE with a linear gate and no shared expert (UpIT's)", `gate ${info.moe.gate_type}, shared expert ${info.moe.shared_expert}`);
  const E = info.moe.num_experts;
  for (let i = 0; i < labels.length; i++) {
    const e = labels[i];
    if (!Number.isInteger(e) || e < 0 || e >= E) throw invalidArgument(op, `labels[${i}]`, `an expert index in [0, ${E})`, e);
  }
  if (path.resolve(out) === path.resolve(moe)) throw invalidArgument(op, 'out', `a folder other than the MoE's (${moe})`, out);
  const V = info.config.vocab_size;
  all.forEach((r, i) => {
    for (let t = 0; t < r.ids.length; t++)
      if (r.ids[t] < 0 || r.ids[t] >= V) throw invalidArgument(op, `rows[${i}].ids[${t}]`, `a token id in [0, ${V})`, r.ids[t]);
      else if (r.targets[t] >= V) throw invalidArgument(op, `rows[${i}].targets[${t}]`, `a token id < vocab_size ${V} (or < 0: ignored)`, r.targets[t]);
  });
  checkWritable(out);
  checkOutputFolder(out, o.overwrite);
  const list: Labelled[] = all.map((row, i) => ({ row, label: labels[i] })).filter((p) => countTargets(p.row.targets) > 0);
  if (list.length < all.length) o.log(`joint router: ${all.length - list.length} of ${all.length} rows have no target tokens; left out`);

  const model = loadModel(moe, { device: o.device, dtype: o.dtype });
  const L = model.blocks.length;
  const routers = model.blocks.map((b) => (b.ffn as MoeFFN).router[0]);
  for (const p of model.params()) p.trainable = routers.includes(p);
  const state: TrainState = { step: 0, m: new Map(), v: new Map() };
  let steps = 0;
  try {
    const before = list.length ? fitOf(model, routers, list, o.microBatch) : { accuracy: NaN, loss: NaN };
    let after = before;
    if (list.length === 0) o.log('joint router: warning: no seed rows with target tokens: the routers are written unchanged');
    else {
      o.log(`joint router: ${list.length} rows, ${L} layers, ${E} experts; before: top-1 ${(100 * before.accuracy).toFixed(1)}%, loss ${before.loss.toFixed(4)}`);
      prepareState('adamw', routers, state, o.device, true, 0);
      model.zeroGrad();
      const perEpoch = Math.ceil(list.length / o.batchSize), total = perEpoch * o.epochs;
      let order: Labelled[] = [];
      for (let step = 0; step < total; step++) {
        const epoch = Math.floor(step / perEpoch);
        if (step % perEpoch === 0) order = shuffle(list, o.seed * 1000003 + epoch);
        const chunk = order.slice((step % perEpoch) * o.batchSize, (step % perEpoch) * o.batchSize + o.batchSize);
        const tokens = chunk.reduce((a, p) => a + countTargets(p.row.targets), 0) * L;
        let lossSum = 0;
        for (let i = 0; i < chunk.length; i += o.microBatch) lossSum += runMicroBatch(model, routers, chunk.slice(i, i + o.microBatch), 1 / tokens).lossSum;
        const sq = lops.sumSquares(routers.map((p) => p.grad!));
        const gradNorm = Math.sqrt(sq.item());
        sq.dispose();
        const loss = lossSum / tokens;
        if (!Number.isFinite(loss) || !Number.isFinite(gradNorm))
          throw new XftError(`${op}: the ${Number.isFinite(loss) ? 'gradient norm' : 'loss'} is not finite at step ${step + 1} (loss ${loss}, gradient norm ${gradNorm}): ` +
            'training diverged; nothing written (lower the lr)', 'XFT_NONFINITE');
        const gradScale = o.clip > 0 && gradNorm > o.clip ? o.clip / gradNorm : 1;
        optimizerStep('adamw', routers, state, { lr: learningRate(step, o.lr, 0, total), step: step + 1, gradScale, weightDecay: o.weightDecay });
        model.zeroGrad();
        state.step = step + 1;
      }
      steps = total;
      useMasterWeights(model, state);
      after = fitOf(model, routers, list, o.microBatch);
      if (!Number.isFinite(after.loss))
        throw new XftError(`${op}: the routers' loss on the seed labels is ${after.loss} after training (the logits overflow): training diverged; nothing written (lower the lr)`, 'XFT_NONFINITE');
      o.log(`joint router: ${steps} steps; after: top-1 ${(100 * after.accuracy).toFixed(1)}%, loss ${after.loss.toFixed(4)}`);
    }
    routers.forEach((r, l) => {
      if (r.value.toArray().some((x) => !Number.isFinite(x)))
        throw new XftError(`${op}: the router of layer ${l} is not finite after training; nothing written (lower the lr)`, 'XFT_NONFINITE');
    });
    const report = { moe: path.resolve(moe), rows: list.length, steps, epochs: o.epochs, lr: o.lr, before, after };
    // an f32 run writes its model (every other tensor as read); a bf16 run's weights were rounded: the
    // MoE is read again and the routers taken from their f32 masters
    const saved = o.dtype === 'f32' ? model : loadModel(moe);
    try {
      if (saved !== model) {
        const byName = new Map(saved.params().map((p) => [p.name, p]));
        for (const r of routers) byName.get(r.name)!.value.copy_(r.value);
      }
      saveModel(saved, out, {
        copyFrom: moe, overwrite: o.overwrite,
        fill: (tmp) => fs.writeFileSync(path.join(tmp, JOINT_ROUTER_FILE), JSON.stringify(report, null, 2) + '\n'),
      });
    } finally {
      if (saved !== model) saved.dispose();
    }
    return { steps, before, after };
  } finally {
    model.dispose();
    disposeOptimizerState(state);
  }
}
