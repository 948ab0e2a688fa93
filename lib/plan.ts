/**
 * Memory planning: the peak device memory of one training step, from config.json alone, by category
 * (weights, gradients, optimizer state, activations, workspace), whether it fits a GPU, and the
 * largest micro-batch that does.
 *
 * The estimate is not a formula fitted to measurements: it replays one steady-state step of
 * `Trainer.step` (gradients allocated by an earlier step) allocation by allocation, in the order and
 * with the shapes and dtypes of lib/model.ts, lib/train.ts and the ops (what each forward keeps for
 * its backward, every temporary of the backward, and the scratch the CUDA kernels take from the pool
 * for one launch), and reports the high-water mark, as the CUDA pool's used bytes would show it
 * (memoryStats().poolReservedBytes after trimPool(); test/67 holds the two within 10%).
 * Whoever changes what a layer keeps or allocates changes its mirror here.
 *
 * Categories at the peak:
 *   weights      every parameter, in the precision's weight dtype (the merge coefficients α stay f32)
 *   gradients    one per trainable parameter, allocated once and zeroed between steps
 *   optimizer    the optimizer's state (and the f32 master weights of mixed precision)
 *   activations  what the forward keeps for the backward (and, under recomputation, a block's own
 *                while its backward runs)
 *   workspace    everything else live at that moment: the backward's activation gradients and
 *                temporaries, the batch, and kernel scratch
 */
import { XftError, describe } from './errors';
import { type LlamaConfig, type MoeConfig, llamaConfig, moeConfig } from './config';
import { readCheckpointInfo, type CheckpointKind } from './checkpoint';
import { upcycleMoeConfig } from './xft';
import { MAX_TENSOR_ELEMENTS } from './tensor';
import { DEFAULT_BUCKET_BYTES, assignWhole } from './dist/shard';

export type PlanStage = 'sft' | 'moe' | 'merge';
export type PlanOptimizer = 'adafactor' | 'adamw';
/**
 * mixed  bf16 weights and activations, f32 master weights in the optimizer, f32 gradients
 * bf16   bf16 weights updated in place (no master copy), bf16 activations, gradients in `gradients` (default f32)
 * f32    f32 weights, activations and gradients
 */
export type PlanPrecision = 'mixed' | 'bf16' | 'f32';

/** The recipe's defaults (the reference: Adafactor on bf16 weights). */
export const PLAN_DEFAULTS = { optimizer: 'adafactor', precision: 'bf16', microBatch: 8, seqLen: 1024, gpuMemoryGB: 80 } as const;
/** Gradient dtype of bf16 weights unless `gradients` says otherwise: f32, as `xft train --grad-dtype` (the reference's bf16 parameters have bf16 gradients: `--grad-dtype bf16`). */
export const BF16_GRADIENTS_DEFAULT: 'bf16' | 'f32' = 'f32';

export interface PlanOptions {
  /** default: from the checkpoint's kind (dense: sft, moe: moe, merged: merge) */
  stage?: PlanStage;
  /** the upcycle of a dense config (defaults 8 and 6, as the paper) */
  experts?: number;
  topK?: number;
  /** sequences per forward pass (default 8) */
  microBatch?: number;
  /** tokens per sequence (default 1024) */
  seqLen?: number;
  optimizer?: PlanOptimizer;
  precision?: PlanPrecision;
  /** the dtype of the linear and expert weights' gradients under precision 'bf16' or 'mixed' (f32 keeps f32 gradients), as TrainOptions.gradDtype */
  gradients?: 'bf16' | 'f32';
  /** activation recomputation (Model.forward / train `recompute`) */
  recompute?: boolean;
  /** bytes of the GPU (default: 80 GB) */
  gpuMemory?: number;
  /** data-parallel ranks (default 1): the plan is one rank's */
  worldSize?: number;
  /**
   * ZeRO stage (default 0: each rank holds the whole optimizer state). 1: the optimizer state (and
   * f32 master weights) sharded: AdamW by flat ranges (1/W each, plus a reduce-scattered gradient
   * shard and one bucket of packed gradients), Adafactor by whole tensors (the most loaded rank)
   */
  zero?: 0 | 1;
}

export interface MemoryBreakdown {
  weights: number;
  gradients: number;
  optimizer: number;
  activations: number;
  workspace: number;
  /** the peak: the sum of the above */
  total: number;
}

