/**
 * Model configuration with the Hugging Face Llama field names (config.json), plus the MoE fields
 * of the XFT reference (num_experts, num_selects, gate type) for upcycled models, and config.json
 * round trips that keep what xft does not change as it was written (lossless-json).
 */
import * as fs from 'node:fs';
import { LosslessNumber, isLosslessNumber, parse as parseLossless, stringify as stringifyLossless } from 'lossless-json';
import { XftError, describe } from './errors';

export interface LlamaConfig {
  hidden_size: number;
  intermediate_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  num_key_value_heads: number;
  vocab_size: number;
  rms_norm_eps: number;
  rope_theta: number;
  max_position_embeddings: number;
  /** HF rope_scaling: only linear scaling (DeepSeek-Coder: { type: 'linear', factor: 4.0 }) is supported; kept as written */
  rope_scaling?: { type: 'linear'; factor: number } | null;
  /** optional HF fields kept on save (written as null when absent: see hfConfigJson) */
  bos_token_id?: number | null;
  eos_token_id?: number | null;
  pad_token_id?: number | null;
  tie_word_embeddings?: boolean;
  torch_dtype?: string;
}

export type RouterKind = 'mlp' | 'linear';

/** MoE fields (names of the XFT reference's config). */
export interface MoeConfig {
  /** E, the shared expert included */
  num_experts: number;
  /** K, the shared expert included */
  num_selects: number;
  /** router: 'mlp' (Linear -> tanh -> Linear, the reference default) or 'linear' */
  gate_type: RouterKind;
  /** routing weight normalization (XFT); false is the paper's ablation */
  normalize_weights: boolean;
  /** a shared expert 0 (XFT); false is vanilla sparse upcycling */
  shared_expert: boolean;
  /** router noise in training (the reference's noisy gate) */
  gate_noise: boolean;
  /** weight of the balance loss (0 disables it); the reference uses 0.01 */
  balance_loss_weight: number;
  /**
   * which balance loss: 'cv2' (default, XFT's reference: cv²(importance) + cv²(load)) or 'switch'
   * (Switch Transformer / Mixtral / UpIT: E·Σ f_i P_i over the full router softmax). Absent means 'cv2'.
   */
  balance_loss?: BalanceLossKind;
}

export type BalanceLossKind = 'cv2' | 'switch';
export const BALANCE_LOSSES: readonly BalanceLossKind[] = ['cv2', 'switch'];

export const DEFAULT_MOE: MoeConfig = {
  num_experts: 8,
  num_selects: 6,
  gate_type: 'mlp',
  normalize_weights: true,
  shared_expert: true,
  gate_noise: true,
  balance_loss_weight: 0.01,
};

const INT_FIELDS = ['hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'vocab_size', 'max_position_embeddings'] as const;

/** Checks a config; fills num_key_value_heads, rms_norm_eps, rope_theta defaults like transformers. */
export function llamaConfig(raw: Partial<LlamaConfig> & Record<string, unknown>, source = 'config'): LlamaConfig {
  if (typeof source !== 'string') source = 'config';
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw))
    throw new XftError(`${source}: expected a config object but received ${describe(raw)}`, 'XFT_TYPE');
  const c = { rms_norm_eps: 1e-6, rope_theta: 10000, max_position_embeddings: 2048, ...raw } as LlamaConfig & Record<string, unknown>;
  keepSource(c, raw);
  if (c.num_key_value_heads === undefined) c.num_key_value_heads = c.num_attention_heads;
  for (const f of INT_FIELDS)
    if (!Number.isSafeInteger(c[f]) || (c[f] as number) < 1)
      throw new XftError(`${source}: expected a positive integer for ${f} but received ${describe(c[f])}`, 'XFT_VALUE');
  if (c.hidden_size % c.num_attention_heads !== 0)
    throw new XftError(`${source}: hidden_size ${c.hidden_size} is not a multiple of num_attention_heads ${c.num_attention_heads}`, 'XFT_VALUE');
  if (c.num_attention_heads % c.num_key_value_heads !== 0)
    throw new XftError(`${source}: num_attention_heads ${c.num_attention_heads} is not a multiple of num_key_value_heads ${c.num_key_value_heads}`, 'XFT_VALUE');
  if ((c.hidden_size / c.num_attention_heads) % 2 !== 0)
    throw new XftError(`${source}: the head size ${c.hidden_size / c.num_attention_heads} must be even (rotary embedding)`, 'XFT_VALUE');
  if (typeof c.rms_norm_eps !== 'number' || !(c.rms_norm_eps > 0) || !Number.isFinite(c.rms_norm_eps)) throw new XftError(`${source}: expected a positive rms_norm_eps but received ${describe(c.rms_norm_eps)}`, 'XFT_VALUE');
  if (typeof c.rope_theta !== 'number' || !(c.rope_theta > 0) || !Number.isFinite(c.rope_theta)) throw new XftError(`${source}: expected a positive rope_theta but received ${describe(c.rope_theta)}`, 'XFT_VALUE');
  if (c.rope_scaling !== undefined && c.rope_scaling !== null) {
    const r = c.rope_scaling as unknown as Record<string, unknown>;
    const kind = r.type ?? r.rope_type;
    if (kind === 'default') c.rope_scaling = null;
    else if (kind !== 'linear' || typeof r.factor !== 'number' || !(r.factor > 0))
      throw new XftError(`${source}: rope_scaling ${describe(r)} is not supported (expected null or { "type": "linear", "factor": > 0 })`, 'XFT_VALUE');
    else c.rope_scaling = { ...r } as LlamaConfig['rope_scaling'];  // as written (extra keys such as rope_type kept)
  }
  if (c.hidden_act !== undefined && c.hidden_act !== 'silu')
    throw new XftError(`${source}: hidden_act ${describe(c.hidden_act)} is not supported (Llama uses "silu")`, 'XFT_VALUE');
  if (c.attention_bias === true || c.mlp_bias === true)
    throw new XftError(`${source}: attention_bias / mlp_bias are not supported (Llama has no biases)`, 'XFT_VALUE');
  if (c.head_dim !== undefined && c.head_dim !== null && c.head_dim !== c.hidden_size / c.num_attention_heads)
    throw new XftError(`${source}: head_dim ${describe(c.head_dim)} differs from hidden_size / num_attention_heads = ${c.hidden_size / c.num_attention_heads} (not supported)`, 'XFT_VALUE');
  if (c.tie_word_embeddings) throw new XftError(`${source}: tied word embeddings are not supported (Llama/DeepSeek-Coder use an untied lm_head)`, 'XFT_VALUE');
  return c;
}

