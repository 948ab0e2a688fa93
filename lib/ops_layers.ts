/**
 * Typed wrappers of the layer op families (see cuda/xft_cuda.h, section [layers]): the supporting
 * kernels of a Llama layer. Each wrapper checks shapes, dtypes, devices and values (XftErrors that
 * name the argument and what was expected), allocates outputs and dispatches to the CPU or CUDA twin.
 * Kernels: cuda/{embedding,rmsnorm,rope,swiglu,elementwise}.cu; CPU twins: binding/cpu/*.cc.
 *
 * Conventions: activations are f32 or bf16 (fp32 arithmetic); parameter gradients are f32 and can be
 * accumulated into an existing tensor (`into` / `dw: tensor`); activation gradients are new tensors
 * unless an `out` is given.
 */
import { XftError, invalidArgument } from './errors';
import { native, type NativeStorage } from './native';
import { FLOAT, expectTensor, sameDevice } from './ops_check';
import { expectInt } from './validate';
import { DType, Tensor, dtypeCode, formatShape, seedOf } from './tensor';
import { expectArray, expectFinite, expectOptions, expectPositive } from './validate';

/** Largest hidden size rmsnorm takes (cuda/rmsnorm.cu kMaxD: a thread keeps its columns in registers). */
export const MAX_RMSNORM_DIM = 8192;
/** Largest head dimension rope takes (cuda/rope.cu: the frequencies are a 1 KiB kernel parameter). */
export const MAX_ROPE_HEAD_DIM = 512;

type S = NativeStorage;
type Seed = number | bigint;

/** The native functions of binding/layer_ops.cc (dtype codes: 0 f32, 1 bf16, 2 i32). */
export interface LayerNative {
  embeddingForward(ids: S, table: S, out: S, dtype: number, R: number, V: number, d: number): void;
  embeddingBackward(ids: S, dOut: S, dTable: S, dtype: number, R: number, V: number, d: number, accumulate: boolean): void;
  rmsnormForward(x: S, w: S, y: S, rstd: S, dtype: number, wDtype: number, R: number, d: number, eps: number): void;
  rmsnormBackward(x: S, w: S, rstd: S, dy: S, dx: S, dw: S | null, dtype: number, wDtype: number, R: number, d: number,
    accumulate: boolean): void;
  ropeForward(x: S, out: S, dtype: number, rows: number, T: number, H: number, hd: number, theta: number, scaling: number): void;
  ropeBackward(dOut: S, dx: S, dtype: number, rows: number, T: number, H: number, hd: number, theta: number, scaling: number): void;
  swigluForward(g: S, u: S, h: S, dtype: number, n: number): void;
  swigluBackward(g: S, u: S, dh: S, dg: S, du: S, dtype: number, n: number): void;
  add(a: S, b: S, y: S, dtype: number, n: number): void;
  axpby(x: S, xDtype: number, y: S, yDtype: number, n: number, alpha: number, beta: number): void;
  tanhForward(x: S, y: S, dtype: number, n: number): void;
  tanhBackward(y: S, dy: S, dx: S, dtype: number, n: number): void;
  routerNoiseForward(clean: S, z: S, noisy: S, dtype: number, n: number, seed: Seed, eps: number): void;
  routerNoiseBackward(z: S, dNoisy: S, dClean: S | null, dz: S, dtype: number, n: number, seed: Seed): void;
  sumSquares(tensors: S[], numel: number[], dtypes: number[], out: S): void;
}

const layerNative = native as unknown as LayerNative;

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

/** `t` has exactly `shape` (and dtype in `dtype`), else XFT_SHAPE/XFT_DTYPE naming `name` and `like`. */
function expectLike(op: string, name: string, t: unknown, shape: readonly number[], dtype: readonly DType[], like: string): Tensor {
  const v = expectTensor(op, name, t, { dtype, shapeName: formatShape(shape) });
  if (!sameShape(v.shape, shape))
    throw new XftError(`${op}: expected ${name} of shape ${formatShape(shape)} (the shape of ${like}), got ${v.describe()}`, 'XFT_SHAPE');
  return v;
}

