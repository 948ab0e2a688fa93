/**
 * The XFT ops, one typed wrapper per native op: check shapes, dtypes and devices (clear XftErrors
 * that name the argument), allocate outputs, dispatch to the CPU or CUDA twin.
 * Math: ../shared/XFT.md; kernels: cuda/routing.cu, cuda/grouped_gemm.cu, cuda/merge.cu;
 * CPU twins: binding/cpu/*.cc.
 */
import { XftError, invalidArgument, describe } from './errors';
import { native } from './native';
import { DType, Tensor, dtypeCode, formatShape } from './tensor';
import { expectArray, expectBool, expectInt, expectOptions } from './validate';
import { FLOAT, expectTensor, sameDevice } from './ops_check';

/** Largest number of router logit columns routeShared accepts (binding/xft_ops.cc kMaxRouteColumns). */
export const MAX_ROUTE_EXPERTS = 1024;

// ---------------------------------------------------------------------------------------------
// 1. Shared-expert routing with routing weight normalization

export interface RouteOptions {
  /** K: experts per token, the shared expert included (2 <= K <= E). */
  topK: number;
  /** Routing weight normalization (XFT); false is the paper's ablation. Default true. */
  normalize?: boolean;
  /** Expert 0 is a shared expert taken by every token (XFT). false is vanilla sparse upcycling:
   * logits are [T, E], top-K over all experts, weights softmax over the selected logits. Default true. */
  shared?: boolean;
  /** Also sum the full softmax over the tokens (Routing.probs, the P of the Switch balance loss). Default false. */
  probs?: boolean;
}

/** The output of routeShared, and what its backward needs. */
export interface Routing {
  /** i32 [T, K]: normal experts by descending probability, then 0 (the shared expert) */
  experts: Tensor;
  /** f32 [T, K]: routing weights g (rows sum to 1 with normalization) */
  weights: Tensor;
  /** i32 [E]: tokens per expert */
  counts: Tensor;
  /** i32 [E + 1]: exclusive cumulative counts, the group offsets of the grouped GEMMs */
  offsets: Tensor;
  /** i32 [T * K]: (t, s) pairs as t * K + s, sorted by expert then token: the gather order */
  order: Tensor;
  /**
   * f32 [N]: per routed expert, the sum over the tokens that selected it of its score: its probability p
   * with a shared expert, its weight g (the top-K renormalized score) without, as the reference's gates
   */
  importance: Tensor;
  /** f32 [N]: per normal expert, the number of tokens that selected it */
  load: Tensor;
  /** f32 [N] with options.probs: per logit column, the sum over all tokens of its full-softmax probability; else null */
  probs: Tensor | null;
  readonly tokens: number;
  readonly topK: number;
  readonly numExperts: number;
  readonly normalize: boolean;
  readonly shared: boolean;
  dispose(): void;
}

function routeOptions(op: string, logits: Tensor, options: RouteOptions) {
  if (options === undefined || options === null || typeof options !== 'object' || Array.isArray(options))
    throw invalidArgument(op, 'options', 'an object with topK', options, 'XFT_TYPE');
  const normalize = options.normalize === undefined ? true : expectBool(op, 'normalize', options.normalize);
  const shared = options.shared === undefined ? true : expectBool(op, 'shared', options.shared);
  const N = logits.shape[1];
  if (N < 1 || N > MAX_ROUTE_EXPERTS)
    throw new XftError(`${op}: expected logits [T, ${shared ? 'E-1' : 'E'}] with 1 to ${MAX_ROUTE_EXPERTS} columns, got ${logits.describe()}`, 'XFT_SHAPE');
  const E = shared ? N + 1 : N;
  const K = expectInt(op, 'topK', options.topK, shared ? 2 : 1, E);
  return { normalize, shared, N, E, K, T: logits.shape[0] };
}

/**
 * Routes T tokens to K experts: softmax over the router logits, the top K-1 normal experts, the
 * shared expert 0 with weight 1 - p_1, normal weights p_1 * softmax(p_1..p_{K-1}) (XFT.md), plus the
 * permutation metadata of the grouped GEMMs. logits: f32 or bf16 [T, E-1].
 */