export interface MemoryPlan {
  stage: PlanStage;
  optimizer: PlanOptimizer;
  precision: PlanPrecision;
  gradients: 'bf16' | 'f32';
  recompute: boolean;
  microBatch: number;
  seqLen: number;
  worldSize: number;
  zero: 0 | 1;
  /** parameters of the model trained, and how many of them are trained */
  parameters: number;
  trainable: number;
  /** the MoE of the moe and merge stages (experts E, top-K, both with the shared expert) */
  moe: { experts: number; topK: number } | null;
  /** bytes at the step's peak, by category */
  peak: MemoryBreakdown;
  /** what stays between steps: weights, gradients, optimizer state */
  persistent: number;
  gpuMemory: number;
  /** the peak fits gpuMemory and no tensor of the step is too large */
  fits: boolean;
  /** a tensor of the step (e.g. the logits [B*T, V]) would have more than MAX_TENSOR_ELEMENTS elements */
  tooLarge: boolean;
  /** the largest micro-batch whose step fits (0: none) */
  maxMicroBatch: number;
}

/** What a plan needs of a model: its config, and its MoE config when it is an MoE or merge checkpoint. */
export interface PlanSource {
  config: LlamaConfig;
  kind?: CheckpointKind;
  moe?: MoeConfig | null;
}

const STAGE_OF: Record<CheckpointKind, PlanStage> = { dense: 'sft', moe: 'moe', merged: 'merge' };
const BYTES = { f32: 4, bf16: 2, i32: 4 } as const;

function fail(name: string, expected: string, got: unknown): never {
  throw new XftError(`planMemory: expected ${expected} for ${name} but received ${describe(got)}`, 'XFT_VALUE');
}

function oneOf<T extends string>(name: string, v: unknown, choices: readonly T[], fallback: T): T {
  if (v === undefined) return fallback;
  if (!choices.includes(v as T)) fail(name, choices.map((c) => `'${c}'`).join(' or '), v);
  return v as T;
}

function positiveInt(name: string, v: unknown, fallback: number): number {
  if (v === undefined) return fallback;
  if (!Number.isSafeInteger(v) || (v as number) < 1) fail(name, 'a positive integer', v);
  return v as number;
}

// ---- the simulated allocator ----

type Category = keyof Omit<MemoryBreakdown, 'total'>;

/** Live bytes by category with the high-water mark and the categories at that moment. */
class Pool {
  #live = new Map<number, { bytes: number; cat: Category }>();
  #next = 1;
  now: MemoryBreakdown = { weights: 0, gradients: 0, optimizer: 0, activations: 0, workspace: 0, total: 0 };
  peak: MemoryBreakdown = { ...this.now };

  alloc(cat: Category, bytes: number): number {
    const id = this.#next++;
    this.#live.set(id, { bytes, cat });
    this.now[cat] += bytes;
    this.now.total += bytes;
    if (this.now.total > this.peak.total) this.peak = { ...this.now };
    return id;
  }

  free(...items: (number | null | undefined | readonly (number | null | undefined)[])[]): void {
    for (const item of items) for (const id of Array.isArray(item) ? item : [item]) {
      if (id === null || id === undefined) continue;
      const a = this.#live.get(id);
      if (!a) throw new XftError(`planMemory: internal error: allocation ${id} freed twice`, 'XFT_NATIVE');
      this.#live.delete(id);
      this.now[a.cat] -= a.bytes;
      this.now.total -= a.bytes;
    }
  }

  /** a kernel's scratch: taken and given back around one launch */
  scratch(bytes: number): void {
    this.free(this.alloc('workspace', bytes));
  }
}

// ---- the model's tensors ----

interface ParamShape {
  shape: number[];
  trainable: boolean;
  /** stays f32 whatever the precision (the merge coefficients α) */
  f32: boolean;
  /** the token embedding (f32 gradients under --grad-dtype bf16, as train() keeps them) */
  embed?: boolean;
}

interface Shapes {
  c: LlamaConfig;
  stage: PlanStage;
  moe: MoeConfig | null;
  params: ParamShape[];
}

