/**
 * UpIT stage 4, assembly (../shared/UPIT.md §2 Stage 4): dense expert checkpoints become one MoE
 * checkpoint under the XFT reference's names, streamed tensor by tensor like upcycleCheckpoint.
 *
 *   expert stacks  layer l, expert e: F_l(experts[e]) (gate, up, down), copied as stored (bit for bit
 *                  when the dtype does not change)
 *   router         linear, no bias, [E, d]: row e of layer l = r_e^(l) from routing[e]'s
 *                  routing_vectors.safetensors; without routing, drawn as `upcycle` draws a linear router
 *   trunk          every other tensor (embedding, attention, norms, final norm, lm_head): the fp32 mean
 *                  over the trunk checkpoints (UPIT.md A4, BTX-style), rounded once to the output dtype
 *   MoE config     E = experts.length, top-k, no shared expert, no router noise, the Switch balance loss
 *
 * With E copies of one checkpoint, no routing and that checkpoint as the trunk, the result is
 * `upcycle(θ, { sharedExpert: false, router: 'linear', noise: false, experts: E, topK: k })` tensor for
 * tensor (UPIT.md §7.1). Peak memory: one f32 accumulator of the largest trunk tensor plus one chunk.
 */
import { XftError, invalidArgument } from '../errors';
import { type BalanceLossKind, BALANCE_LOSSES, moeConfig } from '../config';
import { type CheckpointInfo, checkpointStreaming as cs, checkOutputFolder, configJson, readCheckpointInfo } from '../checkpoint';
import { type FileDType, SafetensorsReader, type WriteEntry, dtypeBytes, f32ToBytes } from '../safetensors';
import { numelOf, formatShape } from '../tensor';
import { expectArray, expectInt, expectNumber, expectOneOf, expectOptions } from '../validate';
import { routerInit, routerTensors } from '../xft';
import { readRoutingVectors } from './route';

export interface AssembleOptions {
  /** dense folders; expert e's FFNs come from experts[e] */
  experts: readonly string[];
  /** folders from preoptimizeRouting (same order): router row e of layer l = r_e^(l); null: router drawn as upcycle does (seed) */
  routing?: readonly string[] | null;
  /** dense folders whose non-FFN tensors are averaged (UPIT.md A4) */
  trunk: readonly string[];
  out: string;
  /** k, experts per token (default 2, the paper's) */
  topK?: number;
  /** seed of the router drawn without routing (as upcycle's) */
  seed?: number;
  /** the MoE's balance loss (default 'switch', UpIT's L_load) */
  balanceLoss?: BalanceLossKind;
  /** its weight (default 0.01) */
  balanceLossWeight?: number;
  /** dtype of the weights written (default: experts[0]'s FFN dtype) */
  dtype?: 'f32' | 'bf16';
  /** replace an existing, non-empty output folder (default false) */
  overwrite?: boolean;
  /** elements per read (default 4M) */
  chunkElements?: number;
  /** called after each tensor is written */
  onProgress?: (p: { done: number; total: number; name: string; bytes: number }) => void;
}

const OP = 'assembleMoe';

function folders(name: string, v: unknown, min: number): string[] {
  const a = expectArray(OP, name, v, `an array of at least ${min} checkpoint folder(s)`) as unknown[];
  if (a.length < min) throw new XftError(`${OP}: expected at least ${min} checkpoint folder(s) for ${name} but received ${a.length}`, 'XFT_VALUE');
  a.forEach((x, i) => {
    if (typeof x !== 'string' || x === '') throw invalidArgument(OP, `${name}[${i}]`, 'a folder path', x, 'XFT_TYPE');
  });
  return a as string[];
}

