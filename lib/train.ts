/**
 * The training loop: AdamW or Adafactor (lib/optim/) on f32 weights, bf16 weights with f32 master
 * copies (mixed precision) or bf16 weights updated in place; linear warmup then linear decay, global
 * gradient-norm clipping, gradient accumulation to a target batch, an onStep callback, and
 * deterministic runs for a fixed seed. A run saved with `saveTrainState` and resumed continues
 * with exactly the losses of an unbroken run.
 *
 * Each step reads top to bottom: next micro-batches -> forward -> backward (gradients accumulate)
 * -> grad norm -> clip -> optimizer update -> zero gradients.
 *
 * No host synchronisation inside a step: losses, token counts and balance losses accumulate on the
 * device, the gradient norm, clipping factor and non-finite check are computed there, and the
 * optimizer kernels read the factor and a skip flag from device memory (lib/ledger.ts). The host
 * reads the step records once per `logEvery` steps (default 1), and then calls onStep for each.
 * Data parallel (`parallel`): the records hold each rank's sums and are summed over ranks when read;
 * the non-finite check and clipping use the norm of the reduced gradient and a non-finite flag
 * summed over ranks on the device, so every rank decides alike.
 *
 * Divergence: a step whose loss or gradient norm is NaN or infinite is caught on the device before
 * the update: the run stops with XFT_NONFINITE (thrown at the next read), weights and optimizer
 * state as the last good step left them (or, with `skipNonFinite`, up to that many such steps are
 * skipped: no update of weights or moments). A loss stuck at ln(vocab) (a collapsed model
 * predicting the uniform distribution) gets a warning.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { XftError, describe } from './errors';
import { Tensor, disposeAll } from './tensor';
import * as lops from './ops_layers';
import { type OptimizerKind, type OptimizerState, type StepHyper, OPTIMIZERS, disposeOptimizerState, optimizerOf, optimizerStep, prepareState, setStateTensor, stateTensors } from './optim';
import type { Device } from './tensor';
import { type Model, type Param, expectModel } from './model';
import { type Sample, concatRows, countTargets, expectSamples, shuffle } from './data';
import { SafetensorsReader, writeSafetensors } from './safetensors';
import { StepLedger, zeroMany } from './ledger';
import { CudaGraph } from './graph';
import { adamwBiasCorrection } from './optim/adamw';
import { recoverFolder, writeFileAtomic, writeFolderAtomic } from './folder';

export interface TrainOptions {
  /** peak learning rate */
  lr: number;
  /** sequences per optimizer step (gradient accumulation reaches it with micro-batches) */
  batchSize: number;
  /** sequences per forward pass (default: batchSize) */
  microBatch?: number;
  /** passes over the data (default 1); or `steps` */
  epochs?: number;
  /** optimizer steps in total (default: from epochs) */
  steps?: number;
  /** linear warmup steps (default 0), then linear decay to 0 at the last step */
  warmupSteps?: number;
  weightDecay?: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  /** clip the global gradient norm to this (default 1.0; 0 disables) */
  clip?: number;
  /** 'adamw' (default; beta1, beta2, eps, weightDecay apply) or 'adafactor' (transformers' Adafactor as the HF Trainer's --optim adafactor) */
  optimizer?: OptimizerKind;
  /** a bf16 model: keep f32 master weights (mixed precision, default true) or update the bf16 weights in place (false: the reference's bf16) */
  masterWeights?: boolean;
  /** bf16 weights updated in place: stochastic rounding of the write (default false: nearest even), seeded by seed, step and tensor */
  stochasticRounding?: boolean;
  /**
   * dtype of the gradients of a bf16 model's linear and expert weights (default 'f32'; 'bf16' halves
   * their memory, accumulating micro-batches in bf16 as PyTorch does for bf16 parameters). The
   * embedding, norms and α keep f32 gradients.
   */
  gradDtype?: 'f32' | 'bf16';
  /** seed of the data order and router noise (default 0) */
  seed?: number;
  /** activation recomputation: blocks keep only their input, backward recomputes them (identical gradients, less memory, ~1/3 more compute) */
  recompute?: boolean;
  /** called after every optimizer step */
  onStep?: (info: StepInfo) => void;
  /** resume from this state (see saveTrainState / loadTrainState) */
  resume?: TrainState;
  /** stop after this step (the state is returned for a later resume) */
  stopAfter?: number;
  /** steps with a non-finite loss or gradient norm that may be skipped (no update) before the run stops with XFT_NONFINITE (default 0) */
  skipNonFinite?: number;
  /** called with a warning about the run (e.g. a loss stuck at ln(vocab)); default: none */
  onWarning?: (message: string) => void;
  /**
   * read the step records back every this many steps (default 1): the steps between make no host
   * synchronisation. onStep runs for each step of an interval at its end, when the weights are those
   * of the interval's last step (evaluate or save only at multiples of logEvery); a non-finite step
   * stops the run there too, with the weights of the step before it.
   */
  logEvery?: number;
  /**
   * capture the whole step (uploads of the micro-batches aside) in a CUDA graph and replay it (the
   * CUDA backend; default false). The first step runs as usual, the second is captured, every later
   * one is a replay: what changes from step to step (token ids and targets, the learning rate, the
   * step number behind AdamW's bias corrections and stochastic rounding, the loss scale 1 / tokens,
   * the ledger slot) is read from device buffers written before each replay (two small uploads), so
   * the losses and weights are those of the same run without it, bit for bit. Refused (XFT_DEVICE or
   * XFT_VALUE) where a replay would be wrong: a CPU model, data parallelism, Adafactor, MoE router noise.
   */
  cudaGraph?: boolean;
  /**
   * data parallelism over several processes (lib/dist/ddp.ts DataParallel): each runs its share of
   * every step's micro-batches (batchSize = microBatch × accumulation steps × world size), gradients
   * and logged losses are summed over ranks; the losses are the single process's
   */
  parallel?: TrainParallel;
}

