/**
 * Model checkpoints in the Hugging Face layout: a folder with `config.json` and safetensors (one
 * `model.safetensors`, or shards and `model.safetensors.index.json`). Three kinds:
 *
 *   dense   LlamaForCausalLM names (`model.layers.{i}.mlp.gate_proj.weight`, ...): loads in
 *           transformers, and a transformers checkpoint loads here. XFT's output is one of these.
 *   moe     the XFT reference's names for the upcycled model:
 *             model.layers.{i}.mlp.calculator.experts.weight_{gate,up,down}.{e}.weight   (expert 0 shared)
 *             model.layers.{i}.mlp.gate.gate_network.{0,2}.weight   ('mlp' router; `.weight` for 'linear')
 *             model.layers.{i}.mlp.gate.weight_noise.weight
 *           config.json records num_experts, num_selects, gate_type / gate_network and the balance options,
 *           with the reference's gate class per variant (GATE_TYPES): TopKUniversalBalancedNoisyGate (XFT),
 *           TopKUniversalBalancedNoNormalizationNoisyGate (no normalization), TopKBalancedNoisyGate (no
 *           shared expert: E routed experts, top-K, softmax over the selected logits).
 *   merge   the MoE's expert tensors plus the learned mixing coefficients
 *             model.layers.{i}.mlp.average_weights   (α, [E-1]; [E] for a soup without a shared rate)
 *           and the shared rate λ as `shared_expert_weight` in config.json.
 *
 * `upcycleCheckpoint` and `mergeCheckpoint` work on disk, tensor by tensor in chunks: their peak
 * memory is one f32 copy of the largest FFN weight (merge) or one chunk (upcycle), whatever the
 * model size. Every folder is written atomically (a temporary folder renamed into place).
 *
 * config.json keeps every key and value of the source config that xft does not change as it was
 * written (config.ts: configJsonText), and writes the keys loaders would otherwise fill with their
 * own defaults (hfConfigJson).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { XftError } from './errors';
import { Tensor, type Device, formatShape, numelOf } from './tensor';
import { type LlamaConfig, type MoeConfig, configJsonText, hfConfigJson, keepSource, llamaConfig, moeConfig, readConfigJson } from './config';
import { Block, DenseFFN, MergedFFN, Model, MoeFFN, Param } from './model';
import { type FileDType, SafetensorsReader, type WriteEntry, bytesToF32, dtypeBytes, f32ToBytes, writeFileAtomic, writeFolderAtomic, writeShards } from './safetensors';
import { checkOutputFolder, recoverFolder } from './folder';
import { type UpcycleOptions, routerInit, routerInitKind, routerTensors, upcycleMoeConfig } from './xft';

export type CheckpointKind = 'dense' | 'moe' | 'merged';
/** dtype of the weights written (the model computes in f32 either way) */
export type SaveDtype = 'f32' | 'bf16' | 'f16';

export interface CheckpointInfo {
  dir: string;
  kind: CheckpointKind;
  /** the dense architecture (HF Llama fields) */
  config: LlamaConfig;
  /** MoE fields (moe and merge checkpoints) */
  moe: MoeConfig | null;
  /** λ of a merge checkpoint (null: soup over all experts) */
  sharedRate: number | null;
  /** config.json as read */
  raw: Record<string, unknown>;
}

const FILE_DTYPE: Record<SaveDtype, FileDType> = { f32: 'F32', bf16: 'BF16', f16: 'F16' };
const TORCH_DTYPE: Record<FileDType, string> = { F32: 'float32', BF16: 'bfloat16', F16: 'float16' } as Record<FileDType, string>;
const FROM_TORCH: Record<string, SaveDtype> = { float32: 'f32', bfloat16: 'bf16', float16: 'f16' };

/** config.json keys that describe the MoE or merge model, not the dense architecture. */
const NON_DENSE_KEYS = [
  'architectures', 'model_type', 'auto_map', 'xft', 'num_experts', 'num_selects', 'size_experts', 'gate_type', 'gate_network', 'gate_use_softmax',
  'gate_use_balance', 'gate_balance_loss_weight', 'gate_add_noise', 'gate_noise_epsilon', 'calculator_type', 'multiply_gate_scores',
  'score_scale_factor', 'add_weight_norm', 'drop_tokens', 'dropped_padding', 'capacity_factor', 'shared_expert_weight', 'ffn_folder_path',
];

/** The dense architecture's fields of a config (the MoE / merge keys left out). */
function denseFields(config: object): Record<string, unknown> {
  return keepSource(Object.fromEntries(Object.entries(config).filter(([k]) => !NON_DENSE_KEYS.includes(k))), config);
}

/** Tokenizer and generation files copied along when a checkpoint is derived from another. */
const SIDE_FILES = ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model', 'generation_config.json'];

