/**
 * UpIT stage 3b (UPIT.md 3b): routing-vector pre-optimization. Expert e's dense model gets one vector
 * r^(l) ∈ R^d per layer, starting at 0; on its seed bucket D_e it minimizes
 *
 *   O_e = γ·L_lm + (1−γ)·L_aux,   L_aux = mean over layers l and response tokens t of softplus(−r^(l)·x_t^(l))
 *
 * (the binary cross-entropy of σ(h) against label 1), with x^(l) the FFN input of layer l (the output of
 * post_attention_layernorm), read through Model.forward's ffnInput probe. L_aux does not back-propagate
 * into x (stop-gradient): dr^(l) = (1−γ)/(L·tokens) · Σ_t −σ(−h_t)·x_t, computed while the forward runs.
 * Trainable: r (lr·routerLrScale) and every layer's FFN (lr) for 'ffn+router', r alone for 'router';
 * the trunk is frozen. AdamW (lib/optim), linear decay of the lr to 0, global gradient-norm clipping.
 *
 * The probe's O(N·d) work (h = x·rᵀ, dr += dhᵀ·x) runs on the small-N router linear kernels
 * (cuda/router_linear.cu, CPU twin binding/cpu/router_linear.cc); the O(N) softplus and sigmoid run
 * on the host in double from h read back (N floats per layer and micro-batch).
 *
 * The output folder: the expert as a dense checkpoint (its trained FFNs; unchanged tensors for
 * 'router' or an empty bucket) plus routing_vectors.safetensors with model.layers.<l>.routing_vector
 * (F32 [d]), written as one atomic, claimed folder (saveModel's writer).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { XftError, invalidArgument } from '../errors';
import { Tensor, DEVICES, type Device, disposeAll, formatShape } from '../tensor';
import { expectBool, expectInt, expectNumber, expectOneOf, expectOptions, expectString, expectFunction } from '../validate';
import { expectTensor, sameDevice } from '../ops_check';
import * as lops from '../ops_layers';
import * as rops from '../ops_router';
import { Param, type Model } from '../model';
import { type Sample, concatRows, countTargets, expectSamples, shuffle } from '../data';
import { disposeOptimizerState, optimizerStep, prepareState } from '../optim';
import { learningRate, useMasterWeights, type TrainState } from '../train';
import { SafetensorsReader, firstNonFinite, writeSafetensors } from '../safetensors';
import { checkOutputFolder, checkWritable, recoverFolder } from '../folder';
import { loadModel, readCheckpointInfo, saveModel } from '../checkpoint';

/** The file of the routing vectors inside a preoptimizeRouting output folder. */
export const ROUTING_VECTORS_FILE = 'routing_vectors.safetensors';
/** The paper's mix of the LM and the routing loss (UPIT.md 3b). */
export const ROUTE_GAMMA = 0.5;
/** "4 epochs" (UPIT.md 3b; which stage the number belongs to is unclear). */
export const ROUTE_EPOCHS = 4;
/** choice: the routing vectors' lr is 10× the FFN's. */
export const ROUTER_LR_SCALE = 10;
/** Sequences per optimizer step when batchSize is not given (fewer when the bucket is smaller). */
export const ROUTE_BATCH = 8;

/** The tensor name of layer l's routing vector. */
export function routingVectorName(layer: number): string {
  return `model.layers.${layer}.routing_vector`;
}

export interface RouteOptions {
  /** peak lr of the FFNs (UPIT.md: the stage-1 lr); the routing vectors use lr·routerLrScale */
  lr: number;
  /** weight of L_lm (default 0.5, the paper) */
  gamma?: number;
  /** passes over the bucket (default 4) */
  epochs?: number;
  /** default 10 (choice) */
  routerLrScale?: number;
  /** 'ffn+router' (default: r and every layer's FFN train) or 'router' (r alone; L_lm is then constant) */
  train?: 'ffn+router' | 'router';
  /** sequences per optimizer step (default min(8, rows)); the last step of an epoch may be smaller */
  batchSize?: number;
  /** sequences per forward pass (default batchSize) */
  microBatch?: number;
  /** seed of the data order (default 0) */
  seed?: number;
  device?: Device;
  /** compute dtype (default f32; bf16: mixed precision with f32 masters of the FFNs; r stays f32) */
  dtype?: 'f32' | 'bf16';
  onLog?: (line: string) => void;
  /** global gradient-norm clip over the trained tensors (default 1.0, as train; 0 disables) */
  clip?: number;
  /** AdamW decoupled weight decay of the FFNs (default 0; never on r) */
  weightDecay?: number;
  /** replace an existing non-empty `out` (default false: XFT_IO) */
  overwrite?: boolean;
}

