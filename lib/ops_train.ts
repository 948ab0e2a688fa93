/**
 * Typed wrappers of the train op families (see cuda/xft_cuda.h, section [train]): causal GQA
 * attention, masked cross-entropy, the MoE permutation around the grouped GEMMs, and the
 * router's balance losses (cv² of XFT; Switch's E·Σ f_i P_i, whose kernels are in cuda/routing.cu). Each wrapper checks shapes, dtypes and devices (XftErrors that name the
 * argument), allocates the outputs and dispatches to the CPU or CUDA twin.
 * Kernels: cuda/{attention,cross_entropy,moe_permute}.cu; CPU twins: binding/cpu/*.cc. The optimizers
 * (AdamW, Adafactor) are in lib/optim/.
 */
import { XftError, invalidArgument } from './errors';
import { native, type NativeStorage } from './native';
import { FLOAT, expectTensor, sameDevice } from './ops_check';
import { expectBool, expectInt } from './validate';
import { DType, Tensor, dtypeCode, formatShape, seedOf } from './tensor';
import { expectNumber, expectRequiredOptions as expectOptions } from './validate';

type S = NativeStorage;

/** The native functions of binding/train_ops.cc (dtype codes: 0 f32, 1 bf16, 2 i32). */
export interface TrainNative {
  attentionForward(q: S, k: S, v: S, out: S, lse: S, dtype: number, B: number, T: number, H: number, Hkv: number, hd: number): void;
  attentionBackward(q: S, k: S, v: S, out: S, lse: S, dOut: S, dq: S, dk: S, dv: S, dtype: number,
    B: number, T: number, H: number, Hkv: number, hd: number): void;
  crossEntropyForward(logits: S, dtype: number, targets: S, R: number, V: number, losses: S, predictions: S): void;
  crossEntropyBackward(logits: S, dtype: number, targets: S, dLoss: S, R: number, V: number, dLogits: S): void;
  invertPermutation(order: S, position: S, n: number): void;
  permuteForward(x: S, order: S, xp: S, dtype: number, T: number, K: number, d: number): void;
  permuteBackward(dxp: S, position: S, dx: S, dtype: number, T: number, K: number, d: number): void;
  unpermuteForward(y: S, position: S, g: S, out: S, dtype: number, T: number, K: number, d: number): void;
  unpermuteBackward(dOut: S, y: S, position: S, g: S, dy: S, dg: S, dtype: number, T: number, K: number, d: number): void;
  balanceLossForward(importance: S, load: S, N: number, weight: number, loss: S): void;
  balanceLossBackward(importance: S, load: S, N: number, weight: number, dLoss: number, dImportance: S, dLoad: S): void;
  switchLossForward(probs: S, load: S, N: number, T: number, S: number, weight: number, loss: S): void;
  switchLossBackward(load: S, N: number, T: number, S: number, weight: number, dLoss: number, dProbs: S): void;
  loadEstimateForward(clean: S, z: S, noisy: S, dtype: number, T: number, N: number, k: number, eps: number, prob: S, load: S): void;
  loadEstimateBackward(clean: S, z: S, noisy: S, dLoad: S, dtype: number, T: number, N: number, k: number, eps: number, seed: bigint, dClean: S, dz: S): void;
}

const train = native as unknown as TrainNative;

/** Largest head dimension the attention kernels take (binding/train_ops.cc kMaxHeadDim). */
export const MAX_HEAD_DIM = 128;
/** Largest batch and number of query heads of attention (CUDA grid limits; kMaxGridDim). */
export const MAX_ATTENTION_GRID = 65535;
/** Weight of the balance loss in the reference (XFT.md). */
export const BALANCE_LOSS_WEIGHT = 0.01;

// ---------------------------------------------------------------------------------------------
// 1. Causal self-attention with grouped-query heads

