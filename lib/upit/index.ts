/**
 * UpIT (Hui et al., arXiv 2410.01610, ACL 2025; ../shared/UPIT.md): a dense model becomes a sparse MoE
 * instruction model from its own instruction-tuning checkpoints. The re-exports of lib/upit/ and the
 * pipeline `upit(options)`, whose stages each write one folder under `out` and are skipped when complete:
 *
 *   prepare     SFT of the dense model, a checkpoint every 0.25 epoch over 2 epochs   <out>/prepare
 *               (`xft train --save-checkpoints-every`); the candidate experts θ1..θn
 *   expand      genetic expansion to E experts when n < E (expandPool)                <out>/expand
 *   seed        1% seed rows, each to its lowest-PPL expert (assignBuckets)           <out>/seed
 *               (with sharedTrunk, each expert first put on the MoE's trunk: trunkExpert    <out>/trunked/expert-<e>)
 *   route       a routing vector per expert from its bucket (preoptimizeRouting)      <out>/route/expert-<e>
 *   assemble    the MoE: expert FFNs, router rows = routing vectors, trunk average    <out>/assemble
 *               (with jointRouter, its routers then trained together on the seed buckets: trainJointRouter)
 *   post-train  2 epochs of L_lm + 0.01 L_load (Switch), `xft train`                  <out>/post-train
 *
 * Defaults marked [paper] come from the sources of UPIT.md; [choice] marks our defaults where they are silent.
 * The two training stages run the `xft train` command (its recipe, resume, data parallelism), as a child
 * process by default (`options.train` replaces it).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { XftError } from '../errors';
import { readCheckpointInfo } from '../checkpoint';
import { writeFileAtomic } from '../folder';
import { countTargets, encodeDataFileAsync, toRows, type Sample } from '../data';
import { loadTokenizer } from '../tokenizer';
import type { Device } from '../tensor';
import { expectBool, expectInt, expectNumber, expectOneOf, expectOptions } from '../validate';
import { listEpochCheckpoints, type EpochCheckpoint } from '../checkpoint_schedule';
import { expandPool } from './expand';
import { assignBuckets, seedIndices } from './seed';
import { preoptimizeRouting } from './route';
import { assembleMoe, trunkExpert } from './assemble';
import { trainJointRouter } from './joint_router';

export { assembleMoe, trunkExpert, type AssembleOptions, type TrunkExpertOptions } from './assemble';
export { expandPool, type ExpandOptions, type ExpandResult, type ExpandRound } from './expand';
export { seedIndices, rowLosses, assignBuckets, type BucketOptions, type BucketMode, type Buckets } from './seed';
export { preoptimizeRouting, readRoutingVectors, type RouteOptions, type RoutingResult } from './route';
export { trainJointRouter, JOINT_ROUTER_FILE, type JointRouterOptions, type JointRouterResult, type RouterFit } from './joint_router';
export { checkpointSteps, listEpochCheckpoints, type EpochCheckpoint } from '../checkpoint_schedule';

export const UPIT_STAGES = ['prepare', 'expand', 'seed', 'route', 'assemble', 'post-train'] as const;
export type UpitStage = (typeof UPIT_STAGES)[number];

/** The pipeline's defaults, each with where it comes from (UPIT.md): `xft upit --help` prints these. */
export const UPIT_DEFAULTS = {
  experts: { value: 4, source: 'paper', note: 'FFN-based main setting: 4 experts' },
  topK: { value: 2, source: 'paper', note: 'top-2' },
  lr: { value: 2e-5, source: 'paper', note: 'FFN-based learning rate (LoRA-based: 2e-4)' },
  prepareEpochs: { value: 2, source: 'paper', note: 'stage-1 SFT epochs' },
  checkpointEvery: { value: 0.25, source: 'paper', note: 'checkpoint interval in epochs' },
  keep: { value: 'latest', source: 'choice', note: 'n > E: keep the E latest checkpoints (A1)' },
  parents: { value: 'least-similar', source: 'paper', note: 'most dissimilar pair' },
  similarity: { value: 'cosine', source: 'choice', note: 'of the FFN deltas from θ0 (A2)' },
  dropRate: { value: 0.5, source: 'choice', note: 'DARE drop rate p (A3)' },
  seedFraction: { value: 0.01, source: 'paper', note: 'seed data: 1% of the training set' },
  buckets: { value: 'ppl', source: 'paper', note: 'each seed row to its lowest-PPL expert (A5: balanced, random)' },
  gamma: { value: 0.5, source: 'paper', note: 'γ between L_lm and the routing BCE' },
  routeEpochs: { value: 4, source: 'paper', note: '"4 epochs" of routing-vector training (attribution uncertain)' },
  routerLrScale: { value: 10, source: 'choice', note: 'routing vectors train at 10x the lr (A7)' },
  routeTrain: { value: 'ffn+router', source: 'choice', note: "what trains in 3b: the expert's FFN and r_e (A7)" },
  trunk: { value: 'average', source: 'choice', note: 'MoE trunk: the mean of the saved checkpoints (A4; last, theta0)' },
  sharedTrunk: { value: false, source: 'choice', note: "A9: the seed and route stages see each expert's FFNs on the MoE's trunk, not on its own checkpoint" },
  jointRouter: { value: false, source: 'choice', note: 'A6 (not the paper): after assembly, one pass of the routers alone, softmax CE on the seed buckets' },
  postEpochs: { value: 2, source: 'paper', note: 'post-training epochs' },
  balanceLossWeight: { value: 0.01, source: 'choice', note: 'w of L_lm + w·L_load (A8)' },
  batchSize: { value: 64, source: 'choice', note: "the project's XFT recipe (A10)" },
} as const;