/** An output: a given tensor (checked) or a new one. */
function output(op: string, name: string, given: unknown, shape: readonly number[], dtype: DType, device: 'cpu' | 'cuda', like: string): Tensor {
  if (given === undefined) return Tensor.empty(shape, { dtype, device });
  const t = expectLike(op, name, given, shape, [dtype], like);
  if (t.device !== device) throw new XftError(`${op}: ${name} is on ${t.device} but ${like} is on ${device}`, 'XFT_DEVICE');
  return t;
}

// ---------------------------------------------------------------------------------------------
// 1. Token embedding

function checkIds(op: string, ids: Tensor, V: number): void {
  // on CUDA, out-of-range ids give zero rows (forward), are skipped (backward) and throw XFT_INDEX at the next sync
  if (ids.device !== 'cpu') return;
  const v = ids.toArray();
  for (let i = 0; i < v.length; i++)
    if (v[i] < 0 || v[i] >= V)
      throw new XftError(`${op}: ids[${i}] = ${v[i]} is out of range for a table of ${V} rows (expected 0 <= id < ${V})`, 'XFT_VALUE');
}

/**
 * out[..., :] = table[ids[...], :]. ids i32 of any shape (e.g. [B, T]), table f32 or bf16 [V, d];
 * out [...ids.shape, d] in the table's dtype. Ids of CPU tensors are checked (XFT_VALUE); on CUDA an
 * out-of-range id gives a zero row and XFT_INDEX at the next synchronisation (e.g. toArray).
 */
export function embedding(ids: Tensor, table: Tensor): Tensor {
  const op = 'embedding';
  expectTensor(op, 'ids', ids, { dtype: ['i32'], shapeName: '[...] (token ids)' });
  expectTensor(op, 'table', table, { dtype: FLOAT, rank: 2, shapeName: '[V, d]' });
  const [V, d] = table.shape;
  if (V < 1 || d < 1) throw new XftError(`${op}: expected a non-empty table [V, d], got ${table.describe()}`, 'XFT_SHAPE');
  const device = sameDevice(op, { ids, table });
  checkIds(op, ids, V);
  const out = Tensor.empty([...ids.shape, d], { dtype: table.dtype, device });
  layerNative.embeddingForward(ids.storage, table.storage, out.storage, dtypeCode(table.dtype), ids.numel, V, d);
  return out;
}

/**
 * dTable f32 [V, d]: row v is the sum of the rows of dOut [...ids.shape, d] (f32 or bf16) whose id
 * is v, added in token order (deterministic on CUDA too). With options.into (f32 [V, d]) the sum is
 * added into it and it is returned.
 */
export function embeddingBackward(ids: Tensor, dOut: Tensor, vocabSize: number, options: { into?: Tensor } = {}): Tensor {
  const op = 'embeddingBackward';
  expectTensor(op, 'ids', ids, { dtype: ['i32'], shapeName: '[...] (token ids)' });
  const V = expectInt(op, 'vocabSize', vocabSize, 1, 2147483647);
  expectTensor(op, 'dOut', dOut, { dtype: FLOAT, shapeName: '[...ids.shape, d]' });
  const d = dOut.shape[dOut.rank - 1];
  if (dOut.rank !== ids.rank + 1 || !sameShape(dOut.shape.slice(0, -1), ids.shape) || !(d >= 1))
    throw new XftError(`${op}: expected dOut of shape [...ids.shape, d] = [${[...ids.shape, 'd'].join(', ')}] ` +
      `with d >= 1, got ${dOut.describe()} for ids ${ids.describe()}`, 'XFT_SHAPE');
  const o = expectOptions(op, options, 'an object { into?: Tensor }');
  const into = o.into === undefined ? null : expectLike(op, 'options.into', o.into, [V, d], ['f32'], `the table [vocabSize, d] = [${V}, ${d}]`);
  const device = sameDevice(op, { ids, dOut, into });
  checkIds(op, ids, V);
  const dTable = into ?? Tensor.empty([V, d], { dtype: 'f32', device });
  layerNative.embeddingBackward(ids.storage, dOut.storage, dTable.storage, dtypeCode(dOut.dtype), ids.numel, V, d, into !== null);
  return dTable;
}