export interface AttentionOptions {
  /** B: sequences in the batch; q, k, v have B*T rows (sequence b in rows b*T .. b*T + T). */
  batch: number;
  /** H: query heads; q has H*hd columns (head h in columns h*hd .. h*hd + hd). */
  heads: number;
  /** Hkv: key/value heads, dividing H (query head h reads kv head h / (H / Hkv)). Default H. */
  kvHeads?: number;
}

/** The attention output and what its backward needs. */
export interface AttentionResult {
  /** [B*T, H*hd], q's dtype */
  out: Tensor;
  /** f32 [B, H, T]: log-sum-exp of each query's scaled scores */
  lse: Tensor;
}

function attentionArgs(op: string, q: unknown, k: unknown, v: unknown, options: AttentionOptions) {
  const o = expectOptions<AttentionOptions>(op, options, 'an object with batch and heads');
  const qt = expectTensor(op, 'q', q, { dtype: FLOAT, rank: 2, shapeName: '[B*T, H*hd]' });
  const B = expectInt(op, 'batch', o.batch, 1, MAX_ATTENTION_GRID);
  const H = expectInt(op, 'heads', o.heads, 1, MAX_ATTENTION_GRID);
  const Hkv = o.kvHeads === undefined ? H : expectInt(op, 'kvHeads', o.kvHeads, 1, H);
  if (H % Hkv !== 0) throw new XftError(`${op}: heads (${H}) must be a multiple of kvHeads (${Hkv})`, 'XFT_VALUE');
  const [rows, cols] = qt.shape;
  if (rows % B !== 0) throw new XftError(`${op}: q has ${rows} rows, not a multiple of batch = ${B} (expected [B*T, H*hd])`, 'XFT_SHAPE');
  if (cols % H !== 0 || cols === 0)
    throw new XftError(`${op}: q has ${cols} columns, not a positive multiple of heads = ${H} (expected [B*T, H*hd])`, 'XFT_SHAPE');
  const T = rows / B, hd = cols / H;
  if (hd > MAX_HEAD_DIM)
    throw new XftError(`${op}: head dimension hd = ${cols} / ${H} = ${hd} exceeds ${MAX_HEAD_DIM}, the largest the kernels take`, 'XFT_SHAPE');
  const kvShape = [rows, Hkv * hd], kvName = `[B*T, Hkv*hd] = ${formatShape(kvShape)}`;
  const kt = expectTensor(op, 'k', k, { dtype: [qt.dtype], shape: kvShape, shapeName: kvName });
  const vt = expectTensor(op, 'v', v, { dtype: [qt.dtype], shape: kvShape, shapeName: kvName });
  return { q: qt, k: kt, v: vt, B, T, H, Hkv, hd, qName: `[B*T, H*hd] = ${formatShape(qt.shape)}` };
}

/**
 * Causal softmax attention, flash-attention style: out_i = Σ_{j<=i} softmax_j(q_i·k_j / √hd) v_j per
 * query head, with grouped-query heads. q [B*T, H*hd], k and v [B*T, Hkv*hd], f32 or bf16 (one dtype),
 * fp32 math; hd <= 128. Returns out (q's shape and dtype) and lse f32 [B, H, T] for the backward.
 */
export function attention(q: Tensor, k: Tensor, v: Tensor, options: AttentionOptions): AttentionResult {
  const op = 'attention';
  const a = attentionArgs(op, q, k, v, options);
  sameDevice(op, { q, k, v });
  const out = Tensor.empty(q.shape, { dtype: q.dtype, device: q.device });
  const lse = Tensor.empty([a.B, a.H, a.T], { dtype: 'f32', device: q.device });
  train.attentionForward(q.storage, k.storage, v.storage, out.storage, lse.storage, dtypeCode(q.dtype), a.B, a.T, a.H, a.Hkv, a.hd);
  return { out, lse };
}

/**
 * Gradients of attention: dq [B*T, H*hd], dk and dv [B*T, Hkv*hd] (dk, dv summed over the query
 * heads sharing a kv head), from the forward's out and lse and dOut = dL/dout. Deterministic.
 */