function shapesOf(c: LlamaConfig, stage: PlanStage, moe: MoeConfig | null): Shapes {
  const d = c.hidden_size, f = c.intermediate_size, hd = d / c.num_attention_heads, kv = c.num_key_value_heads * hd, V = c.vocab_size;
  const trainBody = stage !== 'merge';
  const params: ParamShape[] = [];
  const add = (shape: number[], trainable = trainBody, f32 = false) => params.push({ shape, trainable, f32 });
  params.push({ shape: [V, d], trainable: trainBody, f32: false, embed: true });
  for (let i = 0; i < c.num_hidden_layers; i++) {
    add([d]), add([d, d]), add([kv, d]), add([kv, d]), add([d, d]), add([d]);
    if (stage === 'sft') add([f, d]), add([f, d]), add([d, f]);
    else {
      const E = moe!.num_experts, N = moe!.shared_expert ? E - 1 : E;
      add([E, f, d], trainBody), add([E, f, d], trainBody), add([E, d, f], trainBody);
      if (stage === 'moe') {
        // router (W0, W2 for 'mlp'), and the noise layer upcycle always creates
        add([N, d]);
        if (moe!.gate_type === 'mlp') add([N, N]);
        add([N, d]);
      } else add([moe!.shared_expert ? E - 1 : E], true, true); // α [E-1] beside the fixed λ (a few bytes more when λ is learned too)
    }
  }
  add([d]), add([V, d]);
  return { c, stage, moe, params };
}

const numel = (s: number[]) => s.reduce((a, b) => a * b, 1);

/** f32 elements of the optimizer state of one parameter (transformers' Adafactor: factored over the last two dims). */
function optimizerElements(shape: number[], optimizer: PlanOptimizer): number {
  if (optimizer === 'adamw') return 2 * numel(shape); // m, v
  if (shape.length < 2) return numel(shape); // the full second moment of a vector
  const lead = numel(shape.slice(0, -2)), [r, k] = shape.slice(-2);
  return lead * (r + k); // exp_avg_sq_row [..., r] and exp_avg_sq_col [..., k]
}

interface Settings {
  worldSize: number;
  zero: 0 | 1;
  optimizer: PlanOptimizer;
  precision: PlanPrecision;
  gradients: 'bf16' | 'f32';
  recompute: boolean;
  B: number;
  T: number;
}

/** Rows per block of rmsnorm's backward partial dW sums (cuda/rmsnorm.cu). */
const RMSNORM_BACKWARD_BLOCKS = 1024, RMSNORM_MIN_ROWS = 8;
/** Partial sums per launch of sumSquares (cuda/elementwise.cu kSumBlocks), tensors per launch (kSumChunk). */
const SUM_BLOCKS = 512;
/** Largest grid of mergeExperts' backward per tensor (cuda/merge.cu), threads per block. */
const MERGE_BACKWARD_MAX_GRID = 1024, MERGE_BLOCK = 256;