export interface UpitOptions {
  /** θ0: the dense checkpoint folder */
  dense: string;
  /** JSONL instruction data (the train command's formats) */
  data: string;
  /** output folder: one sub-folder per stage */
  out: string;
  /** E (default 4) and k (default 2) */
  experts?: number;
  topK?: number;
  /** run only this stage (its inputs must be complete); default: every stage not yet complete */
  stage?: UpitStage;
  seed?: number;
  /** stage-1 and post-training lr (default 2e-5) */
  lr?: number;
  /** stage 1: epochs (2), checkpoint interval in epochs (0.25), which to keep when n > E */
  prepareEpochs?: number;
  checkpointEvery?: number;
  keep?: 'latest' | 'first-half';
  /** stage 2: false skips expansion and saves E checkpoints instead (ablation "no expansion, more checkpoints") */
  expand?: boolean;
  parents?: 'least-similar' | 'random';
  similarity?: 'cosine' | 'l2';
  dropRate?: number;
  excludeUsedPairs?: boolean;
  /** stage 3: false draws the router at random (ablation "no router init") */
  routerInit?: boolean;
  seedFraction?: number;
  buckets?: 'ppl' | 'balanced' | 'random';
  gamma?: number;
  routeEpochs?: number;
  routerLrScale?: number;
  routeTrain?: 'ffn+router' | 'router';
  /** stage 4 */
  trunk?: 'average' | 'last' | 'theta0';
  /** UPIT.md A9: the seed and route stages score and train each expert's FFNs on the MoE's trunk
   * (trunkExpert) instead of on the expert's own checkpoint (needs routerInit) */
  sharedTrunk?: boolean;
  /** UPIT.md A6 (not from the paper): after assembly, train the routers alone for one pass over the seed
   * rows with the softmax cross-entropy of their buckets, at lr·routerLrScale (needs routerInit) */
  jointRouter?: boolean;
  postEpochs?: number;
  balanceLossWeight?: number;
  /** data and run settings passed to `xft train` and used by the seed and route stages */
  batchSize?: number;
  microBatch?: number;
  seqLen?: number;
  tokenizer?: string;
  device?: Device;
  precision?: 'f32' | 'bf16';
  /** more `xft train` arguments for both training stages (e.g. ['--nproc', '2']) */
  trainArgs?: readonly string[];
  /** runs `xft train <args>` (default: the CLI as a child process, its output to this process's) */
  train?: (args: string[]) => Promise<void>;
  onLog?: (line: string) => void;
}

