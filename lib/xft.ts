/**
 * The XFT pipeline, as the paper reads: a dense Llama is `upcycle`d into a shared-expert MoE,
 * fine-tuned, made `mergeable` (per-layer mixing coefficients over the frozen experts), trained
 * again (only the coefficients), and compiled `toDense`: a model of the original architecture and size.
 * Parameter names follow Hugging Face Llama and the XFT reference (XFT.md).
 */
import { XftError } from './errors';
import { Tensor, type Device } from './tensor';
import { type BalanceLossKind, type LlamaConfig, type MoeConfig, type RouterKind, llamaConfig, moeConfig } from './config';
import { Block, DenseFFN, MergedFFN, Model, MoeFFN, Param, expectModel } from './model';
import { expectBool, expectInt, expectNumber, expectOneOf, expectOptions } from './validate';

export interface InitOptions {
  seed?: number;
  device?: Device;
  /** std of the normal initialisation of linear and embedding weights (HF initializer_range), default 0.02 */
  std?: number;
  /** 'f32' (default) or 'bf16' (mixed precision; see Model.dtype) */
  dtype?: 'f32' | 'bf16';
}

const layerName = (i: number) => `model.layers.${i}`;

/** A freshly initialised dense Llama (normal(0, std) weights, unit norms). */
export function createDense(config: LlamaConfig, options: InitOptions = {}): Model {
  const op = 'createDense';
  const c = llamaConfig(config as LlamaConfig & Record<string, unknown>, op);
  const o = expectOptions<InitOptions>(op, options, 'an options object { seed?, device?, std?, dtype? }');
  const device = o.device === undefined ? 'cpu' : expectOneOf(op, 'options.device', o.device, ['cpu', 'cuda'] as const, 'XFT_DEVICE');
  const std = o.std === undefined ? 0.02 : expectNumber(op, 'options.std', o.std, 'a finite number >= 0', (x) => x >= 0);
  const dtype = o.dtype === undefined ? undefined : expectOneOf(op, 'options.dtype', o.dtype, ['f32', 'bf16'] as const, 'XFT_DTYPE');
  let seed = (o.seed === undefined ? 0 : expectInt(op, 'options.seed', o.seed, 0, 2 ** 40)) * 1000;
  const normal = (name: string, shape: number[]) => new Param(name, Tensor.randn(shape, { seed: seed++, std, device }));
  const ones = (name: string, n: number) => new Param(name, Tensor.ones([n], { device }));
  const d = c.hidden_size, f = c.intermediate_size, hd = d / c.num_attention_heads, kv = c.num_key_value_heads * hd;
  const blocks = Array.from({ length: c.num_hidden_layers }, (_, i) => {
    const p = layerName(i);
    const ffn = new DenseFFN(normal(`${p}.mlp.gate_proj.weight`, [f, d]), normal(`${p}.mlp.up_proj.weight`, [f, d]), normal(`${p}.mlp.down_proj.weight`, [d, f]));
    return new Block(c, ones(`${p}.input_layernorm.weight`, d), normal(`${p}.self_attn.q_proj.weight`, [d, d]), normal(`${p}.self_attn.k_proj.weight`, [kv, d]),
      normal(`${p}.self_attn.v_proj.weight`, [kv, d]), normal(`${p}.self_attn.o_proj.weight`, [d, d]), ones(`${p}.post_attention_layernorm.weight`, d), ffn);
  });
  const m = new Model(c, normal('model.embed_tokens.weight', [c.vocab_size, d]), blocks, ones('model.norm.weight', d), normal('lm_head.weight', [c.vocab_size, d]), device);
  return dtype ? m.cast(dtype) : m;
}

/** A copy of a parameter (new name optional). */
function copyParam(p: Param, name = p.name, trainable = p.trainable): Param {
  return new Param(name, p.value.clone(), trainable);
}

/** E copies of w [a, b] stacked into [E, a, b]. */
function stackCopies(w: Tensor, E: number): Tensor {
  const s = Tensor.empty([E, ...w.shape], { dtype: w.dtype, device: w.device });
  for (let e = 0; e < E; e++) s.narrow(e, 1).copy_(w);
  return s;
}

/** Copies of the attention, norm, embedding and head parameters of `m`, with an FFN per block from `ffn`. */
function rebuild(m: Model, ffn: (b: Block, i: number) => Block['ffn'], options: { frozen?: boolean } = {}): Model {
  const cp = (p: Param) => copyParam(p, p.name, !options.frozen);
  const blocks = m.blocks.map((b, i) => new Block(m.config, cp(b.inputNorm), cp(b.q), cp(b.k), cp(b.v), cp(b.o), cp(b.postNorm), ffn(b, i)));
  return new Model(m.config, cp(m.embed), blocks, cp(m.norm), cp(m.lmHead), m.device);
}

