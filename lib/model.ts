/**
 * A Llama-style decoder with explicit forward and backward per layer (llm.c style: activations
 * kept for backward as named fields, no general autograd), over the native ops.
 *
 *   x = embed(ids)                                              [B*T, d]
 *   per block: h = x + o_proj(attn(rope(q), rope(k), v))  with q, k, v = proj(rmsnorm(x))
 *              y = h + FFN(rmsnorm(h))
 *   logits = lm_head(rmsnorm(x))                                [B*T, V]
 *   loss = mean over response tokens of cross-entropy(logits, targets)   (targets < 0 masked)
 *
 * FFN is one of three kinds (one model, three FFNs):
 *   DenseFFN   W_down (silu(W_gate x) * (W_up x))
 *   MoeFFN     shared expert 0 + top-(K-1) routed experts: route -> permute -> grouped GEMMs ->
 *              SwiGLU -> grouped GEMM -> weighted unpermute (XFT.md section 1)
 *   MergedFFN  a DenseFFN whose weights are mergeExperts(frozen expert stacks, alpha, λ); only alpha
 *              is trained (XFT.md section 2)
 * Parameters are fp32 master tensors; gradients accumulate (+=) across micro-batches until zeroed.
 * Hugging Face names (model.layers.{i}.self_attn.q_proj.weight, ...) identify every parameter.
 */
import { XftError, invalidArgument } from './errors';
import { Tensor, type Device, disposeAll } from './tensor';
import { expectInt, expectNumber, expectOptions, expectRequiredOptions, expectBool, expectSeed, expectFunction } from './validate';
import { expectTensor } from './ops_check';
import * as xops from './ops';
import * as lops from './ops_layers';
import * as tops from './ops_train';
import * as rops from './ops_router';
import { type StepLedger } from './ledger';
import { type LlamaConfig, type MoeConfig, ropeScaling } from './config';

/** The floor of the router noise scale: softplus(x W_noise) + 0.01 (the reference's noise_epsilon). */
const NOISE_EPS = 0.01;

export interface BackwardOptions {
  /** gradients of the mean loss are multiplied by this (default 1) */
  scale?: number;
  /** the loss is the mean over this many counted tokens (default: the forward's) */
  tokens?: number;
  /** multiplies the balance loss gradient (default `scale`) */
  auxScale?: number;
  /**
   * Called as the backward finishes the gradients of a group of parameters (the trainable ones of
   * lm_head + final norm, then each block from the last, then the embedding), so that a data-parallel
   * run can start reducing them while the rest of the backward runs (lib/dist/ddp.ts).
   */
  onGradients?: (params: Param[]) => void;
  /**
   * the gradient of each row's loss (f32 [rows] on the model's device), used as it is instead of
   * scale / tokens: a captured CUDA graph's step reads it from a buffer written before each replay
   */
  dLoss?: Tensor;
}

/** A trainable (or frozen) tensor with its gradient. */
export class Param {
  grad: Tensor | null = null;
  /**
   * dtype of the gradient buffer: f32, or bf16 for a bf16 weight whose gradient the grouped GEMM
   * accumulates (linear and expert weights; not the embedding, norms or α, whose kernels add into f32).
   */
  gradDtype: 'f32' | 'bf16' = 'f32';
  constructor(readonly name: string, public value: Tensor, public trainable = true) {}

  /** The gradient buffer (gradDtype, zeros on first use). */
  gradBuffer(): Tensor {
    if (this.grad && this.grad.dtype !== this.gradDtype) {
      this.grad.dispose();
      this.grad = null;
    }
    if (!this.grad) this.grad = Tensor.zeros(this.value.shape, { dtype: this.gradDtype, device: this.value.device });
    return this.grad;
  }

  zeroGrad(): void {
    this.grad?.fill_(0);
  }

  dispose(): void {
    this.value.dispose();
    this.grad?.dispose();
    this.grad = null;
  }
}

/** What every layer needs at run time. */
export interface Context {
  device: Device;
  /** B and T of the current batch */
  batch: number;
  seqLen: number;
  training: boolean;
  /** per-step seed for router noise */
  seed: bigint;
  /** multiplies the auxiliary (balance) loss gradient, e.g. 1 / accumulation steps */
  auxScale: number;
  /**
   * activation recomputation (training only): each block keeps its input alone and its backward
   * runs the block's forward again first (same kernels, same router noise seed: identical gradients)
   */
  recompute?: boolean;
  /**
   * Called by each block's forward with the FFN input x = post_attention_layernorm(h) [N, d], before
   * the FFN runs (UpIT's routing-vector probe, lib/upit/route.ts). x is the block's: read it, never
   * dispose or modify it. Not called again by a recomputing backward.
   */
  ffnInput?: (block: Block, x: Tensor) => void;
  /** offsets [0, M] for dense GEMMs of M rows, cached per M */
  denseOffsets(M: number): Tensor;
}

// ---- linear layers through the grouped GEMM (one group) ----

function linear(ctx: Context, x: Tensor, w: Tensor): Tensor {
  return xops.groupedGemm(x, w.reshape([1, w.shape[0], w.shape[1]]), ctx.denseOffsets(x.shape[0]), { validate: false });
}

/**
 * Grouped GEMM backward whose dW is added into the parameter's f32 gradient when it is trainable
 * (bf16 weights too: the GEMM's fp32 accumulators go into the f32 gradient unrounded). dx: a new
 * tensor (true), none (false), or added into the given tensor in the GEMM's epilogue.
 */