export interface UpitResult {
  /** the final MoE checkpoint (post-trained), or the last stage's output with `stage` */
  moe: string;
  /** the stages run now, and those skipped because complete */
  ran: UpitStage[];
  skipped: UpitStage[];
}

const OP = 'upit';
const MARK = 'upit_stage.json';

/** The folders of a pipeline under `out`. */
export function upitFolders(out: string) {
  return {
    prepare: path.join(out, 'prepare'),
    expand: path.join(out, 'expand'),
    seed: path.join(out, 'seed'),
    route: path.join(out, 'route'),
    routeExpert: (e: number) => path.join(out, 'route', `expert-${e}`),
    assemble: path.join(out, 'assemble'),
    postTrain: path.join(out, 'post-train'),
    trunked: (e: number) => path.join(out, 'trunked', `expert-${e}`),
  };
}

/** `xft train` as a child process: the CLI of this package, through the loader this process runs under. */
export function spawnTrain(args: string[]): Promise<void> {
  const cli = path.join(__dirname, '..', `cli${path.extname(__filename)}`);
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...process.execArgv, cli, 'train', ...args], { stdio: ['ignore', 'inherit', 'inherit'] });
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      if (code === 0) resolve();
      else reject(new XftError(`xft train ${args.join(' ')} failed (${signal ?? `exit code ${code}`})`, code === 3 ? 'XFT_VALUE' : 'XFT_IO'));
    });
  });
}

/** a stage's completion mark, or null where there is none; a mark that is not a JSON object is XFT_FORMAT */
function readMark<T>(dir: string): T | null {
  const f = path.join(dir, MARK);
  if (!fs.existsSync(f)) return null;
  let value: unknown;
  try {
    value = JSON.parse(fs.readFileSync(f, 'utf8'));
  } catch (err) {
    throw new XftError(`${OP}: ${f} is not valid JSON (${(err as Error).message}); it marks the stage in ${dir} as done: ` +
      'delete that folder (and the later stages) to redo it', 'XFT_FORMAT');
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value))
    throw new XftError(`${OP}: ${f} holds ${JSON.stringify(value)?.slice(0, 40)}, not a JSON object; delete ${dir} (and the later stages) to redo that stage`, 'XFT_FORMAT');
  return value as T;
}

/**
 * Folders recorded in a mark are relative to the pipeline's `out`, so that a rerun from another working
 * directory (or of a moved --out) finds them; `fromMark` resolves them, and takes a path that an older
 * mark recorded as given (relative to the working directory then, or absolute) where that one exists.
 */
function toMark(out: string, dir: string): string {
  return path.relative(out, path.resolve(dir)) || '.';
}
function fromMark(out: string, dir: string): string {
  const p = path.resolve(out, dir);
  return fs.existsSync(p) || !fs.existsSync(dir) ? p : dir;
}

function writeMark(dir: string, value: unknown): void {
  fs.mkdirSync(dir, { recursive: true });
  writeFileAtomic(path.join(dir, MARK), JSON.stringify(value, null, 2) + '\n');
}

const complete = (dir: string) => fs.existsSync(path.join(dir, 'config.json'));

