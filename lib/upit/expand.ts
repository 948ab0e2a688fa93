/**
 * UpIT stage 2, expert expansion by a genetic algorithm (../shared/UPIT.md 2, Algorithm 2): while the pool
 * P = {θ1..θn} holds fewer than E experts, pick the least similar pair of members (j, k), draw α ~ U(0, 1),
 * and add the child θ0 + α·DARE_p(θj − θ0) + (1 − α)·DARE_p(θk − θ0), one per round.
 *
 * On disk and streaming: every pass reads one tensor name at a time from the base and the pool members
 * (memory: one copy of the tensor per member involved, n + 1 for the first products and |P| + 2 for a
 * child's, 3 to breed a child; never a whole model). The similarity of two members is
 * the cosine (or negative L2 distance) of their deltas from θ0 over every FFN weight of every layer,
 * from fp64 delta products (lib/upit/ops.ts deltaDots); the products are cached, so a child adds |P|
 * new ones. Ties go to the lowest index pair. Children are dense checkpoint folders <out>/child-<i>
 * (i = n, n + 1, …) whose config.json records the round under "xft_upit". Resumable: a child written
 * by an earlier call with the same options is reused (a different record there is XFT_VALUE), and the
 * children are bit-identical run to run and on CPU or CUDA (the ops' masks and sums do not depend on
 * the device). Randomness (α, random parents, DARE masks) comes from `seed` and the round only.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { XftError, invalidArgument } from '../errors';
import { type Device, type DType, formatShape } from '../tensor';
import { type FileDType, SafetensorsReader, type WriteEntry } from '../safetensors';
import { configJson, readCheckpointInfo, writeCheckpoint } from '../checkpoint';
import { lockFolder, recoverFolder } from '../folder';
import { expectArray, expectBool, expectFunction, expectInt, expectNumber, expectOneOf, expectOptions, expectString } from '../validate';
import { cosineFromDots, dareMerge, deltaDots } from './ops';

export interface ExpandOptions {
  /** θ0: the dense checkpoint folder stage 1 started from */
  base: string;
  /** θ1..θn: dense checkpoint folders, same config as base, n >= 1 */
  pool: readonly string[];
  /** E; rounds = max(0, E - n) */
  experts: number;
  /** children: <out>/child-<n>, <out>/child-<n+1>, ... (dense checkpoint folders) */
  out: string;
  /** default 0 */
  seed?: number;
  /** DARE p in [0, 1), default 0.5 */
  dropRate?: number;
  /** default 'least-similar' */
  parents?: 'least-similar' | 'random';
  /** default false: a pair already used may be picked again */
  excludeUsedPairs?: boolean;
  /** default 'cosine' (of FFN deltas from θ0, all layers); 'l2': the negative Euclidean distance */
  similarity?: 'cosine' | 'l2';
  device?: Device;
  onLog?: (line: string) => void;
}

export interface ExpandRound {
  child: string;
  parents: [number, number];
  alpha: number;
  similarity: number;
}

export interface ExpandResult {
  /** the n inputs then the children */
  pool: string[];
  rounds: ExpandRound[];
}

/** The FFN weights of a dense checkpoint: what the similarity compares. */
const FFN = /\.mlp\.(gate|up|down)_proj\.weight$/;
/** Tensors a dense checkpoint may carry that are not weights (left out of children, as the other writers do). */
const IGNORED = /\.rotary_emb\.inv_freq$/;
/** The config.json key of a child's record. */
export const UPIT_KEY = 'xft_upit';

// ---- the seeded generator: the same splitmix64 mix as the kernels' masks (cuda/xft_math.h xft_hash64) ----

const MASK64 = (1n << 64n) - 1n;

/** xft_hash64(seed, index) of cuda/xft_math.h, on unsigned 64-bit bigints. */
export function hash64(seed: bigint, index: bigint): bigint {
  let z = (seed * 0x9e3779b97f4a7c15n + index * 0xd1b54a32d192ed03n + 0x632be59bd9b4e019n) & MASK64;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
  return z ^ (z >> 31n);
}

/** A uniform number in [0, 1) with 53 random bits. */
const uniform = (h: bigint) => Number(h >> 11n) / 2 ** 53;

/** Round r's draws: α, the random-parents draw, and the seed of the DARE masks. */
function roundDraws(seed: number, round: number): { alpha: number; pick: number; dareSeed: bigint } {
  const rs = hash64(BigInt(seed), BigInt(round));
  return { alpha: uniform(hash64(rs, 0n)), pick: uniform(hash64(rs, 1n)), dareSeed: hash64(rs, 2n) };
}