const layer = (i: number) => `model.layers.${i}`;
const PROJ = ['gate', 'up', 'down'] as const;
/** the per-layer tensors every kind has, besides the FFN: `${layer}.${name}.weight` */
const LAYER_COMMON = ['input_layernorm', 'self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'post_attention_layernorm'];
const expertName = (i: number, g: string, e: number) => `${layer(i)}.mlp.calculator.experts.weight_${g}.${e}.weight`;
/** checkpoint tensors that carry nothing (older transformers saved the RoPE frequencies) */
const IGNORED = /\.rotary_emb\.inv_freq$/;

// ---- config.json ----

/**
 * The reference's gate class for each routing variant (modeling_llama_moe_upscaling_hf.py): the class
 * its LlamaMoEUpscalingConfig.gate_type selects, so that the reference computes what xft trained.
 */
export const GATE_TYPES = {
  /** XFT: shared expert 0 with 1 - p_1, normal weights p_1 softmax(p_sel) (gate over E-1 columns) */
  xft: 'TopKUniversalBalancedNoisyGate',
  /** ablation: shared expert, normal weights p_j (gate over E-1 columns) */
  noNormalization: 'TopKUniversalBalancedNoNormalizationNoisyGate',
  /** ablation: vanilla sparse upcycling, top-K of E, softmax over the selected logits (gate over E columns) */
  noSharedExpert: 'TopKBalancedNoisyGate',
} as const;

/** The reference's gate class for an MoE config. */
export function gateTypeOf(m: MoeConfig): string {
  return !m.shared_expert ? GATE_TYPES.noSharedExpert : m.normalize_weights ? GATE_TYPES.xft : GATE_TYPES.noNormalization;
}

function moeJson(m: MoeConfig): Record<string, unknown> {
  return {
    num_experts: m.num_experts, num_selects: m.num_selects,
    gate_type: gateTypeOf(m), gate_network: m.gate_type, gate_use_softmax: true,
    gate_use_balance: m.balance_loss_weight > 0, gate_balance_loss_weight: m.balance_loss_weight,
    gate_add_noise: m.gate_noise, gate_noise_epsilon: 0.01,
    calculator_type: 'UniversalCalculator', multiply_gate_scores: true, score_scale_factor: 1.0, add_weight_norm: false,
    // the Switch loss (UpIT) is recorded only when chosen, so that XFT's config.json is as before
    xft: { normalize_weights: m.normalize_weights, shared_expert: m.shared_expert, ...(m.balance_loss === 'switch' ? { balance_loss: 'switch' } : {}) },
  };
}

/** config.json of a model of `kind`. */
export function configJson(kind: CheckpointKind, config: LlamaConfig, moe: MoeConfig | null, sharedRate: number | null, dtype: FileDType): Record<string, unknown> {
  const dense = denseFields(config) as unknown as LlamaConfig;
  const base = hfConfigJson(dense, { torch_dtype: TORCH_DTYPE[dtype] });
  if (kind === 'dense') return base;
  const m = moeJson(moe!);
  if (kind === 'moe') return keepSource({ ...base, architectures: ['LlamaMoEForCausalLM'], model_type: 'llama_moe_upscaling', ...m }, base);
  return keepSource({
    ...base, architectures: ['LlamaWeightedForCausalLM'], model_type: 'llama_moe_upscaling', ...m, shared_expert_weight: sharedRate,
    xft: { ...(m.xft as object), merge: true },
  }, base);
}

/** The routing variant of a gate_type: the reference's classes, and the xft record for what they leave open. */
function routingVariant(raw: Record<string, unknown>, file: string): { shared_expert: boolean; normalize_weights: boolean } {
  const x = (raw.xft ?? {}) as { normalize_weights?: unknown; shared_expert?: unknown };
  const recorded = { shared_expert: x.shared_expert ?? true, normalize_weights: x.normalize_weights ?? true } as { shared_expert: boolean; normalize_weights: boolean };
  const type = raw.gate_type;
  // absent, or what earlier xft versions wrote for every variant (the ablation recorded only under "xft")
  if (type === undefined || type === GATE_TYPES.xft) return recorded;
  if (type === GATE_TYPES.noNormalization) {
    if (x.shared_expert === false || x.normalize_weights === true)
      throw new XftError(`${file}: gate_type ${type} (shared expert, no normalization) contradicts "xft": ${JSON.stringify(raw.xft)}`, 'XFT_FORMAT');
    return { shared_expert: true, normalize_weights: false };
  }
  if (type === GATE_TYPES.noSharedExpert) {
    if (x.shared_expert === true)
      throw new XftError(`${file}: gate_type ${type} (no shared expert) contradicts "xft": ${JSON.stringify(raw.xft)}`, 'XFT_FORMAT');
    return { shared_expert: false, normalize_weights: recorded.normalize_weights };
  }
  throw new XftError(`${file}: gate_type ${describeValue(type)} is not supported (expected one of ${Object.values(GATE_TYPES).join(', ')})`, 'XFT_FORMAT');
}

const describeValue = (v: unknown) => (typeof v === 'string' ? JSON.stringify(v) : String(v));

/** Reads config.json of a checkpoint folder and tells its kind. */
export function readCheckpointInfo(dir: string): CheckpointInfo {
  recoverFolder(dir);
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) throw new XftError(`${dir}: not a checkpoint folder (no such folder)`, 'XFT_IO');
  const file = path.join(dir, 'config.json');
  if (!fs.existsSync(file)) throw new XftError(`${dir}: not a checkpoint folder (no config.json)`, 'XFT_IO');
  const raw = readConfigJson(file);
  if (raw.model_type !== undefined && raw.model_type !== 'llama' && raw.model_type !== 'llama_moe_upscaling') {
    const arch = Array.isArray(raw.architectures) ? `, architectures ${raw.architectures.join(', ')}` : '';
    throw new XftError(`${file}: not a Llama checkpoint (model_type ${JSON.stringify(raw.model_type)}${arch}); xft reads LlamaForCausalLM ` +
      `checkpoints (model_type "llama") and its own MoE and merge checkpoints ("llama_moe_upscaling")`, 'XFT_FORMAT');
  }
  const config = llamaConfig(denseFields(raw) as Partial<LlamaConfig> & Record<string, unknown>, file);
  const arch = Array.isArray(raw.architectures) ? String(raw.architectures[0]) : '';
  const isMoe = raw.num_experts !== undefined && raw.model_type !== 'llama';
  if (!isMoe) {
    if (raw.model_type === 'llama_moe_upscaling')
      throw new XftError(`${file}: model_type "llama_moe_upscaling" without num_experts: not an MoE checkpoint xft can read`, 'XFT_FORMAT');
    return { dir, kind: 'dense', config, moe: null, sharedRate: null, raw };
  }
  const x = (raw.xft ?? {}) as { merge?: boolean };
  const gateNetwork = raw.gate_network ?? 'mlp';
  const variant = routingVariant(raw, file);
  const moe = moeConfig({
    num_experts: raw.num_experts as number, num_selects: raw.num_selects as number, gate_type: gateNetwork as MoeConfig['gate_type'],
    normalize_weights: variant.normalize_weights, shared_expert: variant.shared_expert, gate_noise: (raw.gate_add_noise as boolean) ?? true,
    balance_loss_weight: raw.gate_use_balance === false ? 0 : ((raw.gate_balance_loss_weight as number) ?? 0.01),
    ...((raw.xft as { balance_loss?: unknown } | undefined)?.balance_loss !== undefined ? { balance_loss: (raw.xft as { balance_loss: MoeConfig['balance_loss'] }).balance_loss } : {}),
  }, file);
  const merged = x.merge === true || arch === 'LlamaWeightedForCausalLM';
  if (!merged) return { dir, kind: 'moe', config, moe, sharedRate: null, raw };
  const rate = raw.shared_expert_weight === undefined ? 0.75 : (raw.shared_expert_weight as number | null);
  if (rate !== null && !(typeof rate === 'number' && rate >= 0 && rate <= 1))
    throw new XftError(`${file}: expected a number in [0, 1] or null for shared_expert_weight but received ${JSON.stringify(rate)}`, 'XFT_FORMAT');
  return { dir, kind: 'merged', config, moe, sharedRate: rate, raw };
}