export function attentionBackward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dOut: Tensor,
  options: AttentionOptions): { dq: Tensor; dk: Tensor; dv: Tensor } {
  const op = 'attentionBackward';
  const a = attentionArgs(op, q, k, v, options);
  expectTensor(op, 'out', out, { dtype: [q.dtype], shape: q.shape, shapeName: a.qName });
  expectTensor(op, 'lse', lse, { dtype: ['f32'], shape: [a.B, a.H, a.T], shapeName: `[B, H, T] = ${formatShape([a.B, a.H, a.T])}` });
  expectTensor(op, 'dOut', dOut, { dtype: [q.dtype], shape: q.shape, shapeName: a.qName });
  sameDevice(op, { q, k, v, out, lse, dOut });
  const like = (t: Tensor) => Tensor.empty(t.shape, { dtype: t.dtype, device: t.device });
  const dq = like(q), dk = like(k), dv = like(v);
  train.attentionBackward(q.storage, k.storage, v.storage, out.storage, lse.storage, dOut.storage, dq.storage, dk.storage,
    dv.storage, dtypeCode(q.dtype), a.B, a.T, a.H, a.Hkv, a.hd);
  return { dq, dk, dv };
}

// ---------------------------------------------------------------------------------------------
// 2. Cross-entropy with a loss mask

export interface CrossEntropyOptions {
  /** Check every target is < V (negative targets are the mask). On CUDA this reads the targets back
   * (a synchronisation); pass false in a training loop whose targets are known to be valid. Default true.
   * Unchecked, a target >= V ignores its row like a negative one. */
  validate?: boolean;
}

function crossEntropyArgs(op: string, logits: unknown, targets: unknown, options: CrossEntropyOptions, dLoss?: unknown) {
  const o = expectOptions<CrossEntropyOptions>(op, options, 'an options object');
  const lt = expectTensor(op, 'logits', logits, { dtype: FLOAT, rank: 2, shapeName: '[R, V]' });
  const [R, V] = lt.shape;
  if (V < 1) throw new XftError(`${op}: expected logits [R, V] with V >= 1, got ${lt.describe()}`, 'XFT_SHAPE');
  const tt = expectTensor(op, 'targets', targets, { dtype: ['i32'], shape: [R], shapeName: `[R] = [${R}]` });
  const dl = dLoss === undefined ? null : expectTensor(op, 'dLoss', dLoss, { dtype: ['f32'], shape: [R], shapeName: `[R] = [${R}]` });
  sameDevice(op, { logits: lt, targets: tt, dLoss: dl });
  if (expectBool(op, 'validate', o.validate, true)) {
    const values = tt.toArray();
    for (let r = 0; r < R; r++)
      if (values[r] >= V) throw new XftError(`${op}: targets[${r}] = ${values[r]} is not a token id < V = ${V} (negative ids mark ignored rows)`, 'XFT_VALUE');
  }
  return { logits: lt, targets: tt, R, V };
}

/**
 * Per-row softmax cross-entropy: losses f32 [R] = logsumexp(logits[r]) - logits[r, targets[r]], 0 for
 * rows whose target is negative (the loss mask: only response tokens count); predictions i32 [R] =
 * argmax of each row (lowest index on ties), for token accuracy. logits f32 or bf16 [R, V], targets i32 [R].
 */
export function crossEntropy(logits: Tensor, targets: Tensor, options: CrossEntropyOptions = {}): { losses: Tensor; predictions: Tensor } {
  const op = 'crossEntropy';
  const a = crossEntropyArgs(op, logits, targets, options);
  const losses = Tensor.empty([a.R], { dtype: 'f32', device: logits.device });
  const predictions = Tensor.empty([a.R], { dtype: 'i32', device: logits.device });
  train.crossEntropyForward(logits.storage, dtypeCode(logits.dtype), targets.storage, a.R, a.V, losses.storage, predictions.storage);
  return { losses, predictions };
}