// ---- options ----

interface Checked {
  base: string; pool: string[]; experts: number; out: string; seed: number; dropRate: number;
  parents: 'least-similar' | 'random'; excludeUsedPairs: boolean; similarity: 'cosine' | 'l2'; device: Device; log: (line: string) => void;
}

function checkOptions(options: ExpandOptions): Checked {
  const op = 'expandPool';
  const o = expectOptions<ExpandOptions>(op, options, 'an options object { base, pool, experts, out, ... }');
  if (options === undefined) throw invalidArgument(op, 'options', 'an options object { base, pool, experts, out, ... }', options, 'XFT_TYPE');
  const base = expectString(op, 'base', o.base, 'a dense checkpoint folder');
  const pool = expectArray<string>(op, 'pool', o.pool, 'a non-empty array of dense checkpoint folders', 1).map((p, i) => expectString(op, `pool[${i}]`, p, 'a dense checkpoint folder'));
  const experts = expectInt(op, 'experts', o.experts, 1, 4096);
  const out = expectString(op, 'out', o.out, 'an output folder');
  const seed = o.seed === undefined ? 0 : expectInt(op, 'seed', o.seed, 0);
  const dropRate = o.dropRate === undefined ? 0.5 : expectNumber(op, 'dropRate', o.dropRate, 'a number in [0, 1)', (v) => v >= 0 && v < 1);
  const parents = o.parents === undefined ? 'least-similar' : expectOneOf(op, 'parents', o.parents, ['least-similar', 'random'] as const);
  const excludeUsedPairs = expectBool(op, 'excludeUsedPairs', o.excludeUsedPairs, false);
  const similarity = o.similarity === undefined ? 'cosine' : expectOneOf(op, 'similarity', o.similarity, ['cosine', 'l2'] as const);
  const device = o.device === undefined ? 'cpu' : expectOneOf(op, 'device', o.device, ['cpu', 'cuda'] as const, 'XFT_DEVICE');
  const onLog = expectFunction<(line: string) => void>(op, 'onLog', o.onLog);
  return { base, pool, experts, out, seed, dropRate, parents, excludeUsedPairs, similarity, device, log: onLog ?? (() => {}) };
}

// ---- the pool on disk ----

/** A member's reader, after checking it is a dense checkpoint with the base's tensors and shapes. */
function openMember(dir: string, what: string, base: SafetensorsReader | null, names: string[]): SafetensorsReader {
  const info = readCheckpointInfo(dir);
  if (info.kind !== 'dense') throw new XftError(`expandPool: ${what} ${dir} is a ${info.kind} checkpoint; expected a dense one`, 'XFT_VALUE');
  const r = new SafetensorsReader(dir);
  if (base) {
    for (const n of names) {
      if (!r.has(n)) throw new XftError(`expandPool: ${what} ${dir} has no tensor ${n} (the base has it): not the base's architecture`, 'XFT_SHAPE');
      const want = base.info(n).shape, got = r.info(n).shape;
      if (formatShape(want) !== formatShape(got))
        throw new XftError(`expandPool: ${what} ${dir}: ${n} has shape ${formatShape(got)}, the base's is ${formatShape(want)}`, 'XFT_SHAPE');
    }
  }
  return r;
}

/** The dtype the ops compute a tensor in: bf16 when every file holds it as BF16, else f32. */
function computeDtype(readers: SafetensorsReader[], name: string): DType {
  return readers.every((r) => r.info(name).dtype === 'BF16') ? 'bf16' : 'f32';
}

/**
 * Delta products over the FFN tensors, summed over tensors in name order: for each request { a, others }
 * (indices into readers; 0 is the base) the products <Δa, Δo> for o of others. One pass: each tensor of
 * each member involved is read once, so the memory is one tensor per member involved.
 */
function poolDots(readers: SafetensorsReader[], requests: { a: number; others: number[] }[], ffn: string[], device: Device): number[][] {
  const sums = requests.map((q) => new Array<number>(q.others.length).fill(0));
  const members = [...new Set(requests.flatMap((q) => [q.a, ...q.others]))];
  for (const name of ffn) {
    const dtype = computeDtype([readers[0], ...members.map((m) => readers[m])], name);
    const base = readers[0].read(name, { dtype, device });
    const loaded = new Map<number, ReturnType<SafetensorsReader['read']>>();
    try {
      for (const m of members) loaded.set(m, readers[m].read(name, { dtype, device }));
      requests.forEach((q, i) => {
        const d = deltaDots(base, loaded.get(q.a)!, q.others.map((m) => loaded.get(m)!));
        d.forEach((v, c) => (sums[i][c] += v));
      });
    } finally {
      base.dispose();
      loaded.forEach((t) => t.dispose());
    }
  }
  return sums;
}