function gemmBackward(x: Tensor, w: Param, w3: Tensor, offsets: Tensor, dy: Tensor, dx: boolean | Tensor = true): Tensor | null {
  if (dx === false && !w.trainable) return null;
  const dw = w.trainable ? w.gradBuffer().reshape(w3.shape) : false;
  return xops.groupedGemmBackward(x, w3, offsets, dy, { dx, dw, validate: false }).dx;
}

/** dx (or null, or added into a given tensor) and dW accumulated into the parameter's gradient when trainable. */
function linearBackward(ctx: Context, x: Tensor, w: Param, dy: Tensor, dx: boolean | Tensor = true): Tensor | null {
  return gemmBackward(x, w, as3d(w.value), ctx.denseOffsets(x.shape[0]), dy, dx);
}

/** a weight [n, k] as the one-expert stack [1, n, k] of the grouped GEMMs */
function as3d(w: Tensor): Tensor {
  return w.rank === 3 ? w : w.reshape([1, w.shape[0], w.shape[1]]);
}

/**
 * The gate/up half of a SwiGLU FFN's backward from dgu = [dg | du] (gateUpBackward: dx of both as one
 * GEMM, x read through `gather`): dW_gate and dW_up added into the trainable parameters' gradients.
 */
function gateUpBackward(x: Tensor, gate: Param, up: Param, offsets: Tensor, dgu: Tensor, gather?: { order: Tensor; K: number }): Tensor {
  const wg = as3d(gate.value), wu = as3d(up.value);
  const g = gather ? { gather: gather.order, gatherDiv: gather.K } : {};
  if (!gate.trainable && !up.trainable) return xops.gateUpBackward(x, wg, wu, offsets, dgu, { ...g, dw: false, validate: false }).dx!;
  if (gate.trainable && up.trainable && gate.gradDtype === up.gradDtype) {
    const into: [Tensor, Tensor] = [gate.gradBuffer().reshape(wg.shape), up.gradBuffer().reshape(wu.shape)];
    return xops.gateUpBackward(x, wg, wu, offsets, dgu, { ...g, dw: into, validate: false }).dx!;
  }
  // one of the two frozen (or their gradient dtypes differ): fresh dW, added where trainable
  const r = xops.gateUpBackward(x, wg, wu, offsets, dgu, { ...g, validate: false });
  for (const [p, dw] of [[gate, r.dwGate!], [up, r.dwUp!]] as const) {
    if (p.trainable) lops.axpby(1, dw.reshape(p.value.shape), 1, p.gradBuffer());
    dw.dispose();
  }
  return r.dx!;
}

/**
 * The router, mlp-router and noise linears (N = E-1 outputs, 7 for 8 experts): the small-N kernels
 * (lib/ops_router.ts) up to ROUTER_LINEAR_MAX_N outputs, the grouped GEMM beyond.
 */
function routerLinear(ctx: Context, x: Tensor, w: Tensor): Tensor {
  return w.shape[0] <= rops.ROUTER_LINEAR_MAX_N ? rops.routerLinear(x, w) : linear(ctx, x, w);
}

/** linearBackward of a router linear: dx (or null), dW accumulated into the parameter's gradient when trainable. */
function routerLinearBackward(ctx: Context, x: Tensor, w: Param, dy: Tensor, needDx = true): Tensor | null {
  if (w.value.shape[0] > rops.ROUTER_LINEAR_MAX_N) return linearBackward(ctx, x, w, dy, needDx);
  if (!needDx && !w.trainable) return null;
  return rops.routerLinearBackward(x, w.value, dy, { dx: needDx, dw: w.trainable ? w.gradBuffer() : false }).dx;
}

/** a += b, disposing b */
function accumulate(a: Tensor, b: Tensor): void {
  lops.add(a, b, { out: a });
  b.dispose();
}

// ---- FFNs ----

export interface FFN {
  readonly kind: 'dense' | 'moe' | 'merged';
  params(): Param[];
  /** y [N, d] from x [N, d] (x = rmsnorm(h)); keeps what backward needs */
  forward(ctx: Context, x: Tensor): Tensor;
  /** dx from dy; accumulates parameter gradients; frees what forward kept */
  backward(ctx: Context, dy: Tensor): Tensor;
  /** auxiliary loss of the last forward (the MoE balance loss), as a number, or 0 */
  auxLoss(): number;
  /** its training forward reads the step's seed (router noise): a captured step would replay one seed */
  readonly stepSeeded?: boolean;
  /** the same on the device (f32 [1], the caller's to dispose; auxLoss() is 0 after), or null when there is none: no synchronisation */
  takeAuxLoss?(): Tensor | null;
  /** drop what forward kept (after an eval forward) */
  release(): void;
  dispose(): void;
}

/**
 * SwiGLU FFN: W_down (silu(W_gate x) * (W_up x)). Weights [f, d], [f, d], [d, f].
 * Gate and up run as one GEMM with the SwiGLU in its epilogue (xops.gateUp); backward keeps x and
 * gu = [g | u] only and recomputes h = silu(g) u in the down projection's fused backward.
 */
export class DenseFFN implements FFN {
  readonly kind = 'dense';
  #saved: { x: Tensor; gu: Tensor } | null = null;
  constructor(readonly gate: Param, readonly up: Param, readonly down: Param) {}

  params(): Param[] {
    return [this.gate, this.up, this.down];
  }