export function routeShared(logits: Tensor, options: RouteOptions): Routing {
  const op = 'routeShared';
  expectTensor(op, 'logits', logits, { dtype: FLOAT, rank: 2, shapeName: '[T, E-1]' });
  const { normalize, shared, N, E, K, T } = routeOptions(op, logits, options);
  const device = logits.device;
  const i32 = { dtype: 'i32' as const, device }, f32 = { dtype: 'f32' as const, device };
  const experts = Tensor.empty([T, K], i32), weights = Tensor.empty([T, K], f32);
  const counts = Tensor.empty([E], i32), offsets = Tensor.empty([E + 1], i32), order = Tensor.empty([T * K], i32);
  const importance = Tensor.empty([N], f32), load = Tensor.empty([N], f32);
  const probs = expectBool(op, 'probs', options.probs, false) ? Tensor.empty([N], f32) : null;
  native.routeForward(logits.storage, dtypeCode(logits.dtype), T, N, K, normalize, shared, experts.storage, weights.storage,
    counts.storage, offsets.storage, order.storage, importance.storage, load.storage, probs ? probs.storage : null);
  return {
    experts, weights, counts, offsets, order, importance, load, probs,
    tokens: T, topK: K, numExperts: E, normalize, shared,
    dispose() {
      for (const t of [experts, weights, counts, offsets, order, importance, load, probs]) t?.dispose();
    },
  };
}

/**
 * dL/dlogits [T, E-1] (logits dtype) from dL/dweights f32 [T, K], and optionally dL/dimportance
 * f32 [E-1] (the cv² balance loss) and dL/dprobs f32 [E-1] (the Switch balance loss: through the full
 * softmax of every token), through normalization, top-k and softmax. routing.experts must
 * name logit columns (as routeShared wrote them): on the CPU any other entry throws XFT_INDEX before
 * anything is written; on CUDA it is skipped and XFT_INDEX is thrown at the next synchronisation.
 */
export function routeSharedBackward(logits: Tensor, routing: Routing, dWeights: Tensor, options: { dImportance?: Tensor; dProbs?: Tensor } = {}): Tensor {
  const op = 'routeSharedBackward';
  expectTensor(op, 'logits', logits, { dtype: FLOAT, rank: 2, shapeName: '[T, E-1]' });
  if (routing === null || typeof routing !== 'object' || !Tensor.isTensor(routing.experts))
    throw invalidArgument(op, 'routing', 'the result of routeShared', routing, 'XFT_TYPE');
  const o = expectOptions<{ dImportance?: Tensor; dProbs?: Tensor }>(op, options, 'an options object { dImportance?, dProbs? }');
  const { normalize, shared, topK: K } = routing;
  const { N, T } = routeOptions(op, logits, { topK: K, normalize, shared });
  if (T !== routing.tokens) throw new XftError(`${op}: logits has ${T} tokens but routing was computed for ${routing.tokens}`, 'XFT_SHAPE');
  expectTensor(op, 'routing.experts', routing.experts, { dtype: ['i32'], shape: [T, K], shapeName: `[T, K] = [${T}, ${K}]` });
  expectTensor(op, 'dWeights', dWeights, { dtype: ['f32'], shape: [T, K], shapeName: `[T, K] = [${T}, ${K}]` });
  const dImportance = o.dImportance;
  if (dImportance !== undefined) expectTensor(op, 'dImportance', dImportance, { dtype: ['f32'], shape: [N], shapeName: `[E-1] = [${N}]` });
  const dProbs = o.dProbs;
  if (dProbs !== undefined) expectTensor(op, 'dProbs', dProbs, { dtype: ['f32'], shape: [N], shapeName: `[E-1] = [${N}]` });
  sameDevice(op, { logits, experts: routing.experts, dWeights, dImportance, dProbs });
  const dLogits = Tensor.empty([T, N], { dtype: logits.dtype, device: logits.device });
  native.routeBackward(logits.storage, dtypeCode(logits.dtype), T, N, K, normalize, shared, routing.experts.storage,
    dWeights.storage, dImportance ? dImportance.storage : null, dLogits.storage, dProbs ? dProbs.storage : null);
  return dLogits;
}

