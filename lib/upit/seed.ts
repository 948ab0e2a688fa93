/**
 * UpIT stage 3a (UPIT.md 3a): seed data and its buckets. A seeded 1% of the training rows (D_s) is
 * scored by every expert's dense model, one expert loaded at a time; each row goes to the bucket of
 * the expert with the lowest perplexity, i.e. the lowest mean NLL of the row's response tokens
 * (targets >= 0; rows padded, not packed), ties to the lower expert index.
 *
 *   loss[e][i] = mean over t with targets[i][t] >= 0 of  -log softmax(logits_e(row i))[t, targets[i][t]]
 *   bucket[i]  = argmin_e loss[e][i]           ('ppl', the paper)
 *              = argmin_e z_e(loss[e][i])      ('balanced', UPIT.md A5: z-score over the rows, per expert)
 *              = a seeded deal of the rows      ('random', the ablation "router init on random buckets")
 *
 * Per-token losses come from the cross-entropy kernel (cuda/cross_entropy.cu, CPU twin
 * binding/cpu/cross_entropy.cc) on the model's logits, summed per row in double on the host.
 */
import * as fs from 'node:fs';
import { XftError, invalidArgument } from '../errors';
import { Tensor, DEVICES, type Device, disposeAll } from '../tensor';
import { expectArray, expectInt, expectNumber, expectOneOf, expectOptions, expectString, expectFunction } from '../validate';
import { type Model, expectModel } from '../model';
import { type Sample, concatRows, expectSamples, shuffle } from '../data';
import * as tops from '../ops_train';
import { loadModel, readCheckpointInfo } from '../checkpoint';

/** The paper's seed fraction: 1% of the training set (UPIT.md 3a). */
export const SEED_FRACTION = 0.01;
/** Rows per forward pass of rowLosses (default). */
export const ROW_LOSS_MICRO_BATCH = 8;

/**
 * Indices of the seed rows: round(fraction·n) of 0..n-1 (at least 1, at most n), distinct, ascending,
 * drawn by a seeded shuffle (data.ts shuffle: the same seed gives the same set).
 */
export function seedIndices(n: number, fraction: number = SEED_FRACTION, seed = 0): number[] {
  const op = 'seedIndices';
  expectInt(op, 'n', n, 1);
  expectNumber(op, 'fraction', fraction, 'a number in (0, 1]', (x) => x > 0 && x <= 1);
  expectInt(op, 'seed', seed, 0);
  const count = Math.min(n, Math.max(1, Math.round(fraction * n)));
  const all = Array.from({ length: n }, (_, i) => i);
  return shuffle(all, seed).slice(0, count).sort((a, b) => a - b);
}

/**
 * Mean NLL of each row's target tokens (targets < 0 ignored): one number per row, in the rows' order.
 * A row without any target token gets NaN (it has no perplexity; assignBuckets never lets a NaN win).
 * Rows are forwarded `microBatch` at a time (default 8), consecutive rows of one length together;
 * padded rows are independent under the causal mask, so a row's loss does not depend on its batch
 * beyond float rounding.
 */