  forward(ctx: Context, x: Tensor): Tensor {
    const { gu, h } = xops.gateUp(x, as3d(this.gate.value), as3d(this.up.value), ctx.denseOffsets(x.shape[0]), { validate: false });
    const y = linear(ctx, h, this.down.value);
    h.dispose();
    this.release();
    this.#saved = { x, gu };
    return y;
  }

  backward(ctx: Context, dy: Tensor): Tensor {
    const s = this.#saved;
    if (!s) throw new XftError('DenseFFN.backward: no forward activations (call forward in training first)', 'XFT_VALUE');
    const off = ctx.denseOffsets(s.x.shape[0]);
    const { dgu, h } = xops.swigluDownBackward(dy, as3d(this.down.value), off, s.gu, { validate: false });
    linearBackward(ctx, h, this.down, dy, false);
    h.dispose();
    const dx = gateUpBackward(s.x, this.gate, this.up, off, dgu);
    dgu.dispose();
    this.release();
    return dx;
  }

  /** dL/dW for gate, up, down when the weights themselves are not parameters (MergedFFN) */
  backwardWeights(ctx: Context, dy: Tensor): { dx: Tensor; dGate: Tensor; dUp: Tensor; dDown: Tensor } {
    const s = this.#saved;
    if (!s) throw new XftError('DenseFFN.backward: no forward activations', 'XFT_VALUE');
    const off = ctx.denseOffsets(s.x.shape[0]);
    const { dgu, h } = xops.swigluDownBackward(dy, as3d(this.down.value), off, s.gu, { validate: false });
    const down = xops.groupedGemmBackward(h, as3d(this.down.value), off, dy, { dx: false, validate: false });
    const gu = xops.gateUpBackward(s.x, as3d(this.gate.value), as3d(this.up.value), off, dgu, { validate: false });
    disposeAll(h, dgu);
    this.release();
    return { dx: gu.dx!, dGate: gu.dwGate!.reshape(this.gate.value.shape), dUp: gu.dwUp!.reshape(this.up.value.shape), dDown: down.dw!.reshape(this.down.value.shape) };
  }

  auxLoss(): number {
    return 0;
  }

  release(): void {
    if (this.#saved) {
      this.#saved.gu.dispose();
      this.#saved = null;
    }
  }

  dispose(): void {
    this.release();
    this.params().forEach((p) => p.dispose());
  }
}

/**
 * The upcycled MoE FFN of XFT: E experts (expert 0 shared), top-(K-1) routing with normalized
 * weights, router 'mlp' (Linear(d, E-1) -> tanh -> Linear(E-1, E-1)) or 'linear', noise in
 * training (noisy = clean + N(0,1) (softplus(x W_noise) + 0.01)), balance loss on importance and load.
 * Expert stacks: gate, up [E, f, d], down [E, d, f].
 */