export interface RoutingResult {
  /** per layer, [d] */
  vectors: Float32Array[];
  /** mean σ(r^(l)·x_t^(l)) over layers and the bucket's response tokens after training (NaN: no tokens) */
  meanSigmoid: number;
  /** optimizer steps taken */
  steps: number;
}

/** What the probe read from a layer's tokens (sums over the counted tokens). */
export interface ProbeStats {
  /** Σ softplus(−h_t) */
  lossSum: number;
  /** Σ σ(h_t) */
  sigmoidSum: number;
  /** counted tokens */
  tokens: number;
}

/** A stats tensor of routingProbe (f32 [3] on `device`, zeros) and its reading. */
export function probeStats(device: Device): Tensor {
  return Tensor.zeros([3], { device });
}

export function readProbeStats(stats: Tensor): ProbeStats {
  const [lossSum, sigmoidSum, tokens] = stats.toArray();
  return { lossSum, sigmoidSum, tokens };
}

export interface RoutingProbeOptions {
  /** f32 [3] on x's device: (Σ softplus(−h), Σ σ(h), count) over the counted tokens is added into it */
  stats: Tensor;
  /** f32 [1, d]: scale · Σ_t −σ(−h_t)·x_t is added into it (none: no gradient) */
  grad?: Tensor;
  /** multiplies the gradient (default 1) */
  scale?: number;
}

/**
 * The routing-vector probe on one layer: h = x·rᵀ [N, 1] for x [N, d] (f32 or bf16) and r f32 [1, d],
 * the tokens counted where targets i32 [N] >= 0. Adds the sums of softplus(−h) and σ(h) into
 * options.stats; with options.grad, adds the gradient of scale·Σ softplus(−h) with x held constant
 * (stop-gradient): scale · Σ_t −σ(−h_t)·x_t. On the device throughout: no host sync.
 */
export function routingProbe(x: Tensor, r: Tensor, targets: Tensor, options: RoutingProbeOptions): void {
  const op = 'routingProbe';
  const xt = expectTensor(op, 'x', x, { dtype: ['f32', 'bf16'], rank: 2, shapeName: '[N, d]' });
  const [N, d] = xt.shape;
  const rt = expectTensor(op, 'r', r, { dtype: ['f32'], shape: [1, d], shapeName: `[1, d] = [1, ${d}]` });
  const o = expectOptions<RoutingProbeOptions>(op, options, 'an options object { stats, grad?, scale? }');
  const grad = o.grad === undefined ? null : expectTensor(op, 'options.grad', o.grad, { dtype: ['f32'], shape: [1, d], shapeName: `[1, d] = [1, ${d}]` });
  sameDevice(op, { x, r, targets, grad });
  const w = xt.dtype === 'f32' ? rt : rt.cast(xt.dtype);
  let h: Tensor | null = null, dh: Tensor | null = null;
  try {
    h = rops.routerLinear(xt, w);
    dh = rops.routingProbeLoss(h, targets, { stats: o.stats, scale: o.scale, dh: grad !== null });
    if (grad && dh && N > 0) rops.routerLinearBackward(xt, w, dh, { dx: false, dw: grad });
  } finally {
    disposeAll(h, dh);
    if (w !== rt) w.dispose();
  }
}

interface Checked {
  lr: number; gamma: number; epochs: number; routerLrScale: number; trainFfn: boolean; batchSize: number; microBatch: number; seed: number;
  device: Device; dtype: 'f32' | 'bf16'; log: (line: string) => void; clip: number; weightDecay: number; overwrite: boolean;
}

