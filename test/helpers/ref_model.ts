// An independent float64 forward of the whole model (dense, or the XFT MoE of XFT.md section 1 with
// router noise and the balance loss), written from XFT.md and transformers' modeling_llama.py over
// plain arrays: it shares no code with lib/ beyond reading the parameters by their HF names.
import { refNormal, refRoute, softmax } from './ref';

export interface RefConfig {
  hidden_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  num_key_value_heads: number;
  vocab_size: number;
  rms_norm_eps: number;
  rope_theta: number;
  /** linear rope scaling factor (1: none) */
  ropeFactor: number;
}

export interface RefMoe {
  experts: number;
  topK: number;
  router: 'mlp' | 'linear';
  normalize: boolean;
  shared: boolean;
  balanceLossWeight: number;
}

export interface RefOptions {
  moe?: RefMoe;
  /** training: the balance loss is computed (and the noise added when noiseSeed is given) */
  training?: boolean;
  /** training: router noise from this seed (element i of a layer's [T, N] noise: xft_normal(seed, i)) and the balance loss */
  noiseSeed?: bigint;
  /** the reference's noise floor: softplus(x W_noise) + eps */
  noiseEps?: number;
}

export interface RefResult {
  logits: Float64Array;
  /** mean cross-entropy over targets >= 0 */
  loss: number;
  /** sum over layers of the balance loss (0 without an MoE or outside training) */
  aux: number;
  /** the smallest gap, over tokens and layers, between the last selected and the first unselected router logit */
  selectionMargin: number;
}

type Weights = Map<string, ArrayLike<number>>;

/** y [rows, n] = x [rows, k] W^T, W [n, k] (nn.Linear), W read from `w` at element offset `at`. */
function matmulT(x: ArrayLike<number>, rows: number, k: number, w: ArrayLike<number>, n: number, at = 0): Float64Array {
  const y = new Float64Array(rows * n);
  for (let r = 0; r < rows; r++)
    for (let j = 0; j < n; j++) {
      let s = 0;
      for (let i = 0; i < k; i++) s += x[r * k + i] * w[at + j * k + i];
      y[r * n + j] = s;
    }
  return y;
}

function rmsNorm(x: ArrayLike<number>, rows: number, d: number, w: ArrayLike<number>, eps: number): Float64Array {
  const y = new Float64Array(rows * d);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let i = 0; i < d; i++) ss += x[r * d + i] ** 2;
    const inv = 1 / Math.sqrt(ss / d + eps);
    for (let i = 0; i < d; i++) y[r * d + i] = w[i] * x[r * d + i] * inv;
  }
  return y;
}

/** HF rotate_half RoPE on x [B*T, heads*hd], in place. */
function rope(x: Float64Array, B: number, T: number, heads: number, hd: number, theta: number, factor: number): void {
  const half = hd / 2;
  for (let b = 0; b < B; b++)
    for (let t = 0; t < T; t++)
      for (let h = 0; h < heads; h++) {
        const base = (b * T + t) * heads * hd + h * hd;
        for (let i = 0; i < half; i++) {
          const angle = (t / factor) * theta ** (-(2 * i) / hd);
          const c = Math.cos(angle), s = Math.sin(angle);
          const x1 = x[base + i], x2 = x[base + i + half];
          x[base + i] = x1 * c - x2 * s;
          x[base + i + half] = x2 * c + x1 * s;
        }
      }
}

const silu = (v: number) => v / (1 + Math.exp(-v));
const softplus = (v: number) => (v > 20 ? v : Math.log1p(Math.exp(v)));

/** erfc with relative error < 1.2e-7 (Numerical Recipes' erfcc). */
function erfc(x: number): number {
  const z = Math.abs(x), t = 1 / (1 + 0.5 * z);
  const r = t * Math.exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (0.27886807 +
    t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))));
  return x >= 0 ? r : 2 - r;
}