/** The settings of a run, checked, with the defaults filled in. */
function settings(options: UpitOptions) {
  const o = expectOptions<UpitOptions>(OP, options, 'an object { dense, data, out, ... }');
  for (const k of ['dense', 'data', 'out'] as const)
    if (typeof o[k] !== 'string' || o[k] === '') throw new XftError(`${OP}: expected a path for ${k} but received ${JSON.stringify(o[k])}`, 'XFT_TYPE');
  const D = UPIT_DEFAULTS;
  const experts = o.experts === undefined ? D.experts.value : expectInt(OP, 'experts', o.experts, 2, 1024);
  const topK = o.topK === undefined ? D.topK.value : expectInt(OP, 'topK', o.topK, 1, experts);
  const pos = (name: keyof UpitOptions, fallback: number) => (o[name] === undefined ? fallback : expectNumber(OP, name, o[name], 'a number > 0', (x) => x > 0));
  const s = {
    ...o, experts, topK,
    stage: o.stage === undefined ? undefined : expectOneOf(OP, 'stage', o.stage, UPIT_STAGES),
    seed: o.seed === undefined ? 0 : expectInt(OP, 'seed', o.seed, 0, 2 ** 40),
    lr: pos('lr', D.lr.value),
    prepareEpochs: pos('prepareEpochs', D.prepareEpochs.value),
    checkpointEvery: pos('checkpointEvery', D.checkpointEvery.value),
    keep: o.keep === undefined ? D.keep.value : expectOneOf(OP, 'keep', o.keep, ['latest', 'first-half'] as const),
    expand: o.expand ?? true,
    routerInit: o.routerInit ?? true,
    seedFraction: o.seedFraction === undefined ? D.seedFraction.value : expectNumber(OP, 'seedFraction', o.seedFraction, 'a fraction in (0, 1]', (x) => x > 0 && x <= 1),
    routeEpochs: pos('routeEpochs', D.routeEpochs.value),
    trunk: o.trunk === undefined ? D.trunk.value : expectOneOf(OP, 'trunk', o.trunk, ['average', 'last', 'theta0'] as const),
    jointRouter: expectBool(OP, 'jointRouter', o.jointRouter, D.jointRouter.value),
    sharedTrunk: expectBool(OP, 'sharedTrunk', o.sharedTrunk, D.sharedTrunk.value),
    postEpochs: pos('postEpochs', D.postEpochs.value),
    balanceLossWeight: o.balanceLossWeight === undefined ? D.balanceLossWeight.value : expectNumber(OP, 'balanceLossWeight', o.balanceLossWeight, 'a number >= 0', (x) => x >= 0),
    batchSize: o.batchSize === undefined ? D.batchSize.value : expectInt(OP, 'batchSize', o.batchSize, 1),
    log: o.onLog ?? (() => {}),
    train: o.train ?? spawnTrain,
  };
  if (s.sharedTrunk && !s.routerInit)
    throw new XftError(`${OP}: sharedTrunk changes what the seed and route stages see, and routerInit: false skips them; drop one of the two`, 'XFT_VALUE');
  if (s.jointRouter && !s.routerInit)
    throw new XftError(`${OP}: jointRouter trains the routers on the seed buckets, which routerInit: false skips; drop one of the two`, 'XFT_VALUE');
  // without expansion, stage 1 saves E checkpoints over its epochs (the paper's ablation)
  if (!s.expand) s.checkpointEvery = Math.min(s.checkpointEvery, s.prepareEpochs / experts);
  return s;
}

type Settings = ReturnType<typeof settings>;

/** The `xft train` arguments both training stages share. */
function trainArgs(s: Settings): string[] {
  const a = ['--data', s.data, '--batch-size', String(s.batchSize), '--lr', String(s.lr), '--seed', String(s.seed)];
  if (s.microBatch !== undefined) a.push('--micro-batch', String(s.microBatch));
  if (s.seqLen !== undefined) a.push('--seq-len', String(s.seqLen));
  if (s.tokenizer !== undefined) a.push('--tokenizer', s.tokenizer);
  if (s.device !== undefined) a.push('--device', s.device);
  if (s.precision !== undefined) a.push('--precision', s.precision);
  return [...a, ...(s.trainArgs ?? [])];
}

/** Runs (or resumes) `xft train` into `out` unless it is complete. */
async function trainStage(s: Settings, model: string, out: string, extra: string[]): Promise<void> {
  if (fs.existsSync(`${out}.resume`)) {
    s.log(`resuming ${out} from ${out}.resume`);
    await s.train([model, '--out', out, '--resume']);
  } else await s.train([model, '--out', out, ...trainArgs(s), ...extra]);
}

/** The epoch checkpoints stage 1 saved (θ1..θn), and the n kept as experts. */
function checkpointsOf(s: Settings): { saved: EpochCheckpoint[]; kept: EpochCheckpoint[] } {
  const dirs = upitFolders(s.out);
  const saved = listEpochCheckpoints(dirs.prepare);
  if (saved.length === 0) throw new XftError(`${OP}: ${dirs.prepare} holds no epoch checkpoints; run the prepare stage first`, 'XFT_VALUE');
  const pool = s.keep === 'first-half' ? saved.filter((c) => c.epoch <= s.prepareEpochs / 2 + 1e-9) : saved;
  return { saved, kept: pool.slice(Math.max(0, pool.length - s.experts)) };
}