export interface CrossEntropyBackwardOptions extends CrossEntropyOptions {
  /** Write dlogits over logits (and return logits): saves an [R, V] buffer. Default false. */
  inPlace?: boolean;
}

/**
 * Fused backward: dlogits [R, V] (logits dtype) = (softmax(logits[r]) - onehot(targets[r])) * dLoss[r],
 * zero rows where the target is masked. dLoss f32 [R] = dL/dlosses (e.g. 1 / number of response tokens).
 */
export function crossEntropyBackward(logits: Tensor, targets: Tensor, dLoss: Tensor, options: CrossEntropyBackwardOptions = {}): Tensor {
  const op = 'crossEntropyBackward';
  if (dLoss === undefined) throw invalidArgument(op, 'dLoss', 'an f32 tensor [R] (dL/dlosses)', dLoss, 'XFT_TYPE');
  const a = crossEntropyArgs(op, logits, targets, options, dLoss);
  const inPlace = expectBool(op, 'inPlace', options.inPlace, false);
  const dLogits = inPlace ? logits : Tensor.empty(logits.shape, { dtype: logits.dtype, device: logits.device });
  train.crossEntropyBackward(logits.storage, dtypeCode(logits.dtype), targets.storage, dLoss.storage, a.R, a.V, dLogits.storage);
  return dLogits;
}

// ---------------------------------------------------------------------------------------------
// 4. MoE permutation: the gather before and the weighted scatter after the grouped GEMMs

export interface PermutationOptions {
  /** Check that order / position is a permutation of 0 .. T*K-1. On CUDA this reads it back (a
   * synchronisation); pass false for routeShared's order and its inverse, valid by construction.
   * Default true. Unchecked, outputs are still fully written: out-of-range entries read as zero rows
   * and are never written through; invertPermutation gives -1 where no entry maps and the largest
   * source index where several do; unpermuteBackward's dy has zero rows where no pair maps and the
   * last pair's (largest t*K + s) where several do. */
  validate?: boolean;
}

function checkPermutation(op: string, name: string, perm: Tensor, options: PermutationOptions): void {
  const o = expectOptions<PermutationOptions>(op, options, 'an options object');
  if (!expectBool(op, 'validate', o.validate, true)) return;
  const values = perm.toArray(), n = values.length;
  const seen = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    const x = values[i];
    if (x < 0 || x >= n) throw new XftError(`${op}: ${name}[${i}] = ${x} is out of range [0, ${n}): not a permutation`, 'XFT_VALUE');
    if (seen[x]) throw new XftError(`${op}: ${name} holds ${x} twice: not a permutation`, 'XFT_VALUE');
    seen[x] = 1;
  }
}

function permutationTensor(op: string, name: string, perm: unknown, n: number, what: string): Tensor {
  return expectTensor(op, name, perm, { dtype: ['i32'], shape: [n], shapeName: `[T*K] = [${n}] (${what})` });
}

/** position i32 [T*K] with position[order[i]] = i: for each (token, slot) pair t*K + s, its row in the grouped layout. */
export function invertPermutation(order: Tensor, options: PermutationOptions = {}): Tensor {
  const op = 'invertPermutation';
  const o = expectTensor(op, 'order', order, { dtype: ['i32'], rank: 1, shapeName: '[T*K]' });
  checkPermutation(op, 'order', o, options);
  const position = Tensor.empty(o.shape, { dtype: 'i32', device: o.device });
  train.invertPermutation(o.storage, position.storage, o.numel);
  return position;
}

function topKArg(op: string, topK: unknown): number {
  return expectInt(op, 'topK', topK, 1, 2147483647);
}