/** cv² with the unbiased variance (torch.var), as the reference's balance loss. */
function cv2(x: number[]): number {
  const n = x.length, mean = x.reduce((a, b) => a + b, 0) / n;
  const variance = n > 1 ? x.reduce((a, b) => a + (b - mean) ** 2, 0) / (n - 1) : 0;
  return variance / (mean * mean + 1e-10);
}

/** SwiGLU of x [rows, d] through expert e of stacks gate, up [E, f, d], down [E, d, f]. */
function expertFFN(x: ArrayLike<number>, rows: number, d: number, f: number, gate: ArrayLike<number>, up: ArrayLike<number>, down: ArrayLike<number>, e: number): Float64Array {
  const g = matmulT(x, rows, d, gate, f, e * f * d), u = matmulT(x, rows, d, up, f, e * f * d);
  const a = g.map((v, i) => silu(v) * u[i]);
  return matmulT(a, rows, f, down, d, e * d * f);
}

/** The MoE FFN of XFT.md on x [R, d]: y, the balance loss, the selection margin. */
function moeFFN(w: Weights, p: string, x: Float64Array, R: number, d: number, moe: RefMoe, o: RefOptions): { y: Float64Array; aux: number; margin: number } {
  const gate = w.get(`${p}.calculator.experts.weight_gate`)!, up = w.get(`${p}.calculator.experts.weight_up`)!, down = w.get(`${p}.calculator.experts.weight_down`)!;
  const E = moe.experts, N = moe.shared ? E - 1 : E, f = gate.length / (E * d);
  const clean = moe.router === 'mlp'
    ? matmulT(matmulT(x, R, d, w.get(`${p}.gate.gate_network.0.weight`)!, N).map(Math.tanh), R, N, w.get(`${p}.gate.gate_network.2.weight`)!, N)
    : matmulT(x, R, d, w.get(`${p}.gate.gate_network.weight`)!, N);
  let logits = clean, scale: Float64Array | null = null;
  const eps = o.noiseEps ?? 0.01;
  if (o.training && o.noiseSeed !== undefined) {
    scale = matmulT(x, R, d, w.get(`${p}.gate.weight_noise.weight`)!, N).map((z) => softplus(z) + eps);
    logits = clean.map((c, i) => c + refNormal(o.noiseSeed!, i) * scale![i]);
  }
  const route = refRoute(logits, R, N, moe.topK, moe.normalize, moe.shared);
  const S = moe.shared ? moe.topK - 1 : moe.topK;
  let margin = Infinity;
  for (let t = 0; t < R; t++) {
    const row = Array.from(logits.subarray(t * N, (t + 1) * N)).sort((a, b) => b - a);
    if (S < N) margin = Math.min(margin, row[S - 1] - row[S]);
  }
  const y = new Float64Array(R * d);
  const perToken = route.experts.length / R;
  for (let t = 0; t < R; t++)
    for (let s = 0; s < perToken; s++) {
      const e = route.experts[t * perToken + s], g = route.weights[t * perToken + s];
      const ye = expertFFN(x.subarray(t * d, (t + 1) * d), 1, d, f, gate, up, down, e);
      for (let i = 0; i < d; i++) y[t * d + i] += g * ye[i];
    }
  let aux = 0;
  if (o.training && moe.balanceLossWeight > 0) {
    // load: the counts, or under noise (k < N) Shazeer's estimate: P(expert i stays in the top k when
    // its own noise is redrawn) = Φ((clean_i − threshold_i) / scale_i)
    let load = route.load.slice(0, N);
    if (scale && S < N) {
      load = new Array(N).fill(0);
      for (let t = 0; t < R; t++) {
        const row = Array.from(logits.subarray(t * N, (t + 1) * N));
        const sorted = [...row.keys()].sort((a, b) => row[b] - row[a] || a - b);
        const thrOut = row[sorted[S - 1]], thrIn = row[sorted[S]];
        for (let i = 0; i < N; i++) {
          const thr = row[i] > thrIn ? thrIn : thrOut;
          load[i] += 0.5 * erfc(-((clean[t * N + i] - thr) / scale[t * N + i]) / Math.SQRT2);
        }
      }
    }
    aux = moe.balanceLossWeight * (cv2(route.importance.slice(0, N)) + cv2(load));
  }
  return { y, aux, margin };
}