// ---------------------------------------------------------------------------------------------
// 2. Grouped expert GEMM

export interface GroupedGemmOptions {
  /** Check offsets (0 = o_0 <= ... <= o_E = M). On CUDA this reads them back (a synchronisation);
   * pass false for offsets made by routeShared, which are valid by construction. Default true.
   * Unchecked, other offsets are clamped to [0, M] and made non-decreasing (o'_e = max(o'_{e-1},
   * o_e)); rows outside [o'_0, o'_E) of y and dx are zeros: outputs are always fully written. */
  validate?: boolean;
}

function gemmArgs(op: string, x: unknown, w: unknown, offsets: unknown) {
  const xt = expectTensor(op, 'x', x, { dtype: FLOAT, rank: 2, shapeName: '[M, k]' });
  const [M, k] = xt.shape;
  const wt = expectTensor(op, 'w', w, { dtype: [xt.dtype], rank: 3, shapeName: '[E, n, k]' });
  const [E, n, kw] = wt.shape;
  if (kw !== k) throw new XftError(`${op}: w is [E, n, k] = ${formatShape(wt.shape)} but x is [M, k] = ${formatShape(xt.shape)}: k differs`, 'XFT_SHAPE');
  if (E < 1 || n < 1 || k < 1) throw new XftError(`${op}: empty weight ${wt.describe()} (need E, n, k >= 1)`, 'XFT_SHAPE');
  const ot = expectTensor(op, 'offsets', offsets, { dtype: ['i32'], shape: [E + 1], shapeName: `[E + 1] = [${E + 1}]` });
  return { x: xt, w: wt, offsets: ot, M, n, k, E };
}

function checkOffsets(op: string, offsets: Tensor, M: number): void {
  const o = offsets.toArray();
  if (o[0] !== 0) throw new XftError(`${op}: offsets must start at 0, got offsets[0] = ${o[0]}`, 'XFT_VALUE');
  for (let e = 1; e < o.length; e++)
    if (o[e] < o[e - 1]) throw new XftError(`${op}: offsets must not decrease, got offsets[${e - 1}] = ${o[e - 1]} > offsets[${e}] = ${o[e]}`, 'XFT_VALUE');
  if (o[o.length - 1] !== M) throw new XftError(`${op}: offsets must end at M = ${M} (rows of x), got ${o[o.length - 1]}`, 'XFT_VALUE');
}

/**
 * y [M, n] with rows offsets[e]..offsets[e+1] = x[rows] @ w[e]^T (nn.Linear layout).
 * x [M, k] and w [E, n, k] share a dtype (f32, or bf16 with fp32 accumulation); offsets i32 [E + 1].
 */
export function groupedGemm(x: Tensor, w: Tensor, offsets: Tensor, options: GroupedGemmOptions = {}): Tensor {
  const op = 'groupedGemm';
  const a = gemmArgs(op, x, w, offsets);
  const o = expectOptions<GroupedGemmOptions>(op, options, 'an options object { validate? }');
  const validate = expectBool(op, 'options.validate', o.validate, true);
  sameDevice(op, { x, w, offsets });
  if (validate) checkOffsets(op, offsets, a.M);
  const y = Tensor.empty([a.M, a.n], { dtype: x.dtype, device: x.device });
  native.groupedGemmForward(x.storage, w.storage, offsets.storage, y.storage, dtypeCode(x.dtype), a.M, a.n, a.k, a.E);
  return y;
}

export interface GroupedGemmBackwardOptions extends GroupedGemmOptions {
  /** Compute dx (default true), or add it into this tensor [M, k] of x's dtype in the GEMM's epilogue
   * (dx = round(dx + dy @ w[e]); rows outside the groups unchanged): the dx of q, k and v without add kernels. */
  dx?: boolean | Tensor;
  /**
   * Compute dw (default true), or add it into this tensor [E, n, k] (gradient accumulation): of w's
   * dtype, or f32 with bf16 inputs (f32 gradients of bf16 weights, from the unrounded fp32 accumulators).
   */
  dw?: boolean | Tensor;
}