/** The dense folders the MoE's trunk is averaged from (UPIT.md A4). */
function trunkFolders(s: Settings): string[] {
  const { saved } = checkpointsOf(s);
  return s.trunk === 'theta0' ? [s.dense] : s.trunk === 'last' ? [saved[saved.length - 1].dir] : saved.map((c) => c.dir);
}

/** The seed rows of the data (padded rows of --seq-len, one per example, as `xft train` makes them). */
async function dataRows(s: Settings): Promise<Sample[]> {
  const info = readCheckpointInfo(s.dense);
  const spec = s.tokenizer ?? (fs.existsSync(path.join(s.dense, 'tokenizer.json')) ? s.dense : 'byte');
  const tok = loadTokenizer(spec);
  const seqLen = s.seqLen ?? Math.min(1024, info.config.max_position_embeddings);
  const { samples } = await encodeDataFileAsync(s.data, tok);
  return toRows(samples, seqLen, 'pad', tok.pad).filter((r) => countTargets(r.targets) > 0);
}

/**
 * The settings each stage's output depends on, its own and (through `stageRecord`) those of the stages
 * before it. A rerun over a complete (or resumable) stage must ask for the same values: the stage is
 * skipped (or resumed), so a changed value would silently not apply.
 */
const STAGE_SETTINGS: Record<UpitStage, (s: Settings) => Record<string, unknown>> = {
  prepare: (s) => ({
    dense: path.resolve(s.dense), data: path.resolve(s.data), seed: s.seed, lr: s.lr, batchSize: s.batchSize, seqLen: s.seqLen ?? null,
    tokenizer: s.tokenizer ?? null, precision: s.precision ?? null, prepareEpochs: s.prepareEpochs, checkpointEvery: s.checkpointEvery,
  }),
  expand: (s) => ({
    experts: s.experts, keep: s.keep, expand: s.expand, parents: s.parents ?? UPIT_DEFAULTS.parents.value,
    similarity: s.similarity ?? UPIT_DEFAULTS.similarity.value, dropRate: s.dropRate ?? UPIT_DEFAULTS.dropRate.value, excludeUsedPairs: s.excludeUsedPairs ?? false,
  }),
  seed: (s) => ({
    routerInit: s.routerInit, seedFraction: s.seedFraction, buckets: s.buckets ?? UPIT_DEFAULTS.buckets.value, sharedTrunk: s.sharedTrunk,
    // the trunk the experts are put on, when they are
    ...(s.sharedTrunk ? { trunk: s.trunk } : {}),
  }),
  route: (s) => ({
    gamma: s.gamma ?? UPIT_DEFAULTS.gamma.value, routeEpochs: s.routeEpochs, routerLrScale: s.routerLrScale ?? UPIT_DEFAULTS.routerLrScale.value,
    routeTrain: s.routeTrain ?? UPIT_DEFAULTS.routeTrain.value,
  }),
  assemble: (s) => ({ topK: s.topK, trunk: s.trunk, balanceLossWeight: s.balanceLossWeight, jointRouter: s.jointRouter }),
  'post-train': (s) => ({ postEpochs: s.postEpochs }),
};
const SETTINGS_FILE = 'upit_settings.json';
/** the CLI flag of a setting (its name in kebab case, but for these) */
function flagOf(key: string): string {
  const kebab = key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
  if (key === 'dense') return '<dense>';
  if (key === 'balanceLossWeight') return '--balance-loss';
  return ['expand', 'routerInit', 'jointRouter', 'sharedTrunk'].includes(key) ? `--[no-]${kebab}` : `--${kebab}`;
}

/** the settings a stage's output depends on: its own and every earlier stage's */
function stageRecord(s: Settings, stage: UpitStage): Record<string, unknown> {
  const r: Record<string, unknown> = {};
  for (const st of UPIT_STAGES.slice(0, UPIT_STAGES.indexOf(stage) + 1)) Object.assign(r, STAGE_SETTINGS[st](s));
  return r;
}