export function rowLosses(model: Model, rows: readonly Sample[], options: { microBatch?: number } = {}): Float64Array {
  const op = 'rowLosses';
  expectModel(op, 'model', model);
  const list = expectSamples(op, 'rows', rows);
  const o = expectOptions<{ microBatch?: number }>(op, options, 'an options object { microBatch? }');
  const micro = o.microBatch === undefined ? ROW_LOSS_MICRO_BATCH : expectInt(op, 'options.microBatch', o.microBatch, 1);
  const V = model.config.vocab_size;
  list.forEach((r, i) => {
    if (r.ids.length === 0) throw new XftError(`${op}: rows[${i}] is empty (no tokens)`, 'XFT_SHAPE');
    for (let t = 0; t < r.targets.length; t++)
      if (r.targets[t] >= V) throw invalidArgument(op, `rows[${i}].targets[${t}]`, `a token id < vocab_size ${V} (or < 0: ignored)`, r.targets[t]);
      else if (r.ids[t] < 0 || r.ids[t] >= V) throw invalidArgument(op, `rows[${i}].ids[${t}]`, `a token id in [0, ${V})`, r.ids[t]);
  });
  const out = new Float64Array(list.length);
  for (let i = 0; i < list.length;) {
    const T = list[i].ids.length;
    let j = i + 1;
    while (j < list.length && j - i < micro && list[j].ids.length === T) j++;
    const part = list.slice(i, j), B = part.length;
    const ids = Tensor.from(concatRows(part, 'ids'), [B * T], { dtype: 'i32', device: model.device });
    const targets = Tensor.from(concatRows(part, 'targets'), [B * T], { dtype: 'i32', device: model.device });
    const logits = model.logits(ids, B, T);
    const { losses, predictions } = tops.crossEntropy(logits, targets, { validate: false });
    const l = losses.toArray();
    disposeAll(ids, targets, logits, losses, predictions);
    part.forEach((r, b) => {
      let sum = 0, count = 0;
      for (let t = 0; t < T; t++)
        if (r.targets[t] >= 0) {
          sum += l[b * T + t];
          count++;
        }
      out[i + b] = count > 0 ? sum / count : NaN;
    });
    i = j;
  }
  return out;
}

export type BucketMode = 'ppl' | 'balanced' | 'random';
export const BUCKET_MODES: readonly BucketMode[] = ['ppl', 'balanced', 'random'];

export interface BucketOptions {
  /** 'ppl' (the paper: lowest mean NLL), 'balanced' (z-scored per expert first, UPIT.md A5) or 'random' (ablation); default 'ppl' */
  mode?: BucketMode;
  /** seed of the 'random' deal (default 0) */
  seed?: number;
  /** rows per forward pass (default 8) */
  microBatch?: number;
  device?: Device;
  /** compute dtype of the expert models (default f32) */
  dtype?: 'f32' | 'bf16';
  /** bucket sizes, and a warning per empty bucket */
  onLog?: (line: string) => void;
}

export interface Buckets {
  /** the expert of each row */
  bucket: number[];
  /** rows per expert */
  sizes: number[];
  /** [expert][row] mean NLL (NaN: a row without target tokens); empty per expert in 'random' mode (no expert is run) */
  losses: number[][];
}

/**
 * Assigns each row to an expert (see the file comment). `experts` are dense checkpoint folders of one
 * architecture; each is loaded, scores every row, and is freed before the next. Ties go to the lower
 * expert index; a NaN never wins (a row that is NaN for every expert goes to expert 0). 'random' deals
 * a seeded shuffle of the rows round-robin (sizes differ by at most 1) and runs no expert.
 */