// ---- shapes ----

interface Shapes {
  /** attention, norms, embedding, head (the same in every kind) */
  common: Map<string, number[]>;
  ffn: (i: number) => { gate: number[]; up: number[]; down: number[] };
}

function shapesOf(c: LlamaConfig): Shapes {
  const d = c.hidden_size, f = c.intermediate_size, kv = c.num_key_value_heads * (d / c.num_attention_heads);
  const common = new Map<string, number[]>([['model.embed_tokens.weight', [c.vocab_size, d]]]);
  for (let i = 0; i < c.num_hidden_layers; i++) {
    const p = layer(i);
    common.set(`${p}.input_layernorm.weight`, [d]);
    common.set(`${p}.self_attn.q_proj.weight`, [d, d]);
    common.set(`${p}.self_attn.k_proj.weight`, [kv, d]);
    common.set(`${p}.self_attn.v_proj.weight`, [kv, d]);
    common.set(`${p}.self_attn.o_proj.weight`, [d, d]);
    common.set(`${p}.post_attention_layernorm.weight`, [d]);
  }
  common.set('model.norm.weight', [d]);
  common.set('lm_head.weight', [c.vocab_size, d]);
  return { common, ffn: () => ({ gate: [f, d], up: [f, d], down: [d, f] }) };
}

/** Every tensor a checkpoint of this kind must hold, with its shape (noise optional). */
function expectedTensors(info: CheckpointInfo): Map<string, number[]> {
  const { common, ffn } = shapesOf(info.config);
  const all = new Map(common);
  const c = info.config, d = c.hidden_size;
  for (let i = 0; i < c.num_hidden_layers; i++) {
    const s = ffn(i);
    if (info.kind === 'dense') {
      for (const g of PROJ) all.set(`${layer(i)}.mlp.${g}_proj.weight`, s[g]);
      continue;
    }
    const E = info.moe!.num_experts;
    for (const g of PROJ) for (let e = 0; e < E; e++) all.set(expertName(i, g, e), s[g]);
    if (info.kind === 'moe') for (const [n, shape] of routerTensors(i, info.moe!, d)) all.set(n, shape);
    else all.set(`${layer(i)}.mlp.average_weights`, [info.sharedRate === null ? E : E - 1]);
  }
  return all;
}