/** dx [M, k] = dy @ w[e] per group, dw [E, n, k] = dy_e^T @ x_e (zero for empty groups). */
export function groupedGemmBackward(x: Tensor, w: Tensor, offsets: Tensor, dy: Tensor, options: GroupedGemmBackwardOptions = {}): { dx: Tensor | null; dw: Tensor | null } {
  const op = 'groupedGemmBackward';
  const a = gemmArgs(op, x, w, offsets);
  expectTensor(op, 'dy', dy, { dtype: [x.dtype], shape: [a.M, a.n], shapeName: `[M, n] = [${a.M}, ${a.n}]` });
  const o = expectOptions<GroupedGemmBackwardOptions>(op, options, 'an options object { validate?, dx?, dw? }');
  const validate = expectBool(op, 'options.validate', o.validate, true);
  const dxInto = Tensor.isTensor(o.dx) ? expectTensor(op, 'options.dx', o.dx, { dtype: [x.dtype], shape: [a.M, a.k], shapeName: `[M, k] = [${a.M}, ${a.k}]` }) : null;
  const wantDx = dxInto !== null || expectBool(op, 'options.dx', o.dx, true);
  if (o.dw !== undefined && typeof o.dw !== 'boolean' && !Tensor.isTensor(o.dw))
    throw invalidArgument(op, 'options.dw', 'a boolean or a Tensor [E, n, k] to accumulate into', o.dw, 'XFT_TYPE');
  const into = Tensor.isTensor(o.dw)
    ? expectTensor(op, 'options.dw', o.dw, { dtype: w.dtype === 'bf16' ? ['bf16', 'f32'] : [w.dtype], shape: w.shape, shapeName: `[E, n, k] = ${formatShape(w.shape)}` })
    : null;
  sameDevice(op, { x, w, offsets, dy, dw: into, dx: dxInto });
  if (validate) checkOffsets(op, offsets, a.M);
  const dx = dxInto ?? (wantDx ? Tensor.empty([a.M, a.k], { dtype: x.dtype, device: x.device }) : null);
  const dw = into ?? (o.dw === false ? null : Tensor.empty(w.shape, { dtype: w.dtype, device: w.device }));
  native.groupedGemmBackward(x.storage, w.storage, offsets.storage, dy.storage, dx ? dx.storage : null, dw ? dw.storage : null,
    dtypeCode(x.dtype), a.M, a.n, a.k, a.E, into !== null, dtypeCode(dw ? dw.dtype : x.dtype), dxInto !== null);
  return { dx, dw };
}

// ---------------------------------------------------------------------------------------------
// 2b. The SwiGLU FFN's gate and up as one grouped GEMM (cuda/grouped_gemm.cu kGateUp, kSwigluDown, kGateUpDx)

export interface GateUpOptions extends GroupedGemmOptions {
  /**
   * i32 [M]: row i of the GEMM reads x[floor(gather[i] / gatherDiv)] (a zero row where gather[i] is
   * negative or the row is past x's), e.g. routing.order with gatherDiv = K: the MoE's permuted copy of
   * x is never made. Default: row i reads x[i] (M = rows of x).
   */
  gather?: Tensor;
  /** the divisor of gather's entries (default 1) */
  gatherDiv?: number;
}