export class MoeFFN implements FFN {
  readonly kind = 'moe';
  #saved: {
    x: Tensor; r1: Tensor | null; t: Tensor | null; clean: Tensor; z: Tensor | null; logits: Tensor;
    /** gu = [g | u] of the routed rows (gate and up in one GEMM reading x through routing.order: no permuted copy of x) */
    routing: xops.Routing; position: Tensor; gu: Tensor; ye: Tensor; seed: bigint;
    /** the load estimate the balance loss used (null: counts) */
    estimate: Tensor | null;
  } | null = null;
  #aux: Tensor | null = null;

  constructor(
    readonly moe: MoeConfig,
    readonly gate: Param,
    readonly up: Param,
    readonly down: Param,
    /** router: [W0 (E-1, d)] for 'linear', [W0 (E-1, d), W2 (E-1, E-1)] for 'mlp' */
    readonly router: Param[],
    /** W_noise (E-1, d): zeros at upcycling (routerInit 'uniform') or N(0, 0.02) ('reference'); null for a gate without noise */
    readonly noise: Param | null,
  ) {}

  get experts(): number {
    return this.moe.num_experts;
  }

  /** experts the router selects per token: K - 1 normal experts (shared expert), or K (no shared expert) */
  get selected(): number {
    return this.moe.shared_expert ? this.moe.num_selects - 1 : this.moe.num_selects;
  }

  /** The logits the last forward routed from ([tokens, normal experts]; noisy under router noise), until backward or release. */
  get routerLogits(): Tensor | null {
    return this.#saved?.logits ?? null;
  }

  params(): Param[] {
    return [this.gate, this.up, this.down, ...this.router, ...(this.noise ? [this.noise] : [])];
  }

  forward(ctx: Context, x: Tensor): Tensor {
    this.release();
    const K = this.moe.num_selects;
    let r1: Tensor | null = null, t: Tensor | null = null, clean: Tensor;
    if (this.router.length === 2) {
      r1 = routerLinear(ctx, x, this.router[0].value);
      t = lops.tanh(r1);
      clean = routerLinear(ctx, t, this.router[1].value);
    } else clean = routerLinear(ctx, x, this.router[0].value);
    let z: Tensor | null = null, logits = clean;
    const noisy = ctx.training && this.noise !== null && this.moe.gate_noise;
    if (noisy) {
      z = routerLinear(ctx, x, this.noise!.value);
      logits = lops.routerNoise(clean, z, { seed: ctx.seed, eps: NOISE_EPS });
    }
    const balance = this.moe.balance_loss_weight > 0 && ctx.training;
    const switchLoss = this.moe.balance_loss === 'switch';
    const routing = xops.routeShared(logits, { topK: K, normalize: this.moe.normalize_weights, shared: this.moe.shared_expert, probs: balance && switchLoss });
    const position = tops.invertPermutation(routing.order, { validate: false });
    const { gu, h } = xops.gateUp(x, this.gate.value, this.up.value, routing.offsets, { gather: routing.order, gatherDiv: K, validate: false });
    const ye = xops.groupedGemm(h, this.down.value, routing.offsets, { validate: false });
    h.dispose();
    const y = tops.unpermute(ye, position, routing.weights, { validate: false });
    // the balance loss: importance, and the load as counts, or under router noise its differentiable
    // noisy top-k estimate (as the reference when k < N); kept on the device, read by auxLoss()
    this.#aux?.dispose();
    let estimate: Tensor | null = null;
    if (balance && switchLoss) {
      // Switch: E·Σ f_i P_i, P over the full softmax of the logits routed from; f (counts) a constant
      this.#aux = tops.switchLoss(routing.probs!, routing.load, { tokens: routing.tokens, selected: this.selected, weight: this.moe.balance_loss_weight });
    } else if (balance) {
      const k = this.selected;
      if (z && k < clean.shape[1]) {
        const e = tops.loadEstimate(clean, z, logits, { k, eps: NOISE_EPS });
        e.prob.dispose();
        estimate = e.load;
      }
      this.#aux = tops.balanceLoss(routing.importance, estimate ?? routing.load, { weight: this.moe.balance_loss_weight });
    } else this.#aux = null;
    this.#saved = { x, r1, t, clean, z, logits, routing, position, gu, ye, seed: ctx.seed, estimate };
    return y;
  }

  backward(ctx: Context, dy: Tensor): Tensor {
    const s = this.#saved;
    if (!s) throw new XftError('MoeFFN.backward: no forward activations (call forward in training first)', 'XFT_VALUE');
    const K = this.moe.num_selects, off = s.routing.offsets;
    const { dy: dye, dg: dWeights } = tops.unpermuteBackward(dy, s.ye, s.position, s.routing.weights, { validate: false });
    const { dgu, h } = xops.swigluDownBackward(dye, this.down.value, off, s.gu, { validate: false });
    gemmBackward(h, this.down, this.down.value, off, dye, false);
    h.dispose();
    // dx of the routed rows (gate and up in one GEMM), summed per token by the permutation's backward
    const dxp = gateUpBackward(s.x, this.gate, this.up, off, dgu, { order: s.routing.order, K });
    const dx = tops.permuteBackward(dxp, s.position, K, { validate: false });
    disposeAll(dye, dgu, dxp);
    // router: balance loss through importance, routing weights through normalization and softmax
    let dImportance: Tensor | undefined, dProbs: Tensor | undefined, viaLoad: { dClean: Tensor; dz: Tensor } | null = null;
    if (this.moe.balance_loss_weight > 0 && s.routing.probs) {
      dProbs = tops.switchLossBackward(s.routing.load, { tokens: s.routing.tokens, selected: this.selected, weight: this.moe.balance_loss_weight, dLoss: ctx.auxScale });
    } else if (this.moe.balance_loss_weight > 0) {
      const b = tops.balanceLossBackward(s.routing.importance, s.estimate ?? s.routing.load, { weight: this.moe.balance_loss_weight, dLoss: ctx.auxScale });
      dImportance = b.dImportance;
      // counts have no gradient; the estimate's flows to the clean logits and the noise scale
      if (s.estimate) viaLoad = tops.loadEstimateBackward(s.clean, s.z!, s.logits, b.dLoad, { k: this.selected, eps: NOISE_EPS, seed: s.seed });
      b.dLoad.dispose();
    }
    const dLogits = xops.routeSharedBackward(s.logits, s.routing, dWeights, { ...(dImportance ? { dImportance } : {}), ...(dProbs ? { dProbs } : {}) });
    disposeAll(dWeights, dImportance, dProbs);
    let dClean = dLogits;
    if (s.z) {
      const n = lops.routerNoiseBackward(s.z, dLogits, { seed: s.seed });
      dClean = n.dClean;
      if (viaLoad) {
        accumulate(dClean, viaLoad.dClean);
        accumulate(n.dz, viaLoad.dz);
      }
      accumulate(dx, routerLinearBackward(ctx, s.x, this.noise!, n.dz)!);
      disposeAll(n.dz, dLogits);
    }
    if (this.router.length === 2) {
      const dt = routerLinearBackward(ctx, s.t!, this.router[1], dClean)!;
      const dr1 = lops.tanhBackward(s.t!, dt);
      accumulate(dx, routerLinearBackward(ctx, s.x, this.router[0], dr1)!);
      disposeAll(dt, dr1);
    } else accumulate(dx, routerLinearBackward(ctx, s.x, this.router[0], dClean)!);
    dClean.dispose();
    this.release();
    return dx;
  }

  auxLoss(): number {
    return this.#aux ? this.#aux.item() : 0;
  }

  get stepSeeded(): boolean {
    return this.noise !== null && this.moe.gate_noise;
  }

  takeAuxLoss(): Tensor | null {
    const aux = this.#aux;
    this.#aux = null;
    return aux;
  }

  release(): void {
    const s = this.#saved;
    if (!s) return;
    disposeAll(s.r1, s.t, s.z, s.position, s.gu, s.ye, s.estimate);
    if (s.logits !== s.clean) s.logits.dispose();
    s.clean.dispose();
    s.routing.dispose();
    this.#saved = null;
  }

  dispose(): void {
    this.release();
    this.#aux?.dispose();
    this.#aux = null;
    this.params().forEach((p) => p.dispose());
  }
}