/** Checks names and shapes of the tensors in `r` against the kind, before anything is read or written. */
function checkTensors(info: CheckpointInfo, r: SafetensorsReader): void {
  const want = expectedTensors(info);
  const missing = [...want.keys()].filter((n) => !r.has(n));
  if (missing.length)
    throw new XftError(`${info.dir}: a ${info.kind} checkpoint needs ${missing.length} tensor(s) it lacks: ${missing.slice(0, 4).join(', ')}${missing.length > 4 ? ', ...' : ''}`, 'XFT_FORMAT');
  const noise = info.kind === 'moe' ? new Set(Array.from({ length: info.config.num_hidden_layers }, (_, i) => `${layer(i)}.mlp.gate.weight_noise.weight`)) : new Set<string>();
  const extra = r.names().filter((n) => !want.has(n) && !noise.has(n) && !IGNORED.test(n));
  if (extra.length)
    throw new XftError(`${info.dir}: unexpected tensor(s) for a ${info.kind} Llama checkpoint: ${extra.slice(0, 4).join(', ')}${extra.length > 4 ? ', ...' : ''}`, 'XFT_FORMAT');
  for (const [n, shape] of want) {
    const t = r.info(n);
    if (formatShape(t.shape) !== formatShape(shape))
      throw new XftError(`${info.dir}: ${n} has shape ${formatShape(t.shape)}, expected ${formatShape(shape)} from config.json`, 'XFT_SHAPE');
    if (t.dtype !== 'F32' && t.dtype !== 'BF16' && t.dtype !== 'F16')
      throw new XftError(`${info.dir}: ${n} is ${t.dtype}, expected F32, BF16 or F16`, 'XFT_DTYPE');
  }
}

// ---- loading ----

export interface LoadOptions {
  device?: Device;
  /** compute dtype of the model (default f32; 'bf16': mixed precision, see Model.dtype) */
  dtype?: 'f32' | 'bf16';
}

/**
 * Loads a checkpoint folder as a Model (f32 weights on `device`): dense and MoE models with every
 * parameter trainable, a merge model with only α trainable (the experts and the rest frozen).
 */
export function loadModel(dir: string, options: LoadOptions = {}): Model {
  const info = readCheckpointInfo(dir);
  const device = options.device ?? 'cpu';
  const r = new SafetensorsReader(dir);
  checkTensors(info, r);
  const c = info.config, trainable = info.kind !== 'merged';
  const dtype = options.dtype ?? 'f32';
  if (dtype !== 'f32' && dtype !== 'bf16') throw new XftError(`loadModel: expected 'f32' or 'bf16' for dtype but received ${JSON.stringify(dtype)}`, 'XFT_VALUE');
  const made: Param[] = [];
  try {
    const param = (name: string, train = trainable) => {
      const p = new Param(name, r.read(name, { device, dtype: name.endsWith('.average_weights') ? 'f32' : dtype, finite: true }), train);
      made.push(p);
      return p;
    };
    const stack = (i: number, g: string) => {
      const E = info.moe!.num_experts, first = r.info(expertName(i, g, 0)).shape;
      const s = Tensor.empty([E, ...first], { device, dtype });
      const p = new Param(`${layer(i)}.mlp.calculator.experts.weight_${g}`, s, info.kind === 'moe');
      made.push(p);
      for (let e = 0; e < E; e++) {
        const t = r.read(expertName(i, g, e), { device, dtype, finite: true });
        s.narrow(e, 1).copy_(t);
        t.dispose();
      }
      return p;
    };
    const embed = param('model.embed_tokens.weight');
    const blocks = Array.from({ length: c.num_hidden_layers }, (_, i) => {
      const p = layer(i);
      const inputNorm = param(`${p}.input_layernorm.weight`);
      const [q, k, v, o] = ['q', 'k', 'v', 'o'].map((x) => param(`${p}.self_attn.${x}_proj.weight`));
      const postNorm = param(`${p}.post_attention_layernorm.weight`);
      let ffn: Block['ffn'];
      if (info.kind === 'dense') ffn = new DenseFFN(param(`${p}.mlp.gate_proj.weight`), param(`${p}.mlp.up_proj.weight`), param(`${p}.mlp.down_proj.weight`));
      else if (info.kind === 'moe') {
        const [g, u, dn] = PROJ.map((x) => stack(i, x));
        const router = routerTensors(i, info.moe!, c.hidden_size).map(([n]) => param(n));
        const noiseName = `${p}.mlp.gate.weight_noise.weight`;
        const noise = r.has(noiseName) ? param(noiseName) : null;
        ffn = new MoeFFN(info.moe!, g, u, dn, router, noise);
      } else {
        const [g, u, dn] = PROJ.map((x) => stack(i, x));
        ffn = new MergedFFN(g, u, dn, param(`${p}.mlp.average_weights`, true), info.sharedRate, info.moe);
      }
      return new Block(c, inputNorm, q, k, v, o, postNorm, ffn);
    });
    return new Model(c, embed, blocks, param('model.norm.weight'), param('lm_head.weight'), device);
  } catch (err) {
    made.forEach((p) => p.dispose());
    throw err;
  }
}