// ---------------------------------------------------------------------------------------------
// 2. RMSNorm

export interface RmsnormOptions {
  /** Added to the mean square before the square root (Llama / DeepSeek-Coder: 1e-6, the default). */
  eps?: number;
}

/** The output of rmsnorm: y, and the per-row 1/rms that the backward needs. */
export interface RmsnormResult {
  /** [..., d], x's dtype */
  y: Tensor;
  /** f32 [R], R = x.numel / d: 1 / sqrt(mean(x^2) + eps) per row */
  rstd: Tensor;
}

function rmsnormArgs(op: string, x: unknown, w: unknown) {
  const xt = expectTensor(op, 'x', x, { dtype: FLOAT, shapeName: '[..., d]' });
  if (xt.rank < 1) throw new XftError(`${op}: expected x to be [..., d], got ${xt.describe()}`, 'XFT_SHAPE');
  const d = xt.shape[xt.rank - 1];
  if (d < 1 || d > MAX_RMSNORM_DIM)
    throw new XftError(`${op}: expected x [..., d] with 1 <= d <= ${MAX_RMSNORM_DIM}, got ${xt.describe()}`, 'XFT_SHAPE');
  const wt = expectTensor(op, 'w', w, { dtype: FLOAT, shape: [d], shapeName: `[d] = [${d}]` });
  return { x: xt, w: wt, d, R: xt.numel / d };
}

/** y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps) over the last dimension (HF LlamaRMSNorm, fp32 math).
 * x f32 or bf16 [..., d]; w f32 or bf16 [d] (its own dtype). */
export function rmsnorm(x: Tensor, w: Tensor, options: RmsnormOptions = {}): RmsnormResult {
  const op = 'rmsnorm';
  const a = rmsnormArgs(op, x, w);
  const o = expectOptions(op, options, 'an object { eps?: number }');
  const eps = o.eps === undefined ? 1e-6 : expectFinite(op, 'eps', o.eps);
  if (eps < 0) throw invalidArgument(op, 'eps', 'a non-negative number', eps);
  const device = sameDevice(op, { x, w });
  const y = Tensor.empty(x.shape, { dtype: x.dtype, device });
  const rstd = Tensor.empty([a.R], { dtype: 'f32', device });
  layerNative.rmsnormForward(x.storage, w.storage, y.storage, rstd.storage, dtypeCode(x.dtype), dtypeCode(w.dtype), a.R, a.d, eps);
  return { y, rstd };
}

export interface RmsnormBackwardOptions {
  /** Compute dw (default true), or add it into this f32 [d] tensor (gradient accumulation). */
  dw?: boolean | Tensor;
}

/** dx [..., d] (x's dtype) and dw f32 [d] from dy, given x, w and the rstd saved by rmsnorm. */
export function rmsnormBackward(x: Tensor, w: Tensor, rstd: Tensor, dy: Tensor, options: RmsnormBackwardOptions = {}): { dx: Tensor; dw: Tensor | null } {
  const op = 'rmsnormBackward';
  const a = rmsnormArgs(op, x, w);
  expectTensor(op, 'rstd', rstd, { dtype: ['f32'], shape: [a.R], shapeName: `[R] = [${a.R}] (from rmsnorm)` });
  expectLike(op, 'dy', dy, x.shape, [x.dtype], 'x');
  const o = expectOptions(op, options, 'an object { dw?: boolean | Tensor }');
  if (o.dw !== undefined && typeof o.dw !== 'boolean' && !Tensor.isTensor(o.dw))
    throw invalidArgument(op, 'options.dw', 'a boolean or an f32 tensor [d]', o.dw, 'XFT_TYPE');
  const into = Tensor.isTensor(o.dw) ? expectTensor(op, 'options.dw', o.dw, { dtype: ['f32'], shape: [a.d], shapeName: `[d] = [${a.d}]` }) : null;
  const device = sameDevice(op, { x, w, rstd, dy, dw: into });
  const dx = Tensor.empty(x.shape, { dtype: x.dtype, device });
  const dw = into ?? (o.dw === false ? null : Tensor.empty([a.d], { dtype: 'f32', device }));
  layerNative.rmsnormBackward(x.storage, w.storage, rstd.storage, dy.storage, dx.storage, dw ? dw.storage : null,
    dtypeCode(x.dtype), dtypeCode(w.dtype), a.R, a.d, into !== null);
  return { dx, dw };
}