function gateUpArgs(op: string, x: unknown, wGate: unknown, wUp: unknown, offsets: unknown, o: GateUpOptions) {
  const xt = expectTensor(op, 'x', x, { dtype: FLOAT, rank: 2, shapeName: '[S, d]' });
  const [S, d] = xt.shape;
  const wg = expectTensor(op, 'wGate', wGate, { dtype: [xt.dtype], rank: 3, shapeName: '[E, f, d]' });
  const [E, f, dw] = wg.shape;
  if (dw !== d) throw new XftError(`${op}: wGate is [E, f, d] = ${formatShape(wg.shape)} but x is [S, d] = ${formatShape(xt.shape)}: d differs`, 'XFT_SHAPE');
  if (E < 1 || f < 1 || d < 1) throw new XftError(`${op}: empty weight ${wg.describe()} (need E, f, d >= 1)`, 'XFT_SHAPE');
  const wu = expectTensor(op, 'wUp', wUp, { dtype: [xt.dtype], shape: wg.shape, shapeName: `wGate's ${formatShape(wg.shape)}` });
  const gather = o.gather === undefined ? null : expectTensor(op, 'options.gather', o.gather, { dtype: ['i32'], rank: 1, shapeName: '[M]' });
  const gatherDiv = o.gatherDiv === undefined ? 1 : expectInt(op, 'options.gatherDiv', o.gatherDiv, 1, 2147483647);
  if (!gather && o.gatherDiv !== undefined) throw invalidArgument(op, 'options.gatherDiv', 'nothing without options.gather', o.gatherDiv);
  const M = gather ? gather.shape[0] : S;
  const ot = expectTensor(op, 'offsets', offsets, { dtype: ['i32'], shape: [E + 1], shapeName: `[E + 1] = [${E + 1}]` });
  return { x: xt, wGate: wg, wUp: wu, gather, gatherDiv, offsets: ot, S, M, f, d, E };
}

/**
 * gu [M, 2f] = [g | u] with g = x_i @ wGate[e]^T, u = x_i @ wUp[e]^T (rows grouped by offsets as
 * groupedGemm), and h [M, f] = silu(g) * u, in one grouped GEMM: exactly swiglu(groupedGemm(x, wGate),
 * groupedGemm(x, wUp)) (g and u rounded to the dtype first). wGate, wUp [E, f, d] keep the Hugging Face
 * layout; x [S, d] read through options.gather when given.
 */
export function gateUp(x: Tensor, wGate: Tensor, wUp: Tensor, offsets: Tensor, options: GateUpOptions = {}): { gu: Tensor; h: Tensor } {
  const op = 'gateUp';
  const o = expectOptions<GateUpOptions>(op, options, 'an options object { validate?, gather?, gatherDiv? }');
  const a = gateUpArgs(op, x, wGate, wUp, offsets, o);
  const validate = expectBool(op, 'options.validate', o.validate, true);
  sameDevice(op, { x, wGate, wUp, offsets, gather: a.gather });
  if (validate) checkOffsets(op, a.offsets, a.M);
  const gu = Tensor.empty([a.M, 2 * a.f], { dtype: x.dtype, device: x.device });
  const h = Tensor.empty([a.M, a.f], { dtype: x.dtype, device: x.device });
  native.gateupForward(x.storage, a.gather ? a.gather.storage : null, a.gatherDiv, a.S, wGate.storage, wUp.storage, offsets.storage,
    gu.storage, h.storage, dtypeCode(x.dtype), a.M, a.f, a.d, a.E);
  return { gu, h };
}

/**
 * The down projection's dx fused with the SwiGLU backward: dh = dy @ wDown[e] (never stored), then
 * dgu [M, 2f] = [dg | du] = swigluBackward(g, u, dh) from gu = [g | u], and h [M, f] = silu(g) * u
 * recomputed (the input of dW_down, which groupedGemmBackward(h, wDown, offsets, dy, { dx: false }) gives).
 */
export function swigluDownBackward(dy: Tensor, wDown: Tensor, offsets: Tensor, gu: Tensor, options: GroupedGemmOptions = {}): { dgu: Tensor; h: Tensor } {
  const op = 'swigluDownBackward';
  const o = expectOptions<GroupedGemmOptions>(op, options, 'an options object { validate? }');
  const dyt = expectTensor(op, 'dy', dy, { dtype: FLOAT, rank: 2, shapeName: '[M, d]' });
  const [M, d] = dyt.shape;
  const wd = expectTensor(op, 'wDown', wDown, { dtype: [dyt.dtype], rank: 3, shapeName: '[E, d, f]' });
  const [E, dw, f] = wd.shape;
  if (dw !== d || E < 1 || f < 1 || d < 1)
    throw new XftError(`${op}: wDown is [E, d, f] = ${formatShape(wd.shape)} but dy is [M, d] = ${formatShape(dyt.shape)} (need matching d, E, f >= 1)`, 'XFT_SHAPE');
  expectTensor(op, 'gu', gu, { dtype: [dyt.dtype], shape: [M, 2 * f], shapeName: `[M, 2f] = [${M}, ${2 * f}]` });
  expectTensor(op, 'offsets', offsets, { dtype: ['i32'], shape: [E + 1], shapeName: `[E + 1] = [${E + 1}]` });
  const validate = expectBool(op, 'options.validate', o.validate, true);
  sameDevice(op, { dy, wDown, offsets, gu });
  if (validate) checkOffsets(op, offsets, M);
  const dgu = Tensor.empty([M, 2 * f], { dtype: dy.dtype, device: dy.device });
  const h = Tensor.empty([M, f], { dtype: dy.dtype, device: dy.device });
  native.swigluDownBackward(dy.storage, wDown.storage, offsets.storage, gu.storage, dgu.storage, h.storage, dtypeCode(dy.dtype), M, f, d, E);
  return { dgu, h };
}