/** The gather: xp [T*K, d] with xp[i] = x[order[i] / K]. x [T, d] f32 or bf16; order i32 [T*K] from routeShared. */
export function permute(x: Tensor, order: Tensor, topK: number, options: PermutationOptions = {}): Tensor {
  const op = 'permute';
  const xt = expectTensor(op, 'x', x, { dtype: FLOAT, rank: 2, shapeName: '[T, d]' });
  const K = topKArg(op, topK);
  const [T, d] = xt.shape;
  if (d < 1) throw new XftError(`${op}: expected x [T, d] with d >= 1, got ${xt.describe()}`, 'XFT_SHAPE');
  permutationTensor(op, 'order', order, T * K, `T = ${T}, K = ${K}`);
  sameDevice(op, { x, order });
  checkPermutation(op, 'order', order, options);
  const xp = Tensor.empty([T * K, d], { dtype: x.dtype, device: x.device });
  train.permuteForward(x.storage, order.storage, xp.storage, dtypeCode(x.dtype), T, K, d);
  return xp;
}

/** Backward of permute: dx [T, d] with dx[t] = Σ_s dxp[position[t*K + s]] (slot order: deterministic). */
export function permuteBackward(dxp: Tensor, position: Tensor, topK: number, options: PermutationOptions = {}): Tensor {
  const op = 'permuteBackward';
  const gt = expectTensor(op, 'dxp', dxp, { dtype: FLOAT, rank: 2, shapeName: '[T*K, d]' });
  const K = topKArg(op, topK);
  const [n, d] = gt.shape;
  if (n % K !== 0) throw new XftError(`${op}: dxp has ${n} rows, not a multiple of topK = ${K} (expected [T*K, d])`, 'XFT_SHAPE');
  if (d < 1) throw new XftError(`${op}: expected dxp [T*K, d] with d >= 1, got ${gt.describe()}`, 'XFT_SHAPE');
  const T = n / K;
  permutationTensor(op, 'position', position, n, `T = ${T}, K = ${K}`);
  sameDevice(op, { dxp, position });
  checkPermutation(op, 'position', position, options);
  const dx = Tensor.empty([T, d], { dtype: dxp.dtype, device: dxp.device });
  train.permuteBackward(dxp.storage, position.storage, dx.storage, dtypeCode(dxp.dtype), T, K, d);
  return dx;
}

function unpermuteArgs(op: string, y: unknown, position: unknown, g: unknown) {
  const yt = expectTensor(op, 'y', y, { dtype: FLOAT, rank: 2, shapeName: '[T*K, d]' });
  const gt = expectTensor(op, 'g', g, { dtype: ['f32'], rank: 2, shapeName: '[T, K]' });
  const [T, K] = gt.shape;
  const [n, d] = yt.shape;
  if (K < 1) throw new XftError(`${op}: expected routing weights g [T, K] with K >= 1, got ${gt.describe()}`, 'XFT_SHAPE');
  if (n !== T * K)
    throw new XftError(`${op}: y ${yt.describe()} must have T*K = ${T * K} rows for routing weights g ${gt.describe()}`, 'XFT_SHAPE');
  if (d < 1) throw new XftError(`${op}: expected y [T*K, d] with d >= 1, got ${yt.describe()}`, 'XFT_SHAPE');
  const pt = permutationTensor(op, 'position', position, n, `T = ${T}, K = ${K}`);
  return { y: yt, g: gt, position: pt, T, K, d };
}

/** The weighted combine: out [T, d] with out[t] = Σ_s g[t, s] y[position[t*K + s]]. y [T*K, d] (expert outputs), g f32 [T, K]. */
export function unpermute(y: Tensor, position: Tensor, g: Tensor, options: PermutationOptions = {}): Tensor {
  const op = 'unpermute';
  const a = unpermuteArgs(op, y, position, g);
  sameDevice(op, { y, position, g });
  checkPermutation(op, 'position', position, options);
  const out = Tensor.empty([a.T, a.d], { dtype: y.dtype, device: y.device });
  train.unpermuteForward(y.storage, position.storage, g.storage, out.storage, dtypeCode(y.dtype), a.T, a.K, a.d);
  return out;
}