function readSettings(out: string): Partial<Record<UpitStage, Record<string, unknown>>> {
  const f = path.join(out, SETTINGS_FILE);
  if (!fs.existsSync(f)) return {};
  try {
    return JSON.parse(fs.readFileSync(f, 'utf8')) as Partial<Record<UpitStage, Record<string, unknown>>>;
  } catch (e) {
    throw new XftError(`${OP}: ${f} is not valid JSON (${(e as Error).message}); it records the settings of the stages under ${out}`, 'XFT_FORMAT');
  }
}

/** records the settings of `stage` as it starts (written before its output, so a resumed stage is checked too) */
function recordSettings(s: Settings, stage: UpitStage): void {
  const all = readSettings(s.out);
  all[stage] = stageRecord(s, stage);
  writeFileAtomic(path.join(s.out, SETTINGS_FILE), JSON.stringify(all, null, 2) + '\n');
}

/**
 * Throws when `stage` has output under `out` (complete, or partial and about to be resumed) made with
 * settings other than this run's. A stage recorded by no settings file (an older pipeline) is not checked.
 */
function checkSettings(s: Settings, stage: UpitStage, dir: string): void {
  const recorded = readSettings(s.out)[stage];
  if (!recorded) return;
  const now = stageRecord(s, stage);
  for (const key of new Set([...Object.keys(recorded), ...Object.keys(now)])) {
    // a setting added after the stage was recorded (jointRouter, sharedTrunk): the stage was made as its default says
    const then = key in recorded ? recorded[key] : ((UPIT_DEFAULTS as Record<string, { value: unknown }>)[key]?.value ?? null);
    const a = JSON.stringify(then ?? null), b = JSON.stringify(now[key] ?? null);
    if (a !== b)
      throw new XftError(`${OP}: ${dir} was made with ${key} ${a} (${flagOf(key)}), and this run asks for ${b}: a complete or interrupted stage is ` +
        `skipped or resumed, so the new value would not apply. Run with ${a} again, choose another --out, or delete ${dir} and the stages after it to redo them`, 'XFT_VALUE');
  }
}

interface ExpandMark { pool: string[] }
interface SeedMark { indices: number[]; bucket: number[]; sizes: number[] }

/**
 * The UpIT pipeline (see the file comment). Each stage is skipped when its folder is complete, and the
 * training stages resume an interrupted run (`<folder>.resume`). With `stage`, only that stage runs.
 */