export interface UpcycleOptions {
  /** E, the shared expert included (paper: 8) */
  experts?: number;
  /** K, the shared expert included (paper: 6) */
  topK?: number;
  /** router: 'mlp' (reference default) or 'linear' */
  router?: RouterKind;
  /** routing weight normalization (default true; false: the paper's ablation) */
  normalize?: boolean;
  /** a shared expert (default true; false: vanilla sparse upcycling) */
  sharedExpert?: boolean;
  /** router noise in training (default true, as the reference) */
  noise?: boolean;
  /** balance loss weight (default 0.01, as the reference; 0 disables it) */
  balanceLossWeight?: number;
  /** balance loss: 'cv2' (default, the XFT reference's) or 'switch' (E·Σ f_i P_i, as Switch / Mixtral / UpIT) */
  balanceLoss?: BalanceLossKind;
  /** seed of the router initialisation */
  seed?: number;
  /**
   * how router and noise weights are drawn (default 'uniform'): 'uniform' as torch.nn.Linear
   * initialises them (U(-1/sqrt(in), 1/sqrt(in))), noise weights zero; 'reference' as the reference's
   * upcycle gets them (from_pretrained draws the weights the dense checkpoint lacks from N(0, 0.02),
   * initializer_range), router and noise weights alike
   */
  routerInit?: RouterInitKind;
}

export type RouterInitKind = 'uniform' | 'reference';

/** std of the reference's initialisation of missing weights (LlamaMoEUpscalingConfig.initializer_range) */
export const REFERENCE_INIT_STD = 0.02;

/** The router initialisation of upcycle options (default 'uniform'). */
export function routerInitKind(options: UpcycleOptions, source: string): RouterInitKind {
  return options.routerInit === undefined ? 'uniform' : expectOneOf(source, 'options.routerInit', options.routerInit, ['uniform', 'reference'] as const);
}

/**
 * Sparse upcycling with a shared expert: every FFN becomes E experts, each a copy of the dense FFN
 * (expert 0 the shared one), plus a router; everything else is copied. Right after upcycling the MoE
 * computes the dense model's function, whatever the router says.
 */
export function upcycle(dense: Model, options: UpcycleOptions = {}): Model {
  expectModel('upcycle', 'dense', dense, 'dense');
  const o = expectOptions<UpcycleOptions>('upcycle', options);
  const moe = upcycleMoeConfig(o, 'upcycle');
  const E = moe.num_experts, N = moe.shared_expert ? E - 1 : E, d = dense.config.hidden_size;
  const init = routerInit(o.seed === undefined ? 0 : expectInt('upcycle', 'options.seed', o.seed, 0, 2 ** 40), dense.device, routerInitKind(o, 'upcycle'));
  const dtype = dense.dtype;
  return rebuild(dense, (b, i) => {
    const f = b.ffn as DenseFFN, p = `${layerName(i)}.mlp`;
    const stack = (w: Param, name: string) => new Param(`${p}.calculator.experts.weight_${name}`, stackCopies(w.value, E));
    const router = routerTensors(i, moe, d).map(([name, shape]) => new Param(name, init.next(shape, dtype)()));
    // a gate without noise has no W_noise (as the reference's gate modules)
    const noise = moe.gate_noise ? new Param(`${p}.gate.weight_noise.weight`, init.noise([N, d], dtype)()) : null;
    return new MoeFFN(moe, stack(f.gate, 'gate'), stack(f.up, 'up'), stack(f.down, 'down'), router, noise);
  });
}

/** The MoE config of an upcycle (defaults: the paper's 8 experts, top-6, mlp router, noise, balance 0.01). */
export function upcycleMoeConfig(options: UpcycleOptions, source: string): MoeConfig {
  options = expectOptions<UpcycleOptions>(source, options);
  for (const f of ['normalize', 'sharedExpert', 'noise'] as const) if (options[f] !== undefined) expectBool(source, `options.${f}`, options[f]);
  return moeConfig({
    num_experts: options.experts ?? 8, num_selects: options.topK ?? 6, gate_type: options.router ?? 'mlp',
    normalize_weights: options.normalize ?? true, shared_expert: options.sharedExpert ?? true, gate_noise: options.noise ?? true,
    balance_loss_weight: options.balanceLossWeight ?? 0.01,
    ...(options.balanceLoss !== undefined ? { balance_loss: options.balanceLoss } : {}),
  }, source);
}

/**
 * Router weights in creation order (layer by layer: W0, then W2 for the mlp router, then W_noise),
 * from seeds derived from `seed`. 'uniform': as torch.nn.Linear, U(-1/sqrt(in), 1/sqrt(in)), W_noise
 * zero (the reference gate's own reset). 'reference': N(0, 0.02) for every one, as the reference's
 * from_pretrained draws the weights the dense checkpoint lacks. A gate without noise has no W_noise.
 * The in-memory and the on-disk upcycle draw the same numbers.
 */