// ---- saving ----

export interface SaveOptions {
  /** dtype of the weights written; default: bf16 for a bf16 model, else the config's torch_dtype, else f32 (α is always f32) */
  dtype?: SaveDtype;
  /** largest shard in bytes (default 5 GiB, as transformers); above it the checkpoint is sharded */
  maxShardBytes?: number;
  /** replace an existing, non-empty folder (default false: an error) */
  overwrite?: boolean;
  /** copy tokenizer and generation files from this checkpoint folder */
  copyFrom?: string;
  /** more files to write into the folder: name -> content */
  files?: Record<string, string>;
  /** writes more files into the folder's temporary copy (e.g. a second safetensors file) before it is renamed into place */
  fill?: (tmpDir: string) => void;
  /** more config.json keys (e.g. a scheduled checkpoint's xft_epoch and xft_step) */
  config?: Record<string, unknown>;
}

function targetDtype(config: LlamaConfig, dtype?: SaveDtype, modelDtype = 'f32'): FileDType {
  if (dtype === undefined && modelDtype === 'bf16') return 'BF16';
  if (dtype !== undefined) {
    if (!(dtype in FILE_DTYPE)) throw new XftError(`expected 'f32', 'bf16' or 'f16' for dtype but received ${JSON.stringify(dtype)}`, 'XFT_VALUE');
    return FILE_DTYPE[dtype];
  }
  return FILE_DTYPE[FROM_TORCH[config.torch_dtype ?? 'float32'] ?? 'f32'];
}

export { checkOutputFolder };

function copySideFiles(from: string | undefined, to: string): void {
  if (!from) return;
  for (const f of SIDE_FILES) if (fs.existsSync(path.join(from, f))) fs.copyFileSync(path.join(from, f), path.join(to, f));
}

/**
 * Writes a checkpoint folder atomically: the entries as safetensors (sharded above maxShardBytes),
 * config.json, the tokenizer files of `copyFrom`, and `files` (name -> content).
 */
export function writeCheckpoint(dir: string, entries: WriteEntry[], config: Record<string, unknown>,
  options: { maxShardBytes?: number; onProgress?: StreamOptions['onProgress']; copyFrom?: string; files?: Record<string, string>; overwrite?: boolean; fill?: (tmpDir: string) => void }): void {
  writeFolderAtomic(dir, (tmp) => {
    writeShards(tmp, withProgress(entries, options.onProgress), { maxShardBytes: options.maxShardBytes });
    writeFileAtomic(path.join(tmp, 'config.json'), configJsonText(config));
    copySideFiles(options.copyFrom, tmp);
    for (const [name, content] of Object.entries(options.files ?? {})) writeFileAtomic(path.join(tmp, name), content);
    options.fill?.(tmp);
  }, { overwrite: options.overwrite ?? false });
}

/** Writes `model` as a checkpoint folder of its kind (dense / moe / merge), atomically. */
export function saveModel(model: Model, dir: string, options: SaveOptions = {}): void {
  checkOutputFolder(dir, options.overwrite);
  const dtype = targetDtype(model.config, options.dtype, model.dtype);
  const entries: WriteEntry[] = [];
  const f = model.blocks[0]?.ffn;
  const rate = f instanceof MergedFFN ? f.sharedRate : null;
  // a merge model made by hand (not from upcycle / loadModel) may not know its MoE: its shapes tell E
  const E = f instanceof MergedFFN ? f.gate.value.shape[0] : 0;
  const moe = f instanceof MoeFFN ? f.moe
    : f instanceof MergedFFN ? (f.moe ?? moeConfig({ num_experts: E, num_selects: Math.min(E, 2), shared_expert: rate !== null }))
    : null;
  for (const p of model.params()) {
    const stacked = /\.calculator\.experts\.weight_(gate|up|down)$/.test(p.name);
    const fileDtype = p.name.endsWith('.average_weights') ? 'F32' : dtype;
    if (!stacked) {
      entries.push({ name: p.name, dtype: fileDtype, shape: p.value.shape, tensor: () => p.value });
      continue;
    }
    const [E, ...shape] = p.value.shape;
    for (let e = 0; e < E; e++)
      entries.push({ name: `${p.name}.${e}.weight`, dtype: fileDtype, shape, tensor: () => p.value.narrow(e, 1).reshape(shape) });
  }
  // extra keys are added to the object itself: a spread would drop the source record it carries (the source's key order and number texts)
  const config = configJson(model.kind, model.config, moe, rate, dtype);
  if (options.config) Object.assign(config, options.config);
  writeCheckpoint(dir, entries, config, options);
}