// ---------------------------------------------------------------------------------------------
// 3. Rotary position embedding

export interface RopeOptions {
  /** T: tokens per sequence; row r of x is at position r % T. Taken from x.shape[1] when x is [B, T, H * hd]. */
  seqLen?: number;
  /** hd: the head dimension (even, <= 512). */
  headDim: number;
  /** Base of the frequencies (Llama 10000, the default; DeepSeek-Coder 100000). */
  theta?: number;
  /** Linear RoPE scaling (HF rope_scaling { type: 'linear', factor }): positions are divided by it. Default 1. */
  scalingFactor?: number;
  /** Write here (x's shape and dtype); may be the input itself (in place). Default: a new tensor. */
  out?: Tensor;
}

function ropeArgs(op: string, inputName: string, x: unknown, options: RopeOptions) {
  const xt = expectTensor(op, inputName, x, { dtype: FLOAT, shapeName: '[B*T, H*hd] or [B, T, H*hd]' });
  if (xt.rank !== 2 && xt.rank !== 3)
    throw new XftError(`${op}: expected ${inputName} to be [B*T, H*hd] or [B, T, H*hd], got ${xt.describe()}`, 'XFT_SHAPE');
  if (options === null || typeof options !== 'object') throw invalidArgument(op, 'options', 'an object with headDim', options, 'XFT_TYPE');
  const hd = expectInt(op, 'headDim', options.headDim, 2, MAX_ROPE_HEAD_DIM);
  if (hd % 2 !== 0) throw invalidArgument(op, 'headDim', 'an even integer', hd);
  const width = xt.shape[xt.rank - 1];
  if (width % hd !== 0 || width === 0)
    throw new XftError(`${op}: the last dimension of ${inputName} (${xt.describe()}) must be heads * headDim with headDim = ${hd}`, 'XFT_SHAPE');
  const rows = xt.numel / width;
  let T: number;
  if (xt.rank === 3) {
    T = xt.shape[1];
    if (options.seqLen !== undefined && options.seqLen !== T)
      throw invalidArgument(op, 'seqLen', `${T} (dimension 1 of ${inputName} ${xt.describe()}) or nothing`, options.seqLen);
    if (T === 0) T = 1;
  } else {
    if (options.seqLen === undefined) throw invalidArgument(op, 'seqLen', `the sequence length T (${inputName} is [B*T, H*hd])`, undefined, 'XFT_TYPE');
    T = expectInt(op, 'seqLen', options.seqLen, 1, 2147483647);
    if (rows % T !== 0) throw new XftError(`${op}: ${inputName} has ${rows} rows, not a multiple of seqLen = ${T}`, 'XFT_SHAPE');
  }
  const theta = options.theta === undefined ? 10000 : expectPositive(op, 'theta', options.theta);
  const scaling = options.scalingFactor === undefined ? 1 : expectPositive(op, 'scalingFactor', options.scalingFactor);
  const out = output(op, 'options.out', options.out, xt.shape, xt.dtype, xt.device, inputName);
  return { x: xt, rows, T, H: width / hd, hd, theta, scaling, out };
}

/**
 * Rotary position embedding, Hugging Face Llama convention (rotate_half): in each head, dims i and
 * i + hd/2 rotate by angle (pos / scalingFactor) * theta^(-2i/hd), pos = row % seqLen.
 * x f32 or bf16 [B*T, H*hd] (or [B, T, H*hd]), heads contiguous in a row. In place with { out: x }.
 */
export function rope(x: Tensor, options: RopeOptions): Tensor {
  const op = 'rope';
  const a = ropeArgs(op, 'x', x, options);
  layerNative.ropeForward(a.x.storage, a.out.storage, dtypeCode(a.x.dtype), a.rows, a.T, a.H, a.hd, a.theta, a.scaling);
  return a.out;
}