export async function upit(options: UpitOptions): Promise<UpitResult> {
  const s = settings(options);
  const dirs = upitFolders(s.out);
  const dense = readCheckpointInfo(s.dense);
  if (dense.kind !== 'dense') throw new XftError(`${OP}: ${s.dense} is a ${dense.kind} checkpoint; UpIT starts from a dense one`, 'XFT_VALUE');
  if (!fs.existsSync(s.data)) throw new XftError(`${OP}: ${s.data}: no such data file`, 'XFT_IO');
  fs.mkdirSync(s.out, { recursive: true });
  // every stage with output (complete, or partial and resumed below) was made with this run's settings
  const stageDir = (st: UpitStage) => (st === 'post-train' ? dirs.postTrain : dirs[st]);
  const hasOutput = (st: UpitStage) => {
    const dir = stageDir(st);
    return st === 'prepare' || st === 'post-train' ? complete(dir) || fs.existsSync(`${dir}.resume`) : fs.existsSync(dir);
  };
  for (const st of UPIT_STAGES) if (hasOutput(st)) checkSettings(s, st, stageDir(st));
  const ran: UpitStage[] = [], skipped: UpitStage[] = [];
  const want = (st: UpitStage) => s.stage === undefined || s.stage === st;
  const done = (st: UpitStage, isDone: boolean) => {
    if (isDone && want(st)) skipped.push(st);
    return !want(st) || isDone;
  };

  // 1. prepare: SFT with epoch checkpoints
  if (!done('prepare', complete(dirs.prepare))) {
    recordSettings(s, 'prepare');
    s.log(`prepare: SFT of ${s.dense}, ${s.prepareEpochs} epochs, a checkpoint every ${s.checkpointEvery} epoch`);
    await trainStage(s, s.dense, dirs.prepare, ['--epochs', String(s.prepareEpochs), '--save-checkpoints-every', String(s.checkpointEvery)]);
    ran.push('prepare');
  }

  // 2. expand: the kept checkpoints, bred up to E
  if (!done('expand', readMark<ExpandMark>(dirs.expand) !== null)) {
    recordSettings(s, 'expand');
    const { kept } = checkpointsOf(s);
    let pool = kept.map((c) => c.dir);
    if (s.expand && pool.length < s.experts) {
      s.log(`expand: ${pool.length} checkpoints -> ${s.experts} experts`);
      pool = expandPool({
        base: s.dense, pool, experts: s.experts, out: dirs.expand, seed: s.seed, dropRate: s.dropRate, parents: s.parents,
        excludeUsedPairs: s.excludeUsedPairs, similarity: s.similarity, device: s.device, onLog: s.log,
      }).pool;
    }
    if (pool.length < s.experts)
      throw new XftError(`${OP}: ${pool.length} checkpoints for ${s.experts} experts without expansion; save more (checkpointEvery <= ${s.prepareEpochs / s.experts}) or expand`, 'XFT_VALUE');
    writeMark(dirs.expand, { pool: pool.map((d) => toMark(s.out, d)) } satisfies ExpandMark);
    ran.push('expand');
  }
  const pool = () => {
    const m = readMark<ExpandMark>(dirs.expand);
    if (!m) throw new XftError(`${OP}: the expand stage has not run (${dirs.expand}); run it first`, 'XFT_VALUE');
    return m.pool.map((d) => fromMark(s.out, d));
  };

  // the experts as the seed and route stages see them: their own checkpoints, or (sharedTrunk) their FFNs
  // on the MoE's trunk, written once under <out>/trunked (a complete one is reused)
  const seen = () => {
    const experts = pool();
    if (!s.sharedTrunk) return experts;
    const trunk = trunkFolders(s);
    return experts.map((dir, e) => {
      const out = dirs.trunked(e);
      if (!complete(out)) {
        s.log(`seed: expert ${e} on the ${s.trunk} trunk of ${trunk.length} -> ${out}`);
        trunkExpert({ expert: dir, trunk, out, overwrite: true });
      }
      return out;
    });
  };

  // 3a. seed: seed rows in buckets by lowest PPL
  let rows: Sample[] | null = null;
  if (!done('seed', readMark<SeedMark>(dirs.seed) !== null)) {
    recordSettings(s, 'seed');
    if (s.routerInit) {
      rows = await dataRows(s);
      const indices = seedIndices(rows.length, s.seedFraction, s.seed);
      const seedRows = indices.map((i) => rows![i]);
      s.log(`seed: ${seedRows.length} of ${rows.length} rows into ${s.experts} buckets (${s.buckets ?? 'ppl'})`);
      const b = assignBuckets(seen(), seedRows, { mode: s.buckets, seed: s.seed, microBatch: s.microBatch, device: s.device, dtype: s.precision, onLog: s.log });
      s.log(`seed: bucket sizes ${b.sizes.join(', ')}`);
      writeMark(dirs.seed, { indices, bucket: b.bucket, sizes: b.sizes } satisfies SeedMark);
    } else writeMark(dirs.seed, { indices: [], bucket: [], sizes: [], skipped: 'no router init' });
    ran.push('seed');
  }

  // 3b. route: one routing vector per expert and layer
  if (!done('route', readMark(dirs.route) !== null)) {
    recordSettings(s, 'route');
    if (s.routerInit) {
      const m = readMark<SeedMark>(dirs.seed);
      if (!m) throw new XftError(`${OP}: the seed stage has not run (${dirs.seed}); run it first`, 'XFT_VALUE');
      rows ??= await dataRows(s);
      const experts = seen();
      for (let e = 0; e < experts.length; e++) {
        const dir = dirs.routeExpert(e);
        if (fs.existsSync(path.join(dir, 'routing_vectors.safetensors'))) continue;
        const mine = m.indices.filter((_, j) => m.bucket[j] === e).map((i) => rows![i]);
        s.log(`route: expert ${e}, ${mine.length} seed rows`);
        // a bucket holds a share of the 1% seed rows: the batch is at most the bucket (the micro-batch kept where it divides it)
        const batch = Math.max(1, Math.min(s.batchSize, mine.length));
        preoptimizeRouting(experts[e], mine, dir, {
          lr: s.lr, gamma: s.gamma, epochs: s.routeEpochs, routerLrScale: s.routerLrScale, train: s.routeTrain,
          batchSize: batch, microBatch: s.microBatch !== undefined && batch % s.microBatch === 0 ? s.microBatch : undefined, seed: s.seed, device: s.device, dtype: s.precision, onLog: s.log,
        });
      }
      writeMark(dirs.route, { experts: experts.map((_, e) => toMark(s.out, dirs.routeExpert(e))) });
    } else writeMark(dirs.route, { experts: null, skipped: 'no router init' });
    ran.push('route');
  }

  // 4. assemble
  if (!done('assemble', complete(dirs.assemble))) {
    const routeMark = readMark<{ experts: string[] | null }>(dirs.route);
    if (!routeMark) throw new XftError(`${OP}: the route stage has not run (${dirs.route}); run it first`, 'XFT_VALUE');
    recordSettings(s, 'assemble');
    const trunk = trunkFolders(s);
    // with router init, expert e's FFN is the one trained with its routing vector (route/expert-e)
    const routed = routeMark.experts?.map((d) => fromMark(s.out, d)) ?? null;
    const experts = routed ?? pool();
    s.log(`assemble: ${experts.length} experts, top-${s.topK}, trunk ${s.trunk} of ${trunk.length}, router ${routed ? 'from the routing vectors' : 'drawn'}` +
      (s.jointRouter ? ', then trained jointly on the seed buckets' : ''));
    // with jointRouter the assembled MoE is a step on the way (<out>/assemble.raw, made again by a rerun)
    const raw = s.jointRouter ? `${dirs.assemble}.raw` : dirs.assemble;
    assembleMoe({ experts, routing: routed, trunk, out: raw, topK: s.topK, seed: s.seed, balanceLoss: 'switch', balanceLossWeight: s.balanceLossWeight, overwrite: s.jointRouter });
    if (s.jointRouter) {
      const m = readMark<SeedMark>(dirs.seed);
      if (!m || m.indices.length === 0) throw new XftError(`${OP}: jointRouter needs the seed buckets (${dirs.seed}); run the seed stage first`, 'XFT_VALUE');
      rows ??= await dataRows(s);
      const seedRows = m.indices.map((i) => rows![i]);
      const batch = Math.max(1, Math.min(s.batchSize, seedRows.length));
      trainJointRouter(raw, seedRows, m.bucket, dirs.assemble, {
        lr: s.lr * (s.routerLrScale ?? UPIT_DEFAULTS.routerLrScale.value), batchSize: batch,
        microBatch: s.microBatch !== undefined && batch % s.microBatch === 0 ? s.microBatch : undefined,
        seed: s.seed, device: s.device, dtype: s.precision, onLog: s.log,
      });
      fs.rmSync(raw, { recursive: true, force: true });
    }
    ran.push('assemble');
  }

  // 5. post-train: L_lm + w L_load, the MoE's config carries the Switch loss
  if (!done('post-train', complete(dirs.postTrain))) {
    if (!complete(dirs.assemble)) throw new XftError(`${OP}: the assemble stage has not run (${dirs.assemble}); run it first`, 'XFT_VALUE');
    recordSettings(s, 'post-train');
    s.log(`post-train: ${s.postEpochs} epochs of the MoE`);
    await trainStage(s, dirs.assemble, dirs.postTrain, ['--epochs', String(s.postEpochs)]);
    ran.push('post-train');
  }
  const last = s.stage === undefined || s.stage === 'post-train' ? dirs.postTrain
    : s.stage === 'route' ? dirs.route : s.stage === 'assemble' ? dirs.assemble : s.stage === 'prepare' ? dirs.prepare : s.stage === 'seed' ? dirs.seed : dirs.expand;
  return { moe: last, ran, skipped };
}
