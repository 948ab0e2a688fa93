/**
 * ZeRO stage 1: the optimizer state sharded over the ranks of a data-parallel run.
 *
 * AdamW (elementwise): each gradient bucket's flat buffer, padded to a multiple of the world size W,
 * is split into W equal ranges; rank r keeps m, v (and the f32 master weights of a mixed-precision
 * run) for range r only. A step reduce-scatters the gradients (rank r receives the sums of its range),
 * updates its range, and all-gathers the weights. The update of an element reads only that element,
 * so the result is the replicated run's (bf16 stochastic rounding draws another stream per range).
 *
 * Adafactor: its row and column statistics and the update's RMS clipping need whole matrices, so
 * whole tensors are assigned to ranks (largest state first, to the least loaded rank); gradients are
 * all-reduced as in plain data parallelism, each owner updates its tensors, and broadcasts them.
 *
 * The state on disk is always the full one (`fullState` gathers it), so a run resumes at any world size.
 */
import { XftError } from '../errors';
import { Tensor, type Device } from '../tensor';
import * as lops from '../ops_layers';
import { type OptimizerKind, type OptimizerState, type OptimParam, type StepHyper, adafactorStateElements, adafactorStateShapes, optimizerStep } from '../optim';
import type { Param } from '../model';
import { type Bucket, type Piece, assignWhole, flatPieces, shardSize } from './shard';
import type { Collectives } from './collectives';

type StateMaps = Required<Omit<OptimizerState, 'optimizer'>>;
const MAPS = ['m', 'v', 'row', 'col', 'master'] as const;

function emptyMaps(): StateMaps {
  return { m: new Map(), v: new Map(), row: new Map(), col: new Map(), master: new Map() };
}

/** The refusals of prepareState (lib/optim): a state saved by another optimizer or precision does not mean what this run reads. */
function checkResumable(kind: OptimizerKind, params: readonly Param[], state: OptimizerState, masterWeights: boolean, step: number): void {
  const saved = state.optimizer ?? (step > 0 ? 'adamw' : undefined);
  if (saved !== undefined && saved !== kind)
    throw new XftError(`train: the state to resume was saved by a '${saved}' run; this run uses '${kind}' (resume with the same optimizer, or start a new run)`, 'XFT_VALUE');
  const masters = state.master?.size ?? 0;
  if (step > 0 && params.some((p) => p.value.dtype === 'bf16') && masterWeights !== masters > 0)
    throw new XftError(`train: the state to resume ${masters > 0 ? 'has f32 master weights (precision mixed)' : 'has no master weights (precision bf16)'}; ` +
      `this run ${masterWeights ? 'keeps master weights (mixed)' : 'has none (bf16)'}: resume with the same precision`, 'XFT_VALUE');
  if (kind === 'adafactor' && state.m.size > 0) throw new XftError('train: an Adafactor state holds no first moments (m.*)', 'XFT_VALUE');
}

/** Elements [start, end) of `t` flattened, as a new tensor (ops take whole tensors). */
function slice(t: Tensor, start: number, end: number): Tensor {
  return t.reshape([-1]).narrow(start, end - start).clone();
}

export class ZeroStage1 {
  readonly #g: Collectives;
  readonly #kind: OptimizerKind;
  readonly #buckets: readonly Bucket<Param>[];
  /** all trainable parameters in the run's order (their index is their stochastic-rounding stream) */
  readonly #params: readonly Param[];
  readonly #device: Device;
  /** AdamW: this rank's piece of each parameter, by bucket */
  readonly #pieces: Piece[][];
  /** Adafactor: the rank that owns each parameter (by name) */
  readonly #owner = new Map<string, number>();
  /** this rank's state: pieces (AdamW) or whole tensors it owns (Adafactor) */
  readonly #local: StateMaps = emptyMaps();
  /** AdamW: the reduce-scattered gradient shard of each bucket */
  #gradShards: Tensor[] = [];