// ---- streaming on disk ----

export interface StreamOptions {
  /** dtype of the weights written; default: each tensor's dtype in the source */
  dtype?: SaveDtype;
  maxShardBytes?: number;
  overwrite?: boolean;
  /** elements per read (default 4M): the memory a copied tensor needs */
  chunkElements?: number;
  /** called after each tensor is written */
  onProgress?: (p: { done: number; total: number; name: string; bytes: number }) => void;
}

/**
 * A write entry that copies `name` from `r` chunk by chunk, converting to `to` when it differs. One
 * read buffer is reused across chunks: the writer consumes each chunk before the next is read.
 */
function copyEntry(r: SafetensorsReader, name: string, outName: string, to: FileDType | undefined, chunk: number): WriteEntry {
  const info = r.info(name), dtype = to ?? info.dtype, n = numelOf(info.shape), size = dtypeBytes(info.dtype);
  return {
    name: outName, dtype, shape: info.shape,
    bytes: function* () {
      const scratch = scratchBytes(Math.min(n, chunk) * size);
      const values = dtype === info.dtype ? null : scratchF32(Math.min(n, chunk));
      for (let s = 0; s < n; s += chunk) {
        const raw = r.readRange(name, s * size, Math.min(n, s + chunk) * size, scratch);
        yield values ? f32ToBytes(bytesToF32(raw, info.dtype, name, values), dtype) : raw;
      }
    },
  };
}

// Buffers shared by every streamed tensor of a process: a new one per tensor is garbage the size of a
// chunk (or of a whole FFN weight) that the GC frees late, so that peak memory grew with the number of
// tensors (test/53). Safe because the writer consumes one entry's chunks before it starts the next.
let scratchBuffer = new Uint8Array(0), scratchValues = new Float32Array(0), scratchAcc = new Float32Array(0);
function scratchBytes(n: number): Uint8Array {
  if (scratchBuffer.length < n) scratchBuffer = new Uint8Array(n);
  return scratchBuffer.subarray(0, n);
}
function scratchF32(n: number): Float32Array {
  if (scratchValues.length < n) scratchValues = new Float32Array(n);
  return scratchValues.subarray(0, n);
}
/** A zeroed f32 accumulator of n values. */
function zeroedAccumulator(n: number): Float32Array {
  if (scratchAcc.length < n) scratchAcc = new Float32Array(n);
  return scratchAcc.subarray(0, n).fill(0);
}

/** Reports each written tensor to onProgress. */
function withProgress(entries: WriteEntry[], onProgress: StreamOptions['onProgress']): WriteEntry[] {
  if (!onProgress) return entries;
  let done = 0;
  return entries.map((e) => ({ ...e, after: () => onProgress({ done: ++done, total: entries.length, name: e.name, bytes: numelOf(e.shape) * dtypeBytes(e.dtype) }) }));
}

function chunkOf(options: StreamOptions): number {
  const c = options.chunkElements ?? 4 * 2 ** 20;
  if (!Number.isSafeInteger(c) || c < 1) throw new XftError(`expected a positive integer for chunkElements but received ${c}`, 'XFT_VALUE');
  return c;
}

function fileDtypeOf(options: StreamOptions): FileDType | undefined {
  if (options.dtype === undefined) return undefined;
  if (!(options.dtype in FILE_DTYPE)) throw new XftError(`expected 'f32', 'bf16' or 'f16' for dtype but received ${JSON.stringify(options.dtype)}`, 'XFT_VALUE');
  return FILE_DTYPE[options.dtype];
}

/**
 * Upcycles a dense checkpoint on disk into an MoE checkpoint (the reference's names), streaming:
 * each FFN weight is copied E times chunk by chunk; routers are initialised exactly as `upcycle`
 * does (same seeds), so loading the result equals `upcycle(loadModel(src), options)`.
 */