/**
 * What the trainer asks of a data-parallel run (lib/dist/ddp.ts implements it); every rank calls
 * these in the same order.
 */
export interface TrainParallel {
  readonly rank: number;
  readonly worldSize: number;
  /** weights made equal on every rank, the optimizer state completed (or sharded) */
  prepare(kind: OptimizerKind, params: Param[], state: TrainState, device: Device, masterWeights: boolean): void;
  /** the last micro-batch's backward has finished these parameters' gradients */
  gradientsReady(params: readonly Param[]): void;
  /** numbers summed over ranks, the same on every rank (a host collective: the trainer calls it at log points only) */
  sum(values: readonly number[]): number[];
  /** f32 device tensors summed over ranks in place (one collective, no host synchronisation with NCCL) */
  allReduce(tensors: Tensor[]): void;
  /**
   * finishes the gradient reduction; the squared norm of the reduced gradient, f32 [1] on the device
   * (the caller disposes it): the whole (`partial` false: equal on every rank), or this rank's share
   * (`partial` true: the trainer sums it over ranks)
   */
  reduceGradients(): { sumsq: Tensor; partial: boolean };
  /** the optimizer step (hyper.control: the device control block may skip it); the weights are equal on every rank afterwards */
  update(kind: OptimizerKind, params: Param[], state: TrainState, hyper: StepHyper): void;
}

export interface StepInfo {
  step: number;
  steps: number;
  epoch: number;
  /** mean cross-entropy over the step's response tokens */
  loss: number;
  /** balance loss of the MoE layers (0 for dense models) */
  auxLoss: number;
  lr: number;
  gradNorm: number;
  /** response tokens of the step */
  tokens: number;
  /** tokens (all positions) per second of wall time for this step */
  tokensPerSecond: number;
  /** the loss or gradient norm was not finite and the step was skipped (skipNonFinite): no update */
  skipped: boolean;
}

/** Optimizer state (lib/optim: moments or statistics, master weights) and progress, for resuming. */
export interface TrainState extends OptimizerState {
  step: number;
}

export interface TrainResult {
  losses: number[];
  state: TrainState;
  steps: number;
}

/** Linear warmup from 0 to lr over `warmup` steps, then linear decay to 0 at `total` (HF get_linear_schedule_with_warmup). */
export function learningRate(step: number, lr: number, warmup: number, total: number): number {
  for (const [name, v] of [['step', step], ['lr', lr], ['warmup', warmup], ['total', total]] as const)
    check(typeof v === 'number' && Number.isFinite(v), name, 'a finite number', v);
  if (step < warmup) return (lr * (step + 1)) / Math.max(1, warmup);
  return lr * Math.max(0, (total - step) / Math.max(1, total - warmup));
}

function check(cond: boolean, name: string, expected: string, got: unknown): void {
  if (!cond) throw new XftError(`train: expected ${expected} for ${name} but received ${describe(got)}`, 'XFT_VALUE');
}

/** Consecutive steps with a loss flat at ln(vocab) before the warning. */
const STUCK_STEPS = 5;
/** |loss - ln V| and |loss - previous loss| below which a step counts as stuck at the uniform prediction. */
const STUCK_TOLERANCE = 1e-4;

/** Models inside train / trainAsync: a second run on one model at a time is refused. */
const busy = new WeakSet<Model>();

function claimModel(model: Model): void {
  expectModel('train', 'model', model);
  if (busy.has(model))
    throw new XftError('train: this model is already being trained by another train / trainAsync call; one run per model at a time (their updates would interleave)', 'XFT_BUSY');
  busy.add(model);
}

/** The f32 values of a graphed step's hyper block: lr, bc1, bc2, step (lib/optim/adamw.ts HyperOption). */
const HYPER = 4;

/** A captured training step (TrainOptions.cudaGraph) and the device buffers its replays read. */
interface GraphedStep {
  graph: CudaGraph | null;
  /** the first step ran as ops (the gradients and the kernels' tables exist) */
  warm: boolean;
  /** rows (tokens) of a micro-batch */
  rows: number;
  /** uploaded each step: per micro-batch its ids then its targets (i32); HYPER values then the per-row loss gradient (f32) */
  ints: Tensor;
  floats: Tensor;
  /** what the captured ops read, copied from the uploads inside the graph */
  ids: Tensor[];
  targets: Tensor[];
  hyper: Tensor;
  dLoss: Tensor;
}