/**
 * q, k, v = x wq^T, x wk^T, x wv^T as one GEMM over the concatenated output columns (one launch; each
 * output exactly groupedGemm's). x [M, d], wq [nq, d], wk and wv [nk, d] (HF q_proj, k_proj, v_proj);
 * offsets i32 [2], the one-group offsets [0, M] (rows outside them are zeros).
 */
export function qkv(x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, offsets: Tensor, options: GroupedGemmOptions = {}): { q: Tensor; k: Tensor; v: Tensor } {
  const op = 'qkv';
  const o = expectOptions<GroupedGemmOptions>(op, options, 'an options object { validate? }');
  const xt = expectTensor(op, 'x', x, { dtype: FLOAT, rank: 2, shapeName: '[M, d]' });
  const [M, d] = xt.shape;
  const q = expectTensor(op, 'wq', wq, { dtype: [xt.dtype], rank: 2, shapeName: '[nq, d]' });
  const nq = q.shape[0];
  const k = expectTensor(op, 'wk', wk, { dtype: [xt.dtype], rank: 2, shapeName: '[nk, d]' });
  const nk = k.shape[0];
  expectTensor(op, 'wv', wv, { dtype: [xt.dtype], shape: k.shape, shapeName: `wk's ${formatShape(k.shape)}` });
  if (q.shape[1] !== d || k.shape[1] !== d || nq < 1 || nk < 1 || d < 1)
    throw new XftError(`${op}: expected wq [nq, d] and wk, wv [nk, d] with d = ${d} (x is ${xt.describe()}), got ${q.describe()} and ${k.describe()}`, 'XFT_SHAPE');
  expectTensor(op, 'offsets', offsets, { dtype: ['i32'], shape: [2], shapeName: '[2] (one group)' });
  const validate = expectBool(op, 'options.validate', o.validate, true);
  sameDevice(op, { x, wq, wk, wv, offsets });
  if (validate) checkOffsets(op, offsets, M);
  const out = (n: number) => Tensor.empty([M, n], { dtype: x.dtype, device: x.device });
  const r = { q: out(nq), k: out(nk), v: out(nk) };
  native.qkvForward(x.storage, wq.storage, wk.storage, wv.storage, offsets.storage, r.q.storage, r.k.storage, r.v.storage, dtypeCode(x.dtype), M, nq, nk, d);
  return r;
}

export interface GateUpBackwardOptions extends GateUpOptions {
  /** Compute dx [M, d] (default true), or add it into this tensor of x's dtype in the GEMM's epilogue. */
  dx?: boolean | Tensor;
  /**
   * Compute dW_gate and dW_up (default true), or add them into these two tensors [E, f, d] (of the
   * weights' dtype, or f32 with bf16 inputs, as groupedGemmBackward).
   */
  dw?: boolean | [Tensor, Tensor];
}

/**
 * The backward of gateUp from dgu = [dg | du]: dx [M, d] = dg @ wGate[e] + du @ wUp[e] as one GEMM over
 * the 2f columns (rounded once), dwGate, dwUp [E, f, d] = dg_e^T @ x_e, du_e^T @ x_e with x read
 * through the same gather (no permuted copy). dx rows are the GEMM's rows (the MoE sums them per token
 * with permuteBackward).
 */