  constructor(group: Collectives, kind: OptimizerKind, params: readonly Param[], buckets: readonly Bucket<Param>[], device: Device) {
    this.#g = group;
    this.#kind = kind;
    this.#params = params;
    this.#buckets = buckets;
    this.#device = device;
    const W = group.worldSize, r = group.rank;
    this.#pieces = kind === 'adamw' ? buckets.map((b) => flatPieces(b, W, r)) : [];
    if (kind === 'adafactor') {
      const owners = assignWhole(params.map((p) => adafactorStateElements(p.value.shape)), W);
      params.forEach((p, i) => this.#owner.set(p.name, owners[i]));
    }
  }

  /** Whether gradients are all-reduced (Adafactor) rather than reduce-scattered (AdamW). */
  get allReduces(): boolean {
    return this.#kind === 'adafactor';
  }

  /** Optimizer state elements (f32) this rank keeps. */
  get localStateElements(): number {
    let n = 0;
    for (const k of MAPS) this.#local[k].forEach((t) => (n += t.numel));
    return n;
  }

  /**
   * Takes this rank's part of `state` (a full state: loaded from a checkpoint, or empty for a new
   * run), zeros where it has none, and empties `state`'s maps (their tensors are disposed).
   */
  prepare(state: OptimizerState, masterWeights: boolean, step: number): void {
    checkResumable(this.#kind, this.#params, state, masterWeights, step);
    const L = this.#local, dev = this.#device;
    if (this.#kind === 'adamw') {
      this.#buckets.forEach((b, bi) => b.params.forEach((p, i) => {
        const { start, end } = this.#pieces[bi][i];
        if (end <= start) return;
        for (const k of ['m', 'v'] as const) {
          const full = state[k].get(p.name);
          L[k].set(p.name, full ? slice(full, start, end) : Tensor.zeros([end - start], { device: dev }));
        }
        if (masterWeights && p.value.dtype !== 'f32') {
          const full = state.master?.get(p.name);
          L.master.set(p.name, full ? slice(full, start, end) : slice(p.value, start, end).cast('f32'));
        }
      }));
    } else {
      for (const p of this.#params) {
        if (this.#owner.get(p.name) !== this.#g.rank) continue;
        for (const k of ['v', 'row', 'col'] as const) {
          const t = state[k]?.get(p.name);
          if (t) L[k].set(p.name, t.clone());
        }
        if (!L.row.has(p.name) && !L.v.has(p.name)) {
          const s = adafactorStateShapes(p.value.shape);
          if ('v' in s) L.v.set(p.name, Tensor.zeros(s.v, { device: dev }));
          else L.row.set(p.name, Tensor.zeros(s.row, { device: dev })), L.col.set(p.name, Tensor.zeros(s.col, { device: dev }));
        }
        if (masterWeights && p.value.dtype !== 'f32') L.master.set(p.name, state.master?.get(p.name)?.clone() ?? p.value.cast('f32'));
      }
    }
    for (const k of MAPS) {
      state[k]?.forEach((t) => t.dispose());
      state[k]?.clear();
    }
    state.optimizer = this.#kind;
  }