/** dx = R^T dOut: the inverse rotation (same options as rope; in place with { out: dOut }). */
export function ropeBackward(dOut: Tensor, options: RopeOptions): Tensor {
  const op = 'ropeBackward';
  const a = ropeArgs(op, 'dOut', dOut, options);
  layerNative.ropeBackward(a.x.storage, a.out.storage, dtypeCode(a.x.dtype), a.rows, a.T, a.H, a.hd, a.theta, a.scaling);
  return a.out;
}

// ---------------------------------------------------------------------------------------------
// 4. SwiGLU

/** h = silu(g) * u elementwise (the Llama FFN activation). g, u: one dtype (f32 or bf16) and one shape. */
export function swiglu(g: Tensor, u: Tensor): Tensor {
  const op = 'swiglu';
  expectTensor(op, 'g', g, { dtype: FLOAT, shapeName: '[R, f]' });
  expectLike(op, 'u', u, g.shape, [g.dtype], 'g');
  const device = sameDevice(op, { g, u });
  const h = Tensor.empty(g.shape, { dtype: g.dtype, device });
  layerNative.swigluForward(g.storage, u.storage, h.storage, dtypeCode(g.dtype), g.numel);
  return h;
}

/** dg = dh * u * s * (1 + g (1 - s)), du = dh * silu(g), s = sigmoid(g). */
export function swigluBackward(g: Tensor, u: Tensor, dh: Tensor): { dg: Tensor; du: Tensor } {
  const op = 'swigluBackward';
  expectTensor(op, 'g', g, { dtype: FLOAT, shapeName: '[R, f]' });
  expectLike(op, 'u', u, g.shape, [g.dtype], 'g');
  expectLike(op, 'dh', dh, g.shape, [g.dtype], 'g');
  const device = sameDevice(op, { g, u, dh });
  const dg = Tensor.empty(g.shape, { dtype: g.dtype, device }), du = Tensor.empty(g.shape, { dtype: g.dtype, device });
  layerNative.swigluBackward(g.storage, u.storage, dh.storage, dg.storage, du.storage, dtypeCode(g.dtype), g.numel);
  return { dg, du };
}

// ---------------------------------------------------------------------------------------------
// 5. Elementwise ops and the sum of squares

/** y = a + b (one dtype, one shape, e.g. a residual). With options.out (may be a or b) writes there. */
export function add(a: Tensor, b: Tensor, options: { out?: Tensor } = {}): Tensor {
  const op = 'add';
  expectTensor(op, 'a', a, { dtype: FLOAT });
  expectLike(op, 'b', b, a.shape, [a.dtype], 'a');
  const device = sameDevice(op, { a, b });
  const o = expectOptions(op, options, 'an object { out?: Tensor }');
  const y = output(op, 'options.out', o.out, a.shape, a.dtype, device, 'a');
  layerNative.add(a.storage, b.storage, y.storage, dtypeCode(a.dtype), a.numel);
  return y;
}

/**
 * y = alpha * x + beta * y in place, and returns y. x and y have one shape and may differ in dtype
 * (e.g. adding a bf16 gradient into an f32 accumulator: axpby(1, g, 1, acc); scaling: axpby(s, y, 0, y)).
 * With beta = 0 the old values of y are not read (NaN in y does not propagate).
 */
export function axpby(alpha: number, x: Tensor, beta: number, y: Tensor): Tensor {
  const op = 'axpby';
  expectFinite(op, 'alpha', alpha);
  expectFinite(op, 'beta', beta);
  expectTensor(op, 'x', x, { dtype: FLOAT });
  expectLike(op, 'y', y, x.shape, FLOAT, 'x');
  sameDevice(op, { x, y });
  layerNative.axpby(x.storage, dtypeCode(x.dtype), y.storage, dtypeCode(y.dtype), x.numel, alpha, beta);
  return y;
}

/** y = tanh(x) elementwise (the router MLP). */
export function tanh(x: Tensor): Tensor {
  const op = 'tanh';
  expectTensor(op, 'x', x, { dtype: FLOAT });
  const y = Tensor.empty(x.shape, { dtype: x.dtype, device: x.device });
  layerNative.tanhForward(x.storage, y.storage, dtypeCode(x.dtype), x.numel);
  return y;
}

