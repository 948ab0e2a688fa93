/**
 * Data-parallel training (PyTorch DDP's design over lib/dist's collectives): every rank holds the
 * whole model, runs its share of each step's micro-batches (lib/dist/shard.ts), and the gradients are
 * summed over ranks in place, in buckets as the backward produces them (allReduceAsync: the
 * reduction of the last layers' bucket runs while the backward computes the earlier layers; no
 * copy of the gradients is made). Optionally ZeRO stage 1
 * (lib/dist/zero.ts): the optimizer state sharded over ranks.
 *
 * Scaling: every rank's backward divides by the token count of the whole step (all ranks read the
 * same data order, so each knows it), and the reduction sums; the gradient is then exactly the one
 * process's (the mean over the step's response tokens), whatever the world size. (accelerate's DDP
 * averages per-rank means instead, which weights tokens unequally when ranks see different counts.)
 */
import type { Device, Tensor } from '../tensor';
import * as lops from '../ops_layers';
import { type OptimizerKind, type StepHyper, optimizerStep, prepareState, disposeOptimizerState } from '../optim';
import type { Param } from '../model';
import type { TrainParallel, TrainState } from '../train';
import { type Bucket, DEFAULT_BUCKET_BYTES, buckets } from './shard';
import { ZeroStage1 } from './zero';
import type { Collectives } from './collectives';

export interface DataParallelOptions {
  /** gradient bytes per bucket (default 25 MiB, as DDP) */
  bucketBytes?: number;
  /** 0: replicated optimizer state (default); 1: ZeRO stage 1 */
  zero?: 0 | 1;
}

export class DataParallel implements TrainParallel {
  readonly rank: number;
  readonly worldSize: number;
  readonly zero: 0 | 1;
  readonly #g: Collectives;
  readonly #bucketBytes: number;
  #buckets: Bucket<Param>[] = [];
  #pending: ({ wait(): void } | null)[] = [];
  #ready = new Set<Param>();
  #zero: ZeroStage1 | null = null;
  #params: Param[] = [];

  constructor(group: Collectives, options: DataParallelOptions = {}) {
    this.#g = group;
    this.rank = group.rank;
    this.worldSize = group.worldSize;
    this.zero = options.zero ?? 0;
    this.#bucketBytes = options.bucketBytes ?? DEFAULT_BUCKET_BYTES;
  }

  get group(): Collectives {
    return this.#g;
  }

  /**
   * Rank 0's weights to every rank (DDP does this at construction), the buckets, and the optimizer
   * state: complete on every rank, or this rank's shard under ZeRO (the full `state` given, e.g. a
   * resumed one, is cut to the shard and its maps emptied).
   */
  prepare(kind: OptimizerKind, params: Param[], state: TrainState, device: Device, masterWeights: boolean): void {
    this.dispose();
    this.#params = params;
    for (const p of params) this.#g.broadcast(p.value, 0);
    // the backward finishes gradients from the last layer to the first: buckets in that order
    this.#buckets = buckets([...params].reverse(), (p) => ({ numel: p.value.numel, gradDtype: p.gradDtype, valueDtype: p.value.dtype }), this.#bucketBytes, this.worldSize);
    this.#pending = this.#buckets.map(() => null);
    if (this.zero === 1) {
      this.#zero = new ZeroStage1(this.#g, kind, params, this.#buckets, device);
      this.#zero.prepare(state, masterWeights, state.step);
    } else prepareState(kind, params, state, device, masterWeights, state.step);
  }

  /** Starts the all-reduce of every bucket whose gradients are now all final (not under ZeRO with AdamW: reduce-scattered at the end). */
  gradientsReady(params: readonly Param[]): void {
    for (const p of params) this.#ready.add(p);
    if (this.#zero && !this.#zero.allReduces) return;
    this.#buckets.forEach((b, i) => {
      if (this.#pending[i] === null && b.params.every((p) => this.#ready.has(p))) this.#launch(i);
    });
  }

  /** The bucket's gradients summed over ranks in place (one collective over its tensors: no copy). */
  #launch(i: number): void {
    this.#pending[i] = this.#g.allReduceAsync(this.#buckets[i].params.map((p) => p.gradBuffer()));
  }

  sum(values: readonly number[]): number[] {
    return this.#g.sum(values);
  }

  allReduce(tensors: Tensor[]): void {
    this.#g.allReduce(tensors);
  }

  /**
   * Completes the reduction: every gradient is the sum over ranks (replicated), or this rank holds the
   * sums of its shard (ZeRO with AdamW). Returns the squared norm of the reduced gradient on the device
   * (no host synchronisation): the whole, or (ZeRO with AdamW, `partial`) this rank's shard's share.
   */
  reduceGradients(): { sumsq: Tensor; partial: boolean } {
    this.#ready.clear();
    if (this.#zero && !this.#zero.allReduces) return { sumsq: this.#zero.reduceScatter(), partial: true };
    this.#buckets.forEach((_, i) => {
      if (this.#pending[i] === null) this.#launch(i);
      this.#pending[i]!.wait();
      this.#pending[i] = null;
    });
    // every rank holds the same sums: the norm is computed locally, identically
    return { sumsq: lops.sumSquares(this.#params.map((p) => p.grad!)), partial: false };
  }

  update(kind: OptimizerKind, params: Param[], state: TrainState, h: StepHyper): void {
    if (this.#zero) this.#zero.step(h);
    else optimizerStep(kind, params, state, h);
  }

  /**
   * The full optimizer state (a collective: every rank calls it, in step). Replicated: `state` itself.
   * ZeRO: gathered from the shards, a new state the caller disposes with `release`.
   */
  fullState(state: TrainState): TrainState {
    return this.#zero ? this.#zero.fullState(state.step) : state;
  }

  /** Disposes what fullState returned when it is not the run's own state. */
  release(full: TrainState, state: TrainState): void {
    if (full !== state) disposeOptimizerState(full);
  }

  /** Optimizer state elements this rank keeps. */
  get localStateElements(): number {
    return this.#zero ? this.#zero.localStateElements : 0;
  }

  barrier(): void {
    this.#g.barrier();
  }

  dispose(): void {
    for (const w of this.#pending) w?.wait();
    this.#pending = [];
    this.#zero?.dispose();
    this.#zero = null;
    this.#ready.clear();
  }
}