/**
 * The learned merge of XFT.md section 2: a dense SwiGLU FFN whose weights are recomputed each step
 * as W̄ = Σ_e c_e W_e from the frozen expert stacks, c_0 = λ, c_i = (1 - λ) softmax(alpha)_i.
 * Only alpha [E-1] is trained (sharedRate null: c = softmax(alpha), alpha [E]).
 */
export class MergedFFN implements FFN {
  readonly kind = 'merged';
  #dense: DenseFFN | null = null;

  constructor(
    readonly gate: Param,
    readonly up: Param,
    readonly down: Param,
    readonly alpha: Param,
    readonly sharedRate: number | null,
    /** the MoE this merge came from (kept for its checkpoint's config) */
    readonly moe: MoeConfig | null = null,
  ) {}

  params(): Param[] {
    return [this.gate, this.up, this.down, this.alpha];
  }

  /** The merged weights [gate, up, down] for the current alpha. */
  merged(): Tensor[] {
    return xops.mergeExperts([this.gate.value, this.up.value, this.down.value], this.alpha.value, this.sharedRate);
  }

  forward(ctx: Context, x: Tensor): Tensor {
    this.release();
    const [g, u, d] = this.merged();
    this.#dense = new DenseFFN(new Param('gate', g, false), new Param('up', u, false), new Param('down', d, false));
    return this.#dense.forward(ctx, x);
  }

  backward(ctx: Context, dy: Tensor): Tensor {
    const dense = this.#dense;
    if (!dense) throw new XftError('MergedFFN.backward: no forward activations', 'XFT_VALUE');
    const { dx, dGate, dUp, dDown } = dense.backwardWeights(ctx, dy);
    if (this.alpha.trainable)
      xops.mergeExpertsBackward([this.gate.value, this.up.value, this.down.value], this.alpha.value, this.sharedRate, [dGate, dUp, dDown],
        { into: this.alpha.gradBuffer() });
    disposeAll(dGate, dUp, dDown);
    this.release();
    return dx;
  }

  auxLoss(): number {
    return 0;
  }

  release(): void {
    if (this.#dense) {
      this.#dense.dispose();
      this.#dense = null;
    }
  }

  dispose(): void {
    this.release();
    this.params().forEach((p) => p.dispose());
  }
}

// ---- the decoder block ----

export class Block {
  #saved: {
    x: Tensor; n1: Tensor; rstd1: Tensor; q: Tensor; k: Tensor; v: Tensor; att: Tensor; lse: Tensor;
    h: Tensor; n2: Tensor; rstd2: Tensor;
  } | null = null;
  /** recomputation: the block's input (owned by the model) and the forward's seed, replayed by backward */
  #input: { x: Tensor; seed: bigint } | null = null;

  constructor(
    readonly config: LlamaConfig,
    readonly inputNorm: Param,
    readonly q: Param,
    readonly k: Param,
    readonly v: Param,
    readonly o: Param,
    readonly postNorm: Param,
    public ffn: FFN,
  ) {}

  params(): Param[] {
    return [this.inputNorm, this.q, this.k, this.v, this.o, this.postNorm, ...this.ffn.params()];
  }

  /** RoPE of this config (theta, linear scaling) for the batch's sequence length; forward and backward share it. */
  #ropeOptions(ctx: Context) {
    const c = this.config;
    return { seqLen: ctx.seqLen, headDim: c.hidden_size / c.num_attention_heads, theta: c.rope_theta, scalingFactor: ropeScaling(c) };
  }

  forward(ctx: Context, x: Tensor): Tensor {
    const c = this.config;
    const eps = c.rms_norm_eps;
    const { y: n1, rstd: rstd1 } = lops.rmsnorm(x, this.inputNorm.value, { eps });
    // q, k, v in one GEMM launch (the checkpoint keeps q_proj, k_proj, v_proj)
    const { q, k, v } = xops.qkv(n1, this.q.value, this.k.value, this.v.value, ctx.denseOffsets(n1.shape[0]), { validate: false });
    const ropeOpts = this.#ropeOptions(ctx);
    lops.rope(q, { ...ropeOpts, out: q });
    lops.rope(k, { ...ropeOpts, out: k });
    const { out: att, lse } = tops.attention(q, k, v, { batch: ctx.batch, heads: c.num_attention_heads, kvHeads: c.num_key_value_heads });
    const o = linear(ctx, att, this.o.value);
    const h = lops.add(x, o);
    o.dispose();
    const { y: n2, rstd: rstd2 } = lops.rmsnorm(h, this.postNorm.value, { eps });
    ctx.ffnInput?.(this, n2);
    const f = this.ffn.forward(ctx, n2);
    const y = lops.add(h, f);
    f.dispose();
    this.#input = null;
    if (ctx.training && !ctx.recompute) this.#saved = { x, n1, rstd1, q, k, v, att, lse, h, n2, rstd2 };
    else {
      this.ffn.release();
      disposeAll(n1, rstd1, q, k, v, att, lse, h, n2, rstd2);
      if (ctx.training) this.#input = { x, seed: ctx.seed };
    }
    return y;
  }

  /** dx from dy (dy is consumed). Under recomputation, first the forward again from the kept input. */
  backward(ctx: Context, dy: Tensor): Tensor {
    if (this.#input) {
      const { x, seed } = this.#input;
      this.forward({ ...ctx, training: true, recompute: false, seed }, x).dispose();
      // the replay's balance loss is the first forward's, counted then: not kept past the step
      this.ffn.takeAuxLoss?.()?.dispose();
    }
    const s = this.#saved;
    if (!s) throw new XftError('Block.backward: no forward activations (call forward in training first)', 'XFT_VALUE');
    const c = this.config;
    // y = h + ffn(rmsnorm(h))
    const dn2 = this.ffn.backward(ctx, dy);
    const r2 = lops.rmsnormBackward(s.h, this.postNorm.value, s.rstd2, dn2, { dw: this.postNorm.trainable ? this.postNorm.gradBuffer() : false });
    const dh = r2.dx;
    accumulate(dh, dy);
    dn2.dispose();
    // h = x + o_proj(attn)
    const datt = linearBackward(ctx, s.att, this.o, dh)!;
    const g = tops.attentionBackward(s.q, s.k, s.v, s.att, s.lse, datt, { batch: ctx.batch, heads: c.num_attention_heads, kvHeads: c.num_key_value_heads });
    const ropeOpts = this.#ropeOptions(ctx);
    lops.ropeBackward(g.dq, { ...ropeOpts, out: g.dq });
    lops.ropeBackward(g.dk, { ...ropeOpts, out: g.dk });
    // dn1 = dq Wq + dk Wk + dv Wv: k's and v's added in their GEMMs' epilogues
    const dn1 = linearBackward(ctx, s.n1, this.q, g.dq)!;
    linearBackward(ctx, s.n1, this.k, g.dk, dn1);
    linearBackward(ctx, s.n1, this.v, g.dv, dn1);
    const r1 = lops.rmsnormBackward(s.x, this.inputNorm.value, s.rstd1, dn1, { dw: this.inputNorm.trainable ? this.inputNorm.gradBuffer() : false });
    accumulate(r1.dx, dh);
    disposeAll(datt, g, dn1, s.n1, s.rstd1, s.q, s.k, s.v, s.att, s.lse, s.h, s.n2, s.rstd2);
    this.#saved = null;
    return r1.dx;
  }

  release(): void {
    this.#input = null;
    if (this.#saved) {
      const s = this.#saved;
      disposeAll(s.n1, s.rstd1, s.q, s.k, s.v, s.att, s.lse, s.h, s.n2, s.rstd2);
      this.#saved = null;
    }
    this.ffn.release();
  }
}