export function moeConfig(raw: Partial<MoeConfig>, source = 'moe config'): MoeConfig {
  if (typeof source !== 'string') source = 'moe config';
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw))
    throw new XftError(`${source}: expected an MoE config object but received ${describe(raw)}`, 'XFT_TYPE');
  const m = { ...DEFAULT_MOE, ...raw };
  if (!Number.isSafeInteger(m.num_experts) || m.num_experts < 2)
    throw new XftError(`${source}: expected an integer >= 2 for num_experts but received ${describe(m.num_experts)}`, 'XFT_VALUE');
  const minK = m.shared_expert ? 2 : 1;
  if (!Number.isSafeInteger(m.num_selects) || m.num_selects < minK || m.num_selects > m.num_experts)
    throw new XftError(`${source}: expected an integer in [${minK}, ${m.num_experts}] for num_selects but received ${describe(m.num_selects)}`, 'XFT_VALUE');
  if (m.gate_type !== 'mlp' && m.gate_type !== 'linear')
    throw new XftError(`${source}: expected 'mlp' or 'linear' for gate_type but received ${describe(m.gate_type)}`, 'XFT_VALUE');
  for (const f of ['normalize_weights', 'shared_expert', 'gate_noise'] as const)
    if (typeof m[f] !== 'boolean') throw new XftError(`${source}: expected true or false for ${f} but received ${describe(m[f])}`, 'XFT_VALUE');
  if (!(typeof m.balance_loss_weight === 'number' && m.balance_loss_weight >= 0 && Number.isFinite(m.balance_loss_weight))) throw new XftError(`${source}: expected balance_loss_weight >= 0 but received ${describe(m.balance_loss_weight)}`, 'XFT_VALUE');
  if (m.balance_loss !== undefined && !BALANCE_LOSSES.includes(m.balance_loss))
    throw new XftError(`${source}: expected 'cv2' or 'switch' for balance_loss but received ${describe(m.balance_loss)}`, 'XFT_VALUE');
  if (m.balance_loss === undefined) delete m.balance_loss;
  return m;
}

/** The linear RoPE scaling factor of a config (1 when none). */
export function ropeScaling(c: LlamaConfig): number {
  return c.rope_scaling ? c.rope_scaling.factor : 1;
}

/** Parameter count of the dense model. */
export function parameterCount(c: LlamaConfig): number {
  c = llamaConfig(c as LlamaConfig & Record<string, unknown>, 'parameterCount');
  const d = c.hidden_size, f = c.intermediate_size, hd = d / c.num_attention_heads;
  const attn = d * d * 2 + 2 * d * c.num_key_value_heads * hd;
  return c.vocab_size * d * 2 + c.num_hidden_layers * (attn + 3 * d * f + 2 * d) + d;
}

/**
 * config.json as transformers writes it for a LlamaForCausalLM. Keys a loader would otherwise fill
 * with its own defaults are written out: `rope_scaling` (null when the source had none; the XFT
 * reference's config class assumes DeepSeek-Coder's linear scaling 4.0), `rope_theta`, and the
 * token ids `pad_token_id`, `bos_token_id`, `eos_token_id` (null when absent; the reference assumes
 * 32014, 32013, 32014, transformers' LlamaConfig null, 1, 2).
 */
export function hfConfigJson(c: LlamaConfig, extra: Record<string, unknown> = {}): Record<string, unknown> {
  const out = {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    hidden_act: 'silu',
    attention_bias: false,
    mlp_bias: false,
    tie_word_embeddings: false,
    initializer_range: 0.02,
    torch_dtype: c.torch_dtype ?? 'float32',
    rope_scaling: null,
    pad_token_id: null,
    bos_token_id: null,
    eos_token_id: null,
    ...c,
    ...extra,
  };
  return keepSource(out, c);
}