export function gateUpBackward(x: Tensor, wGate: Tensor, wUp: Tensor, offsets: Tensor, dgu: Tensor, options: GateUpBackwardOptions = {}):
  { dx: Tensor | null; dwGate: Tensor | null; dwUp: Tensor | null } {
  const op = 'gateUpBackward';
  const o = expectOptions<GateUpBackwardOptions>(op, options, 'an options object { validate?, gather?, gatherDiv?, dx?, dw? }');
  const a = gateUpArgs(op, x, wGate, wUp, offsets, o);
  expectTensor(op, 'dgu', dgu, { dtype: [x.dtype], shape: [a.M, 2 * a.f], shapeName: `[M, 2f] = [${a.M}, ${2 * a.f}]` });
  const validate = expectBool(op, 'options.validate', o.validate, true);
  const dxInto = Tensor.isTensor(o.dx) ? expectTensor(op, 'options.dx', o.dx, { dtype: [x.dtype], shape: [a.M, a.d], shapeName: `[M, d] = [${a.M}, ${a.d}]` }) : null;
  const wantDx = dxInto !== null || expectBool(op, 'options.dx', o.dx, true);
  let into: [Tensor, Tensor] | null = null;
  if (Array.isArray(o.dw)) {
    if (o.dw.length !== 2) throw invalidArgument(op, 'options.dw', 'a boolean or two tensors [dwGate, dwUp]', o.dw, 'XFT_TYPE');
    const like = { dtype: (wGate.dtype === 'bf16' ? ['bf16', 'f32'] : [wGate.dtype]) as DType[], shape: wGate.shape, shapeName: `[E, f, d] = ${formatShape(wGate.shape)}` };
    into = [expectTensor(op, 'options.dw[0]', o.dw[0], like), expectTensor(op, 'options.dw[1]', o.dw[1], like)];
    if (into[0].dtype !== into[1].dtype) throw new XftError(`${op}: options.dw[0] is ${into[0].dtype} but options.dw[1] is ${into[1].dtype} (expected one dtype)`, 'XFT_DTYPE');
  } else if (o.dw !== undefined && typeof o.dw !== 'boolean') throw invalidArgument(op, 'options.dw', 'a boolean or two tensors [dwGate, dwUp]', o.dw, 'XFT_TYPE');
  sameDevice(op, { x, wGate, wUp, offsets, dgu, gather: a.gather, dx: dxInto, dwGate: into?.[0], dwUp: into?.[1] });
  if (validate) checkOffsets(op, a.offsets, a.M);
  const dx = dxInto ?? (wantDx ? Tensor.empty([a.M, a.d], { dtype: x.dtype, device: x.device }) : null);
  const wantDw = into !== null || o.dw !== false;
  const [dwGate, dwUp] = into ?? (wantDw ? [Tensor.empty(wGate.shape, { dtype: wGate.dtype, device: x.device }), Tensor.empty(wGate.shape, { dtype: wGate.dtype, device: x.device })] : [null, null]);
  native.gateupBackward(x.storage, a.gather ? a.gather.storage : null, a.gatherDiv, a.S, wGate.storage, wUp.storage, offsets.storage, dgu.storage,
    dx ? dx.storage : null, dwGate ? dwGate.storage : null, dwUp ? dwUp.storage : null, dtypeCode(x.dtype), dtypeCode(dwGate ? dwGate.dtype : x.dtype),
    a.M, a.f, a.d, a.E, into !== null, dxInto !== null);
  return { dx, dwGate, dwUp };
}

// ---------------------------------------------------------------------------------------------
// 3. Mixing-coefficient merge