/** Peak of one steady-state training step. */
function simulate(s: Shapes, o: Settings): { peak: MemoryBreakdown; persistent: number; largest: number } {
  const { c, stage, moe } = s;
  const pool = new Pool();
  const act = o.precision === 'f32' ? 4 : 2; // activations in the weights' dtype
  const wBytes = o.precision === 'f32' ? 4 : 2;
  const gBytes = o.precision !== 'f32' ? BYTES[o.gradients] : 4;
  // persistent: weights, gradients of the trainable parameters, optimizer state (+ f32 masters of mixed precision)
  const stateBytes: number[] = [];
  let gradBytes = 0;
  for (const p of s.params) {
    const n = numel(p.shape), wb = p.f32 ? 4 : wBytes;
    pool.alloc('weights', n * wb);
    if (!p.trainable) continue;
    // train(): bf16 gradients (--grad-dtype bf16) only for bf16 matrices and expert stacks; the embedding and vectors keep f32
    const gb = n * (!p.f32 && !p.embed && p.shape.length >= 2 ? gBytes : 4);
    pool.alloc('gradients', gb);
    gradBytes += gb;
    stateBytes.push(4 * optimizerElements(p.shape, o.optimizer) + (o.precision === 'mixed' && wb !== 4 ? 4 * n : 0));
  }
  const W = o.worldSize;
  if (o.zero === 0 || W === 1) stateBytes.forEach((b) => pool.alloc('optimizer', b));
  else if (o.optimizer === 'adamw') {
    // lib/dist/zero.ts: 1/W of each bucket's state, and the reduce-scattered gradient shard
    pool.alloc('optimizer', Math.ceil(stateBytes.reduce((a, b) => a + b, 0) / W));
    pool.alloc('gradients', Math.ceil(gradBytes / W));
  } else {
    // whole tensors to ranks, largest first to the least loaded: the most loaded rank's share
    const owner = assignWhole(stateBytes, W), load = new Array<number>(W).fill(0);
    stateBytes.forEach((b, i) => (load[owner[i]] += b));
    pool.alloc('optimizer', load.reduce((a, b) => Math.max(a, b), 0));
  }
  const persistent = pool.now.total;
  // ZeRO with AdamW packs one gradient bucket at a time for the reduce-scatter (after the backward)
  if (o.zero === 1 && W > 1 && o.optimizer === 'adamw') pool.scratch(Math.min(DEFAULT_BUCKET_BYTES, gradBytes));

  const B = o.B, T = o.T, N = B * T, d = c.hidden_size, f = c.intermediate_size, H = c.num_attention_heads;
  const kv = c.num_key_value_heads * (d / H), V = c.vocab_size, L = c.num_hidden_layers;
  let largest = 0; // elements of the largest activation or temporary
  const A = (cat: Category, elements: number, bytes = act) => {
    largest = Math.max(largest, elements);
    return pool.alloc(cat, elements * bytes);
  };
  const kept = (elements: number, bytes = act) => A('activations', elements, bytes);
  const temp = (elements: number, bytes = act) => A('workspace', elements, bytes);
  const rmsnormDwScratch = (rows: number) => pool.scratch(Math.ceil(rows / Math.max(RMSNORM_MIN_ROWS, Math.ceil(rows / RMSNORM_BACKWARD_BLOCKS))) * d * 4);
  const trainBody = stage !== 'merge';
  const E = moe?.num_experts ?? 0, En = moe ? (moe.shared_expert ? E - 1 : E) : 0, K = moe?.num_selects ?? 0, NK = N * K;
  const noisy = stage === 'moe' && moe!.gate_noise;
  const estimate = noisy && moe!.balance_loss_weight > 0 && (moe!.shared_expert ? K - 1 : K) < En;

  // Trainer.step: the micro-batch (ids, targets); Model.forward: the embedding
  const batch = [temp(N, 4), temp(N, 4)];
  const xs = [kept(N * d)];

  // FFN forward: the ids of what it keeps, and its output
  const ffnForward = (): { saved: number[]; y: number } => {
    if (stage === 'sft' || stage === 'merge') {
      const saved: number[] = [];
      if (stage === 'merge') {
        pool.scratch(E * 4); // mergeExperts: coefficients
        saved.push(kept(f * d), kept(f * d), kept(d * f)); // the merged weights gate, up, down
      }
      // gateUp: gu = [g | u] kept, h until the down projection has read it
      const gu = kept(2 * N * f), h = temp(N * f);
      saved.push(gu);
      const y = temp(N * d);
      pool.free(h);
      return { saved, y };
    }
    const saved: number[] = [];
    if (moe!.gate_type === 'mlp') saved.push(kept(N * En), kept(N * En)); // r1, t
    saved.push(kept(N * En)); // clean
    if (noisy) saved.push(kept(N * En), kept(N * En)); // z, noisy logits
    // routeShared: experts, weights [N, K], counts [E], offsets [E+1], order [NK], importance, load [En]; scratch hist, imp_part, rank
    saved.push(kept(NK, 4), kept(NK, 4), kept(E, 4), kept(E + 1, 4), kept(NK, 4), kept(En, 4), kept(En, 4));
    pool.scratch(4 * ((E + En) * Math.min(N, 1024) + NK));
    saved.push(kept(NK, 4)); // position
    // gateUp through the routing order (no permuted copy of x): gu kept, h until the down projection has read it
    const gu = kept(2 * NK * f), h = temp(NK * f), ye = kept(NK * d);
    pool.free(h);
    saved.push(gu, ye);
    const y = temp(N * d);
    if (moe!.balance_loss_weight > 0) {
      if (estimate) {
        const prob = temp(N * En, 4);
        saved.push(kept(En, 4)); // load estimate
        pool.free(prob);
      }
      saved.push(kept(1, 4)); // the balance loss
    }
    return { saved, y };
  };

  // Block.forward: ids it keeps (n1 ... rstd2 and the FFN's), and its output
  const blockForward = (keep: boolean): { saved: number[]; y: number } => {
    const n1 = kept(N * d), rstd1 = kept(N, 4);
    const q = kept(N * d), k = kept(N * kv), v = kept(N * kv);
    const att = kept(N * d), lse = kept(N * H, 4);
    const oo = temp(N * d), h = kept(N * d);
    pool.free(oo);
    const n2 = kept(N * d), rstd2 = kept(N, 4);
    const ffn = ffnForward();
    const y = kept(N * d);
    pool.free(ffn.y);
    const saved = [n1, rstd1, q, k, v, att, lse, h, n2, rstd2, ...ffn.saved];
    if (!keep) {
      pool.free(saved);
      return { saved: [], y };
    }
    return { saved, y };
  };

  const blocks: number[][] = [];
  for (let i = 0; i < L; i++) {
    const b = blockForward(!o.recompute);
    blocks.push(b.saved);
    xs.push(b.y);
  }
  // final norm, lm_head, cross-entropy (losses and predictions read back and freed)
  const nf = kept(N * d), rstdf = kept(N, 4), logits = kept(N * V);
  pool.free(temp(N, 4), temp(N, 4));

  // Model.backward: dLogits in place of the logits
  pool.free(temp(N, 4));
  const dnf = temp(N * d);
  let dx = temp(N * d);
  if (trainBody) rmsnormDwScratch(N);
  pool.free(dnf, nf, rstdf, logits, xs[L]);

  const ffnBackward = (saved: number[]): number => {
    if (stage === 'sft') {
      // swigluDownBackward: dgu and h (dW_down's input); gateUpBackward: dx of gate and up in one GEMM
      const dgu = temp(2 * N * f), h = temp(N * f);
      pool.free(h);
      const dxf = temp(N * d);
      pool.free(dgu, saved);
      return dxf;
    }
    if (stage === 'merge') {
      // backwardWeights: dgu and h, dW_down, then dx and dW of gate and up (weight dtype); then α's gradient from the three dW
      const dgu = temp(2 * N * f), h = temp(N * f), dDown = temp(d * f, wBytes);
      const dxf = temp(N * d), dGate = temp(f * d, wBytes), dUp = temp(f * d, wBytes);
      pool.free(h, dgu, saved.slice(3)); // and the dense FFN's gu
      const parts = 3 * Math.min(MERGE_BACKWARD_MAX_GRID, Math.max(1, Math.ceil((f * d) / (16 / wBytes) / MERGE_BLOCK)));
      pool.scratch(E * parts * 8);
      pool.free(dGate, dUp, dDown, saved.slice(0, 3)); // and the merged weights
      return dxf;
    }
    // MoE: unpermute -> down -> SwiGLU -> gate/up -> permute, then the router
    const dye = temp(NK * d), dWeights = temp(NK, 4);
    pool.scratch(NK * 4);
    const dgu = temp(2 * NK * f), h = temp(NK * f); // swigluDownBackward
    pool.free(h);
    const dxp = temp(NK * d); // gateUpBackward: the routed rows' dx, one GEMM for gate and up
    const dxf = temp(N * d);
    pool.free(dye, dgu, dxp);
    let dImp: number | null = null, via: number[] = [];
    if (moe!.balance_loss_weight > 0) {
      dImp = temp(En, 4);
      const dLoad = temp(En, 4);
      if (estimate) via = [temp(N * En), temp(N * En)];
      pool.free(dLoad);
    }
    const dLogits = temp(N * En);
    pool.free(dWeights, dImp);
    let dClean = dLogits;
    if (noisy) {
      dClean = temp(N * En);
      const dz = temp(N * En);
      pool.free(via);
      pool.free(temp(N * d)); // dx of the noise layer, added into dx
      pool.free(dz, dLogits);
    }
    if (moe!.gate_type === 'mlp') {
      const dt = temp(N * En), dr1 = temp(N * En);
      pool.free(temp(N * d));
      pool.free(dt, dr1);
    } else pool.free(temp(N * d));
    pool.free(dClean, saved);
    return dxf;
  };

  for (let i = L - 1; i >= 0; i--) {
    let saved = blocks[i];
    if (o.recompute) {
      const b = blockForward(true);
      saved = b.saved;
      pool.free(b.y);
    }
    const [n1, rstd1, q, k, v, att, lse, h, n2, rstd2, ...ffnSaved] = saved;
    const dn2 = ffnBackward(ffnSaved);
    const dh = temp(N * d);
    if (trainBody) rmsnormDwScratch(N);
    pool.free(dx, dn2);
    const datt = temp(N * d);
    const dq = temp(N * d), dk = temp(N * kv), dv = temp(N * kv);
    pool.scratch(N * H * 4); // attention backward: D [B, H, T]
    const dn1 = temp(N * d); // dx of q, with k's and v's added in their GEMMs' epilogues
    const dxb = temp(N * d);
    if (trainBody) rmsnormDwScratch(N);
    pool.free(dh, datt, dq, dk, dv, dn1, n1, rstd1, q, k, v, att, lse, h, n2, rstd2);
    if (i > 0) pool.free(xs[i]);
    dx = dxb;
  }
  if (trainBody) {
    // embeddingBackward: sort scratch (keys, rows in and out; cub's temporary storage ~ the same again)
    const arr = Math.ceil((N * 4) / 256) * 256;
    pool.scratch(4 * arr + 2 * arr);
  }
  pool.free(dx, xs[0], batch);
  // the update: the gradient norm's partial sums (AdamW and Adafactor update in place)
  const trainable = s.params.filter((p) => p.trainable).length;
  pool.scratch(Math.ceil(trainable / 64) * SUM_BLOCKS * 8);
  // every activation and temporary is given back by the end of the step, as in the code it mirrors
  if (pool.now.total !== persistent) throw new XftError(`planMemory: internal error: ${pool.now.total - persistent} bytes left after the step`, 'XFT_NATIVE');
  return { peak: pool.peak, persistent, largest };
}