export function upcycleCheckpoint(src: string, dst: string, options: UpcycleOptions & StreamOptions = {}): CheckpointInfo {
  const info = readCheckpointInfo(src);
  if (info.kind !== 'dense') throw new XftError(`upcycleCheckpoint: ${src} is a ${info.kind} checkpoint; expected a dense one`, 'XFT_VALUE');
  const moe = upcycleMoeConfig(options, 'upcycleCheckpoint');
  const r = new SafetensorsReader(src);
  checkTensors(info, r);
  checkOutputFolder(dst, options.overwrite);
  const to = fileDtypeOf(options), chunk = chunkOf(options);
  const c = info.config, d = c.hidden_size, E = moe.num_experts;
  const init = routerInit(options.seed ?? 0, 'cpu', routerInitKind(options, 'upcycleCheckpoint'));
  const entries: WriteEntry[] = [copyEntry(r, 'model.embed_tokens.weight', 'model.embed_tokens.weight', to, chunk)];
  for (let i = 0; i < c.num_hidden_layers; i++) {
    const p = layer(i);
    for (const n of LAYER_COMMON)
      entries.push(copyEntry(r, `${p}.${n}.weight`, `${p}.${n}.weight`, to, chunk));
    const ffnDtype = to ?? r.info(`${p}.mlp.gate_proj.weight`).dtype;
    for (const g of PROJ) for (let e = 0; e < E; e++) entries.push(copyEntry(r, `${p}.mlp.${g}_proj.weight`, expertName(i, g, e), to, chunk));
    for (const [name, shape] of routerTensors(i, moe, d)) {
      const make = init.next(shape);
      entries.push({ name, dtype: ffnDtype, shape, tensor: make, dispose: true });
    }
    const N = moe.shared_expert ? E - 1 : E;
    if (moe.gate_noise) entries.push({ name: `${p}.mlp.gate.weight_noise.weight`, dtype: ffnDtype, shape: [N, d], tensor: init.noise([N, d]), dispose: true });
  }
  entries.push(copyEntry(r, 'model.norm.weight', 'model.norm.weight', to, chunk));
  entries.push(copyEntry(r, 'lm_head.weight', 'lm_head.weight', to, chunk));
  const dtype = to ?? r.info('model.layers.0.mlp.gate_proj.weight').dtype;
  const out: CheckpointInfo = { dir: dst, kind: 'moe', config: c, moe, sharedRate: null, raw: configJson('moe', c, moe, null, dtype) };
  writeCheckpoint(dst, entries, out.raw, { ...options, copyFrom: src });
  return out;
}

/**
 * Writes a merge checkpoint for a trained merge model whose frozen weights came from `src` (an MoE
 * or merge checkpoint): every frozen tensor is copied from `src` as it is there (its dtype and bits,
 * whatever precision the model computed in), the router is dropped, and the model's α is written
 * (f32) with its λ. Streams like mergeCheckpoint.
 */
export function saveMergeCheckpoint(model: Model, src: string, dst: string, options: StreamOptions & { files?: Record<string, string> } = {}): CheckpointInfo {
  if (model.kind !== 'merged') throw new XftError(`saveMergeCheckpoint: expected a merge model, got a ${model.kind} model`, 'XFT_VALUE');
  const info = readCheckpointInfo(src);
  if (info.kind === 'dense') throw new XftError(`saveMergeCheckpoint: ${src} is a dense checkpoint; expected the MoE or merge checkpoint the model came from`, 'XFT_VALUE');
  const r = new SafetensorsReader(src);
  checkTensors(info, r);
  checkOutputFolder(dst, options.overwrite);
  const ffns = model.blocks.map((b) => b.ffn as MergedFFN);
  const rate = ffns[0].sharedRate, E = info.moe!.num_experts;
  if (ffns[0].gate.value.shape[0] !== E || model.blocks.length !== info.config.num_hidden_layers)
    throw new XftError(`saveMergeCheckpoint: the model does not have the shape of ${src}`, 'XFT_SHAPE');
  const to = fileDtypeOf(options), chunk = chunkOf(options);
  const keep = (n: string) => !/\.mlp\.gate\./.test(n) && !n.endsWith('.mlp.average_weights') && !IGNORED.test(n);
  const entries: WriteEntry[] = r.names().filter(keep).map((n) => copyEntry(r, n, n, to, chunk));
  ffns.forEach((f, i) => entries.push({ name: `${layer(i)}.mlp.average_weights`, dtype: 'F32', shape: f.alpha.value.shape, tensor: () => f.alpha.value }));
  const dtype = to ?? r.info('model.layers.0.mlp.calculator.experts.weight_gate.0.weight').dtype;
  const raw = configJson('merged', info.config, info.moe, rate, dtype);
  writeCheckpoint(dst, entries, raw, { ...options, copyFrom: src });
  return { dir: dst, kind: 'merged', config: info.config, moe: info.moe, sharedRate: rate, raw };
}

/** Mixing coefficients c_e (XFT.md section 2), computed in double: c_0 = λ, c_i = (1 - λ) softmax(α)_i; soup: softmax(α). */
export function mixingCoefficients(alpha: ArrayLike<number>, sharedRate: number | null): number[] {
  const a = Array.from(alpha), m = a.reduce((x, v) => Math.max(x, v), -Infinity);
  const ex = a.map((v) => Math.exp(v - m)), z = ex.reduce((s, v) => s + v, 0);
  const s = ex.map((v) => v / z);
  return sharedRate === null ? s : [sharedRate, ...s.map((v) => (1 - sharedRate) * v)];
}

export interface MergeCheckpointOptions extends StreamOptions {
  /**
   * λ for an MoE checkpoint (merged with the initial coefficients, α = 0; default 0.75, or null
   * without a shared expert). A merge checkpoint uses the λ its α was learned with.
   */
  sharedRate?: number | null;
}