/** The model's forward in float64: logits [B*T, V], the loss over `targets`, the balance losses. */
export function refModelForward(w: Weights, c: RefConfig, ids: ArrayLike<number>, targets: ArrayLike<number>, B: number, T: number, o: RefOptions = {}): RefResult {
  const d = c.hidden_size, H = c.num_attention_heads, KV = c.num_key_value_heads, hd = d / H, R = B * T, V = c.vocab_size;
  const embed = w.get('model.embed_tokens.weight')!;
  let x = new Float64Array(R * d);
  for (let r = 0; r < R; r++) for (let i = 0; i < d; i++) x[r * d + i] = embed[ids[r] * d + i];
  let aux = 0, selectionMargin = Infinity;
  for (let l = 0; l < c.num_hidden_layers; l++) {
    const p = `model.layers.${l}`;
    const n1 = rmsNorm(x, R, d, w.get(`${p}.input_layernorm.weight`)!, c.rms_norm_eps);
    const q = matmulT(n1, R, d, w.get(`${p}.self_attn.q_proj.weight`)!, d);
    const k = matmulT(n1, R, d, w.get(`${p}.self_attn.k_proj.weight`)!, KV * hd);
    const v = matmulT(n1, R, d, w.get(`${p}.self_attn.v_proj.weight`)!, KV * hd);
    rope(q, B, T, H, hd, c.rope_theta, c.ropeFactor);
    rope(k, B, T, KV, hd, c.rope_theta, c.ropeFactor);
    const att = new Float64Array(R * d);
    for (let b = 0; b < B; b++)
      for (let h = 0; h < H; h++) {
        const kh = Math.floor(h / (H / KV));
        for (let i = 0; i < T; i++) {
          const scores = Array.from({ length: i + 1 }, (_, j) => {
            let s = 0;
            for (let e = 0; e < hd; e++) s += q[(b * T + i) * d + h * hd + e] * k[(b * T + j) * KV * hd + kh * hd + e];
            return s / Math.sqrt(hd);
          });
          const pr = softmax(scores);
          for (let j = 0; j <= i; j++) for (let e = 0; e < hd; e++) att[(b * T + i) * d + h * hd + e] += pr[j] * v[(b * T + j) * KV * hd + kh * hd + e];
        }
      }
    const o2 = matmulT(att, R, d, w.get(`${p}.self_attn.o_proj.weight`)!, d);
    const h1 = x.map((val, i) => val + o2[i]);
    const n2 = rmsNorm(h1, R, d, w.get(`${p}.post_attention_layernorm.weight`)!, c.rms_norm_eps);
    let y: Float64Array;
    if (o.moe) {
      const m = moeFFN(w, `${p}.mlp`, n2, R, d, o.moe, o);
      y = m.y;
      aux += m.aux;
      selectionMargin = Math.min(selectionMargin, m.margin);
    } else {
      const g = w.get(`${p}.mlp.gate_proj.weight`)!, f = g.length / d;
      y = expertFFN(n2, R, d, f, g, w.get(`${p}.mlp.up_proj.weight`)!, w.get(`${p}.mlp.down_proj.weight`)!, 0);
    }
    x = h1.map((val, i) => val + y[i]);
  }
  const nf = rmsNorm(x, R, d, w.get('model.norm.weight')!, c.rms_norm_eps);
  const logits = matmulT(nf, R, d, w.get('lm_head.weight')!, V);
  let sum = 0, count = 0;
  for (let r = 0; r < R; r++) {
    if (targets[r] < 0) continue;
    const row = logits.subarray(r * V, (r + 1) * V);
    const mx = Math.max(...row);
    const lse = mx + Math.log(row.reduce((a, z) => a + Math.exp(z - mx), 0));
    sum += lse - row[targets[r]];
    count++;
  }
  return { logits, loss: count ? sum / count : 0, aux, selectionMargin };
}