// ---- the model ----

export interface ForwardResult {
  /** mean cross-entropy over the counted (response) tokens */
  loss: number;
  /** sum of the FFNs' auxiliary (balance) losses */
  auxLoss: number;
  /** counted tokens and how many the model predicted right (argmax) */
  tokens: number;
  correct: number;
}

export interface ForwardOptions {
  /** keep activations for backward() and add router noise */
  training: boolean;
  /** router noise seed (default 0) */
  seed?: bigint;
  /** activation recomputation (training only) */
  recompute?: boolean;
  /**
   * Called with each layer's FFN input x = post_attention_layernorm(h) [B*T, d] (layer index, x),
   * in layer order, during this forward only. x belongs to the model: read it, never dispose or
   * modify it. A probe's gradients do not flow back into x (UpIT's routing vectors, lib/upit/route.ts).
   */
  ffnInput?: (layer: number, x: Tensor) => void;
}

export class Model {
  #offsets = new Map<number, Tensor>();
  #saved: { xs: Tensor[]; nf: Tensor; rstdf: Tensor; logits: Tensor; targets: Tensor; ids: Tensor; tokens: number; batch: number; seqLen: number } | null = null;

  constructor(
    readonly config: LlamaConfig,
    readonly embed: Param,
    readonly blocks: Block[],
    readonly norm: Param,
    readonly lmHead: Param,
    readonly device: Device,
  ) {}

  /**
   * The dtype the model computes in: 'bf16' (mixed precision: bf16 weights and activations, fp32
   * accumulation and statistics, the optimizer keeps f32 master weights) or 'f32'.
   */
  get dtype(): 'f32' | 'bf16' {
    return this.embed.value.dtype as 'f32' | 'bf16';
  }

  /**
   * Casts the weights to `dtype` in place (gradients stay f32; the mixing coefficients α stay f32).
   * bf16 -> f32 is exact; f32 -> bf16 rounds to nearest even.
   */
  cast(dtype: 'f32' | 'bf16'): this {
    if (dtype !== 'f32' && dtype !== 'bf16') throw invalidArgument('Model.cast', 'dtype', "'f32' or 'bf16'", dtype, 'XFT_VALUE');
    expectModel('Model.cast', 'this', this);
    const alphas = new Set(this.blocks.flatMap((b) => (b.ffn instanceof MergedFFN ? [b.ffn.alpha] : [])));
    for (const p of this.params()) {
      if (p.value.dtype === dtype || alphas.has(p)) continue;
      const v = p.value.cast(dtype);
      p.value.dispose();
      p.value = v;
    }
    return this;
  }

  get kind(): 'dense' | 'moe' | 'merged' {
    return this.blocks[0]?.ffn.kind ?? 'dense';
  }

  params(): Param[] {
    return [this.embed, ...this.blocks.flatMap((b) => b.params()), this.norm, this.lmHead];
  }

  trainableParams(): Param[] {
    return this.params().filter((p) => p.trainable);
  }