/**
 * Compiles an MoE or merge checkpoint on disk into a dense Llama checkpoint: per layer and
 * projection W̄ = Σ_e c_e W_e, accumulated in f32 expert by expert, chunk by chunk (peak memory:
 * one f32 copy of the largest FFN weight). Everything but the FFNs is copied.
 */
export function mergeCheckpoint(src: string, dst: string, options: MergeCheckpointOptions = {}): CheckpointInfo & { coefficients: number[][] } {
  const info = readCheckpointInfo(src);
  if (info.kind === 'dense') throw new XftError(`mergeCheckpoint: ${src} is a dense checkpoint; expected an MoE or merge checkpoint`, 'XFT_VALUE');
  const moe = info.moe!, E = moe.num_experts;
  let rate: number | null;
  if (info.kind === 'merged') {
    if (options.sharedRate !== undefined && options.sharedRate !== info.sharedRate)
      throw new XftError(`mergeCheckpoint: ${src} learned its coefficients with shared rate ${info.sharedRate}; sharedRate ${options.sharedRate} would not match them`, 'XFT_VALUE');
    rate = info.sharedRate;
  } else {
    rate = options.sharedRate === undefined ? (moe.shared_expert ? 0.75 : null) : options.sharedRate;
    if (rate !== null && !(typeof rate === 'number' && rate >= 0 && rate <= 1))
      throw new XftError(`mergeCheckpoint: expected a number in [0, 1] or null for sharedRate but received ${JSON.stringify(rate)}`, 'XFT_VALUE');
    if (rate !== null && !moe.shared_expert) throw new XftError('mergeCheckpoint: this MoE has no shared expert; pass sharedRate: null', 'XFT_VALUE');
  }
  const r = new SafetensorsReader(src);
  checkTensors(info, r);
  checkOutputFolder(dst, options.overwrite);
  const to = fileDtypeOf(options), chunk = chunkOf(options);
  const c = info.config;
  const coefficients: number[][] = [];
  const entries: WriteEntry[] = [copyEntry(r, 'model.embed_tokens.weight', 'model.embed_tokens.weight', to, chunk)];
  for (let i = 0; i < c.num_hidden_layers; i++) {
    const p = layer(i);
    const alpha = info.kind === 'merged' ? Array.from(r.readF32(`${p}.mlp.average_weights`)) : new Array<number>(rate === null ? E : E - 1).fill(0);
    const coef = mixingCoefficients(alpha, rate);
    coefficients.push(coef);
    for (const n of LAYER_COMMON)
      entries.push(copyEntry(r, `${p}.${n}.weight`, `${p}.${n}.weight`, to, chunk));
    for (const g of PROJ) {
      const first = r.info(expertName(i, g, 0)), n = numelOf(first.shape), dtype = to ?? first.dtype;
      entries.push({
        name: `${p}.mlp.${g}_proj.weight`, dtype, shape: first.shape,
        bytes: function* () {
          // one f32 accumulator for the tensor; the read buffers are reused (no garbage per chunk)
          const acc = zeroedAccumulator(n), c = Math.min(n, chunk);
          const buffers = { scratch: scratchBytes(c * dtypeBytes(first.dtype)), out: scratchF32(c) };
          for (let e = 0; e < E; e++) {
            const ce = coef[e];
            for (let s = 0; s < n; s += chunk) {
              const v = r.readF32(expertName(i, g, e), s, Math.min(chunk, n - s), buffers);
              for (let j = 0; j < v.length; j++) acc[s + j] += ce * v[j];
            }
          }
          if (dtype === 'F32') yield new Uint8Array(acc.buffer, 0, n * 4);
          else for (let s = 0; s < n; s += chunk) yield f32ToBytes(acc.subarray(s, Math.min(n, s + chunk)), dtype);
        },
      });
    }
  }
  entries.push(copyEntry(r, 'model.norm.weight', 'model.norm.weight', to, chunk));
  entries.push(copyEntry(r, 'lm_head.weight', 'lm_head.weight', to, chunk));
  const dtype = to ?? r.info('model.layers.0.mlp.calculator.experts.weight_gate.0.weight').dtype;
  const raw = configJson('dense', c, null, null, dtype);
  writeCheckpoint(dst, entries, raw, { ...options, copyFrom: src });
  return { dir: dst, kind: 'dense', config: c, moe: null, sharedRate: null, raw, coefficients };
}

// ---- building blocks of the streamed writers of lib/upit (assemble) ----

/**
 * @internal The pieces `upcycleCheckpoint` and `mergeCheckpoint` are built from, for the UpIT writers
 * (lib/upit/assemble.ts): the tensor check of a checkpoint, the chunked copy entry, the atomic,
 * claimed folder writer, the reference's names, and the shared scratch buffers of streamed tensors.
 */
export const checkpointStreaming = {
  checkTensors, copyEntry, writeCheckpoint, expertName, layerCommon: LAYER_COMMON, projections: PROJ, fileDtypeOf, chunkOf,
  scratchBytes, scratchF32, zeroedAccumulator,
} as const;