export function assignBuckets(experts: readonly string[], rows: readonly Sample[], options: BucketOptions = {}): Buckets {
  const op = 'assignBuckets';
  const dirs = expectArray<unknown>(op, 'experts', experts, 'an array of dense checkpoint folders').map((d, e) => expectString(op, `experts[${e}]`, d, 'a checkpoint folder path'));
  if (dirs.length === 0) throw invalidArgument(op, 'experts', 'at least one dense checkpoint folder', experts);
  const list = expectSamples(op, 'rows', rows);
  const o = expectOptions<BucketOptions>(op, options, 'an options object { mode?, seed?, microBatch?, device?, dtype?, onLog? }');
  const mode = o.mode === undefined ? 'ppl' : expectOneOf(op, 'options.mode', o.mode, BUCKET_MODES);
  const seed = o.seed === undefined ? 0 : expectInt(op, 'options.seed', o.seed, 0);
  const micro = o.microBatch === undefined ? ROW_LOSS_MICRO_BATCH : expectInt(op, 'options.microBatch', o.microBatch, 1);
  const device = o.device === undefined ? 'cpu' : expectOneOf(op, 'options.device', o.device, DEVICES, 'XFT_DEVICE');
  const dtype = o.dtype === undefined ? 'f32' : expectOneOf(op, 'options.dtype', o.dtype, ['f32', 'bf16'] as const, 'XFT_DTYPE');
  const log = expectFunction<(line: string) => void>(op, 'options.onLog', o.onLog) ?? (() => {});
  // every folder is checked before the first (long) scoring pass
  let arch: string | null = null;
  dirs.forEach((dir, e) => {
    if (!fs.existsSync(dir)) throw new XftError(`${op}: experts[${e}] = ${dir} does not exist`, 'XFT_IO');
    const info = readCheckpointInfo(dir);
    if (info.kind !== 'dense') throw invalidArgument(op, `experts[${e}]`, 'a dense checkpoint folder', `a ${info.kind} checkpoint (${dir})`);
    const c = info.config, shape = `${c.num_hidden_layers}x${c.hidden_size}x${c.intermediate_size} vocab ${c.vocab_size}`;
    if (arch !== null && shape !== arch) throw new XftError(`${op}: experts[${e}] (${dir}) is ${shape}, experts[0] is ${arch}: the experts must share one architecture`, 'XFT_SHAPE');
    arch = shape;
  });
  const E = dirs.length, N = list.length;
  const bucket = new Array<number>(N).fill(0);
  const losses: number[][] = dirs.map(() => []);
  if (mode === 'random') {
    const order = shuffle(Array.from({ length: N }, (_, i) => i), seed);
    order.forEach((row, k) => (bucket[row] = k % E));
  } else {
    dirs.forEach((dir, e) => {
      const model = loadModel(dir, { device, dtype });
      try {
        losses[e] = Array.from(rowLosses(model, list, { microBatch: micro }));
      } finally {
        model.dispose();
      }
      log(`seed: expert ${e} (${dir}) scored ${N} rows`);
    });
    const score = mode === 'balanced' ? losses.map(zScores) : losses;
    for (let i = 0; i < N; i++) bucket[i] = argminNaNLast(score.map((s) => s[i]));
    const noTargets = list.filter((_, i) => losses.every((l) => Number.isNaN(l[i]))).length;
    if (noTargets > 0) log(`seed: warning: ${noTargets} row(s) have no target tokens (no perplexity); they go to expert 0`);
  }
  const sizes = new Array<number>(E).fill(0);
  for (const b of bucket) sizes[b]++;
  log(`seed: ${mode} buckets over ${N} rows: sizes [${sizes.join(', ')}]`);
  sizes.forEach((n, e) => {
    if (n === 0) log(`seed: warning: the bucket of expert ${e} (${dirs[e]}) is empty: its routing vectors will stay 0`);
  });
  return { bucket, sizes, losses };
}

/** Index of the smallest value; ties to the lower index; NaN loses to every number (all NaN: 0). */
export function argminNaNLast(values: readonly number[]): number {
  let best = 0;
  for (let e = 1; e < values.length; e++) {
    const v = values[e], b = values[best];
    if (!Number.isNaN(v) && (Number.isNaN(b) || v < b)) best = e;
  }
  return best;
}

/** (x - mean) / std over the non-NaN values (population std); all 0 where std is 0; NaN stays NaN. */
function zScores(values: readonly number[]): number[] {
  let n = 0, sum = 0;
  for (const v of values) if (!Number.isNaN(v)) n++, sum += v;
  const mean = n > 0 ? sum / n : 0;
  let sq = 0;
  for (const v of values) if (!Number.isNaN(v)) sq += (v - mean) ** 2;
  const std = n > 0 ? Math.sqrt(sq / n) : 0;
  return values.map((v) => (Number.isNaN(v) ? NaN : std > 0 ? (v - mean) / std : 0));
}