/** dx = dy * (1 - y^2), from the output y of tanh. */
export function tanhBackward(y: Tensor, dy: Tensor): Tensor {
  const op = 'tanhBackward';
  expectTensor(op, 'y', y, { dtype: FLOAT });
  expectLike(op, 'dy', dy, y.shape, [y.dtype], 'y');
  const device = sameDevice(op, { y, dy });
  const dx = Tensor.empty(y.shape, { dtype: y.dtype, device });
  layerNative.tanhBackward(y.storage, dy.storage, dx.storage, dtypeCode(y.dtype), y.numel);
  return dx;
}

export interface RouterNoiseOptions {
  /** Seed of the noise: element i gets n_i = xft_normal(seed, i); pass the same seed to the backward. */
  seed: number | bigint;
  /** Added to softplus(z) (the reference: 0.01, the default). */
  eps?: number;
}

function noiseSeed(op: string, options: unknown): bigint {
  if (options === null || typeof options !== 'object') throw invalidArgument(op, 'options', 'an object with seed', options, 'XFT_TYPE');
  return seedOf(op, (options as RouterNoiseOptions).seed);
}

/**
 * The reference's noisy gate: noisy = clean + n * (softplus(z) + eps), n standard normal from the
 * counter-based generator (element i: xft_normal(seed, i)), z = x · W_noise. clean, z: [T, E-1], one dtype.
 */
export function routerNoise(clean: Tensor, z: Tensor, options: RouterNoiseOptions): Tensor {
  const op = 'routerNoise';
  expectTensor(op, 'clean', clean, { dtype: FLOAT, shapeName: '[T, E-1]' });
  expectLike(op, 'z', z, clean.shape, [clean.dtype], 'clean');
  const seed = noiseSeed(op, options);
  const eps = options.eps === undefined ? 0.01 : expectFinite(op, 'eps', options.eps);
  const device = sameDevice(op, { clean, z });
  const noisy = Tensor.empty(clean.shape, { dtype: clean.dtype, device });
  layerNative.routerNoiseForward(clean.storage, z.storage, noisy.storage, dtypeCode(clean.dtype), clean.numel, seed, eps);
  return noisy;
}

/** dClean = dNoisy (a copy), dz = dNoisy * n * sigmoid(z), with the seed of the forward. */
export function routerNoiseBackward(z: Tensor, dNoisy: Tensor, options: { seed: number | bigint }): { dClean: Tensor; dz: Tensor } {
  const op = 'routerNoiseBackward';
  expectTensor(op, 'z', z, { dtype: FLOAT, shapeName: '[T, E-1]' });
  expectLike(op, 'dNoisy', dNoisy, z.shape, [z.dtype], 'z');
  const seed = noiseSeed(op, options);
  const device = sameDevice(op, { z, dNoisy });
  const dClean = Tensor.empty(z.shape, { dtype: z.dtype, device }), dz = Tensor.empty(z.shape, { dtype: z.dtype, device });
  layerNative.routerNoiseBackward(z.storage, dNoisy.storage, dClean.storage, dz.storage, dtypeCode(z.dtype), z.numel, seed);
  return { dClean, dz };
}

/**
 * f32 [1] on the tensors' device: the sum over all tensors of the squares of their elements (fp64
 * accumulation, deterministic), e.g. the squared global gradient norm. Tensors f32 or bf16, any shapes.
 */
export function sumSquares(tensors: Tensor[]): Tensor {
  const op = 'sumSquares';
  const list = expectArray<unknown>(op, 'tensors', tensors, 'a non-empty array of f32 or bf16 tensors', 1).map((t, i) => expectTensor(op, `tensors[${i}]`, t, { dtype: FLOAT }));
  const device = sameDevice(op, Object.fromEntries(list.map((t, i) => [`tensors[${i}]`, t])));
  const out = Tensor.empty([1], { dtype: 'f32', device });
  layerNative.sumSquares(list.map((t) => t.storage), list.map((t) => t.numel), list.map((t) => dtypeCode(t.dtype)), out.storage);
  return out;
}