/** Why a run cannot be replayed from a CUDA graph (a replay would be refused or wrong), as an XftError. */
function graphRefusal(model: Model, o: TrainOptions, par: TrainParallel | undefined): void {
  const no = (why: string, code: 'XFT_DEVICE' | 'XFT_VALUE' = 'XFT_VALUE') => new XftError(`train: cudaGraph: ${why}; train without cudaGraph (--cuda-graph)`, code);
  if (model.device !== 'cuda') throw no(`CUDA graphs need the CUDA backend, and the model is on ${model.device}`, 'XFT_DEVICE');
  if (par) throw no('data parallelism is not captured (the gradient all-reduce and the sums over ranks are calls of the host inside the step)');
  if ((o.optimizer ?? 'adamw') !== 'adamw') throw no(`only AdamW reads its step from the device (${o.optimizer}'s step-dependent decay is a launch argument)`);
  if (model.blocks.some((b) => b.ffn.stepSeeded === true))
    throw no('the MoE router noise draws from a per-step seed that its kernels take as a launch argument (a replay would repeat one step\'s noise): set gate_noise false');
}

/** 64-bit seed of (run seed, step, micro-batch) for router noise. */
function stepSeed(seed: number, step: number, micro: number): bigint {
  return BigInt.asUintN(64, (BigInt(seed) << 40n) ^ (BigInt(step) << 12n) ^ BigInt(micro) ^ 0x9e3779b97f4a7c15n);
}

/**
 * A training run, one optimizer step at a time (`train` and `trainAsync` drive it). Each step:
 * next micro-batches -> forward -> backward (gradients accumulate) -> grad norm -> clip -> AdamW -> zero gradients.
 */
export class Trainer {
  readonly total: number;
  readonly state: TrainState;
  readonly losses: number[] = [];
  readonly #o: TrainOptions;
  readonly #rows: readonly Sample[];
  readonly #params: Param[];
  readonly #seqLen: number;
  readonly #micro: number;
  readonly #accum: number;
  /** micro-batches of a step this rank runs, and the first one's index in the step */
  readonly #localAccum: number;
  readonly #firstMicro: number;
  readonly #par: TrainParallel | undefined;
  readonly #stepsPerEpoch: number;
  readonly #last: number;
  #order: Sample[] = [];
  #orderEpoch = -1;
  /** steps skipped for a non-finite loss or gradient norm */
  skipped = 0;
  #stuck = 0;
  #warnedStuck = false;
  readonly #ledger: StepLedger;
  readonly #logEvery: number;
  /** data parallel: the non-finite flag of this rank's step, f32 [1], summed over ranks on the device */
  readonly #flag: Tensor | null;
  /** cudaGraph: the captured step and the buffers it reads (null: not a graphed run) */
  #graphed: GraphedStep | null = null;
  /** steps taken since the last read: their records wait in the ledger */
  #pending: { step: number; epoch: number; lr: number; tokens: number }[] = [];
  #intervalStart = process.hrtime.bigint();

