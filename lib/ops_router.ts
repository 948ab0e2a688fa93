/**
 * Typed wrappers of the small-N router linears (cuda/router_linear.cu, CPU twin
 * binding/cpu/router_linear.cc): y = x @ w^T for the MoE router's Linear(d, E-1), the mlp router's
 * Linear(E-1, E-1) and the noise Linear(d, E-1), whose N = E-1 outputs (7 for 8 experts) would
 * waste the grouped GEMM's 128 x 256 tile. One warp per two token rows reads x once for all N
 * outputs; dW is a deterministic two-stage reduction over token slices. Same contract as
 * groupedGemm / groupedGemmBackward with one group: dx overwrites, dw accumulates into a given tensor.
 * Also UpIT's routing-vector loss on a probe's logits (cuda/routing_probe.cu, CPU twin
 * binding/cpu/routing_probe.cc), whose h = x rᵀ and dr = dhᵀ x are router linears with N = 1.
 */
import { XftError, invalidArgument } from './errors';
import { native, type NativeStorage } from './native';
import { FLOAT, expectTensor, sameDevice } from './ops_check';
import { Tensor, dtypeCode, formatShape } from './tensor';
import { expectBool, expectNumber, expectOptions } from './validate';

/** Largest N (outputs) the router linear kernels take (cuda/router_linear.cu: NB <= 32). */
export const ROUTER_LINEAR_MAX_N = 32;

type S = NativeStorage;

/** The native functions of binding/router_ops.cc (dtype codes: 0 f32, 1 bf16). */
export interface RouterNative {
  routerLinearForward(x: S, w: S, y: S, dtype: number, T: number, N: number, d: number): void;
  routerLinearBackward(x: S, w: S, dy: S, dx: S | null, dw: S | null, dtype: number, dwDtype: number, T: number, N: number,
    d: number, accumulate: boolean): void;
  routingProbe(h: S, targets: S, dh: S | null, stats: S, dtype: number, N: number, scale: number): void;
}

const routerNative = native as unknown as RouterNative;

function routerArgs(op: string, x: unknown, w: unknown) {
  const xt = expectTensor(op, 'x', x, { dtype: FLOAT, rank: 2, shapeName: '[T, d]' });
  const [T, d] = xt.shape;
  const wt = expectTensor(op, 'w', w, { dtype: [xt.dtype], rank: 2, shapeName: '[N, d]' });
  const [N, dw] = wt.shape;
  if (dw !== d) throw new XftError(`${op}: w is [N, d] = ${formatShape(wt.shape)} but x is [T, d] = ${formatShape(xt.shape)}: d differs`, 'XFT_SHAPE');
  if (d < 1) throw new XftError(`${op}: expected d >= 1, got x ${xt.describe()}`, 'XFT_SHAPE');
  if (N < 1 || N > ROUTER_LINEAR_MAX_N)
    throw new XftError(`${op}: expected w [N, d] with 1 <= N <= ${ROUTER_LINEAR_MAX_N} outputs, got ${wt.describe()} (use groupedGemm for wide layers)`, 'XFT_SHAPE');
  return { x: xt, w: wt, T, N, d };
}

/** y [T, N] = x [T, d] @ w [N, d]^T (f32 or bf16, one dtype; fp32 sums); N <= ROUTER_LINEAR_MAX_N. */
export function routerLinear(x: Tensor, w: Tensor): Tensor {
  const op = 'routerLinear';
  const a = routerArgs(op, x, w);
  const device = sameDevice(op, { x, w });
  const y = Tensor.empty([a.T, a.N], { dtype: a.x.dtype, device });
  routerNative.routerLinearForward(a.x.storage, a.w.storage, y.storage, dtypeCode(a.x.dtype), a.T, a.N, a.d);
  return y;
}

export interface RouterLinearBackwardOptions {
  /** Compute dx (default true). */
  dx?: boolean;
  /** Compute dw (default true), or add it into this tensor [N, d] of w's dtype, or f32 with bf16 inputs. */
  dw?: boolean | Tensor;
}