function mergeArgs(op: string, weights: unknown, alpha: unknown, sharedRate: unknown) {
  const list = expectArray<unknown>(op, 'weights', weights, 'a non-empty array of expert stacks [E, ...]', 1);
  const first = expectTensor(op, 'weights[0]', list[0], { dtype: FLOAT, shapeName: '[E, ...]' });
  if (first.rank < 1) throw new XftError(`${op}: expected weights[0] to be an expert stack [E, ...], got ${first.describe()}`, 'XFT_SHAPE');
  const E = first.shape[0];
  if (E < 2) throw new XftError(`${op}: expected at least 2 experts, got weights[0] ${first.describe()}`, 'XFT_SHAPE');
  const stacks = list.map((w, i) => {
    const t = expectTensor(op, `weights[${i}]`, w, { dtype: [first.dtype], shapeName: `[E, ...] with E = ${E}` });
    if (t.rank < 1 || t.shape[0] !== E) throw new XftError(`${op}: expected weights[${i}] to be [E, ...] with E = ${E}, got ${t.describe()}`, 'XFT_SHAPE');
    return t;
  });
  if (sharedRate !== null && (typeof sharedRate !== 'number' || !(sharedRate >= 0 && sharedRate <= 1)))
    throw invalidArgument(op, 'sharedRate', 'a number in [0, 1], or null for no fixed shared rate', sharedRate, typeof sharedRate === 'number' ? 'XFT_VALUE' : 'XFT_TYPE');
  const A = sharedRate === null ? E : E - 1;
  const a = expectTensor(op, 'alpha', alpha, { dtype: ['f32'], shape: [A], shapeName: sharedRate === null ? `[E] = [${E}]` : `[E-1] = [${A}]` });
  const device = sameDevice(op, Object.fromEntries([['alpha', a], ...stacks.map((t, i) => [`weights[${i}]`, t])]));
  return { stacks, alpha: a, E, rate: sharedRate === null ? -1 : sharedRate, device, dtype: first.dtype };
}

/**
 * The per-layer merge: for each expert stack W [E, ...], W̄ = Σ_e c_e W_e with c_0 = sharedRate and
 * c_i = (1 - sharedRate) softmax(alpha)_i (alpha f32 [E-1]); sharedRate null: c = softmax(alpha), alpha [E].
 */
export function mergeExperts(weights: Tensor[], alpha: Tensor, sharedRate: number | null): Tensor[] {
  const op = 'mergeExperts';
  const a = mergeArgs(op, weights, alpha, sharedRate);
  const merged = a.stacks.map((w) => Tensor.empty(w.shape.slice(1), { dtype: w.dtype, device: w.device }));
  native.mergeForward(a.stacks.map((w) => w.storage), merged.map((m) => m.storage), merged.map((m) => m.numel),
    dtypeCode(a.dtype), a.E, a.alpha.storage, a.rate);
  return merged;
}

/** dL/dalpha f32 (alpha's shape) from dL/dW̄ for each merged tensor; with options.into, adds into it. */
export function mergeExpertsBackward(weights: Tensor[], alpha: Tensor, sharedRate: number | null, dMerged: Tensor[], options: { into?: Tensor } = {}): Tensor {
  const op = 'mergeExpertsBackward';
  const a = mergeArgs(op, weights, alpha, sharedRate);
  const o = expectOptions<{ into?: Tensor }>(op, options, 'an options object { into? }');
  expectArray(op, 'dMerged', dMerged, `an array of ${a.stacks.length} gradients`);
  if (dMerged.length !== a.stacks.length)
    throw invalidArgument(op, 'dMerged', `an array of ${a.stacks.length} gradients (one per expert stack)`, dMerged, 'XFT_TYPE');
  const grads = dMerged.map((g, i) => expectTensor(op, `dMerged[${i}]`, g, { dtype: [a.dtype], shape: a.stacks[i].shape.slice(1),
    shapeName: formatShape(a.stacks[i].shape.slice(1)) }));
  const into = o.into === undefined ? null : expectTensor(op, 'options.into', o.into, { dtype: ['f32'], shape: alpha.shape });
  sameDevice(op, Object.fromEntries([['alpha', alpha], ['into', into], ...grads.map((t, i) => [`dMerged[${i}]`, t])]));
  const dAlpha = into ?? Tensor.empty(alpha.shape, { dtype: 'f32', device: alpha.device });
  native.mergeBackward(a.stacks.map((w) => w.storage), grads.map((g) => g.storage), grads.map((g) => g.numel),
    dtypeCode(a.dtype), a.E, a.alpha.storage, a.rate, dAlpha.storage, into !== null);
  return dAlpha;
}