  constructor(readonly model: Model, rows: readonly Sample[], options: TrainOptions) {
    expectModel('train', 'model', model);
    expectSamples('train', 'rows', rows, true);
    const o = options;
    check(o !== null && typeof o === 'object', 'options', 'an object with lr and batchSize', o);
    check(typeof o.lr === 'number' && o.lr >= 0, 'lr', 'a number >= 0', o.lr);
    check(Number.isSafeInteger(o.batchSize) && o.batchSize >= 1, 'batchSize', 'a positive integer', o.batchSize);
    const micro = o.microBatch ?? o.batchSize;
    check(Number.isSafeInteger(micro) && micro >= 1 && o.batchSize % micro === 0, 'microBatch', `a positive divisor of batchSize (${o.batchSize})`, micro);
    check(o.skipNonFinite === undefined || (Number.isSafeInteger(o.skipNonFinite) && o.skipNonFinite >= 0), 'skipNonFinite', 'an integer >= 0', o.skipNonFinite);
    check(rows.length > 0, 'rows', 'at least one training sequence', rows.length);
    const seqLen = rows[0].ids.length;
    check(rows.every((r) => r.ids.length === seqLen && r.targets.length === seqLen), 'rows', `sequences of one length (${seqLen})`, 'rows of several lengths');
    const stepsPerEpoch = Math.floor(rows.length / o.batchSize);
    check(stepsPerEpoch >= 1, 'batchSize', `at most the number of training sequences (${rows.length})`, o.batchSize);
    // every option is checked here, before the optimizer state is allocated
    const count = (name: keyof TrainOptions, min: number) => o[name] === undefined || check(Number.isSafeInteger(o[name]) && (o[name] as number) >= min, name, `an integer >= ${min}`, o[name]);
    const num = (name: keyof TrainOptions, what: string, ok: (x: number) => boolean) =>
      o[name] === undefined || check(typeof o[name] === 'number' && Number.isFinite(o[name]) && ok(o[name] as number), name, what, o[name]);
    check(Number.isFinite(o.lr), 'lr', 'a finite number >= 0', o.lr);
    count('epochs', 1), count('steps', 1), count('warmupSteps', 0), count('stopAfter', 0), count('seed', 0), count('logEvery', 1);
    num('weightDecay', 'a finite number >= 0', (x) => x >= 0), num('clip', 'a finite number >= 0', (x) => x >= 0), num('eps', 'a finite number >= 0', (x) => x >= 0);
    num('beta1', 'a number in [0, 1)', (x) => x >= 0 && x < 1), num('beta2', 'a number in [0, 1)', (x) => x >= 0 && x < 1);
    check(o.onStep === undefined || typeof o.onStep === 'function', 'onStep', 'a function', o.onStep);
    check(o.recompute === undefined || typeof o.recompute === 'boolean', 'recompute', 'a boolean', o.recompute);
    check(o.optimizer === undefined || OPTIMIZERS.includes(o.optimizer), 'optimizer', `one of ${OPTIMIZERS.map((x) => `'${x}'`).join(', ')}`, o.optimizer);
    check(o.masterWeights === undefined || typeof o.masterWeights === 'boolean', 'masterWeights', 'a boolean', o.masterWeights);
    check(o.stochasticRounding === undefined || typeof o.stochasticRounding === 'boolean', 'stochasticRounding', 'a boolean', o.stochasticRounding);
    check(o.gradDtype === undefined || o.gradDtype === 'f32' || o.gradDtype === 'bf16', 'gradDtype', "'f32' or 'bf16'", o.gradDtype);
    check(o.gradDtype !== 'bf16' || model.dtype === 'bf16', 'gradDtype', "'f32' for an f32 model (bf16 gradients need bf16 weights)", o.gradDtype);
    check(o.resume === undefined || (o.resume !== null && typeof o.resume === 'object' && o.resume.m instanceof Map && o.resume.v instanceof Map &&
      Number.isSafeInteger(o.resume.step)), 'resume', 'a TrainState (from train or loadTrainState)', o.resume);
    const par = o.parallel;
    check(par === undefined || (par !== null && typeof par === 'object' && typeof par.reduceGradients === 'function' && typeof par.allReduce === 'function'),
      'parallel', 'a TrainParallel (lib/dist DataParallel)', par);
    const world = par?.worldSize ?? 1, rank = par?.rank ?? 0, accum = o.batchSize / micro;
    if (accum % world !== 0)
      throw new XftError(`train: the batch size ${o.batchSize} must be micro-batch × accumulation steps × world size: ${accum} micro-batches of ${micro} do not split over ${world} ranks ` +
        `(use a batch size that is a multiple of ${micro * world}, or a micro-batch that divides ${o.batchSize / world})`, 'XFT_VALUE');
    check(o.cudaGraph === undefined || typeof o.cudaGraph === 'boolean', 'cudaGraph', 'a boolean', o.cudaGraph);
    if (o.cudaGraph) graphRefusal(model, o, par);
    this.#par = par;
    this.#localAccum = accum / world;
    this.#firstMicro = rank * this.#localAccum;
    this.#o = o;
    this.#rows = rows;
    this.#seqLen = seqLen;
    this.#micro = micro;
    this.#accum = o.batchSize / micro;
    this.#stepsPerEpoch = stepsPerEpoch;
    this.total = o.steps ?? stepsPerEpoch * (o.epochs ?? 1);
    this.#last = Math.min(this.total, o.stopAfter ?? this.total);
    this.#params = model.trainableParams();
    this.state = o.resume ?? { step: 0, m: new Map(), v: new Map() };
    for (const p of this.#params)
      p.gradDtype = o.gradDtype === 'bf16' && p.value.dtype === 'bf16' && p.value.shape.length >= 2 && p !== model.embed ? 'bf16' : 'f32';
    if (par) par.prepare(o.optimizer ?? 'adamw', this.#params, this.state, model.device, o.masterWeights ?? true);
    else prepareState(o.optimizer ?? 'adamw', this.#params, this.state, model.device, o.masterWeights ?? true, this.state.step);
    model.zeroGrad();
    this.#logEvery = o.logEvery ?? 1;
    this.#ledger = new StepLedger(model.device, this.#logEvery);
    this.#flag = par ? Tensor.zeros([1], { device: model.device }) : null;
    if (o.cudaGraph) {
      if (optimizerOf(this.state) !== 'adamw') throw new XftError(`train: cudaGraph supports AdamW only; the state to resume is an ${optimizerOf(this.state)} one`, 'XFT_VALUE');
      if (this.total >= 2 ** 24) throw new XftError(`train: cudaGraph reads the step number as f32 on the device: at most 2^24 - 1 steps (got ${this.total})`, 'XFT_VALUE');
      const rows = micro * seqLen, d = { device: model.device };
      this.#graphed = {
        graph: null, warm: false, rows,
        ints: Tensor.zeros([2 * accum * rows], { ...d, dtype: 'i32' }), floats: Tensor.zeros([HYPER + rows], d),
        ids: Array.from({ length: accum }, () => Tensor.zeros([rows], { ...d, dtype: 'i32' })),
        targets: Array.from({ length: accum }, () => Tensor.zeros([rows], { ...d, dtype: 'i32' })),
        hyper: Tensor.zeros([HYPER], d), dLoss: Tensor.zeros([rows], d),
      };
    }
  }

  /** True when the last step (or stopAfter) is reached. */
  get done(): boolean {
    return this.state.step >= this.#last;
  }

  /**
   * One optimizer step, queued without a host synchronisation. At a log point (every logEvery steps,
   * and the last step) the records are read and onStep runs for each: returns the last one's info.
   */
  step(): StepInfo | undefined {
    const o = this.#o, model = this.model, seqLen = this.#seqLen, micro = this.#micro, accum = this.#accum;
    const step = this.state.step, seed = o.seed ?? 0, clip = o.clip ?? 1.0;
    const epoch = Math.floor(step / this.#stepsPerEpoch);
    if (epoch !== this.#orderEpoch) {
      this.#order = shuffle(this.#rows, seed * 1000003 + epoch);
      this.#orderEpoch = epoch;
    }
    const first = (step % this.#stepsPerEpoch) * o.batchSize;
    const chunk = this.#order.slice(first, first + o.batchSize);
    const stepTokens = chunk.reduce((a, r) => a + countTargets(r.targets), 0);
    const lr = learningRate(step, o.lr, o.warmupSteps ?? 0, this.total);
    if (this.#graphed) this.#graphStep(this.#graphed, chunk, step, stepTokens, lr);
    else this.#eagerStep(chunk, step, stepTokens, lr);
    this.state.step = step + 1;
    this.#pending.push({ step, epoch, lr, tokens: stepTokens });
    if ((step + 1) % this.#logEvery === 0 || this.done) return this.flush();
    return undefined;
  }

  /** The step's device work, op by op (the micro-batches uploaded one by one). */
  #eagerStep(chunk: Sample[], step: number, stepTokens: number, lr: number): void {
    const o = this.#o, model = this.model, seqLen = this.#seqLen, micro = this.#micro, accum = this.#accum;
    const seed = o.seed ?? 0, clip = o.clip ?? 1.0;
    // this rank's micro-batches of the step (all of them in a single process); the backward divides by
    // the whole step's token count, so that summing over ranks gives the single process's gradient
    const par = this.#par, last = this.#firstMicro + this.#localAccum - 1;
    for (let mb = this.#firstMicro; mb <= last; mb++) {
      const part = chunk.slice(mb * micro, (mb + 1) * micro);
      const ids = Tensor.from(concatRows(part, 'ids'), [part.length * seqLen], { dtype: 'i32', device: model.device });
      const targets = Tensor.from(concatRows(part, 'targets'), [part.length * seqLen], { dtype: 'i32', device: model.device });
      model.forwardToLedger(ids, targets, part.length, seqLen, { training: true, seed: stepSeed(seed, step, mb), recompute: o.recompute ?? false }, this.#ledger, accum);
      model.backward({ tokens: stepTokens, scale: 1, auxScale: 1 / accum, onGradients: par && mb === last ? (ps) => par.gradientsReady(ps) : undefined });
      disposeAll(ids, targets);
    }
    // the step's end on the device: gradient norm, clipping factor, the non-finite check -> the control block
    let sq: Tensor;
    if (par) {
      const reduced = par.reduceGradients();
      sq = reduced.sumsq;
      // every rank's non-finite flag (and its share of the norm under ZeRO) summed: every rank decides alike
      this.#ledger.nonFinite(this.#flag!);
      par.allReduce(reduced.partial ? [sq, this.#flag!] : [this.#flag!]);
    } else sq = lops.sumSquares(this.#params.filter((p) => p.grad !== null).map((p) => p.grad!));
    this.#ledger.end(sq, this.#pending.length, clip, o.skipNonFinite ?? 0, this.#flag ?? undefined);
    sq.dispose();
    // a bf16 parameter with a master: the f32 master is updated and rounded into the parameter; a skipped step writes nothing
    const hyper: StepHyper = {
      lr, step: step + 1, gradScale: 1, beta1: o.beta1, beta2: o.beta2, eps: o.eps, weightDecay: o.weightDecay ?? 0,
      stochasticRounding: o.stochasticRounding, seed, control: this.#ledger.control,
    };
    if (par) par.update(optimizerOf(this.state), this.#params, this.state, hyper);
    else optimizerStep(optimizerOf(this.state), this.#params, this.state, hyper);
    zeroMany(this.#params.filter((p) => p.grad !== null).map((p) => p.grad!));
  }

  /**
   * cudaGraph: the step's inputs uploaded into the graph's buffers (token ids and targets in one i32
   * upload; lr, bias corrections, step and the per-row loss gradient in one f32 upload), then the
   * step's device work: run as ops the first time (it makes the gradients and the kernels' tables),
   * captured the second time, replayed from then on.
   */
  #graphStep(g: GraphedStep, chunk: Sample[], step: number, stepTokens: number, lr: number): void {
    const o = this.#o, micro = this.#micro, rows = g.rows;
    const ints = new Int32Array(g.ints.numel);
    for (let mb = 0; mb < g.ids.length; mb++) {
      const part = chunk.slice(mb * micro, (mb + 1) * micro);
      ints.set(concatRows(part, 'ids'), 2 * mb * rows);
      ints.set(concatRows(part, 'targets'), (2 * mb + 1) * rows);
    }
    const floats = new Float32Array(g.floats.numel);
    floats.set([lr, adamwBiasCorrection(o.beta1 ?? 0.9, step + 1), adamwBiasCorrection(o.beta2 ?? 0.999, step + 1), step + 1]);
    // the eager step's fill value scale / tokens, rounded to f32 alike
    floats.fill(stepTokens > 0 ? 1 / stepTokens : 0, HYPER);
    for (const [dst, data, dtype] of [[g.ints, ints, 'i32'], [g.floats, floats, 'f32']] as const) {
      const host = Tensor.from(data, [data.length], { dtype });
      dst.copy_(host);
      host.dispose();
    }
    if (!g.warm) {
      this.#graphBody(g, step);
      g.warm = true;
      return;
    }
    if (!g.graph) {
      try {
        g.graph = CudaGraph.capture(() => this.#graphBody(g, step));
      } catch (err) {
        if (err instanceof XftError) err.message = `train: cudaGraph: the training step could not be captured: ${err.message}`;
        throw err;
      }
    }
    g.graph.launch();
  }

  /** The device work of a graphed step: reads only the graph's buffers (no upload, no read back, nothing kept past it). */
  #graphBody(g: GraphedStep, step: number): void {
    const o = this.#o, model = this.model, seqLen = this.#seqLen, micro = this.#micro, accum = this.#accum, rows = g.rows;
    const seed = o.seed ?? 0, clip = o.clip ?? 1.0;
    g.hyper.copy_(g.floats.narrow(0, HYPER));
    g.dLoss.copy_(g.floats.narrow(HYPER, rows));
    for (let mb = 0; mb < accum; mb++) {
      g.ids[mb].copy_(g.ints.narrow(2 * mb * rows, rows));
      g.targets[mb].copy_(g.ints.narrow((2 * mb + 1) * rows, rows));
      // the seed is baked into the capture: graphRefusal let through only models whose kernels do not read it
      model.forwardToLedger(g.ids[mb], g.targets[mb], micro, seqLen, { training: true, seed: stepSeed(seed, step, mb), recompute: o.recompute ?? false }, this.#ledger, accum);
      model.backward({ dLoss: g.dLoss, scale: 1, auxScale: 1 / accum });
    }
    const grads = this.#params.filter((p) => p.grad !== null).map((p) => p.grad!);
    const sq = lops.sumSquares(grads);
    this.#ledger.end(sq, 'next', clip, o.skipNonFinite ?? 0);
    sq.dispose();
    optimizerStep(optimizerOf(this.state), this.#params, this.state, {
      lr: 0, step: step + 1, gradScale: 1, beta1: o.beta1, beta2: o.beta2, eps: o.eps, weightDecay: o.weightDecay ?? 0,
      stochasticRounding: o.stochasticRounding, seed, control: this.#ledger.control, hyper: g.hyper,
    });
    zeroMany(grads);
  }

  /** Whether the next step() ends at a log point (then it reads the records back). */
  get atLogPoint(): boolean {
    return this.#pending.length === 0;
  }

  /**
   * Reads the records of the steps taken since the last read (one synchronisation; data parallel:
   * one sum over ranks) and calls onStep for each; returns the last one's info (undefined when none
   * waited). A step found not finite beyond the skip budget throws XFT_NONFINITE, the state set back
   * to the step before it. Every rank of a data-parallel run calls it at the same steps.
   */
  flush(): StepInfo | undefined {
    const pending = this.#pending, o = this.#o;
    if (pending.length === 0) return undefined;
    this.#pending = [];
    const records = this.#ledger.read(pending.length);
    if (this.#par) {
      // each rank's sums of the step -> the step's (the norm and status are equal on every rank already)
      const summed = this.#par.sum(records.flatMap((r) => [r.lossSum, r.auxLoss, r.tokens, r.correct]));
      records.forEach((r, k) => {
        [r.lossSum, r.auxLoss, r.tokens, r.correct] = summed.slice(4 * k, 4 * k + 4);
        r.loss = r.tokens > 0 ? r.lossSum / r.tokens : 0;
      });
    }
    const now = process.hrtime.bigint(), seconds = Number(now - this.#intervalStart) / 1e9;
    this.#intervalStart = now;
    const tokensPerSecond = (o.batchSize * this.#seqLen * pending.length) / seconds;
    let last: StepInfo | undefined;
    for (let k = 0; k < pending.length; k++) {
      const { step, epoch, lr, tokens } = pending[k], { loss, auxLoss, gradNorm, status } = records[k];
      const what = Number.isFinite(loss) && Number.isFinite(auxLoss) ? 'gradient norm' : 'loss';
      if (status === 'stopped' || status === 'after-stop') {
        this.state.step = step;  // the later steps of the interval were not applied either
        const skipped = o.skipNonFinite ? ` (${this.skipped} step(s) skipped already, --skip-nonfinite ${o.skipNonFinite})` : '';
        throw new XftError(
          `train: the ${what} is not finite at step ${step + 1} (loss ${loss}, gradient norm ${gradNorm})${skipped}: ` +
          `training diverged; stopped before updating, with the weights and optimizer state of step ${step} (lower the learning rate, or clip the gradient norm)`, 'XFT_NONFINITE');
      }
      if (status === 'skipped') {
        this.skipped++;
        o.onWarning?.(`step ${step + 1}: the ${what} is not finite; step skipped (${this.skipped} of at most ${o.skipNonFinite})`);
      } else this.#watchStuck(loss);
      this.losses.push(loss);
      last = { step: step + 1, steps: this.total, epoch, loss, auxLoss, lr, gradNorm, tokens, tokensPerSecond, skipped: status === 'skipped' };
      o.onStep?.(last);
    }
    return last;
  }

  /** Warns once when the loss sits at ln(vocab), unchanged, for STUCK_STEPS steps: the model predicts the uniform distribution. */
  #watchStuck(loss: number): void {
    const uniform = Math.log(this.model.config.vocab_size), prev = this.losses.at(-1);
    const stuck = Math.abs(loss - uniform) < STUCK_TOLERANCE * uniform && prev !== undefined && Math.abs(loss - prev) < STUCK_TOLERANCE * uniform;
    this.#stuck = stuck ? this.#stuck + 1 : 0;
    if (this.#stuck >= STUCK_STEPS && !this.#warnedStuck) {
      this.#warnedStuck = true;
      this.#o.onWarning?.(
        `the loss has been ${loss.toFixed(4)} = ln(vocab_size ${this.model.config.vocab_size}) for ${this.#stuck} steps: the model predicts the uniform distribution ` +
        '(collapsed, usually a learning rate far too high); it is not learning');
    }
  }

  result(): TrainResult {
    return { losses: this.losses, state: this.state, steps: this.total };
  }

  /** Frees the step ledger (the state and the model stay). */
  dispose(): void {
    this.#ledger.dispose();
    this.#flag?.dispose();
    const g = this.#graphed;
    if (g) {
      g.graph?.dispose();
      disposeAll(g.ints, g.floats, g.ids, g.targets, g.hyper, g.dLoss);
      this.#graphed = null;
    }
  }
}

/**
 * Trains `model` on `rows` (samples of one length, from data.toRows). Returns per-step losses and the
 * optimizer state. A second train / trainAsync on a model already in training is refused (XFT_BUSY).
 */
export function train(model: Model, rows: readonly Sample[], options: TrainOptions): TrainResult {
  claimModel(model);
  try {
    const run = new Trainer(model, rows, options);
    try {
      while (!run.done) run.step();
      run.flush();
      return run.result();
    } finally {
      run.dispose();
    }
  } finally {
    busy.delete(model);
  }
}

/**
 * `train` that yields to the event loop between steps, so signal handlers (Ctrl-C) and timers run;
 * when `signal` is aborted it stops after the current step with `interrupted: true` (save the
 * state with saveTrainState and resume later: the losses continue exactly).
 */
export async function trainAsync(model: Model, rows: readonly Sample[], options: TrainOptions & { signal?: AbortSignal }): Promise<TrainResult & { interrupted: boolean }> {
  claimModel(model);
  try {
    const run = new Trainer(model, rows, options);
    try {
      const tick = () => new Promise<void>((resolve) => setImmediate(resolve));
      while (!run.done) {
        await tick();
        // ranks stop together: a Ctrl-C seen by any rank stops all of them after the same step (checked
        // between log intervals, where the ranks meet anyway: no collective inside an interval)
        const aborted = options.signal?.aborted ?? false;
        if (options.parallel ? run.atLogPoint && options.parallel.sum([aborted ? 1 : 0])[0] > 0 : aborted) {
          run.flush();
          return { ...run.result(), interrupted: true };
        }
        run.step();
      }
      run.flush();
      return { ...run.result(), interrupted: false };
    } finally {
      run.dispose();
    }
  } finally {
    busy.delete(model);
  }
}

/** Mean loss and token accuracy of `model` on `rows` (no gradients). */
export function evaluate(
  model: Model, rows: readonly Sample[], options: { batchSize?: number; onBatch?: (done: number, total: number, positions: number) => void } = {},
): { loss: number; accuracy: number; tokens: number } {
  expectModel('evaluate', 'model', model);
  expectSamples('evaluate', 'rows', rows, true);
  check(options !== null && typeof options === 'object', 'options', 'an options object', options);
  const bs = options.batchSize ?? 8;
  check(Number.isSafeInteger(bs) && bs >= 1, 'batchSize', 'a positive integer', bs);
  let sum = 0, tokens = 0, correct = 0;
  for (let i = 0; i < rows.length; i += bs) {
    const part = rows.slice(i, i + bs), seqLen = part[0].ids.length;
    const ids = Tensor.from(concatRows(part, 'ids'), [part.length * seqLen], { dtype: 'i32', device: model.device });
    const targets = Tensor.from(concatRows(part, 'targets'), [part.length * seqLen], { dtype: 'i32', device: model.device });
    const f = model.forward(ids, targets, part.length, seqLen, { training: false });
    sum += f.loss * f.tokens;
    tokens += f.tokens;
    correct += f.correct;
    disposeAll(ids, targets);
    options.onBatch?.(Math.min(rows.length, i + bs), rows.length, part.length * seqLen);
  }
  return { loss: tokens ? sum / tokens : 0, accuracy: tokens ? correct / tokens : 0, tokens };
}

/**
 * Saves parameters and optimizer moments (safetensors) and the step (JSON, with `extra` fields,
 * e.g. the run's options) into `dir`, atomically; a state holding NaN or ±Inf is refused
 * (XFT_NONFINITE) and the earlier state in `dir` kept.
 */
export function saveTrainState(dir: string, model: Model, state: TrainState, extra: Record<string, unknown> = {}): void {
  const entries = (prefix: string, list: [string, Tensor][]) =>
    list.map(([name, t]) => ({ name: `${prefix}${name}`, dtype: 'F32' as const, shape: t.shape, tensor: () => t }));
  writeFolderAtomic(dir, (tmp) => {
    writeSafetensors(path.join(tmp, 'params.safetensors'), entries('', model.params().map((p: Param) => [p.name, p.value])));
    writeSafetensors(path.join(tmp, 'optimizer.safetensors'), entries('', stateTensors(state)));
    writeFileAtomic(path.join(tmp, 'trainer_state.json'), JSON.stringify({ ...extra, step: state.step, optimizer: optimizerOf(state) }, null, 2));
  });
}

/** trainer_state.json of a saved state: the step and the extra fields. */
export function readTrainStateInfo(dir: string): { step: number } & Record<string, unknown> {
  recoverFolder(dir);
  const file = path.join(dir, 'trainer_state.json');
  if (!fs.existsSync(file)) throw new XftError(`${dir}: no trainer_state.json (not a training checkpoint)`, 'XFT_IO');
  let info: unknown;
  try {
    info = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    throw new XftError(`${file}: ${(err as Error).message}`, 'XFT_FORMAT');
  }
  const step = (info as { step?: unknown } | null)?.step;
  if (typeof info !== 'object' || info === null || Array.isArray(info) || !Number.isSafeInteger(step) || (step as number) < 0)
    throw new XftError(`${file}: expected a JSON object with an integer step but received ${describe(info)}`, 'XFT_FORMAT');
  return info as { step: number } & Record<string, unknown>;
}

/** Loads what saveTrainState wrote: parameters into `model` (same architecture), and the optimizer state. */
export function loadTrainState(dir: string, model: Model): TrainState {
  const info = readTrainStateInfo(dir), step = info.step;
  const optimizer = info.optimizer ?? 'adamw';
  if (!OPTIMIZERS.includes(optimizer as OptimizerKind))
    throw new XftError(`${path.join(dir, 'trainer_state.json')}: unknown optimizer ${describe(optimizer)} (expected one of ${OPTIMIZERS.join(', ')})`, 'XFT_FORMAT');
  const params = new SafetensorsReader(path.join(dir, 'params.safetensors'));
  for (const p of model.params()) {
    const t = params.read(p.name, { device: model.device, shape: p.value.shape, dtype: p.value.dtype, finite: true });
    p.value.copy_(t);
    t.dispose();
  }
  const opt = new SafetensorsReader(path.join(dir, 'optimizer.safetensors'));
  const state: TrainState = { step, optimizer: optimizer as OptimizerKind, m: new Map(), v: new Map(), row: new Map(), col: new Map(), master: new Map() };
  for (const name of opt.names()) {
    const t = opt.read(name, { device: model.device, finite: true });
    if (!setStateTensor(state, name, t) || (optimizer === 'adafactor' && name.startsWith('m.'))) {
      t.dispose();
      disposeOptimizerState(state);
      throw new XftError(`${dir}: unexpected tensor ${name} in optimizer.safetensors (an ${optimizer} state)`, 'XFT_FORMAT');
    }
  }
  return state;
}

/**
 * Puts the f32 master weights of a bf16 run into `model` (cast to f32 first), so that what is saved
 * next is rounded once from them rather than from the bf16 copies. No-op for an f32 run.
 */
export function useMasterWeights(model: Model, state: TrainState): void {
  if (!state.master || state.master.size === 0) return;
  model.cast('f32');
  for (const p of model.params()) {
    const master = state.master.get(p.name);
    if (master) p.value.copy_(master);
  }
}

export function disposeState(state: TrainState): void {
  disposeOptimizerState(state);
}