/** dx [T, d] = dy @ w (overwrite); dw [N, d] = dy^T @ x (new, or added into options.dw). */
export function routerLinearBackward(x: Tensor, w: Tensor, dy: Tensor, options: RouterLinearBackwardOptions = {}): { dx: Tensor | null; dw: Tensor | null } {
  const op = 'routerLinearBackward';
  const a = routerArgs(op, x, w);
  expectTensor(op, 'dy', dy, { dtype: [a.x.dtype], shape: [a.T, a.N], shapeName: `[T, N] = [${a.T}, ${a.N}]` });
  const o = expectOptions<RouterLinearBackwardOptions>(op, options, 'an options object { dx?, dw? }');
  const wantDx = expectBool(op, 'options.dx', o.dx, true);
  if (o.dw !== undefined && typeof o.dw !== 'boolean' && !Tensor.isTensor(o.dw))
    throw invalidArgument(op, 'options.dw', 'a boolean or a Tensor [N, d] to accumulate into', o.dw, 'XFT_TYPE');
  const into = Tensor.isTensor(o.dw)
    ? expectTensor(op, 'options.dw', o.dw, { dtype: a.w.dtype === 'bf16' ? ['bf16', 'f32'] : [a.w.dtype], shape: a.w.shape, shapeName: `[N, d] = ${formatShape(a.w.shape)}` })
    : null;
  const device = sameDevice(op, { x, w, dy, dw: into });
  const dx = wantDx ? Tensor.empty([a.T, a.d], { dtype: a.x.dtype, device }) : null;
  const dw = into ?? (o.dw === false ? null : Tensor.empty(a.w.shape, { dtype: a.w.dtype, device }));
  routerNative.routerLinearBackward(a.x.storage, a.w.storage, dy.storage, dx ? dx.storage : null, dw ? dw.storage : null,
    dtypeCode(a.x.dtype), dtypeCode(dw ? dw.dtype : a.x.dtype), a.T, a.N, a.d, into !== null);
  return { dx, dw };
}

export interface RoutingProbeLossOptions {
  /** f32 [3] on h's device: (Σ softplus(−h), Σ σ(h), count) over the counted tokens is added into it */
  stats: Tensor;
  /** multiplies dh (default 1) */
  scale?: number;
  /** compute dh (default true) */
  dh?: boolean;
}

/**
 * UpIT's routing-vector loss on one layer's probe logits h = x rᵀ ([N, 1] or [N], f32 or bf16), with
 * targets i32 [N] (a token counts where targets >= 0): adds (Σ softplus(−h_t), Σ σ(h_t), count) over
 * the counted tokens into options.stats, and returns dh (h's shape and dtype) = −σ(−h)·scale on the
 * counted tokens, 0 elsewhere: the gradient of scale·Σ softplus(−h). Deterministic; no host sync.
 */
export function routingProbeLoss(h: Tensor, targets: Tensor, options: RoutingProbeLossOptions): Tensor | null {
  const op = 'routingProbeLoss';
  const ht = expectTensor(op, 'h', h, { dtype: FLOAT, shapeName: '[N, 1] or [N]' });
  if (!(ht.rank === 1 || (ht.rank === 2 && ht.shape[1] === 1))) throw new XftError(`${op}: expected h [N, 1] or [N], got ${ht.describe()}`, 'XFT_SHAPE');
  const N = ht.shape[0];
  expectTensor(op, 'targets', targets, { dtype: ['i32'], shape: [N], shapeName: `[N] = [${N}]` });
  const o = expectOptions<RoutingProbeLossOptions>(op, options, 'an options object { stats, scale?, dh? }');
  if (o.stats === undefined) throw invalidArgument(op, 'options.stats', 'an f32 tensor [3] to accumulate into', o.stats, 'XFT_TYPE');
  const stats = expectTensor(op, 'options.stats', o.stats, { dtype: ['f32'], shape: [3], shapeName: '[3]' });
  const scale = o.scale === undefined ? 1 : expectNumber(op, 'options.scale', o.scale);
  const wantDh = expectBool(op, 'options.dh', o.dh, true);
  const device = sameDevice(op, { h, targets, stats });
  const dh = wantDh ? Tensor.empty(ht.shape, { dtype: ht.dtype, device }) : null;
  routerNative.routingProbe(ht.storage, targets.storage, dh ? dh.storage : null, stats.storage, dtypeCode(ht.dtype), N, scale);
  return dh;
}
