/**
 * The arithmetic of data-parallel training, with no communication: how a step's global batch is split
 * over ranks, how gradients are grouped into buckets in the order the backward produces them, and how
 * ZeRO stage 1 partitions the optimizer state (flat ranges of each bucket for AdamW, whole tensors
 * for Adafactor, whose factored statistics need whole matrices).
 *
 * The split keeps a run's recipe independent of the world size W: a step reads the same `batch`
 * sequences in the same micro-batches (of `micro` sequences) whatever W is; rank r runs the
 * contiguous micro-batches [r·A/W, (r+1)·A/W) of the A = batch / micro of the step, so W must divide A.
 */
import { XftError, describe } from '../errors';
import { dtypeBytes, type DType } from '../tensor';

function fail(what: string, code: 'XFT_VALUE' | 'XFT_TYPE' = 'XFT_VALUE'): never {
  throw new XftError(what, code);
}

/** An integer >= min, else XFT_VALUE naming `name`. */
function expectCount(op: string, name: string, v: unknown, min: number): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) fail(`${op}: expected an integer >= ${min} for ${name} but received ${describe(v)}`);
  return v;
}

export interface RankBatch {
  /** micro-batches of a step over all ranks (batch / micro) */
  microBatches: number;
  /** micro-batches this rank runs per step */
  localMicroBatches: number;
  /** index (in the step) of this rank's first micro-batch */
  firstMicroBatch: number;
  /** sequences of the step this rank reads: [first, first + count) of the step's batch */
  firstSequence: number;
  sequences: number;
}

/**
 * Rank `rank`'s share of a step of `batch` sequences in micro-batches of `micro` over `world` ranks:
 * batch = micro × accumulation steps × world, else XFT_VALUE saying what divides what.
 */
export function rankBatch(batch: number, micro: number, world: number, rank: number): RankBatch {
  const op = 'rankBatch';
  expectCount(op, 'batch', batch, 1), expectCount(op, 'micro', micro, 1), expectCount(op, 'world', world, 1), expectCount(op, 'rank', rank, 0);
  if (rank >= world) fail(`${op}: rank ${rank} is out of range for a world of ${world}`);
  if (batch % micro !== 0) fail(`the micro-batch ${micro} must divide the batch size ${batch}`);
  const microBatches = batch / micro;
  if (microBatches % world !== 0)
    fail(`the batch size ${batch} must be micro-batch × accumulation steps × world size: ${microBatches} micro-batches of ${micro} do not split over ${world} ranks ` +
      `(choose a batch size that is a multiple of ${micro * world}, or a micro-batch that divides ${batch / world})`);
  const local = microBatches / world;
  return { microBatches, localMicroBatches: local, firstMicroBatch: rank * local, firstSequence: rank * local * micro, sequences: local * micro };
}

/** What a bucket needs to know about a parameter. */
export interface BucketParam {
  readonly numel: number;
  /** dtype of its gradient */
  readonly gradDtype: DType;
  /** dtype of its weights (ZeRO all-gathers them) */
  readonly valueDtype: DType;
}

export interface Bucket<P> {
  readonly params: readonly P[];
  /** elements of each parameter */
  readonly numels: readonly number[];
  /** element offset of each parameter in the bucket's flat buffer */
  readonly offsets: readonly number[];
  /** elements of the parameters */
  readonly numel: number;
  /** numel rounded up to a multiple of the world size (reduce-scatter splits it evenly) */
  readonly padded: number;
  readonly gradDtype: DType;
  readonly valueDtype: DType;
}

/** PyTorch DDP's default bucket size (25 MiB). */
export const DEFAULT_BUCKET_BYTES = 25 * 2 ** 20;

/**
 * Parameters (in the order their gradients become final) in buckets of at most `capBytes` of gradient
 * each (a larger parameter gets a bucket of its own); a bucket holds one gradient dtype and one weight
 * dtype. Every rank builds the same buckets from the same parameters.
 */
export function buckets<P>(params: readonly P[], info: (p: P) => BucketParam, capBytes: number, world: number): Bucket<P>[] {
  expectCount('buckets', 'capBytes', capBytes, 1), expectCount('buckets', 'world', world, 1);
  const out: Bucket<P>[] = [];
  let open: [P, BucketParam][] = [], bytes = 0;
  const close = () => {
    if (open.length === 0) return;
    const offsets: number[] = [];
    let n = 0;
    for (const [, q] of open) offsets.push(n), (n += q.numel);
    const first = open[0][1];
    out.push({ params: open.map(([p]) => p), numels: open.map(([, q]) => q.numel), offsets, numel: n, padded: Math.ceil(n / world) * world, gradDtype: first.gradDtype, valueDtype: first.valueDtype });
    open = [], bytes = 0;
  };
  for (const p of params) {
    const q = info(p), b = q.numel * dtypeBytes(q.gradDtype);
    if (open.length && (bytes + b > capBytes || q.gradDtype !== open[0][1].gradDtype || q.valueDtype !== open[0][1].valueDtype)) close();
    open.push([p, q]);
    bytes += b;
  }
  close();
  return out;
}

/** A parameter's elements [start, end) that `rank` owns under a flat partition of its bucket (empty when start = end). */
export interface Piece {
  readonly start: number;
  readonly end: number;
  /** where the piece sits in the rank's shard of the bucket */
  readonly shardOffset: number;
}

/** Elements per rank of a bucket's flat partition. */
export function shardSize(bucket: Bucket<unknown>, world: number): number {
  return bucket.padded / world;
}

/**
 * The piece of each parameter of `bucket` that `rank` owns when the bucket's flat buffer (padded to
 * a multiple of the world size) is split into `world` equal ranges, range r to rank r.
 */
export function flatPieces(bucket: Bucket<unknown>, world: number, rank: number): Piece[] {
  const size = shardSize(bucket, world), lo = rank * size, hi = lo + size;
  return bucket.numels.map((numel, i) => {
    const a = Math.max(lo, bucket.offsets[i]), b = Math.min(hi, bucket.offsets[i] + numel);
    return b > a ? { start: a - bucket.offsets[i], end: b - bucket.offsets[i], shardOffset: a - lo } : { start: 0, end: 0, shardOffset: 0 };
  });
}

/**
 * Whole tensors to ranks (Adafactor under ZeRO stage 1): largest first (by `cost`, e.g. optimizer
 * state elements) to the least loaded rank, ties to the lower rank and, among equal costs, in the
 * given order. Deterministic: every rank computes the same owners. Returns the owner of each tensor.
 */
export function assignWhole(costs: readonly number[], world: number): number[] {
  expectCount('assignWhole', 'world', world, 1);
  const load = new Array<number>(world).fill(0), owner = new Array<number>(costs.length).fill(0);
  const order = costs.map((c, i) => [c, i] as const).sort((x, y) => y[0] - x[0] || x[1] - y[1]);
  for (const [c, i] of order) {
    let best = 0;
    for (let r = 1; r < world; r++) if (load[r] < load[best]) best = r;
    owner[i] = best;
    load[best] += c;
  }
  return owner;
}