export function routerInit(seed: number, device: Device = 'cpu', kind: RouterInitKind = 'uniform'): {
  next(shape: number[], dtype?: 'f32' | 'bf16'): () => Tensor;
  noise(shape: number[], dtype?: 'f32' | 'bf16'): () => Tensor;
} {
  let s = seed * 1000 + 777;
  const normal = (shape: number[], dtype: 'f32' | 'bf16') => {
    const mine = s++;
    return () => Tensor.randn(shape, { seed: mine, std: REFERENCE_INIT_STD, device, dtype });
  };
  return {
    next(shape: number[], dtype: 'f32' | 'bf16' = 'f32') {
      if (kind === 'reference') return normal(shape, dtype);
      const mine = s++, bound = 1 / Math.sqrt(shape[1]);
      return () => Tensor.uniform(shape, { seed: mine, low: -bound, high: bound, device, dtype });
    },
    noise(shape: number[], dtype: 'f32' | 'bf16' = 'f32') {
      if (kind === 'reference') return normal(shape, dtype);
      return () => Tensor.zeros(shape, { device, dtype });
    },
  };
}

/** The router tensors of layer i, names (the reference's) and shapes: [W0 (N, d), W2 (N, N)] for 'mlp', [W0] for 'linear'. */
export function routerTensors(i: number, moe: MoeConfig, d: number): [string, number[]][] {
  const N = moe.shared_expert ? moe.num_experts - 1 : moe.num_experts, p = `${layerName(i)}.mlp.gate`;
  return moe.gate_type === 'mlp' ? [[`${p}.gate_network.0.weight`, [N, d]], [`${p}.gate_network.2.weight`, [N, N]]] : [[`${p}.gate_network.weight`, [N, d]]];
}

export interface MergeableOptions {
  /** λ, the fixed weight of the shared expert (paper: 0.75); null learns it with the others (ablation) */
  sharedRate?: number | null;
}

/**
 * The merge-learning model: each MoE FFN becomes a dense FFN whose weights are Σ_e c_e W_e over the
 * (frozen) fine-tuned experts, with c_0 = λ and c_i = (1 - λ) softmax(alpha)_i, alpha initialised to
 * zeros. Only alpha is trainable.
 */
export function mergeable(moe: Model, options: MergeableOptions = {}): Model {
  expectModel('mergeable', 'moe', moe, 'moe');
  const o = expectOptions<MergeableOptions>('mergeable', options, 'an options object { sharedRate? }');
  const rate = o.sharedRate === undefined ? 0.75 : o.sharedRate;
  if (rate !== null) expectNumber('mergeable', 'options.sharedRate', rate, 'a number in [0, 1], or null', (x) => x >= 0 && x <= 1);
  return rebuild(moe, (b, i) => {
    const f = b.ffn as MoeFFN;
    if (!f.moe.shared_expert && rate !== null)
      throw new XftError('mergeable: this MoE has no shared expert; pass sharedRate: null', 'XFT_VALUE');
    const E = f.experts;
    const alpha = new Param(`${layerName(i)}.mlp.average_weights`, Tensor.zeros([rate === null ? E : E - 1], { device: moe.device }));
    return new MergedFFN(copyParam(f.gate, f.gate.name, false), copyParam(f.up, f.up.name, false), copyParam(f.down, f.down.name, false), alpha, rate, f.moe);
  }, { frozen: true });
}

/** Compiles a merge model to a dense model of the original architecture: W̄ computed once per layer. */
export function toDense(merged: Model): Model {
  expectModel('toDense', 'merged', merged, 'merged');
  const dense = rebuild(merged, (b, i) => {
    const [g, u, d] = (b.ffn as MergedFFN).merged();
    const p = `${layerName(i)}.mlp`;
    return new DenseFFN(new Param(`${p}.gate_proj.weight`, g), new Param(`${p}.up_proj.weight`, u), new Param(`${p}.down_proj.weight`, d));
  });
  return dense;
}

/** An independent copy of a dense model (all parameters trainable). */
export function copyDense(m: Model): Model {
  expectModel('copyDense', 'm', m, 'dense');
  return rebuild(m, (b) => {
    const f = b.ffn as DenseFFN;
    return new DenseFFN(copyParam(f.gate, f.gate.name, true), copyParam(f.up, f.up.name, true), copyParam(f.down, f.down.name, true));
  });
}

/** Number of parameters (all, or only the trainable ones). */
export function countParameters(m: Model, options: { trainableOnly?: boolean } = {}): number {
  expectModel('countParameters', 'm', m);
  const o = expectOptions<{ trainableOnly?: boolean }>('countParameters', options, 'an options object { trainableOnly? }');
  const trainableOnly = expectBool('countParameters', 'options.trainableOnly', o.trainableOnly, false);
  return m.params().filter((p) => !trainableOnly || p.trainable).reduce((a, p) => a + p.value.numel, 0);
}