/**
 * Backward of unpermute: dy [T*K, d] with dy[position[t*K + s]] = g[t, s] dOut[t], and the routing-weight
 * gradient dg f32 [T, K] = <dOut[t], y[position[t*K + s]]> (fp32 accumulation), for routeSharedBackward.
 */
export function unpermuteBackward(dOut: Tensor, y: Tensor, position: Tensor, g: Tensor, options: PermutationOptions = {}): { dy: Tensor; dg: Tensor } {
  const op = 'unpermuteBackward';
  const a = unpermuteArgs(op, y, position, g);
  expectTensor(op, 'dOut', dOut, { dtype: [y.dtype], shape: [a.T, a.d], shapeName: `[T, d] = [${a.T}, ${a.d}]` });
  sameDevice(op, { dOut, y, position, g });
  checkPermutation(op, 'position', position, options);
  const dy = Tensor.empty(y.shape, { dtype: y.dtype, device: y.device });
  const dg = Tensor.empty(g.shape, { dtype: 'f32', device: y.device });
  train.unpermuteBackward(dOut.storage, y.storage, position.storage, g.storage, dy.storage, dg.storage, dtypeCode(y.dtype), a.T, a.K, a.d);
  return { dy, dg };
}

// ---------------------------------------------------------------------------------------------
// 5. Balance loss of the router

function balanceArgs(op: string, importance: unknown, load: unknown, weight: unknown) {
  const it = expectTensor(op, 'importance', importance, { dtype: ['f32'], rank: 1, shapeName: '[N]' });
  const N = it.shape[0];
  if (N < 1) throw new XftError(`${op}: expected importance [N] with N >= 1 experts, got ${it.describe()}`, 'XFT_SHAPE');
  const lt = expectTensor(op, 'load', load, { dtype: ['f32'], shape: [N], shapeName: `[N] = [${N}]` });
  const w = weight === undefined ? BALANCE_LOSS_WEIGHT : expectNumber(op, 'weight', weight, 'a finite number', () => true);
  return { importance: it, load: lt, N, weight: w };
}

/**
 * The balance loss of XFT.md: f32 [1] = weight (cv²(importance) + cv²(load)), cv²(x) = var(x) / (mean(x)² + 1e-10)
 * with the unbiased variance (as torch.var; 0 for one expert). importance, load f32 [N] from routeShared.
 */
export function balanceLoss(importance: Tensor, load: Tensor, options: { weight?: number } = {}): Tensor {
  const op = 'balanceLoss';
  const o = expectOptions<{ weight?: number }>(op, options, 'an options object');
  const a = balanceArgs(op, importance, load, o.weight);
  sameDevice(op, { importance, load });
  const loss = Tensor.empty([1], { dtype: 'f32', device: importance.device });
  train.balanceLossForward(importance.storage, load.storage, a.N, a.weight, loss.storage);
  return loss;
}

/** dL/dimportance and dL/dload f32 [N] of the balance loss, for dL/dloss = dLoss (default 1). */
export function balanceLossBackward(importance: Tensor, load: Tensor, options: { weight?: number; dLoss?: number } = {}): { dImportance: Tensor; dLoad: Tensor } {
  const op = 'balanceLossBackward';
  const o = expectOptions<{ weight?: number; dLoss?: number }>(op, options, 'an options object');
  const a = balanceArgs(op, importance, load, o.weight);
  const dLoss = o.dLoss === undefined ? 1 : expectNumber(op, 'dLoss', o.dLoss, 'a finite number', () => true);
  sameDevice(op, { importance, load });
  const dImportance = Tensor.empty([a.N], { dtype: 'f32', device: importance.device });
  const dLoad = Tensor.empty([a.N], { dtype: 'f32', device: importance.device });
  train.balanceLossBackward(importance.storage, load.storage, a.N, a.weight, dLoss, dImportance.storage, dLoad.storage);
  return { dImportance, dLoad };
}