function checkOptions(op: string, options: unknown, rows: number): Checked {
  if (options === undefined) throw invalidArgument(op, 'options', 'an options object with lr', options, 'XFT_TYPE');
  const o = expectOptions<RouteOptions>(op, options, 'an options object { lr, gamma?, epochs?, routerLrScale?, train?, batchSize?, microBatch?, seed?, device?, dtype?, onLog? }');
  const nonNegative = (name: string, v: unknown, fallback: number) => v === undefined ? fallback : expectNumber(op, name, v, 'a finite number >= 0', (x) => x >= 0);
  const batchSize = o.batchSize === undefined ? Math.max(1, Math.min(ROUTE_BATCH, rows)) : expectInt(op, 'options.batchSize', o.batchSize, 1);
  return {
    lr: expectNumber(op, 'options.lr', o.lr, 'a finite number >= 0', (x) => x >= 0),
    gamma: o.gamma === undefined ? ROUTE_GAMMA : expectNumber(op, 'options.gamma', o.gamma, 'a number in [0, 1]', (x) => x >= 0 && x <= 1),
    epochs: o.epochs === undefined ? ROUTE_EPOCHS : expectInt(op, 'options.epochs', o.epochs, 1),
    routerLrScale: nonNegative('options.routerLrScale', o.routerLrScale, ROUTER_LR_SCALE),
    trainFfn: (o.train === undefined ? 'ffn+router' : expectOneOf(op, 'options.train', o.train, ['ffn+router', 'router'] as const)) === 'ffn+router',
    batchSize,
    microBatch: o.microBatch === undefined ? batchSize : expectInt(op, 'options.microBatch', o.microBatch, 1, batchSize),
    seed: o.seed === undefined ? 0 : expectInt(op, 'options.seed', o.seed, 0),
    device: o.device === undefined ? 'cpu' : expectOneOf(op, 'options.device', o.device, DEVICES, 'XFT_DEVICE'),
    dtype: o.dtype === undefined ? 'f32' : expectOneOf(op, 'options.dtype', o.dtype, ['f32', 'bf16'] as const, 'XFT_DTYPE'),
    log: expectFunction<(line: string) => void>(op, 'options.onLog', o.onLog) ?? (() => {}),
    clip: nonNegative('options.clip', o.clip, 1),
    weightDecay: nonNegative('options.weightDecay', o.weightDecay, 0),
    overwrite: expectBool(op, 'options.overwrite', o.overwrite, false),
  };
}

/** Σ over layers of the probe on `rows` (eval forwards, nothing trained). */
function probeAll(model: Model, rows: readonly Sample[], vectors: readonly Param[], micro: number): ProbeStats {
  const stats = probeStats(model.device);
  try {
    for (let i = 0; i < rows.length; i += micro) runMicroBatch(model, rows.slice(i, i + micro), vectors, null, stats, null);
    return readProbeStats(stats);
  } finally {
    stats.dispose();
  }
}

/**
 * One forward of `part` with the probe on every layer, its sums added into `stats` (and its gradient
 * into each r when `auxScale` is given), and with `backward` the model's backward of the LM loss; the
 * LM loss sum and tokens.
 */
function runMicroBatch(model: Model, part: readonly Sample[], vectors: readonly Param[], backward: { tokens: number; scale: number } | null,
  stats: Tensor, auxScale: number | null): { lmSum: number; tokens: number } {
  const T = part[0].ids.length, B = part.length;
  const ids = Tensor.from(concatRows(part, 'ids'), [B * T], { dtype: 'i32', device: model.device });
  const targets = Tensor.from(concatRows(part, 'targets'), [B * T], { dtype: 'i32', device: model.device });
  try {
    const f = model.forward(ids, targets, B, T, {
      training: backward !== null,
      ffnInput: (l, x) => routingProbe(x, vectors[l].value, targets, auxScale === null ? { stats } : { stats, grad: vectors[l].gradBuffer(), scale: auxScale }),
    });
    if (backward) model.backward(backward);
    return { lmSum: f.loss * f.tokens, tokens: f.tokens };
  } finally {
    disposeAll(ids, targets);
  }
}

/**
 * Pre-optimizes expert `expert`'s routing vectors on its bucket `rows` (padded rows of one length) and
 * writes `out` (see the file comment). An empty bucket (or one without target tokens) trains nothing:
 * the vectors stay 0, the model is written unchanged, and onLog gets a warning.
 */