  /** A context for a batch of B sequences of T tokens. */
  context(batch: number, seqLen: number, training: boolean, seed = 0n, auxScale = 1): Context {
    return {
      device: this.device, batch, seqLen, training, seed, auxScale,
      denseOffsets: (M: number) => {
        let t = this.#offsets.get(M);
        if (!t) {
          t = Tensor.from([0, M], [2], { dtype: 'i32', device: this.device });
          this.#offsets.set(M, t);
        }
        return t;
      },
    };
  }

  /** Logits [B*T, V] for ids i32 [B*T] (eval mode; nothing kept). */
  logits(ids: Tensor, batch: number, seqLen: number): Tensor {
    checkBatch('Model.logits', this, ids, null, batch, seqLen);
    const ctx = this.context(batch, seqLen, false);
    let x = lops.embedding(ids, this.embed.value);
    for (const b of this.blocks) {
      const y = b.forward(ctx, x);
      x.dispose();
      x = y;
    }
    const { y: nf, rstd } = lops.rmsnorm(x, this.norm.value, { eps: this.config.rms_norm_eps });
    const logits = linear(ctx, nf, this.lmHead.value);
    disposeAll(x, nf, rstd);
    return logits;
  }

  /**
   * Loss of a batch (ids, targets i32 [B*T], targets < 0 masked). With `training`, keeps the
   * activations for backward() and adds router noise; otherwise frees them at once. With
   * `recompute` (training only), each block keeps only its input and backward() recomputes the
   * block's activations (the same kernels with the same router noise: gradients are identical).
   */
  forward(ids: Tensor, targets: Tensor, batch: number, seqLen: number, options: ForwardOptions): ForwardResult {
    return this.#forward('Model.forward', ids, targets, batch, seqLen, options, null)!;
  }

  /**
   * forward() whose loss sums, token and accuracy counts and balance losses go into `ledger` on the
   * device (lib/ledger.ts; the balance losses divided by `auxDiv`, the accumulation steps) instead of
   * being read back: no host synchronisation. backward() then needs `tokens`.
   */
  forwardToLedger(ids: Tensor, targets: Tensor, batch: number, seqLen: number, options: ForwardOptions,
    ledger: StepLedger, auxDiv = 1): void {
    expectNumber('Model.forwardToLedger', 'auxDiv', auxDiv, 'a finite number > 0', (x) => x > 0);
    this.#forward('Model.forwardToLedger', ids, targets, batch, seqLen, options, { ledger, auxDiv });
  }