// ---------------------------------------------------------------------------------------------
// 5b. Switch balance loss (UpIT's L_load; Switch Transformer, Mixtral): kernels in cuda/routing.cu

export interface SwitchLossOptions {
  /** T: the tokens routed (probs and load are sums over them) */
  tokens: number;
  /** S: experts selected per token (top-k; K - 1 with a shared expert), so that Σ load = T·S */
  selected: number;
  /** weight w of the loss (default BALANCE_LOSS_WEIGHT) */
  weight?: number;
}

function switchArgs(op: string, probs: unknown, load: unknown, options: unknown) {
  const lt = expectTensor(op, 'load', load, { dtype: ['f32'], rank: 1, shapeName: '[N]' });
  const N = lt.shape[0];
  if (N < 1) throw new XftError(`${op}: expected load [N] with N >= 1 experts, got ${lt.describe()}`, 'XFT_SHAPE');
  const pt = probs === undefined ? null : expectTensor(op, 'probs', probs, { dtype: ['f32'], shape: [N], shapeName: `[N] = [${N}]` });
  const o = expectOptions<SwitchLossOptions>(op, options, 'an object { tokens, selected, weight? }');
  const T = expectInt(op, 'tokens', o.tokens, 0, 2147483647);
  const S = expectInt(op, 'selected', o.selected, 1, N);
  const w = o.weight === undefined ? BALANCE_LOSS_WEIGHT : expectNumber(op, 'weight', o.weight, 'a finite number', () => true);
  return { probs: pt, load: lt, N, T, S, weight: w };
}

/**
 * The Switch-style balance loss f32 [1] = weight · N · Σ_i f_i P_i with f_i = load_i / (T·S), the fraction
 * of the token→expert assignments that went to expert i, and P_i = probs_i / T, its mean full-softmax
 * probability (probs and load from routeShared with { probs: true }). 1 (times weight) under uniform routing.
 */
export function switchLoss(probs: Tensor, load: Tensor, options: SwitchLossOptions): Tensor {
  const op = 'switchLoss';
  const a = switchArgs(op, probs, load, options);
  sameDevice(op, { probs, load });
  const loss = Tensor.empty([1], { dtype: 'f32', device: load.device });
  train.switchLossForward(probs.storage, load.storage, a.N, a.T, a.S, a.weight, loss.storage);
  return loss;
}

/**
 * dL/dprobs f32 [N] = dLoss · weight · N · f_i / T for dL/dloss = dLoss (default 1): f is a constant (the
 * counts have no gradient, as in Switch and Mixtral), so the gradient reaches the logits through P only
 * (routeSharedBackward's dProbs).
 */
export function switchLossBackward(load: Tensor, options: SwitchLossOptions & { dLoss?: number }): Tensor {
  const op = 'switchLossBackward';
  const a = switchArgs(op, undefined, load, options);
  const dLoss = options.dLoss === undefined ? 1 : expectNumber(op, 'dLoss', options.dLoss, 'a finite number', () => true);
  const dProbs = Tensor.empty([a.N], { dtype: 'f32', device: load.device });
  train.switchLossBackward(load.storage, a.N, a.T, a.S, a.weight, dLoss, dProbs.storage);
  return dProbs;
}

// ---------------------------------------------------------------------------------------------
// 6. The differentiable load of the balance loss under router noise (noisy top-k estimate)

/** Most experts a router may have for loadEstimate (cuda/load_estimate.h). */
export const MAX_LOAD_EXPERTS = 256;

export interface LoadEstimateOptions {
  /** k: experts selected per token among the N router outputs (XFT: K - 1; no shared expert: K); 1 <= k < N */
  k: number;
  /** the noise scale's floor, as routerNoise (default 0.01) */
  eps?: number;
}