/** S(j, k) from the cached products: the cosine, or the negative L2 distance, of the two deltas. */
function similarityOf(G: number[][], j: number, k: number, metric: 'cosine' | 'l2'): number {
  if (metric === 'cosine') return cosineFromDots(G[j][k], G[j][j], G[k][k]);
  return -Math.sqrt(Math.max(0, G[j][j] + G[k][k] - 2 * G[j][k]));
}

/** The record a child's config.json carries; `match` is what must agree for an earlier child to be reused. */
function childRecord(o: Checked, round: number, parents: [number, number], alpha: number, similarity: number, poolDirs: string[]) {
  const match = {
    round, parents, alpha, beta: 1 - alpha, drop_rate: o.dropRate, seed: o.seed, parent_selection: o.parents,
    exclude_used_pairs: o.excludeUsedPairs, similarity_metric: o.similarity,
    base: path.resolve(o.base), pool: o.pool.map((p) => path.resolve(p)),
  };
  return { match, record: { ...match, parent_dirs: parents.map((p) => path.resolve(poolDirs[p])), similarity } };
}

/** An earlier child at `dir`: reused when its record matches, XFT_VALUE when it does not; null when there is none. */
function earlierChild(dir: string, match: Record<string, unknown>): boolean {
  recoverFolder(dir);
  if (!fs.existsSync(dir)) return false;
  const file = path.join(dir, 'config.json');
  const raw = fs.existsSync(file) ? readCheckpointInfo(dir).raw : null;
  const rec = raw?.[UPIT_KEY] as Record<string, unknown> | undefined;
  const same = rec !== undefined && Object.entries(match).every(([k, v]) => JSON.stringify(rec[k]) === JSON.stringify(v));
  if (!same) {
    const differ = rec === undefined ? `it has no "${UPIT_KEY}" record` :
      Object.keys(match).filter((k) => JSON.stringify(rec[k]) !== JSON.stringify(match[k])).map((k) => `${k}: ${JSON.stringify(rec[k])} there, ${JSON.stringify(match[k])} now`).join('; ');
    throw new XftError(`expandPool: ${dir} exists but was not written by this expansion (${differ}); remove it or choose another out folder`, 'XFT_VALUE');
  }
  return true;
}

/** Writes child `dir` = base + α·DARE_p(θj − base) + β·DARE_p(θk − base), tensor by tensor. */
function writeChild(dir: string, readers: SafetensorsReader[], names: string[], j: number, k: number, alpha: number, dareSeed: bigint,
  o: Checked, record: Record<string, unknown>): void {
  const info = readCheckpointInfo(o.pool[0]);
  const fileDtype = (name: string): FileDType => {
    const d = readers[j].info(name).dtype;
    return d === 'BF16' ? 'BF16' : d === 'F16' ? 'F16' : 'F32';
  };
  const entries: WriteEntry[] = names.map((name, tensorId) => ({
    name, dtype: fileDtype(name), shape: readers[0].info(name).shape, dispose: true,
    tensor: () => {
      const dtype = computeDtype([readers[0], readers[j], readers[k]], name);
      const base = readers[0].read(name, { dtype, device: o.device });
      const a = readers[j].read(name, { dtype, device: o.device }), b = readers[k].read(name, { dtype, device: o.device });
      try {
        return dareMerge(base, a, b, { alpha, beta: 1 - alpha, dropRate: o.dropRate, seed: dareSeed, tensorId, dtype: fileDtype(name) === 'BF16' ? 'bf16' : 'f32' });
      } finally {
        [base, a, b].forEach((t) => t.dispose());
      }
    },
  }));
  const config = configJson('dense', info.config, null, null, fileDtype(names.find((n) => FFN.test(n)) ?? names[0]));
  delete config.xft_epoch;
  delete config.xft_step;
  writeCheckpoint(dir, entries, { ...config, [UPIT_KEY]: record }, { copyFrom: o.base });
}

/**
 * Expands the pool to `experts` members (UPIT.md stage 2; see the file comment). Returns the pool (the
 * inputs, then the children) and what each round chose.
 */