function sourceOf(source: string | PlanSource): { config: LlamaConfig; kind: CheckpointKind; moe: MoeConfig | null } {
  if (typeof source === 'string') {
    const info = readCheckpointInfo(source);
    return { config: info.config, kind: info.kind, moe: info.moe };
  }
  if (source === null || typeof source !== 'object' || !('config' in source)) fail('source', 'a checkpoint folder or { config, kind?, moe? }', source);
  const config = llamaConfig(source.config as LlamaConfig & Record<string, unknown>, 'planMemory');
  const kind = source.kind ?? (source.moe ? 'moe' : 'dense');
  return { config, kind, moe: source.moe ? moeConfig(source.moe, 'planMemory') : null };
}

/**
 * The memory plan of one training step of the model in `source` (a checkpoint or config folder: only
 * config.json is read; or a config object) at the given stage and settings. A dense config at the
 * moe or merge stage is planned as its upcycle (`experts`, `topK`).
 */
export function planMemory(source: string | PlanSource, options: PlanOptions = {}): MemoryPlan {
  if (options === null || typeof options !== 'object') fail('options', 'an options object', options);
  const src = sourceOf(source);
  const stage = oneOf('stage', options.stage, ['sft', 'moe', 'merge'] as const, STAGE_OF[src.kind]);
  if (src.kind !== 'dense' && stage === 'sft') throw new XftError(`planMemory: the sft stage trains a dense model; this is a ${src.kind} model`, 'XFT_VALUE');
  if (src.kind === 'merged' && stage === 'moe') throw new XftError('planMemory: a merge checkpoint has no MoE stage', 'XFT_VALUE');
  let moe = src.moe;
  if (src.kind !== 'dense' && (options.experts !== undefined || options.topK !== undefined))
    throw new XftError(`planMemory: experts and topK plan the upcycle of a dense model; this is a ${src.kind} model (E = ${moe!.num_experts}, K = ${moe!.num_selects})`, 'XFT_VALUE');
  if (src.kind === 'dense' && stage !== 'sft')
    moe = upcycleMoeConfig({ experts: positiveInt('experts', options.experts, 8), topK: positiveInt('topK', options.topK, 6) }, 'planMemory');
  const precision = oneOf('precision', options.precision, ['mixed', 'bf16', 'f32'] as const, PLAN_DEFAULTS.precision);
  const worldSize = positiveInt('worldSize', options.worldSize, 1);
  const zero = options.zero === undefined ? 0 : options.zero === 0 || options.zero === 1 ? options.zero : fail('zero', '0 or 1', options.zero);
  const settings: Settings = {
    worldSize, zero,
    optimizer: oneOf('optimizer', options.optimizer, ['adafactor', 'adamw'] as const, PLAN_DEFAULTS.optimizer),
    precision,
    gradients: precision !== 'f32' ? oneOf('gradients', options.gradients, ['bf16', 'f32'] as const, BF16_GRADIENTS_DEFAULT) : 'f32',
    recompute: options.recompute === undefined ? false : typeof options.recompute === 'boolean' ? options.recompute : fail('recompute', 'a boolean', options.recompute),
    B: positiveInt('microBatch', options.microBatch, PLAN_DEFAULTS.microBatch),
    T: positiveInt('seqLen', options.seqLen, PLAN_DEFAULTS.seqLen),
  };
  const gpuMemory = options.gpuMemory === undefined ? PLAN_DEFAULTS.gpuMemoryGB * 1e9
    : typeof options.gpuMemory === 'number' && options.gpuMemory > 0 && Number.isFinite(options.gpuMemory) ? options.gpuMemory : fail('gpuMemory', 'a positive number of bytes', options.gpuMemory);
  const shapes = shapesOf(src.config, stage, moe);
  const { peak, persistent, largest } = simulate(shapes, settings);
  // a step fits when its peak does and no tensor of it is past the kernels' 32-bit element indexing
  const fitsIn = (r: { peak: MemoryBreakdown; largest: number }) => r.peak.total <= gpuMemory && r.largest <= MAX_TENSOR_ELEMENTS;
  // the largest micro-batch that fits: the peak grows with B (doubling, then bisection)
  const fitsAt = (B: number) => fitsIn(simulate(shapes, { ...settings, B }));
  let maxMicroBatch = 0;
  if (fitsAt(1)) {
    let lo = 1, hi = 2;
    while (hi <= 65536 && fitsAt(hi)) lo = hi, hi *= 2;
    while (hi - lo > 1) {
      const mid = (lo + hi) >> 1;
      if (fitsAt(mid)) lo = mid;
      else hi = mid;
    }
    maxMicroBatch = lo;
  }
  const parameters = shapes.params.reduce((a, p) => a + numel(p.shape), 0);
  const trainable = shapes.params.filter((p) => p.trainable).reduce((a, p) => a + numel(p.shape), 0);
  return {
    stage, optimizer: settings.optimizer, precision, gradients: settings.gradients, recompute: settings.recompute, microBatch: settings.B, seqLen: settings.T, worldSize, zero,
    parameters, trainable, moe: moe && stage !== 'sft' ? { experts: moe.num_experts, topK: moe.num_selects } : null,
    peak, persistent, gpuMemory, fits: fitsIn({ peak, largest }), tooLarge: largest > MAX_TENSOR_ELEMENTS, maxMicroBatch,
  };
}