export function preoptimizeRouting(expert: string, rows: readonly Sample[], out: string, options: RouteOptions): RoutingResult {
  const op = 'preoptimizeRouting';
  expectString(op, 'expert', expert, 'a dense checkpoint folder');
  expectString(op, 'out', out, 'an output folder');
  const all = expectSamples(op, 'rows', rows, true);
  const o = checkOptions(op, options, all.length);
  if (!fs.existsSync(expert)) throw new XftError(`${op}: expert ${expert} does not exist`, 'XFT_IO');
  const info = readCheckpointInfo(expert);
  if (info.kind !== 'dense') throw invalidArgument(op, 'expert', 'a dense checkpoint folder', `a ${info.kind} checkpoint (${expert})`);
  if (path.resolve(out) === path.resolve(expert)) throw invalidArgument(op, 'out', `a folder other than the expert's (${expert})`, out);
  checkWritable(out);
  checkOutputFolder(out, o.overwrite);
  const V = info.config.vocab_size;
  all.forEach((r, i) => {
    for (let t = 0; t < r.ids.length; t++)
      if (r.ids[t] < 0 || r.ids[t] >= V) throw invalidArgument(op, `rows[${i}].ids[${t}]`, `a token id in [0, ${V})`, r.ids[t]);
      else if (r.targets[t] >= V) throw invalidArgument(op, `rows[${i}].targets[${t}]`, `a token id < vocab_size ${V} (or < 0: ignored)`, r.targets[t]);
  });
  const list = all.filter((r) => countTargets(r.targets) > 0);
  if (list.length < all.length) o.log(`route: ${all.length - list.length} of ${all.length} rows have no target tokens; left out`);

  const model = loadModel(expert, { device: o.device, dtype: o.dtype });
  const L = model.blocks.length, d = model.config.hidden_size;
  const vectors = Array.from({ length: L }, (_, l) => new Param(routingVectorName(l), Tensor.zeros([1, d], { device: o.device }), true));
  const state: TrainState = { step: 0, m: new Map(), v: new Map() };
  let steps = 0, meanSigmoid = NaN;
  try {
    if (list.length === 0) o.log(`route: warning: the bucket of ${expert} has no rows with target tokens: its routing vectors stay 0 and its FFNs unchanged`);
    else {
      const ffn = new Set(model.blocks.flatMap((b) => b.ffn.params()));
      for (const p of model.params()) p.trainable = o.trainFfn && ffn.has(p);
      const ffnParams = model.trainableParams();
      prepareState('adamw', [...ffnParams, ...vectors], state, o.device, true, 0);
      model.zeroGrad();
      steps = trainVectors(model, list, vectors, ffnParams, state, o, expert);
      const end = probeAll(model, list, vectors, o.microBatch);
      meanSigmoid = end.sigmoidSum / end.tokens;
      o.log(`route: ${expert}: ${steps} steps on ${list.length} rows; mean σ(r·x) ${meanSigmoid.toFixed(4)}, L_aux ${(end.lossSum / end.tokens).toFixed(4)}`);
      useMasterWeights(model, state);
    }
    const result = { vectors: vectors.map((v) => Float32Array.from(v.value.toArray())), meanSigmoid, steps };
    result.vectors.forEach((v, l) => {
      if (v.some((x) => !Number.isFinite(x))) throw new XftError(`${op}: the routing vector of layer ${l} is not finite after training; nothing written (lower lr)`, 'XFT_NONFINITE');
    });
    const metadata = { format: 'pt', xft_upit_route: JSON.stringify({ expert: path.resolve(expert), rows: list.length, steps, meanSigmoid: Number.isFinite(meanSigmoid) ? meanSigmoid : null, gamma: o.gamma, epochs: o.epochs, lr: o.lr, routerLrScale: o.routerLrScale, train: o.trainFfn ? 'ffn+router' : 'router' }) };
    // an f32 run writes its model (the trunk as read); a bf16 run's weights were rounded: the trunk is
    // taken from the file again and the trained FFNs from their f32 masters
    const saved = o.dtype === 'f32' ? model : loadModel(expert);
    try {
      if (saved !== model && steps > 0 && o.trainFfn) {
        const byName = new Map(saved.params().map((p) => [p.name, p]));
        for (const p of model.blocks.flatMap((b) => b.ffn.params())) byName.get(p.name)!.value.copy_(p.value);
      }
      saveModel(saved, out, {
        copyFrom: expert, overwrite: o.overwrite,
        fill: (tmp) => writeSafetensors(path.join(tmp, ROUTING_VECTORS_FILE), vectors.map((v) => ({ name: v.name, dtype: 'F32' as const, shape: [d], tensor: () => v.value.reshape([d]) })), metadata),
      });
    } finally {
      if (saved !== model) saved.dispose();
    }
    return result;
  } finally {
    model.dispose();
    vectors.forEach((v) => v.dispose());
    disposeOptimizerState(state);
  }
}