export function expandPool(options: ExpandOptions): ExpandResult {
  const o = checkOptions(options);
  const n = o.pool.length, rounds = Math.max(0, o.experts - n);
  const baseInfo = readCheckpointInfo(o.base);
  if (baseInfo.kind !== 'dense') throw new XftError(`expandPool: base ${o.base} is a ${baseInfo.kind} checkpoint; expected a dense one`, 'XFT_VALUE');
  const baseReader = new SafetensorsReader(o.base);
  const names = baseReader.names().filter((x) => !IGNORED.test(x)).sort();
  const ffn = names.filter((x) => FFN.test(x));
  if (ffn.length === 0) throw new XftError(`expandPool: base ${o.base} has no FFN weights (*.mlp.{gate,up,down}_proj.weight)`, 'XFT_FORMAT');
  const readers = [baseReader, ...o.pool.map((p, i) => openMember(p, `pool[${i}]`, baseReader, names))];
  if (rounds === 0) {
    o.log(`expand: the pool has ${n} members, at least the ${o.experts} experts asked for: no rounds`);
    return { pool: [...o.pool], rounds: [] };
  }
  const claim = lockFolder(o.out);
  try {
    fs.mkdirSync(o.out, { recursive: true });
    // G[i][j] = <Δi, Δj> over the FFN weights, pool indices 0..; readers are offset by one (the base)
    const G: number[][] = Array.from({ length: n }, () => new Array<number>(n).fill(0));
    const initial = poolDots(readers, Array.from({ length: n }, (_, i) => ({ a: i + 1, others: Array.from({ length: n - i }, (_, q) => i + 1 + q) })), ffn, o.device);
    initial.forEach((row, i) => row.forEach((v, q) => (G[i][i + q] = G[i + q][i] = v)));
    const poolDirs = [...o.pool], used = new Set<string>(), result: ExpandRound[] = [];
    for (let r = 0; r < rounds; r++) {
      const m = poolDirs.length;
      const pairs: [number, number][] = [];
      for (let j = 0; j < m; j++) for (let k = j + 1; k < m; k++) if (!o.excludeUsedPairs || !used.has(`${j},${k}`)) pairs.push([j, k]);
      const draws = roundDraws(o.seed, r);
      let chosen: [number, number], s: number;
      if (m < 2) {
        // one member: its child is a DARE mutation of it (both parents the same)
        chosen = [0, 0];
        s = similarityOf(G, 0, 0, o.similarity);
      } else if (o.parents === 'random') {
        chosen = pairs[Math.min(pairs.length - 1, Math.floor(draws.pick * pairs.length))];
        s = similarityOf(G, chosen[0], chosen[1], o.similarity);
      } else {
        chosen = pairs[0];
        s = similarityOf(G, chosen[0], chosen[1], o.similarity);
        for (const [j, k] of pairs) {
          const v = similarityOf(G, j, k, o.similarity);
          if (v < s) [chosen, s] = [[j, k], v];
        }
      }
      const [j, k] = chosen, alpha = draws.alpha;
      used.add(`${j},${k}`);
      const dir = path.join(o.out, `child-${n + r}`);
      const { match, record } = childRecord(o, r, chosen, alpha, s, poolDirs);
      if (earlierChild(dir, match)) o.log(`expand round ${r + 1}/${rounds}: ${dir} is already complete (parents ${j}, ${k}, α ${alpha.toFixed(4)}): reused`);
      else {
        writeChild(dir, readers, names, j + 1, k + 1, alpha, draws.dareSeed, o, record);
        o.log(`expand round ${r + 1}/${rounds}: parents ${j}, ${k} (similarity ${s.toPrecision(6)}), α ${alpha.toFixed(4)}, p ${o.dropRate} -> ${dir}`);
      }
      readers.push(openMember(dir, `child ${n + r}`, baseReader, names));
      poolDirs.push(dir);
      // the child's products with every member and itself: |P| + 1 new entries of G
      const [row] = poolDots(readers, [{ a: m + 1, others: Array.from({ length: m + 1 }, (_, q) => q + 1) }], ffn, o.device);
      G[m] = [];
      row.forEach((v, q) => {
        G[m][q] = v;
        G[q][m] = v;
      });
      result.push({ child: dir, parents: [j, k], alpha, similarity: s });
    }
    return { pool: poolDirs, rounds: result };
  } finally {
    claim.release();
  }
}