  #forward(op: string, ids: Tensor, targets: Tensor, batch: number, seqLen: number, options: ForwardOptions,
    into: { ledger: StepLedger; auxDiv: number } | null): ForwardResult | null {
    checkBatch(op, this, ids, targets, batch, seqLen);
    const o = expectRequiredOptions<ForwardOptions>(op, options, 'an options object { training, seed?, recompute?, ffnInput? }');
    const training = expectBool(op, 'options.training', o.training);
    const seed = o.seed === undefined ? 0n : expectSeed(op, o.seed, 'options.seed');
    const recompute = expectBool(op, 'options.recompute', o.recompute, false);
    const probe = expectFunction<NonNullable<ForwardOptions['ffnInput']>>(op, 'options.ffnInput', o.ffnInput);
    this.release();
    const ctx: Context = { ...this.context(batch, seqLen, training, seed), recompute };
    if (probe) ctx.ffnInput = (block, x) => probe(this.blocks.indexOf(block), x);
    const xs: Tensor[] = [];
    let x = lops.embedding(ids, this.embed.value);
    for (const b of this.blocks) {
      xs.push(x);
      x = b.forward(ctx, x);
    }
    const { y: nf, rstd: rstdf } = lops.rmsnorm(x, this.norm.value, { eps: this.config.rms_norm_eps });
    const logits = linear(ctx, nf, this.lmHead.value);
    const { losses, predictions } = tops.crossEntropy(logits, targets, { validate: false });
    if (into) {
      for (const b of this.blocks) {
        // the ledger keeps the sum: the layer's tensor is not kept past the step (a captured step allocates nothing that outlives it)
        const aux = b.ffn.takeAuxLoss?.();
        if (aux) into.ledger.addAux(aux), aux.dispose();
      }
      into.ledger.micro(losses, predictions, targets, into.auxDiv);
      disposeAll(losses, predictions);
      if (training) this.#saved = { xs: [...xs, x], nf, rstdf, logits, targets, ids, tokens: -1, batch, seqLen };
      else {
        disposeAll(xs.slice(1), x, nf, rstdf, logits);
        xs[0].dispose();
      }
      return null;
    }
    const l = losses.toArray(), p = predictions.toArray(), tg = targets.toArray();
    let sum = 0, tokens = 0, correct = 0;
    for (let i = 0; i < l.length; i++)
      if (tg[i] >= 0) {
        sum += l[i];
        tokens++;
        if (p[i] === tg[i]) correct++;
      }
    disposeAll(losses, predictions);
    const auxLoss = this.blocks.reduce((a, b) => a + b.ffn.auxLoss(), 0);
    if (training) this.#saved = { xs: [...xs, x], nf, rstdf, logits, targets, ids, tokens, batch, seqLen };
    else {
      disposeAll(xs.slice(1), x, nf, rstdf, logits);
      xs[0].dispose();
    }
    return { loss: tokens ? sum / tokens : 0, auxLoss, tokens, correct };
  }

  /**
   * Backward of the last training forward: accumulates gradients of the mean loss over `tokens`
   * counted tokens (default: the forward's), scaled by `scale`; the balance loss gradient is scaled by
   * `auxScale` (default `scale`; e.g. 1 / accumulation steps).
   */
  backward(options: BackwardOptions = {}): void {
    const op = 'Model.backward';
    const o = expectOptions<BackwardOptions>(op, options, 'an options object { scale?, tokens?, auxScale?, onGradients? }');
    if (o.scale !== undefined) expectNumber(op, 'options.scale', o.scale);
    if (o.tokens !== undefined) expectInt(op, 'options.tokens', o.tokens, 0);
    if (o.auxScale !== undefined) expectNumber(op, 'options.auxScale', o.auxScale);
    if (o.onGradients !== undefined && typeof o.onGradients !== 'function') throw invalidArgument(op, 'options.onGradients', 'a function', o.onGradients, 'XFT_TYPE');
    options = o;
    const ready = (params: Param[]) => o.onGradients?.(params.filter((p) => p.trainable));
    const s = this.#saved;
    if (!s) throw new XftError('Model.backward: call forward({ training: true }) first', 'XFT_VALUE');
    if (options.tokens === undefined && o.dLoss === undefined && s.tokens < 0)
      throw new XftError(`${op}: after forwardToLedger, pass options.tokens (the counted tokens of the step: the ledger keeps them on the device)`, 'XFT_VALUE');
    const tokens = options.tokens ?? s.tokens;
    const R = s.logits.shape[0];
    const given = o.dLoss === undefined ? null : expectTensor(op, 'options.dLoss', o.dLoss, { dtype: ['f32'], shape: [R], shapeName: `[rows] = [${R}]` });
    if (given && given.device !== this.device) throw new XftError(`${op}: options.dLoss is on ${given.device} but the model is on ${this.device}`, 'XFT_DEVICE');
    const dLoss = given ?? Tensor.full([R], tokens > 0 ? (options.scale ?? 1) / tokens : 0, { device: this.device });
    const dLogits = tops.crossEntropyBackward(s.logits, s.targets, dLoss, { inPlace: true, validate: false });
    if (!given) dLoss.dispose();
    const c2 = this.context(s.batch, s.seqLen, true, 0n, options.auxScale ?? options.scale ?? 1);
    const dnf = linearBackward(c2, s.nf, this.lmHead, dLogits)!;
    const xLast = s.xs[s.xs.length - 1];
    let dx = lops.rmsnormBackward(xLast, this.norm.value, s.rstdf, dnf, { dw: this.norm.trainable ? this.norm.gradBuffer() : false }).dx;
    disposeAll(dnf, s.nf, s.rstdf, s.logits, xLast);
    ready([this.lmHead, this.norm]);
    for (let i = this.blocks.length - 1; i >= 0; i--) {
      dx = this.blocks[i].backward(c2, dx);
      if (i > 0) s.xs[i].dispose();
      ready(this.blocks[i].params());
    }
    if (this.embed.trainable) lops.embeddingBackward(s.ids, dx, this.config.vocab_size, { into: this.embed.gradBuffer() });
    ready([this.embed]);
    disposeAll(dx, s.xs[0]);
    this.#saved = null;
  }

  /** Frees kept activations (after a training forward without backward). */
  release(): void {
    const s = this.#saved;
    if (s) {
      disposeAll(s.xs, s.nf, s.rstdf, s.logits);
      this.#saved = null;
    }
    this.blocks.forEach((b) => b.release());
  }

  zeroGrad(): void {
    this.params().forEach((p) => p.zeroGrad());
  }

  dispose(): void {
    this.release();
    this.params().forEach((p) => p.dispose());
    this.#offsets.forEach((t) => t.dispose());
    this.#offsets.clear();
  }
}

/** `m` as a Model whose parameters are all live (of `kind` when given), else XFT_TYPE / XFT_DISPOSED / XFT_VALUE. */
export function expectModel(op: string, name: string, m: unknown, kind?: Model['kind']): Model {
  if (!(m instanceof Model)) throw invalidArgument(op, name, kind ? `a ${kind} Model` : 'a Model', m, 'XFT_TYPE');
  if (m.params().some((p) => p.value.disposed)) throw new XftError(`${op}: ${name} (a ${m.kind} model) was used after dispose()`, 'XFT_DISPOSED');
  if (kind && m.kind !== kind) throw invalidArgument(op, name, `a ${kind} model`, `a ${m.kind} model`, 'XFT_VALUE');
  return m;
}

/** ids (and targets) i32 [B*T] on the model's device, B and T positive integers. */
function checkBatch(op: string, m: Model, ids: unknown, targets: unknown, batch: unknown, seqLen: unknown): void {
  expectModel(op, 'this', m);
  const B = expectInt(op, 'batch', batch, 1, 2147483647), T = expectInt(op, 'seqLen', seqLen, 1, 2147483647);
  const like = { dtype: ['i32'] as const, shape: [B * T], shapeName: `[B*T] = [${B * T}]` };
  const named: Record<string, Tensor> = { ids: expectTensor(op, 'ids', ids, { ...like, dtype: ['i32'] }) };
  if (targets !== null) named.targets = expectTensor(op, 'targets', targets, { ...like, dtype: ['i32'] });
  for (const [name, t] of Object.entries(named))
    if (t.device !== m.device) throw new XftError(`${op}: ${name} is on ${t.device} but the model is on ${m.device}`, 'XFT_DEVICE');
}