function loadArgs(op: string, clean: unknown, z: unknown, noisy: unknown, options: unknown) {
  const ct = expectTensor(op, 'clean', clean, { dtype: FLOAT, rank: 2, shapeName: '[T, N]' });
  const [T, N] = ct.shape;
  for (const [name, v] of [['z', z], ['noisy', noisy]] as const) {
    const t = expectTensor(op, name, v, { dtype: [ct.dtype], rank: 2, shapeName: formatShape(ct.shape) });
    if (t.shape[0] !== T || t.shape[1] !== N) throw new XftError(`${op}: expected ${name} of shape ${formatShape(ct.shape)} (the shape of clean), got ${t.describe()}`, 'XFT_SHAPE');
  }
  if (N < 2 || N > MAX_LOAD_EXPERTS) throw new XftError(`${op}: expected clean [T, N] with 2 <= N <= ${MAX_LOAD_EXPERTS} experts, got ${ct.describe()}`, 'XFT_SHAPE');
  const o = expectOptions<LoadEstimateOptions>(op, options, 'an object { k, eps? }');
  const k = expectInt(op, 'k', o.k, 1, N - 1);
  const eps = o.eps === undefined ? 0.01 : expectNumber(op, 'eps', o.eps, 'a finite number >= 0', (x) => x >= 0);
  return { T, N, k, eps, dtype: ct.dtype };
}

/**
 * The differentiable per-expert load of the noisy top-k gate (Shazeer et al. 2017), the load the
 * reference's balance loss uses when router noise is on: load_i = Σ_t Φ((clean_ti − thr_ti) / c_ti),
 * c = softplus(z) + eps, thr the (k+1)-th largest noisy logit of the token when noisy_ti is above it,
 * else the k-th (cuda/load_estimate.cu). clean, z, noisy [T, N] (noisy from routerNoise(clean, z)).
 * Returns load f32 [N] and the per-token probabilities prob f32 [T, N].
 */
export function loadEstimate(clean: Tensor, z: Tensor, noisy: Tensor, options: LoadEstimateOptions): { load: Tensor; prob: Tensor } {
  const op = 'loadEstimate';
  const a = loadArgs(op, clean, z, noisy, options);
  const device = sameDevice(op, { clean, z, noisy });
  const prob = Tensor.empty([a.T, a.N], { dtype: 'f32', device }), load = Tensor.empty([a.N], { dtype: 'f32', device });
  train.loadEstimateForward(clean.storage, z.storage, noisy.storage, dtypeCode(a.dtype), a.T, a.N, a.k, a.eps, prob.storage, load.storage);
  return { load, prob };
}

/**
 * dClean and dz [T, N] (clean's dtype) from dLoad f32 [N], through the probabilities and the
 * thresholds (noisy logits: clean + n c, n the router noise of `seed`, the seed given to routerNoise).
 */
export function loadEstimateBackward(clean: Tensor, z: Tensor, noisy: Tensor, dLoad: Tensor, options: LoadEstimateOptions & { seed: number | bigint }): { dClean: Tensor; dz: Tensor } {
  const op = 'loadEstimateBackward';
  const a = loadArgs(op, clean, z, noisy, options);
  expectTensor(op, 'dLoad', dLoad, { dtype: ['f32'], shape: [a.N], shapeName: `[N] = [${a.N}]` });
  const seed = seedOf(op, options.seed);
  const device = sameDevice(op, { clean, z, noisy, dLoad });
  const dClean = Tensor.empty([a.T, a.N], { dtype: a.dtype, device }), dz = Tensor.empty([a.T, a.N], { dtype: a.dtype, device });
  train.loadEstimateBackward(clean.storage, z.storage, noisy.storage, dLoad.storage, dtypeCode(a.dtype), a.T, a.N, a.k, a.eps, seed, dClean.storage, dz.storage);
  return { dClean, dz };
}