// ---- lossless config.json ----

/**
 * The config.json document (numbers as lossless-json's LosslessNumber, in their written form) each
 * config object was read from. llamaConfig and hfConfigJson pass it on to the objects they derive,
 * and configJsonText writes every value xft left unchanged from it, as it was written.
 */
const SOURCES = new WeakMap<object, Record<string, unknown>>();

/** Records that `to` derives from the config.json `from` came from (if any); returns `to`. */
export function keepSource<T extends object>(to: T, from: object): T {
  const doc = SOURCES.get(from);
  if (doc && to !== from) SOURCES.set(to, doc);
  return to;
}

/** The config.json document a config object derives from, or undefined (made in code). */
export function configSource(config: object): Record<string, unknown> | undefined {
  return SOURCES.get(config);
}

/** Keys the reference's config class and transformers read as floats: written with a fraction when xft sets them. */
const FLOAT_KEYS = new Set(['rope_theta', 'rms_norm_eps', 'initializer_range', 'gate_balance_loss_weight', 'gate_noise_epsilon',
  'score_scale_factor', 'capacity_factor', 'shared_expert_weight', 'attention_dropout', 'factor']);

const isRecord = (x: unknown): x is Record<string, unknown> => typeof x === 'object' && x !== null && !Array.isArray(x) && !isLosslessNumber(x);

/** Whether a plain JSON value equals a lossless document value (numbers by value). */
function sameValue(value: unknown, doc: unknown): boolean {
  if (isLosslessNumber(doc)) return typeof value === 'number' && Number(doc.value) === value;
  if (Array.isArray(doc)) return Array.isArray(value) && value.length === doc.length && doc.every((d, i) => sameValue(value[i], d));
  if (isRecord(doc)) {
    if (!isRecord(value)) return false;
    const keys = Object.keys(doc).filter((k) => doc[k] !== undefined), vkeys = Object.keys(value).filter((k) => value[k] !== undefined);
    return keys.length === vkeys.length && keys.every((k) => k in value && sameValue(value[k], doc[k]));
  }
  return value === doc;
}

/** A number xft sets for a float key: integral values get a fraction (4 -> 4.0), as Python writes floats. */
function floatForm(key: string, value: unknown): unknown {
  if (!FLOAT_KEYS.has(key) || typeof value !== 'number' || !Number.isInteger(value) || Math.abs(value) >= 1e16) return value;
  return new LosslessNumber(`${value}.0`);
}

/** `value` with every part equal to the document's taken from it; keys in the document's order first. */
function mergeWritten(value: unknown, doc: unknown, key = ''): unknown {
  if (doc !== undefined && sameValue(value, doc)) return doc;
  if (isRecord(value)) {
    const d = isRecord(doc) ? doc : {};
    const keys = [...Object.keys(d).filter((k) => k in value), ...Object.keys(value).filter((k) => !(k in d))];
    return Object.fromEntries(keys.filter((k) => value[k] !== undefined).map((k) => [k, mergeWritten(value[k], d[k], k)]));
  }
  return floatForm(key, value);
}

/**
 * The text of config.json for `config`: what equals the source document (configSource, or `source`)
 * is written exactly as it was there (4.0 stays 4.0, 1e-06 stays 1e-06, unknown keys and their
 * order kept); keys xft adds follow in its order; floats xft sets are written with a fraction.
 */
export function configJsonText(config: Record<string, unknown>, source: Record<string, unknown> | undefined = configSource(config)): string {
  return stringifyLossless(mergeWritten(config, source), undefined, 2) + '\n';
}

/** config.json as an object; a file that is not a JSON object is XFT_FORMAT naming the file (a missing one XFT_IO). */
export function readConfigJson(file: string): Record<string, unknown> {
  let raw: unknown, text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
    raw = JSON.parse(text);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new XftError(`cannot read ${file}: ${(err as Error).message}`, code === 'ENOENT' || code === 'EACCES' ? 'XFT_IO' : 'XFT_FORMAT');
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw))
    throw new XftError(`${file}: expected a JSON object of model settings but received ${describe(raw)}`, 'XFT_FORMAT');
  try {
    SOURCES.set(raw, parseLossless(text) as Record<string, unknown>);
  } catch {
    // lossless-json refuses what JSON.parse takes (a duplicate key): then the values are written as parsed
  }
  return raw as Record<string, unknown>;
}

/** A tiny config for tests and the demo. */
export function tinyConfig(overrides: Partial<LlamaConfig> = {}): LlamaConfig {
  if (overrides === null || typeof overrides !== 'object' || Array.isArray(overrides))
    throw new XftError(`tinyConfig: expected an object of overrides but received ${describe(overrides)}`, 'XFT_TYPE');
  return llamaConfig({
    hidden_size: 64, intermediate_size: 176, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2,
    vocab_size: 259, rms_norm_eps: 1e-6, rope_theta: 10000, max_position_embeddings: 512, ...overrides,
  });
}