const GB = 1e9;

/** The plan as the CLI prints it: the settings, bytes by category, the fit and the largest micro-batch. */
export function formatPlan(p: MemoryPlan, options: { gpu?: string } = {}): string {
  const gb = (v: number) => `${(v / GB).toFixed(2)} GB`;
  const moe = p.moe ? `, ${p.moe.experts} experts top-${p.moe.topK}` : '';
  const grads = p.precision === 'bf16' ? `, ${p.gradients} gradients` : '';
  const rows: [string, number][] = [
    ['weights', p.peak.weights], ['gradients', p.peak.gradients], ['optimizer state', p.peak.optimizer],
    ['activations', p.peak.activations], ['workspace', p.peak.workspace],
  ];
  const width = rows.reduce((w, [name]) => Math.max(w, name.length), 'peak'.length);
  return [
    `${p.stage} stage${moe}: ${(p.parameters / 1e9).toFixed(2)}B parameters (${(p.trainable / 1e9).toFixed(p.trainable < 1e7 ? 6 : 2)}B trained)`,
    `${p.optimizer}, ${p.precision} precision${grads}${p.recompute ? ', activation recomputation' : ''}; micro-batch ${p.microBatch} × ${p.seqLen} tokens` +
      (p.worldSize > 1 ? `; per rank of ${p.worldSize}${p.zero ? ', ZeRO stage 1 (optimizer state sharded)' : ' (optimizer state replicated)'}` : ''),
    '',
    ...rows.map(([name, v]) => `  ${name.padEnd(width)}  ${gb(v).padStart(10)}`),
    `  ${'peak'.padEnd(width)}  ${gb(p.peak.total).padStart(10)}`,
    '',
    ...(p.tooLarge ? [`a tensor of this step would have more than ${MAX_TENSOR_ELEMENTS} elements (the kernels' limit): use a smaller micro-batch`] : []),
    `${p.fits ? 'fits' : 'does not fit'} in ${gb(p.gpuMemory)}${options.gpu ? ` (${options.gpu})` : ''}; ` +
      (p.maxMicroBatch > 0 ? `largest micro-batch that fits: ${p.maxMicroBatch}` : 'not even a micro-batch of 1 fits'),
  ].join('\n');
}