/** The optimization loop of preoptimizeRouting; the number of steps. */
function trainVectors(model: Model, rows: readonly Sample[], vectors: Param[], ffnParams: Param[], state: TrainState, o: Checked, expert: string): number {
  const L = vectors.length, perEpoch = Math.ceil(rows.length / o.batchSize), total = perEpoch * o.epochs;
  let order: Sample[] = [], orderEpoch = -1, epochLoss = 0, epochTokens = 0;
  for (let step = 0; step < total; step++) {
    const epoch = Math.floor(step / perEpoch);
    if (epoch !== orderEpoch) {
      order = shuffle(rows, o.seed * 1000003 + epoch);
      orderEpoch = epoch;
    }
    const first = (step % perEpoch) * o.batchSize, chunk = order.slice(first, first + o.batchSize);
    const stepTokens = chunk.reduce((a, r) => a + countTargets(r.targets), 0);
    const auxScale = (1 - o.gamma) / (L * stepTokens);
    let lm = 0, aux = 0;
    const stats = probeStats(model.device);
    try {
      for (let i = 0; i < chunk.length; i += o.microBatch) {
        const backward = o.trainFfn ? { tokens: stepTokens, scale: o.gamma } : null;
        lm += runMicroBatch(model, chunk.slice(i, i + o.microBatch), vectors, backward, stats, auxScale).lmSum;
      }
      aux = readProbeStats(stats).lossSum;
    } finally {
      stats.dispose();
    }
    const loss = o.gamma * (lm / stepTokens) + (1 - o.gamma) * (aux / (L * stepTokens));
    const withGrad = [...ffnParams, ...vectors].filter((p) => p.grad !== null);
    const sq = lops.sumSquares(withGrad.map((p) => p.grad!));
    const gradNorm = Math.sqrt(sq.item());
    sq.dispose();
    if (!Number.isFinite(loss) || !Number.isFinite(gradNorm))
      throw new XftError(`preoptimizeRouting: the ${Number.isFinite(loss) ? 'gradient norm' : 'loss'} is not finite at step ${step + 1} of ${expert} (loss ${loss}, gradient norm ${gradNorm}): ` +
        'training diverged; nothing written (lower the lr)', 'XFT_NONFINITE');
    const gradScale = o.clip > 0 && gradNorm > o.clip ? o.clip / gradNorm : 1;
    const lr = learningRate(step, o.lr, 0, total);
    optimizerStep('adamw', ffnParams, state, { lr, step: step + 1, gradScale, weightDecay: o.weightDecay });
    optimizerStep('adamw', vectors, state, { lr: lr * o.routerLrScale, step: step + 1, gradScale, weightDecay: 0 });
    model.zeroGrad();
    vectors.forEach((v) => v.zeroGrad());
    state.step = step + 1;
    epochLoss += loss * stepTokens;
    epochTokens += stepTokens;
    if ((step + 1) % perEpoch === 0) {
      o.log(`route: ${expert}: epoch ${epoch + 1}/${o.epochs}, loss ${(epochLoss / epochTokens).toFixed(4)} (γ·L_lm + (1−γ)·L_aux)`);
      epochLoss = epochTokens = 0;
    }
  }
  return total;
}

/**
 * The routing vectors of a preoptimizeRouting output folder: per layer an f32 [d] (d and the layer
 * count from its config.json). A missing file is XFT_IO; a missing tensor or one of another layer
 * XFT_FORMAT; a wrong shape XFT_SHAPE; a dtype other than F32 XFT_DTYPE; NaN or ±Inf XFT_NONFINITE.
 */
export function readRoutingVectors(dir: string): Float32Array[] {
  const op = 'readRoutingVectors';
  expectString(op, 'dir', dir, 'a folder written by preoptimizeRouting');
  recoverFolder(dir);
  const file = path.join(dir, ROUTING_VECTORS_FILE);
  if (!fs.existsSync(file)) throw new XftError(`${op}: ${dir} has no ${ROUTING_VECTORS_FILE} (not a folder written by preoptimizeRouting)`, 'XFT_IO');
  const c = readCheckpointInfo(dir).config, L = c.num_hidden_layers, d = c.hidden_size;
  const r = new SafetensorsReader(file);
  const expected = new Set(Array.from({ length: L }, (_, l) => routingVectorName(l)));
  for (const name of r.names())
    if (!expected.has(name)) throw new XftError(`${op}: ${file} holds ${name}, not a routing vector of the model's ${L} layers`, 'XFT_FORMAT');
  return Array.from({ length: L }, (_, l) => {
    const name = routingVectorName(l);
    if (!r.has(name)) throw new XftError(`${op}: ${file} has no ${name}`, 'XFT_FORMAT');
    const t = r.info(name);
    if (t.dtype !== 'F32') throw new XftError(`${op}: ${file}: ${name} is ${t.dtype}, expected F32`, 'XFT_DTYPE');
    if (formatShape(t.shape) !== formatShape([d])) throw new XftError(`${op}: ${file}: ${name} has shape ${formatShape(t.shape)}, expected [${d}] (hidden_size)`, 'XFT_SHAPE');
    const raw = r.readBytes(name);
    const at = firstNonFinite(raw, 'F32');
    if (at >= 0) throw new XftError(`${op}: ${file}: ${name} holds a non-finite value at element ${at}`, 'XFT_NONFINITE');
    return r.readF32(name);
  });
}
