/**
 * The collectives data-parallel training uses, as one small interface (`Collectives`): over a
 * ProcessGroup of lib/dist/group.ts (Gloo on the CPU, NCCL on GPUs) with `collectivesOf`, or
 * `SoloGroup`, the world of one process (every collective the identity).
 */
import { Tensor } from '../tensor';
import type { ProcessGroup } from './group';

/** In-place collectives over the ranks of a run; every rank calls each one in the same order. */
export interface Collectives {
  readonly rank: number;
  readonly worldSize: number;
  /** each tensor = the sum of every rank's (tensors of one dtype) */
  allReduce(t: Tensor | Tensor[]): void;
  /** allReduce started now (Gloo: on its communication thread; NCCL: on a second stream); `wait()` before reading or writing the tensors */
  allReduceAsync(t: Tensor | Tensor[]): { wait(): void };
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
 * The collectives of a process group. Sums of host numbers go through its f64 reduction; a
 * non-finite number (a diverged loss) is carried as a flag, so that every rank sees the NaN.
 */
export function collectivesOf(pg: ProcessGroup): Collectives {
  return {
    rank: pg.rank,
    worldSize: pg.worldSize,
    allReduce: (t) => pg.allReduce(t, 'sum'),
    allReduceAsync: (t) => pg.allReduceAsync(t, 'sum'),
    reduceScatter: (input, output) => pg.reduceScatter(input, output, 'sum'),
    allGather: (input, output) => pg.allGather(input, output),
    broadcast: (t, root) => pg.broadcast(t, root),
    barrier: () => pg.barrier(),
    sum: (values) => {
      const finite = values.map((x) => (Number.isFinite(x) ? x : 0));
      const bad = values.map((x) => (Number.isFinite(x) ? 0 : 1));
      const r = pg.allReduceNumbers([...finite, ...bad], 'sum');
      return values.map((_, i) => (r[values.length + i] > 0 ? NaN : r[i]));
    },
  };
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