/** A dense checkpoint of the architecture of `like` (checked names, shapes, dtypes), with its reader. */
function denseInput(dir: string, what: string, like?: CheckpointInfo): { info: CheckpointInfo; r: SafetensorsReader } {
  const info = readCheckpointInfo(dir);
  if (info.kind !== 'dense') throw new XftError(`${OP}: ${what} ${dir} is a ${info.kind} checkpoint; expected a dense one`, 'XFT_VALUE');
  const r = new SafetensorsReader(dir);
  cs.checkTensors(info, r);
  if (like) {
    const a = like.config, b = info.config;
    for (const k of ['hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'vocab_size'] as const)
      if (a[k] !== b[k]) throw new XftError(`${OP}: ${what} ${dir} has ${k} ${b[k]}, but ${like.dir} has ${a[k]}: every input must have one architecture`, 'XFT_SHAPE');
  }
  return { info, r };
}

/** The fp32 mean of a tensor over the trunk checkpoints `tr`, rounded once to `to`, as a streamed entry. */
function trunkMean(tr: readonly { r: SafetensorsReader }[], to: FileDType, chunk: number): (name: string) => WriteEntry {
  return (name) => {
    const info = tr[0].r.info(name), n = numelOf(info.shape);
    if (tr.length === 1) return cs.copyEntry(tr[0].r, name, name, to, chunk);
    return {
      name, dtype: to, shape: info.shape,
      bytes: function* () {
        const acc = cs.zeroedAccumulator(n), step = Math.min(n, chunk);
        for (const t of tr) {
          const buffers = { scratch: cs.scratchBytes(step * dtypeBytes(t.r.info(name).dtype)), out: cs.scratchF32(step) };
          for (let s = 0; s < n; s += chunk) {
            const v = t.r.readF32(name, s, Math.min(chunk, n - s), buffers);
            for (let j = 0; j < v.length; j++) acc[s + j] += v[j];
          }
        }
        const k = tr.length;
        for (let j = 0; j < n; j++) acc[j] /= k;
        if (to === 'F32') yield new Uint8Array(acc.buffer, acc.byteOffset, n * 4);
        else for (let s = 0; s < n; s += chunk) yield f32ToBytes(acc.subarray(s, Math.min(n, s + chunk)), to);
      },
    };
  };
}

/**
 * Assembles the UpIT MoE checkpoint `out` (atomically; the folder is claimed while written): expert e's
 * FFNs from experts[e], the linear router from the routing vectors (or drawn), the trunk averaged.
 * Returns the written checkpoint's info (kind 'moe'), which loadModel, xft eval / generate / train and
 * XFT's learned merge (no shared expert: sharedRate null) accept.
 */
export function assembleMoe(options: AssembleOptions): CheckpointInfo {
  const o = expectOptions<AssembleOptions>(OP, options, 'an object { experts, routing?, trunk, out, ... }');
  const experts = folders('experts', o.experts, 2);
  const trunk = folders('trunk', o.trunk, 1);
  const routing = o.routing === undefined || o.routing === null ? null : folders('routing', o.routing, 1);
  if (routing && routing.length !== experts.length)
    throw new XftError(`${OP}: expected one routing folder per expert (${experts.length}) but received ${routing.length}`, 'XFT_VALUE');
  if (typeof o.out !== 'string' || o.out === '') throw invalidArgument(OP, 'out', 'an output folder path', o.out, 'XFT_TYPE');
  const E = experts.length;
  const topK = o.topK === undefined ? 2 : expectInt(OP, 'topK', o.topK, 1, E);
  const seed = o.seed === undefined ? 0 : expectInt(OP, 'seed', o.seed, 0, 2 ** 40);
  const balanceLoss = o.balanceLoss === undefined ? 'switch' : expectOneOf(OP, 'balanceLoss', o.balanceLoss, BALANCE_LOSSES);
  const weight = o.balanceLossWeight === undefined ? 0.01 : expectNumber(OP, 'balanceLossWeight', o.balanceLossWeight, 'a finite number >= 0', (x) => x >= 0);
  const dtypeOpt = o.dtype === undefined ? undefined : expectOneOf(OP, 'dtype', o.dtype, ['f32', 'bf16'] as const);
  const chunk = cs.chunkOf({ chunkElements: o.chunkElements });

  // every input read and checked before anything is written
  const first = denseInput(experts[0], 'experts[0]');
  const ex = [first, ...experts.slice(1).map((d, i) => denseInput(d, `experts[${i + 1}]`, first.info))];
  const tr = trunk.map((d, i) => denseInput(d, `trunk[${i}]`, first.info));
  const c = first.info.config, d = c.hidden_size, layers = c.num_hidden_layers;
  const vectors = routing?.map((dir, e) => {
    const v = readRoutingVectors(dir);
    if (v.length !== layers || v.some((x) => x.length !== d))
      throw new XftError(`${OP}: ${dir}: expected ${layers} routing vectors of ${d} values (one per layer), got ${v.length} of ${formatShape([v[0]?.length ?? 0])}`, 'XFT_SHAPE');
    v.forEach((x, l) => {
      if (!x.every(Number.isFinite)) throw new XftError(`${OP}: ${dir}: the routing vector of layer ${l} holds a non-finite value`, 'XFT_FORMAT');
    });
    void e;
    return v;
  }) ?? null;
  checkOutputFolder(o.out, o.overwrite);

  const moe = moeConfig({
    num_experts: E, num_selects: topK, gate_type: 'linear', normalize_weights: true, shared_expert: false, gate_noise: false,
    balance_loss_weight: weight, balance_loss: balanceLoss,
  }, OP);
  const layer0 = 'model.layers.0.mlp.gate_proj.weight';
  const to: FileDType = dtypeOpt === 'bf16' ? 'BF16' : dtypeOpt === 'f32' ? 'F32' : first.r.info(layer0).dtype;
  const init = routerInit(seed, 'cpu', 'uniform');

  const meanEntry = trunkMean(tr, to, chunk);

  const entries: WriteEntry[] = [meanEntry('model.embed_tokens.weight')];
  for (let l = 0; l < layers; l++) {
    const p = `model.layers.${l}`;
    for (const n of cs.layerCommon) entries.push(meanEntry(`${p}.${n}.weight`));
    for (const g of cs.projections)
      for (let e = 0; e < E; e++) entries.push(cs.copyEntry(ex[e].r, `${p}.mlp.${g}_proj.weight`, cs.expertName(l, g, e), to, chunk));
    for (const [name, shape] of routerTensors(l, moe, d)) {
      if (vectors) {
        const rows = vectors.map((v) => v[l]);
        entries.push({
          name, dtype: to, shape,
          bytes: () => {
            const w = new Float32Array(E * d);
            rows.forEach((v, e) => w.set(v, e * d));
            return f32ToBytes(w, to);
          },
        });
      } else entries.push({ name, dtype: to, shape, tensor: init.next(shape), dispose: true });
    }
  }
  entries.push(meanEntry('model.norm.weight'));
  entries.push(meanEntry('lm_head.weight'));
  const out: CheckpointInfo = { dir: o.out, kind: 'moe', config: c, moe, sharedRate: null, raw: configJson('moe', c, moe, null, to) };
  cs.writeCheckpoint(o.out, entries, out.raw, { copyFrom: experts[0], overwrite: o.overwrite, onProgress: o.onProgress });
  return out;
}

export interface TrunkExpertOptions {
  /** the dense folder whose FFNs (gate, up, down of every layer) are kept */
  expert: string;
  /** dense folders whose other tensors are averaged, as assembleMoe's trunk */
  trunk: readonly string[];
  out: string;
  /** dtype of the weights written (default: the expert's FFN dtype) */
  dtype?: 'f32' | 'bf16';
  overwrite?: boolean;
  chunkElements?: number;
}

/**
 * UPIT.md A9 (option sharedTrunk): expert `expert` as it will sit in the MoE, a dense checkpoint of its
 * FFNs on the averaged trunk (every other tensor the fp32 mean over `trunk`, rounded once, exactly as
 * assembleMoe writes them), so that the seed stage scores and the route stage trains every expert on the
 * trunk the MoE will have, not on the expert's own. Streamed tensor by tensor; written atomically.
 */
export function trunkExpert(options: TrunkExpertOptions): CheckpointInfo {
  const op = 'trunkExpert';
  const o = expectOptions<TrunkExpertOptions>(op, options, 'an object { expert, trunk, out, ... }');
  if (typeof o.expert !== 'string' || o.expert === '') throw invalidArgument(op, 'expert', 'a dense checkpoint folder', o.expert, 'XFT_TYPE');
  const trunk = folders('trunk', o.trunk, 1);
  if (typeof o.out !== 'string' || o.out === '') throw invalidArgument(op, 'out', 'an output folder path', o.out, 'XFT_TYPE');
  const dtypeOpt = o.dtype === undefined ? undefined : expectOneOf(op, 'dtype', o.dtype, ['f32', 'bf16'] as const);
  const chunk = cs.chunkOf({ chunkElements: o.chunkElements });
  const ex = denseInput(o.expert, 'expert');
  const tr = trunk.map((d, i) => denseInput(d, `trunk[${i}]`, ex.info));
  checkOutputFolder(o.out, o.overwrite);
  const c = ex.info.config;
  const to: FileDType = dtypeOpt === 'bf16' ? 'BF16' : dtypeOpt === 'f32' ? 'F32' : ex.r.info('model.layers.0.mlp.gate_proj.weight').dtype;
  const meanEntry = trunkMean(tr, to, chunk);
  const entries: WriteEntry[] = [meanEntry('model.embed_tokens.weight')];
  for (let l = 0; l < c.num_hidden_layers; l++) {
    const p = `model.layers.${l}`;
    for (const n of cs.layerCommon) entries.push(meanEntry(`${p}.${n}.weight`));
    for (const g of cs.projections) entries.push(cs.copyEntry(ex.r, `${p}.mlp.${g}_proj.weight`, `${p}.mlp.${g}_proj.weight`, to, chunk));
  }
  entries.push(meanEntry('model.norm.weight'));
  entries.push(meanEntry('lm_head.weight'));
  const out: CheckpointInfo = { dir: o.out, kind: 'dense', config: c, moe: null, sharedRate: null, raw: configJson('dense', c, null, null, to) };
  cs.writeCheckpoint(o.out, entries, out.raw, { copyFrom: o.expert, overwrite: o.overwrite });
  return out;
}
