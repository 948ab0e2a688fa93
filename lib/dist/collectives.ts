/**
 * The collectives data-parallel training uses, as one small interface (`Collectives`) over a process
 * group of lib/dist (Gloo on the CPU, NCCL on GPUs), plus `SoloGroup`, the world of one process
 * (every collective the identity), and `sumOverRanks`: host numbers summed over ranks in f64 order.
 */
import { Tensor } from '../tensor';

/** In-place collectives over the ranks of a run; every rank calls each one in the same order. */
export interface Collectives {
  readonly rank: number;
  readonly worldSize: number;
  /** `t` = the sum of every rank's `t` */
  allReduce(t: Tensor): void;
  /** allReduce started now (on GPUs on a second stream); `wait()` before reading or writing `t` */
  allReduceAsync(t: Tensor): { wait(): void };
  /** output [n] of rank r = the sum over ranks of input[r·n, (r+1)·n) */
  reduceScatter(input: Tensor, output: Tensor): void;
  /** output [W·n]: rank r's input [n] at r·n */
  allGather(input: Tensor, output: Tensor): void;
  /** `t` = root's `t` */
  broadcast(t: Tensor, root: number): void;
  barrier(): void;
  /** numbers summed over ranks, the same result on every rank (see sumOverRanks) */
  sum(values: readonly number[]): number[];
}

/**
 * Each rank's numbers (f64) as f32 pairs (hi = fround(x), lo = fround(x - hi)), all-gathered and
 * summed on the host in rank order: the sum keeps ~48 bits, whatever the world size, and is the same
 * on every rank. Logged losses and token counts are summed this way.
 */
export function sumOverRanks(g: Pick<Collectives, 'rank' | 'worldSize' | 'allGather'>, values: readonly number[], device: 'cpu' | 'cuda'): number[] {
  const k = values.length, W = g.worldSize;
  if (W === 1 || k === 0) return [...values];
  const pairs = new Float32Array(2 * k);
  values.forEach((x, i) => {
    const hi = Math.fround(x);
    pairs[2 * i] = hi;
    pairs[2 * i + 1] = Number.isFinite(hi) ? Math.fround(x - hi) : 0;
  });
  const mine = Tensor.from(pairs, [2 * k], { device }), all = Tensor.empty([W * 2 * k], { device });
  try {
    g.allGather(mine, all);
    const a = all.toArray(), out = new Array<number>(k).fill(0);
    for (let r = 0; r < W; r++) for (let i = 0; i < k; i++) out[i] += a[r * 2 * k + 2 * i] + a[r * 2 * k + 2 * i + 1];
    return out;
  } finally {
    mine.dispose(), all.dispose();
  }
}

const done = { wait: () => {} };

/** A world of one process: a run with it is the plain single-process run. */
export class SoloGroup implements Collectives {
  readonly rank = 0;
  readonly worldSize = 1;
  allReduce(): void {}
  allReduceAsync(): { wait(): void } {
    return done;
  }
  reduceScatter(input: Tensor, output: Tensor): void {
    output.copy_(input);
  }
  allGather(input: Tensor, output: Tensor): void {
    output.copy_(input);
  }
  broadcast(): void {}
  barrier(): void {}
  sum(values: readonly number[]): number[] {
    return [...values];
  }
}