  /**
   * AdamW: reduce-scatters (sums) the gradients, bucket by bucket (packed into a flat buffer padded
   * to a multiple of the world size, one bucket at a time), into this rank's shards; returns this
   * rank's share of the gradients' sum of squares, f32 [1] on the device (the caller disposes it).
   */
  reduceScatter(): Tensor {
    this.#disposeShards();
    const W = this.#g.worldSize;
    this.#buckets.forEach((b) => {
      const flat = Tensor.zeros([b.padded], { dtype: b.gradDtype, device: this.#device });
      b.params.forEach((p, k) => flat.narrow(b.offsets[k], p.value.numel).copy_(p.gradBuffer().reshape([-1])));
      const shard = Tensor.empty([shardSize(b, W)], { dtype: b.gradDtype, device: this.#device });
      this.#g.reduceScatter(flat, shard);
      flat.dispose();
      this.#gradShards.push(shard);
    });
    return lops.sumSquares(this.#gradShards);
  }

  /**
   * The optimizer step on this rank's shard, then the weights to every rank: AdamW all-gathers each
   * bucket's updated ranges; Adafactor broadcasts each tensor from its owner.
   */
  step(h: StepHyper): void {
    const g = this.#g, L = this.#local;
    if (this.#kind === 'adafactor') {
      const mine: OptimParam[] = this.#params.map((p) => ({ name: p.name, value: p.value, grad: this.#owner.get(p.name) === g.rank ? p.grad : null }));
      optimizerStep('adafactor', mine, L, h);
      for (const p of this.#params) g.broadcast(p.value, this.#owner.get(p.name)!);
      return;
    }
    const W = g.worldSize, index = new Map(this.#params.map((p, i) => [p.name, i]));
    this.#buckets.forEach((b, bi) => {
      const size = shardSize(b, W), shard = this.#gradShards[bi];
      const valueShard = Tensor.zeros([size], { dtype: b.valueDtype, device: this.#device });
      // the run's whole parameter list, so that each piece keeps its parameter's rounding stream
      const list: OptimParam[] = this.#params.map((p) => ({ name: p.name, value: p.value, grad: null }));
      const made: Tensor[] = [];
      b.params.forEach((p, i) => {
        const { start, end, shardOffset } = this.#pieces[bi][i];
        if (end <= start) return;
        const value = slice(p.value, start, end), grad = shard.reshape([-1]).narrow(shardOffset, end - start).clone();
        list[index.get(p.name)!] = { name: p.name, value, grad };
        made.push(value, grad);
      });
      optimizerStep('adamw', list, L, h);
      b.params.forEach((p, i) => {
        const { start, end, shardOffset } = this.#pieces[bi][i];
        if (end > start) valueShard.narrow(shardOffset, end - start).copy_(list[index.get(p.name)!].value);
      });
      const gathered = Tensor.empty([b.padded], { dtype: b.valueDtype, device: this.#device });
      g.allGather(valueShard, gathered);
      b.params.forEach((p, i) => p.value.reshape([-1]).copy_(gathered.narrow(b.offsets[i], p.value.numel)));
      made.forEach((t) => t.dispose());
      valueShard.dispose(), gathered.dispose();
    });
    this.#disposeShards();
  }

  /**
   * The full optimizer state on every rank (a collective: every rank calls it), for a checkpoint that
   * any world size can resume. The caller disposes it.
   */
  fullState(step: number): OptimizerState & { step: number } {
    const g = this.#g, L = this.#local, W = g.worldSize, dev = this.#device;
    const out: OptimizerState & { step: number } = { step, optimizer: this.#kind, ...emptyMaps() };
    if (this.#kind === 'adamw') {
      const kinds = ['m', 'v', ...(this.#hasMasters() ? (['master'] as const) : [])] as const;
      this.#buckets.forEach((b, bi) => {
        const size = shardSize(b, W);
        for (const k of kinds) {
          const shard = Tensor.zeros([size], { device: dev }), flat = Tensor.empty([b.padded], { device: dev });
          b.params.forEach((p, i) => {
            const { start, end, shardOffset } = this.#pieces[bi][i];
            const t = L[k].get(p.name);
            if (end > start && t) shard.narrow(shardOffset, end - start).copy_(t);
          });
          g.allGather(shard, flat);
          b.params.forEach((p, i) => {
            if (k === 'master' && p.value.dtype === 'f32') return;
            out[k]!.set(p.name, flat.narrow(b.offsets[i], p.value.numel).clone().reshape(p.value.shape));
          });
          shard.dispose(), flat.dispose();
        }
      });
      return out;
    }
    const masters = this.#hasMasters();
    for (const p of this.#params) {
      const owner = this.#owner.get(p.name)!, mine = owner === g.rank, s = adafactorStateShapes(p.value.shape);
      const parts: ['v' | 'row' | 'col' | 'master', readonly number[]][] = 'v' in s ? [['v', s.v]] : [['row', s.row], ['col', s.col]];
      if (masters && p.value.dtype !== 'f32') parts.push(['master', p.value.shape]);
      for (const [k, shape] of parts) {
        const t = mine ? L[k].get(p.name)!.clone() : Tensor.empty(shape, { device: dev });
        g.broadcast(t, owner);
        out[k]!.set(p.name, t);
      }
    }
    return out;
  }

  /** Whether the run keeps f32 master weights (the same answer on every rank). */
  #hasMasters(): boolean {
    return this.#g.sum([this.#local.master.size])[0] > 0;
  }

  #disposeShards(): void {
    this.#gradShards.forEach((t) => t.dispose());
    this.#gradShards = [];
  }

  dispose(): void {
    this.#disposeShards();
    for (const k of MAPS) {
      this.#local[k].forEach((t) => t.dispose());
      this.#local[k].clear();
    }
  }
}
