#!/usr/bin/env node
/**
 * The `xft` command line: info, plan, upcycle, train, merge, eval, generate, demo, upit.
 *
 * Exit codes (for scripts):
 *   0    success
 *   1    runtime failure (I/O, CUDA, out of memory, training diverged (a non-finite loss or gradient
 *        norm), the output folder claimed by another running xft, an internal error)
 *   2    usage error (unknown command or option, an option value out of range)
 *   3    unusable input (a checkpoint, config.json or data file that is malformed or does not fit,
 *        or a checkpoint holding NaN or ±Inf weights)
 *   130  interrupted (Ctrl-C); `xft train` first saves a resumable state
 */
import { Command, InvalidArgumentError, CommanderError, Option } from 'commander';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MultiBar, Presets, SingleBar } from 'cli-progress';
import { backend, cudaAvailable, memoryStats, type Device, type Tensor } from './tensor';
import { packageRoot } from './native';
import { cudaVersionString } from './backend_reason';
import { XftError } from './errors';
import { runDemo, markdownTable } from './demo';
import { checkWritable, lockFolder, type FolderLock } from './folder';
import { checkOutputFolder, loadModel, mergeCheckpoint, readCheckpointInfo, saveMergeCheckpoint, saveModel, upcycleCheckpoint, type SaveDtype, type CheckpointKind } from './checkpoint';
import { mergeable, countParameters } from './xft';
import { generate } from './generate';
import { trainAsync, evaluate, saveTrainState, loadTrainState, readTrainStateInfo, disposeState, useMasterWeights, type TrainState } from './train';
import { checkTokenizerFolder, countTargets, encodeDataFileAsync, loadTokenizer, split, toRows, type Tokenizer, type Sample } from './data';
import type { Model, Param } from './model';
import { planMemory, formatPlan, PLAN_DEFAULTS, type PlanOptions } from './plan';
import { OPTIMIZERS, PRECISIONS, type OptimizerKind, type Precision } from './optim';
import { distEnv, launch, ProcessGroup, type DistEnv } from './dist/index';
import { DataParallel } from './dist/ddp';
import { collectivesOf } from './dist/collectives';
import { evaluateParallel, defaultMicroBatch, testFaultHook } from './dist/run';
import { checkpointDir, checkpointEpochs, checkpointSteps, checkpointsFolder } from './checkpoint_schedule';
import { upit, UPIT_DEFAULTS, UPIT_STAGES, type UpitStage } from './upit/index';

const pkg = JSON.parse(fs.readFileSync(path.join(packageRoot(), 'package.json'), 'utf8')) as { version: string };

export const EXIT = { ok: 0, failure: 1, usage: 2, input: 3, interrupted: 130 } as const;

/** The paper's recipe per stage (XFT.md): lr, epochs; batch 64, linear schedule, warmup ≈ 7.2% of the steps. */
export const RECIPE: Record<CheckpointKind, { lr: number; epochs: number; what: string }> = {
  dense: { lr: 5e-5, epochs: 5, what: 'SFT of the dense model' },
  moe: { lr: 5e-5, epochs: 4, what: 'MoE fine-tuning' },
  merged: { lr: 1e-5, epochs: 1, what: 'merge learning (only the mixing coefficients)' },
};
/** 500 / 6952, 625 / 8690, 125 / 1738 steps on evol-codealpaca-v1 (111k examples, batch 64) */
const WARMUP_FRACTION = 0.072;
/**
 * How a run optimizes, by device. On a GPU, the reference scripts' Trainer flags (`--optim adafactor
 * --max_grad_norm -1 --bf16 True`, weights loaded in bf16): Adafactor, no gradient clipping, bf16
 * weights updated in place. On the CPU (small models, f32 compute), AdamW with clipping at 1 on f32
 * weights, as before: it converges in the few hundred steps a CPU run affords.
 */
export const RUN_DEFAULTS: Record<Device, { optim: OptimizerKind; precision: Precision; clip: number }> = {
  cuda: { optim: 'adafactor', precision: 'bf16', clip: 0 },
  cpu: { optim: 'adamw', precision: 'f32', clip: 1 },
};

/** A command line that cannot run as given (exit code 2). */
class UsageError extends Error {}

// ---- option parsers (errors exit with code 2) ----

function int(min: number) {
  return (v: string) => {
    const n = Number(v);
    if (!Number.isSafeInteger(n) || n < min) throw new InvalidArgumentError(`expected an integer >= ${min}`);
    return n;
  };
}

function num(min: number, max = Infinity) {
  return (v: string) => {
    const n = Number(v);
    if (v.trim() === '' || !Number.isFinite(n) || n < min || n > max) throw new InvalidArgumentError(`expected a number in [${min}, ${max === Infinity ? '∞' : max}]`);
    return n;
  };
}

function rate(v: string): number | null {
  if (v === 'none' || v === 'null') return null;
  return num(0, 1)(v);
}

/** A --shared-rate value: commander stores a parser's null as '' (its "no value"), which means 'none' here. */
function sharedRateOf(v: number | null | undefined | ''): number | null | undefined {
  return v === '' ? null : v;
}

/** "5GB", "500MB", "2GiB" or bytes (as transformers' max_shard_size: GB = 10^9, GiB = 2^30). */
function bytes(v: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KIB|MIB|GIB)?$/i.exec(v.trim());
  if (!m) throw new InvalidArgumentError('expected a size such as 5GB, 500MB, 2GiB or a number of bytes');
  const unit = (m[2] ?? 'B').toUpperCase();
  const mult: Record<string, number> = { B: 1, KB: 1e3, MB: 1e6, GB: 1e9, KIB: 2 ** 10, MIB: 2 ** 20, GIB: 2 ** 30 };
  const n = Math.floor(Number(m[1]) * mult[unit]);
  if (n < 1) throw new InvalidArgumentError('expected a positive size');
  return n;
}

const dtypeOption = () => new Option('--dtype <dtype>', 'dtype of the weights written (default: as the source)').choices(['f32', 'bf16', 'f16']);
const deviceOption = () => new Option('--device <device>', "'cuda' or 'cpu' (default: the GPU when there is one)").choices(['cuda', 'cpu']);
const precisionOption = () =>
  new Option('--precision <dtype>', "compute dtype: 'bf16' (mixed precision: bf16 weights and activations, fp32 accumulation, f32 master weights) or 'f32' (default: bf16 on the GPU, f32 on the CPU)").choices(['bf16', 'f32']);
const shardOption = () => new Option('--max-shard-size <size>', 'largest safetensors shard (5GB, 500MB, ...)').argParser(bytes).default(5e9, '5GB');

/** --device, checked before any work: 'cuda' on a host without a usable GPU is a runtime failure (exit 1). */
function deviceOf(d?: string): Device {
  if (d === 'cuda' && !cudaAvailable()) throw new XftError(`--device cuda: no CUDA device is available (${backend().reason})`, 'XFT_CUDA');
  return (d as Device | undefined) ?? (cudaAvailable() ? 'cuda' : 'cpu');
}

/** --out, checked before any work: a folder that cannot be written fails at once (exit 1). */
function checkOut(out: string): void {
  checkWritable(out);
}

const DEFAULT_SEQ_LEN = 1024;

/**
 * --seq-len against the model's max_position_embeddings: positions past it were never trained (and
 * rotary scaling is defined up to it), so a longer one is refused unless --allow-long (then a warning).
 * Without --seq-len: 1024, or max_position_embeddings when smaller.
 */
function seqLenFor(o: { seqLen?: number; allowLong?: boolean }, config: { max_position_embeddings: number }, dir: string): number {
  const max = config.max_position_embeddings;
  if (o.seqLen === undefined) return Math.min(DEFAULT_SEQ_LEN, max);
  if (o.seqLen > max) {
    const what = `--seq-len ${o.seqLen} is longer than the model's max_position_embeddings ${max} (${path.join(dir, 'config.json')})`;
    if (!o.allowLong) throw new UsageError(`${what}: positions past it were never trained; use --seq-len ${max} or less, or --allow-long to go on anyway`);
    console.error(`xft: warning: ${what}; going on (--allow-long)`);
  }
  return o.seqLen;
}

function precisionOf(p: string | undefined, device: Device): 'f32' | 'bf16' {
  return (p as 'f32' | 'bf16' | undefined) ?? (device === 'cuda' ? 'bf16' : 'f32');
}

// ---- progress ----

function bar(format: string): SingleBar {
  return new SingleBar({ format, hideCursor: true, clearOnComplete: false, noTTYOutput: true, notTTYSchedule: 10000, etaBuffer: 20 }, Presets.shades_classic);
}

function fileProgress(label: string) {
  const b = bar(` ${label} |{bar}| {value}/{total} tensors | {mbs} MB/s | ETA {eta_formatted}`);
  const t0 = Date.now();
  let written = 0, started = false;
  return {
    onProgress: (p: { done: number; total: number; bytes: number }) => {
      if (!started) {
        b.start(p.total, 0, { mbs: '-' });
        started = true;
      }
      written += p.bytes;
      b.update(p.done, { mbs: (written / 1e6 / Math.max(1e-3, (Date.now() - t0) / 1000)).toFixed(0) });
    },
    stop: () => {
      if (started) b.stop();
      started = false;
    },
  };
}

// ---- data ----

interface DataOptions {
  data: string;
  tokenizer?: string;
  seqLen?: number;
  allowLong?: boolean;
  pack?: boolean;
}

/**
 * The tokenizer: --tokenizer, else the model folder's tokenizer.json, else bytes. `copied`: the model
 * folder's tokenizer files are copied into the output, so they are checked even when --tokenizer is another.
 */
function tokenizerFor(modelDir: string, spec: string | undefined, vocab: number, copied = false): Tokenizer {
  const chosen = spec ?? (fs.existsSync(path.join(modelDir, 'tokenizer.json')) ? modelDir : 'byte');
  if (copied && chosen !== modelDir) checkTokenizerFolder(modelDir);
  const tok = loadTokenizer(chosen);
  if (tok.vocabSize > vocab)
    throw new XftError(`the tokenizer ${chosen} has ${tok.vocabSize} tokens but the model's vocab_size is ${vocab}`, 'XFT_VALUE');
  return tok;
}

/** Sequences of --seq-len; sequences left without a response token (truncated away) are dropped, with a warning. */
function rowsOf(samples: Sample[], o: DataOptions & { seqLen: number }, tok: Tokenizer): Sample[] {
  if (samples.length === 0) return [];
  const rows = toRows(samples, o.seqLen, o.pack ? 'pack' : 'pad', tok.pad);
  const kept = rows.filter((r) => countTargets(r.targets) > 0);
  if (kept.length === 0)
    throw new XftError(`--seq-len ${o.seqLen}: no sequence keeps a response token (the prompt template alone is longer); use a larger --seq-len`, 'XFT_VALUE');
  if (kept.length < rows.length)
    console.error(`xft: ${rows.length - kept.length} of ${rows.length} sequences have no response token within --seq-len ${o.seqLen}; they are skipped`);
  return kept;
}

/** The examples of a JSONL file encoded (on worker threads when large), with a progress bar, or read back from the token cache next to it. */
async function loadData(file: string, tok: Tokenizer, quiet = false): Promise<Sample[]> {
  const b = bar(' tokenize |{bar}| {value}/{total} examples | ETA {eta_formatted}');
  let started = false;
  const r = await encodeDataFileAsync(file, tok, {
    onProgress: (done, total) => {
      if (quiet) return;
      if (!started) b.start(total, 0);
      started = true;
      b.update(done);
    },
  });
  if (started) b.stop();
  if (r.samples.length === 0) throw new XftError(`${file}: no examples`, 'XFT_FORMAT');
  if (!quiet) console.error(`xft: ${r.samples.length} examples ${r.cached ? `read from the token cache ${r.cacheFile}` : `tokenized in ${r.seconds.toFixed(1)} s (cached in ${r.cacheFile})`}`);
  return r.samples;
}

function describe(m: Model): string {
  const all = countParameters(m), trainable = countParameters(m, { trainableOnly: true });
  return `${m.kind} model, ${(all / 1e6).toFixed(2)}M parameters (${(trainable / 1e6).toFixed(2)}M trainable) on ${m.device}`;
}

// ---- commands ----

const program = new Command();
program
  .name('xft')
  .description('XFT for code LLMs: upcycle a dense Llama to a shared-expert MoE, fine-tune, merge back to dense')
  .version(pkg.version)
  .addHelpText('after', `
Pipeline (Hugging Face checkpoint folders throughout):
  xft upcycle dense/ moe/                       # dense -> MoE (8 experts, top-6, shared expert 0)
  xft train moe/ --data train.jsonl --out moe-ft/
  xft train moe-ft/ --merge --data train.jsonl --out merge/   # learn the mixing coefficients
  xft merge merge/ final/                       # -> a dense LlamaForCausalLM of the original size
  xft eval final/ --data heldout.jsonl
  xft generate final/ "Write a function that reverses a string."

Exit codes: 0 success, 1 runtime failure, 2 usage error, 3 unusable input, 130 interrupted (Ctrl-C).
1 also means: training diverged (a NaN/Inf loss or gradient norm), or the output folder is claimed by another xft.

Output folders are claimed while written (a lock file .<name>.lock beside them, with the owner's pid):
a second xft writing the same folder fails at once; a lock left by a process that no longer runs is taken over.`);

program
  .command('info')
  .description('show the compute backend (GPU name, compute capability, memory, or why the CPU is used) and the build')
  .option('--json', 'print JSON')
  .action((opts: { json?: boolean }) => {
    const b = backend();
    const info = { version: pkg.version, backend: b, memory: memoryStats(), node: process.version };
    if (opts.json) {
      console.log(JSON.stringify(info, null, 2));
      return;
    }
    console.log(`xft ${pkg.version} (node ${process.version})`);
    console.log(`build:   ${b.compiledWithCuda ? 'CUDA backend (sm_80, sm_90a, PTX compute_90) + CPU' : 'CPU only'}`);
    if (b.kind === 'cuda') {
      const gib = (v = 0) => (v / 2 ** 30).toFixed(1);
      console.log(`device:  ${b.name} (compute capability ${b.computeCapability!.join('.')}, ${b.multiprocessors} SMs)`);
      console.log(`memory:  ${gib(b.freeMemory)} GiB free of ${gib(b.totalMemory)} GiB`);
      console.log(`cuda:    driver ${b.driverVersion}, runtime ${b.runtimeVersion}`);
    } else {
      console.log(`device:  CPU (${b.reason})`);
      if (b.cuda)
        console.log(`cuda:    ${b.cuda.driverVersion === 0 ? 'no driver' : `driver ${b.cuda.driverRelease || 'version unknown'} (supports CUDA ${cudaVersionString(b.cuda.driverVersion)})`}, runtime ${cudaVersionString(b.cuda.runtimeVersion)}, ${b.cuda.deviceCount} device(s)`);
    }
  });

program
  .command('plan')
  .description('peak GPU memory of one training step by category (weights, gradients, optimizer state, activations, workspace), whether it fits, and the largest micro-batch that fits; reads only config.json')
  .argument('<model>', 'checkpoint or config folder (only config.json is read)')
  .addOption(new Option('--stage <stage>', 'training stage (default: sft for a dense model, moe for an MoE, merge for a merge checkpoint)').choices(['sft', 'moe', 'merge']))
  .option('--experts <E>', 'experts of the upcycle of a dense config, the shared expert included (default 8)', int(2))
  .option('--top-k <K>', 'experts per token of that upcycle, the shared expert included (default 6)', int(1))
  .option('--micro-batch <n>', 'sequences per forward pass', int(1), PLAN_DEFAULTS.microBatch)
  .option('--seq-len <n>', 'tokens per sequence', int(1), PLAN_DEFAULTS.seqLen)
  .addOption(new Option('--optim <name>', 'optimizer').choices(['adafactor', 'adamw']).default(PLAN_DEFAULTS.optimizer))
  .addOption(new Option('--precision <mode>', "'mixed' (bf16 weights, f32 master weights and gradients), 'bf16' (bf16 weights updated in place) or 'f32'").choices(['mixed', 'bf16', 'f32']).default(PLAN_DEFAULTS.precision))
  .addOption(new Option('--grad-dtype <dtype>', "gradients of the linear and expert weights with --precision bf16 or mixed, as xft train (default f32)").choices(['bf16', 'f32']))
  .option('--recompute', 'activation recomputation (as xft train --recompute)')
  .option('--gpu-memory <GB>', 'GPU memory in GB (default: the GPU present, else 80)', num(1e-9))
  .option('--nproc <n>', 'data-parallel ranks (as xft train --nproc, or torchrun\'s world size): the plan is one rank\'s', int(1), 1)
  .addOption(new Option('--zero <stage>', 'ZeRO stage as xft train --zero (1: optimizer state sharded over the ranks)').choices(['0', '1']).default('0'))
  .option('--json', 'print JSON')
  .action((dir: string, o: { stage?: PlanOptions['stage']; experts?: number; topK?: number; microBatch: number; seqLen: number; optim: PlanOptions['optimizer']; precision: PlanOptions['precision'];
    gradDtype?: 'bf16' | 'f32'; recompute?: boolean; gpuMemory?: number; json?: boolean; nproc: number; zero: '0' | '1' }) => {
    if (o.gradDtype === 'bf16' && o.precision === 'f32') throw new UsageError('plan: --grad-dtype bf16 needs bf16 weights (--precision bf16 or mixed)');
    const b = backend();
    const gpuMemory = o.gpuMemory !== undefined ? o.gpuMemory * 1e9 : b.kind === 'cuda' && b.totalMemory ? b.totalMemory : PLAN_DEFAULTS.gpuMemoryGB * 1e9;
    const plan = planMemory(dir, {
      stage: o.stage, experts: o.experts, topK: o.topK, microBatch: o.microBatch, seqLen: o.seqLen, optimizer: o.optim, precision: o.precision,
      gradients: o.gradDtype, recompute: o.recompute ?? false, gpuMemory, worldSize: o.nproc, zero: o.zero === '1' ? 1 : 0,
    });
    console.log(o.json ? JSON.stringify(plan, null, 2) : formatPlan(plan, { gpu: o.gpuMemory !== undefined ? 'given' : b.kind === 'cuda' ? b.name ?? 'the GPU' : 'no GPU here: 80 GB assumed' }));
  });

program
  .command('upcycle')
  .description('upcycle a dense Llama checkpoint into a shared-expert MoE checkpoint (streams tensor by tensor: memory stays small whatever the model size)')
  .argument('<dense>', 'dense checkpoint folder (config.json + safetensors)')
  .argument('<out>', 'output folder for the MoE checkpoint')
  .option('--experts <E>', 'experts per layer, the shared expert included', int(2), 8)
  .option('--top-k <K>', 'experts per token, the shared expert included', int(1), 6)
  .addOption(new Option('--router <kind>', 'router network').choices(['mlp', 'linear']).default('mlp'))
  .option('--no-normalize', 'ablation: no routing weight normalization')
  .option('--no-shared-expert', 'ablation: vanilla sparse upcycling (no shared expert)')
  .option('--no-noise', 'no router noise in training')
  .option('--balance-loss <w>', 'weight of the balance loss (0 disables it)', num(0), 0.01)
  .addOption(new Option('--balance-kind <kind>', "balance loss: 'cv2' (the XFT reference's cv²(importance) + cv²(load)) or 'switch' (E·Σ f_i P_i, as Switch Transformer, Mixtral and UpIT)").choices(['cv2', 'switch']).default('cv2'))
  .option('--seed <n>', 'seed of the router initialisation', int(0), 0)
  .addOption(new Option('--router-init <kind>', "router and noise weights: 'uniform' as torch.nn.Linear (U(±1/√in), noise weights 0), or 'reference' as the XFT reference's upcycle draws them (N(0, 0.02))").choices(['uniform', 'reference']).default('uniform'))
  .addOption(dtypeOption())
  .addOption(shardOption())
  .option('--overwrite', 'replace a non-empty output folder')
  .action((src: string, out: string, o: { experts: number; topK: number; router: 'mlp' | 'linear'; normalize: boolean; sharedExpert: boolean; noise: boolean; balanceLoss: number; balanceKind: 'cv2' | 'switch'; seed: number; routerInit: 'uniform' | 'reference'; dtype?: SaveDtype; maxShardSize: number; overwrite?: boolean }) => {
    checkOut(out);
    const minK = o.sharedExpert ? 2 : 1;
    if (o.topK < minK || o.topK > o.experts)
      throw new UsageError(`upcycle: --top-k ${o.topK} is out of range: expected ${minK} to --experts ${o.experts}${o.sharedExpert ? ' (the shared expert counts as one of the K)' : ''}`);
    checkTokenizerFolder(src); // copied into the output: a bad tokenizer file fails here, naming the file
    const p = fileProgress('upcycle');
    const t0 = Date.now();
    try {
      const r = sourceNonFinite(src, out, () => upcycleCheckpoint(src, out, {
        experts: o.experts, topK: o.topK, router: o.router, normalize: o.normalize, sharedExpert: o.sharedExpert, noise: o.noise,
        balanceLossWeight: o.balanceLoss, ...(o.balanceKind === 'switch' ? { balanceLoss: 'switch' as const } : {}), seed: o.seed, routerInit: o.routerInit, dtype: o.dtype, maxShardBytes: o.maxShardSize, overwrite: o.overwrite, onProgress: p.onProgress,
      }));
      p.stop();
      console.log(`wrote ${out}: MoE with ${r.moe!.num_experts} experts (top-${r.moe!.num_selects}, ${r.moe!.gate_type} router) per layer, ${r.config.num_hidden_layers} layers, in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    } finally {
      p.stop();
    }
  });

program
  .command('train')
  .description('train a checkpoint with the paper\'s recipe for its kind: dense -> SFT, MoE -> MoE fine-tuning, merge (or MoE with --merge) -> merge learning')
  .argument('<model>', 'checkpoint folder (dense, MoE or merge)')
  .option('--data <file>', 'JSONL instruction data (instruction/response, instruction/output or problem/solution); required unless --resume')
  .requiredOption('--out <dir>', 'output checkpoint folder (written when training ends; Ctrl-C saves <out>.resume)')
  .option('--merge', 'start merge learning from an MoE checkpoint (mixing coefficients α = 0, experts frozen)')
  .option('--shared-rate <λ>', "shared expert rate of merge learning ('none': soup over all experts)", rate, 0.75)
  .option('--tokenizer <spec>', "'byte' or a tokenizer.json / folder (default: the model's tokenizer.json, else bytes)")
  .option('--seq-len <n>', 'tokens per sequence (default: 1024, or max_position_embeddings when smaller)', int(2))
  .option('--allow-long', "allow a --seq-len above the model's max_position_embeddings (a warning instead of exit 2)")
  .option('--pack', 'pack examples into full sequences (default: one example per sequence, padded)')
  .option('--batch-size <n>', 'sequences per optimizer step', int(1), 64)
  .option('--micro-batch <n>', 'sequences per forward pass (gradient accumulation up to --batch-size; default min(8, batch))', int(1))
  .option('--epochs <n>', 'passes over the data (default: the recipe: SFT 5, MoE 4, merge 1)', num(0))
  .option('--steps <n>', 'optimizer steps (overrides --epochs)', int(1))
  .option('--lr <lr>', 'peak learning rate (default: the recipe: 5e-5, merge 1e-5)', num(0))
  .option('--warmup <steps>', `linear warmup steps (default: ${(WARMUP_FRACTION * 100).toFixed(1)}% of the steps, as the recipe)`, int(0))
  .option('--weight-decay <w>', 'AdamW weight decay', num(0), 0)
  .option('--clip <norm>', 'gradient norm clipping (0: off; default: GPU 0 as the reference, CPU 1)', num(0))
  .addOption(new Option('--optim <name>', "optimizer: 'adafactor' (transformers' Adafactor, as the reference) or 'adamw' (default: GPU adafactor, CPU adamw)").choices([...OPTIMIZERS]))
  .option('--stochastic-rounding', 'with --precision bf16: round the bf16 weight updates stochastically (updates below a bf16 ulp are kept on average)')
  .addOption(new Option('--grad-dtype <dtype>', "gradients of the linear and expert weights with --precision bf16 or mixed: 'f32' or 'bf16' (half the memory)").choices(['f32', 'bf16']).default('f32'))
  .option('--held-out <n>', 'examples (or a fraction < 1) held out for evaluation at the end', num(0), 0)
  .option('--seed <n>', 'seed of the data order and router noise', int(0), 0)
  .option('--save-every <steps>', 'also save a resumable state every N steps', int(1))
  .option('--save-checkpoints-every <epochs>', 'also save a loadable checkpoint every F epochs (e.g. 0.25: after step round(j·F·S), S steps per epoch, ' +
    'the last at the final step) to <out>.checkpoints/checkpoint-<step>, its config.json recording xft_epoch and xft_step (UpIT\'s candidate experts); ' +
    'a resumed run writes the same set; with --overwrite an earlier run\'s checkpoints there are removed first', num(Number.MIN_VALUE))
  .option('--eval-every <steps>', 'evaluate on the held-out examples every N steps (needs --held-out)', int(1))
  .option('--resume', 'continue the run saved in <out>.resume (its options are used)')
  .option('--recompute', 'activation recomputation: keep only each block\'s input, recompute it in the backward (less memory, ~1/3 more compute, identical gradients)')
  .option('--cuda-graph', 'capture the training step in a CUDA graph and replay it (CUDA, AdamW, one process, no MoE router noise; the same losses and weights)')
  .option('--skip-nonfinite <n>', 'skip up to N steps whose loss or gradient norm is NaN/Inf (no update) before stopping with exit 1 (default 0: stop at the first)', int(0), 0)
  .option('--nproc <n>', 'data-parallel processes on this machine (one per GPU, or CPU processes); the global batch stays --batch-size. Under torchrun or srun, omit it: each process is one rank', int(1))
  .addOption(new Option('--zero <stage>', 'ZeRO stage: 0 replicates the optimizer state on every rank, 1 shards it over the ranks').choices(['0', '1']).default('0'))
  .option('--dist-timeout <seconds>', 'how long a rank waits for the others (rendezvous, each collective) before the run stops with an error', num(1), 300)
  .addOption(deviceOption())
  .addOption(new Option('--precision <mode>', "'bf16' (bf16 weights updated in place, f32 optimizer math, as the reference), 'mixed' (bf16 compute weights + f32 master weights) or 'f32' (default: GPU bf16, CPU f32)").choices([...PRECISIONS]))
  .addOption(dtypeOption())
  .addOption(shardOption())
  .option('--overwrite', 'replace a non-empty output folder')
  .action(trainCommand);

interface TrainCliOptions extends DataOptions {
  out: string; merge?: boolean; sharedRate: number | null; batchSize: number; microBatch?: number; epochs?: number; steps?: number; lr?: number;
  warmup?: number; weightDecay: number; clip?: number; heldOut: number; seed: number; saveEvery?: number; saveCheckpointsEvery?: number; evalEvery?: number; resume?: boolean; device?: string; precision?: string;
  dtype?: SaveDtype; maxShardSize: number; overwrite?: boolean; skipNonfinite?: number; optim?: OptimizerKind; stochasticRounding?: boolean; gradDtype?: 'f32' | 'bf16'; recompute?: boolean;
  nproc?: number; zero: '0' | '1'; distTimeout: number; cudaGraph?: boolean;
}

/** This process's place in a distributed run and its process group (world size 1: a plain run). */
interface Rank {
  env: DistEnv;
  group: ProcessGroup | null;
  /** rank 0: writes files, prints progress */
  lead: boolean;
}

/** XFT_DDP_BUCKET_BYTES (tests: small buckets), else DDP's 25 MiB. */
function bucketBytesOf(v: string | undefined): number | undefined {
  if (v === undefined || v === '') return undefined;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 1) throw new UsageError(`XFT_DDP_BUCKET_BYTES: expected a positive integer but received ${JSON.stringify(v)}`);
  return n;
}

/** The options that decide how the saved state reads: given again with --resume, they must match the run's. */
const RESUME_FIXED = ['optim', 'precision', 'stochasticRounding'] as const;

/**
 * The run's optimizer, precision and clipping: the flags, else the device's defaults (RUN_DEFAULTS).
 * Options saved before --optim existed (no `optim`): AdamW, and their 'bf16' precision was mixed.
 */
function runSettings(o: TrainCliOptions, device: Device): { optim: OptimizerKind; precision: Precision; clip: number } {
  const d = RUN_DEFAULTS[device];
  if (o.resume && o.optim === undefined)
    return { optim: 'adamw', precision: o.precision === 'bf16' || (o.precision === undefined && device === 'cuda') ? 'mixed' : 'f32', clip: o.clip ?? 1 };
  const precision = (o.precision as Precision | undefined) ?? d.precision;
  if (o.stochasticRounding && precision !== 'bf16')
    throw new UsageError(`train: --stochastic-rounding rounds bf16 weights updated in place; it needs --precision bf16 (this run: ${precision})`);
  if (o.gradDtype === 'bf16' && precision === 'f32') throw new UsageError('train: --grad-dtype bf16 needs bf16 weights (--precision bf16 or mixed)');
  return { optim: o.optim ?? d.optim, precision, clip: o.clip ?? d.clip };
}

async function trainCommand(modelDir: string, cli: TrainCliOptions, command: Command): Promise<void> {
  if (cli.resume)
    for (const k of RESUME_FIXED) if (command.getOptionValueSource(k) !== 'cli') delete cli[k];
  const resumeDir = `${cli.out.replace(/[/\\]+$/, '')}.resume`;
  const env = distEnv();
  if (cli.nproc !== undefined && cli.nproc > 1 && env.source === 'single') return launchRanks(cli.nproc, cli.distTimeout);
  const rank: Rank = { env, group: null, lead: env.rank === 0 };
  if (env.worldSize > 1) pickLocalGpu(env);
  if (!rank.lead) quietRank();
  if (rank.lead) checkOut(cli.out);
  const claims: FolderLock[] = [];
  try {
    if (env.worldSize > 1) {
      rank.group = await ProcessGroup.init({ env, device: deviceOf(cli.device ?? savedDevice(resumeDir, cli.resume)), timeoutMs: Math.round(cli.distTimeout * 1000) });
      if (rank.lead) console.error(`xft: rank 0 of ${env.worldSize} (${env.source}), ${rank.group.backend}, timeout ${cli.distTimeout} s`);
    }
    // claim <out> and <out>.resume for the whole run (rank 0 writes them): a second run with this --out fails now, not after training
    if (rank.lead) claims.push(lockFolder(cli.out), lockFolder(resumeDir));
    if (rank.lead && (cli.saveCheckpointsEvery !== undefined || cli.resume)) claims.push(lockFolder(checkpointsFolder(cli.out)));
    await trainRun(modelDir, cli, resumeDir, command, rank);
  } finally {
    claims.forEach((c) => c.release());
    rank.group?.dispose();
  }
}

/**
 * `--nproc N` outside a launcher: this process starts N ranks of the same command line (torchrun's
 * variables set) and supervises them; when one fails, the others are stopped and the exit code and
 * message are the failed rank's.
 */
async function launchRanks(nproc: number, timeoutSeconds: number): Promise<void> {
  const argv = [process.execPath, ...process.execArgv, process.argv[1], ...process.argv.slice(2)];
  const r = await launch({ nproc, argv, timeoutMs: Math.min(10_000, Math.round(timeoutSeconds * 1000)) });
  if (r.exitCode !== 0) {
    console.error(`xft: train --nproc ${nproc}: ${r.message ?? 'failed'}`);
    process.exitCode = r.exitCode;
  }
}

/**
 * One GPU per local rank, chosen as ProcessGroup.init chooses it (XFT_CUDA_DEVICE unless set: the
 * local rank, wrapped around the GPUs CUDA_VISIBLE_DEVICES names), but before deviceOf starts the
 * CUDA backend, which happens before the group is made.
 */
function pickLocalGpu(env: DistEnv): void {
  const visible = (process.env.CUDA_VISIBLE_DEVICES ?? '').split(',').filter((d) => d.trim() !== '').length;
  process.env.XFT_CUDA_DEVICE ??= String(visible > 0 ? env.localRank % visible : env.localRank);
}

/** Ranks other than 0 print only warnings and errors. */
function quietRank(): void {
  console.log = () => {};
}

/** The device a saved run used, for the process group made before its options are read (a plain JSON read: rank 0 recovers the folder later). */
function savedDevice(resumeDir: string, resume?: boolean): string | undefined {
  if (!resume) return undefined;
  try {
    return (JSON.parse(fs.readFileSync(path.join(resumeDir, 'trainer_state.json'), 'utf8')) as { args?: { options?: { device?: string } } }).args?.options?.device;
  } catch {
    return undefined;
  }
}

async function trainRun(modelDir: string, cli: TrainCliOptions, resumeDir: string, command: Command, rank: Rank): Promise<void> {
  let o = cli;
  const group = rank.group, lead = rank.lead, world = rank.env.worldSize;
  // rank 0 restores an interrupted replacement of <out>.resume before the others read it
  if (lead && cli.resume) readTrainStateInfo(resumeDir);
  group?.barrier();
  const saved = cli.resume ? readTrainStateInfo(resumeDir) : null;
  if (saved) {
    const args = saved.args as { model: string; options: TrainCliOptions } | undefined;
    if (!args) throw new XftError(`${resumeDir}: no run options in trainer_state.json`, 'XFT_FORMAT');
    if (path.resolve(args.model) !== path.resolve(modelDir))
      throw new XftError(`${resumeDir} continues a run of ${args.model}, not ${modelDir}`, 'XFT_VALUE');
    // the world size, sharding and timeout are the caller's: a run resumes at any world size
    o = { ...args.options, device: cli.device ?? args.options.device, resume: true, nproc: cli.nproc, zero: cli.zero, distTimeout: cli.distTimeout };
    const savedOptim = (saved.optimizer as string | undefined) ?? 'adamw';
    for (const k of RESUME_FIXED) {
      const was = k === 'optim' ? o.optim ?? savedOptim : k === 'stochasticRounding' ? o[k] ?? false : o[k];
      if (command.getOptionValueSource(k) === 'cli' && cli[k] !== was)
        throw new XftError(`--resume: ${resumeDir} holds a run with --${k === 'stochasticRounding' ? 'stochastic-rounding' : k} ${was ?? '(default)'}; ` +
          `it continues only with the same setting (given: ${cli[k]}); start a new run (another --out) to change it`, 'XFT_VALUE');
    }
    if (command.getOptionValueSource('saveCheckpointsEvery') === 'cli' && cli.saveCheckpointsEvery !== o.saveCheckpointsEvery)
      throw new XftError(`--resume: ${resumeDir} holds a run with --save-checkpoints-every ${o.saveCheckpointsEvery ?? '(none)'}; it continues only with the same schedule ` +
        `(given: ${cli.saveCheckpointsEvery}); start a new run (another --out) to change it`, 'XFT_VALUE');
    console.log(`resuming at step ${saved.step} with the saved options${world > 1 ? ` on ${world} ranks` : ''}`);
  } else if (!o.data) throw new UsageError("train: required option '--data <file>' not specified");
  if (lead) checkOutputFolder(o.out, o.overwrite);
  const info = readCheckpointInfo(modelDir);
  if (o.merge && info.kind !== 'moe') throw new XftError(`--merge starts merge learning from an MoE checkpoint; ${modelDir} is a ${info.kind} checkpoint`, 'XFT_VALUE');
  const device = deviceOf(o.device);
  const seqLen = seqLenFor(o, info.config, modelDir);
  o = { ...o, seqLen };
  const tok = tokenizerFor(modelDir, o.tokenizer, info.config.vocab_size, true);
  const samples = await loadData(o.data, tok, !lead);
  const parts = o.heldOut > 0 ? split(samples, o.heldOut, o.seed) : { train: samples, eval: [] };
  if (parts.train.length === 0) throw new XftError(`${o.data}: no training examples left after holding out ${o.heldOut}`, 'XFT_VALUE');
  const rows = rowsOf(parts.train, { ...o, seqLen }, tok), evalRows = rowsOf(parts.eval, { ...o, seqLen }, tok);
  if (o.evalEvery && evalRows.length === 0) throw new UsageError('train: --eval-every needs held-out examples (--held-out)');
  const batch = Math.min(o.batchSize, rows.length);
  const micro = o.microBatch ?? defaultMicroBatch(batch, world);
  if (batch % micro !== 0) throw new XftError(`--micro-batch ${micro} must divide the batch size ${batch}`, 'XFT_VALUE');
  if ((batch / micro) % world !== 0)
    throw new XftError(`--batch-size ${batch} must be --micro-batch ${micro} × accumulation steps × world size ${world}: ${batch / micro} micro-batches do not split over ${world} ranks ` +
      `(use a batch size that is a multiple of ${micro * world}, or a --micro-batch that divides ${batch / world})`, 'XFT_VALUE');
  // saved with the run, so that a resume at another world size runs the same micro-batches
  o = { ...o, microBatch: micro };

  const run = runSettings(o, device);
  o = { ...o, ...run };
  let model = loadModel(modelDir, { device, dtype: run.precision === 'f32' ? 'f32' : 'bf16' });
  if (o.merge) {
    const moe = model;
    model = mergeable(moe, { sharedRate: sharedRateOf(o.sharedRate) });
    moe.dispose();
  }
  const recipe = RECIPE[model.kind];
  const stepsPerEpoch = Math.floor(rows.length / batch);
  const total = o.steps ?? Math.max(1, Math.round(stepsPerEpoch * (o.epochs ?? recipe.epochs)));
  const lr = o.lr ?? recipe.lr, warmup = o.warmup ?? Math.round(WARMUP_FRACTION * total);
  // --save-checkpoints-every: the steps that save a checkpoint, and their epochs
  const schedule = new Map<number, number>();
  if (o.saveCheckpointsEvery !== undefined) {
    if (model.kind === 'merged')
      throw new UsageError('train: --save-checkpoints-every saves dense or MoE checkpoints; merge learning (--merge or a merge checkpoint) does not support it');
    const steps = checkpointSteps(stepsPerEpoch, o.saveCheckpointsEvery, o.steps !== undefined ? total / stepsPerEpoch : o.epochs ?? recipe.epochs);
    const epochs = checkpointEpochs(o.saveCheckpointsEvery, steps.length);
    steps.forEach((step, j) => {
      if (step <= total) schedule.set(step, epochs[j]);
    });
    const root = checkpointsFolder(o.out);
    if (lead && !o.resume && fs.existsSync(root) && fs.readdirSync(root).length > 0) {
      if (!o.overwrite) throw new XftError(`${root} holds checkpoints of an earlier run (pass --overwrite to remove them, or use another --out)`, 'XFT_IO');
      fs.rmSync(root, { recursive: true, force: true });
    }
    console.log(`checkpoints every ${o.saveCheckpointsEvery} epoch: after steps ${[...schedule.keys()].join(', ') || '(none)'} in ${root}`);
  }
  console.log(`${recipe.what}: ${describe(model)}, precision ${run.precision}${o.stochasticRounding ? ' (stochastic rounding)' : ''}, ${run.optim}, clip ${run.clip || 'off'}${o.recompute ? ', activation recomputation' : ''}`);
  console.log(`data: ${rows.length} sequences of ${o.seqLen} tokens (${tok.name} tokenizer), ${evalRows.length} held out; ${total} steps of ${batch} (micro-batch ${micro}), lr ${lr}, warmup ${warmup}`);

  // the run's state object: the trainer fills and advances it, so --save-every can save it between steps
  const state: TrainState = o.resume ? loadTrainState(resumeDir, model) : { step: 0, m: new Map(), v: new Map() };
  const losses: number[] = [...((saved?.losses as number[] | undefined) ?? [])];
  const evals: { step: number; loss: number; accuracy: number }[] = [];
  const runArgs = () => ({ args: { model: modelDir, options: { ...o, resume: undefined } }, losses });
  const stop = new AbortController();
  const onSigint = () => {
    console.error('\nxft: Ctrl-C: stopping after this step and saving a resumable state (Ctrl-C again to quit at once)');
    stop.abort();
    process.once('SIGINT', () => process.exit(EXIT.interrupted));
  };
  process.once('SIGINT', onSigint);
  // a launcher stops its ranks with SIGTERM (Ctrl-C of xft --nproc, torchrun): the same graceful stop
  if (group) process.once('SIGTERM', onSigint);
  const dp = group ? new DataParallel(collectivesOf(group), { zero: o.zero === '1' ? 1 : 0, bucketBytes: bucketBytesOf(process.env.XFT_DDP_BUCKET_BYTES) }) : null;
  const evalOn = (what: Sample[]) => (dp ? evaluateParallel(model, what, micro, dp.group) : evaluate(model, what, { batchSize: micro }));
  /** The full state to rank 0's folder (a collective under ZeRO); the other ranks wait until it is written. */
  const saveState = (at: TrainState) => {
    const full = dp ? dp.fullState(at) : at;
    try {
      if (lead) saveTrainState(resumeDir, model, full, runArgs());
    } finally {
      dp?.release(full, at);
    }
    dp?.barrier();
  };
  /** The scheduled checkpoint after `step`: the weights the final save would write now (master weights when kept); rank 0 writes. */
  const saveScheduled = (step: number, epoch: number) => {
    const full = dp ? dp.fullState(state) : state;
    try {
      if (lead)
        withMasterWeights(model, full, () => saveModel(model, checkpointDir(o.out, step), {
          dtype: o.dtype, maxShardBytes: o.maxShardSize, overwrite: true, copyFrom: modelDir, config: { xft_epoch: epoch, xft_step: step },
        }));
    } finally {
      dp?.release(full, state);
    }
    dp?.barrier();
    if (lead) console.error(`\nxft: saved the checkpoint of epoch ${epoch} (step ${step}) in ${checkpointDir(o.out, step)}`);
  };
  const fault = testFaultHook(rank.env.rank);
  const b = bar(' train |{bar}| {value}/{total} steps | loss {loss} | lr {lr} | {tps} tok/s | ETA {eta_formatted}');
  if (lead) b.start(total, state.step, { loss: '-', lr: '-', tps: '-' });
  if (world > 1) console.log(`data parallel: ${world} ranks × ${batch / micro / world} micro-batches of ${micro} per step${o.zero === '1' ? ', ZeRO stage 1 (optimizer state sharded)' : ''}`);
  let savedStep = saved?.step ?? null;
  const r = await trainAsync(model, rows, {
    parallel: dp ?? undefined,
    lr, batchSize: batch, microBatch: micro, steps: total, warmupSteps: warmup, weightDecay: o.weightDecay, clip: run.clip, seed: o.seed,
    optimizer: run.optim, masterWeights: run.precision === 'mixed', stochasticRounding: o.stochasticRounding ?? false, gradDtype: o.gradDtype ?? 'f32',
    resume: state, signal: stop.signal, skipNonFinite: o.skipNonfinite ?? 0, recompute: o.recompute ?? false,
    cudaGraph: o.cudaGraph ?? false,
    onWarning: (message) => console.error(`\nxft: warning: ${message}`),
    onStep: (s) => {
      losses.push(s.loss);
      fault?.(s.step);
      if (lead) b.update(s.step, { loss: s.loss.toFixed(4), lr: s.lr.toExponential(2), tps: Math.round(s.tokensPerSecond) });
      if (o.evalEvery && s.step % o.evalEvery === 0 && s.step < s.steps) {
        const ev = evalOn(evalRows);
        evals.push({ step: s.step, loss: ev.loss, accuracy: ev.accuracy });
        console.log(`step ${s.step}: held-out loss ${ev.loss.toFixed(4)}, token accuracy ${(ev.accuracy * 100).toFixed(2)}%`);
      }
      const epoch = schedule.get(s.step);
      if (epoch !== undefined) saveScheduled(s.step, epoch);
      if (o.saveEvery && s.step % o.saveEvery === 0 && s.step < s.steps) {
        saveState(state);
        savedStep = s.step;
        if (lead) console.error(`xft: saved a resumable state at step ${s.step} in ${resumeDir}`);
      }
    },
  }).catch((err: unknown) => {
    if ((err as XftError).code === 'XFT_NONFINITE') {
      const kept = savedStep !== null ? `; the last good state (step ${savedStep}) stays in ${resumeDir}` : '';
      (err as Error).message += `. Nothing was written${kept}${fs.existsSync(o.out) ? `; ${o.out} is unchanged` : ''}`;
    }
    throw err;
  }).finally(() => {
    b.stop();
    process.removeListener('SIGINT', onSigint);
    process.removeListener('SIGTERM', onSigint);
  });
  if (r.interrupted) {
    saveState(r.state);
    if (lead) console.error(`xft: saved the state at step ${r.state.step}/${total} in ${resumeDir}; continue with: xft train ${modelDir} --out ${o.out} --resume`);
    process.exitCode = EXIT.interrupted;
    return;
  }
  const metrics: Record<string, unknown> = { kind: model.kind, steps: total, losses, evals, lr, warmup, batch, seqLen: o.seqLen, ...run };
  if (world > 1) metrics.worldSize = world;
  if (evalRows.length) {
    const ev = evalOn(evalRows);
    metrics.eval = ev;
    console.log(`held-out: loss ${ev.loss.toFixed(4)}, token accuracy ${(ev.accuracy * 100).toFixed(2)}% (${ev.tokens} tokens)`);
  }
  const files = { 'xft_train.json': JSON.stringify(metrics, null, 2) + '\n' };
  // the full state (gathered under ZeRO) for the master weights; rank 0 writes, the others wait for it
  const full = dp ? dp.fullState(r.state) : r.state;
  if (lead) {
    if (model.kind === 'merged') {
      // the frozen experts are copied from the source checkpoint as they are there; only α comes from the run
      saveMergeCheckpoint(model, modelDir, o.out, { dtype: o.dtype, maxShardBytes: o.maxShardSize, overwrite: o.overwrite, files });
    } else {
      // a bf16 run: the written weights are rounded from the f32 master weights, not from the bf16 copies
      useMasterWeights(model, full);
      saveModel(model, o.out, { dtype: o.dtype, maxShardBytes: o.maxShardSize, overwrite: o.overwrite, copyFrom: modelDir, files });
    }
  }
  dp?.release(full, r.state);
  dp?.barrier();
  if (lead) fs.rmSync(resumeDir, { recursive: true, force: true });
  console.log(`wrote ${o.out} (${model.kind} checkpoint); final training loss ${losses.at(-1)?.toFixed(4) ?? '-'}`);
  disposeState(r.state);
  dp?.dispose();
  model.dispose();
}

/** Runs `fn` with the model's weights replaced by the state's f32 master weights where it keeps them (mixed precision), then puts them back. */
function withMasterWeights(model: Model, state: TrainState, fn: () => void): void {
  const swapped: [Param, Tensor][] = [];
  try {
    for (const p of model.params()) {
      const master = state.master?.get(p.name);
      if (master) {
        swapped.push([p, p.value]);
        p.value = master;
      }
    }
    fn();
  } finally {
    for (const [p, value] of swapped) p.value = value;
  }
}

program
  .command('merge')
  .description('compile an MoE or merge checkpoint into a dense Llama checkpoint of the original size (W̄ = Σ c_e W_e per layer; streams: memory stays small)')
  .argument('<model>', 'merge checkpoint (learned α) or MoE checkpoint (initial coefficients, α = 0)')
  .argument('<out>', 'output folder for the dense checkpoint (loads in transformers as LlamaForCausalLM)')
  .option('--shared-rate <λ>', "λ for an MoE checkpoint (default 0.75; 'none': average all experts)", rate)
  .addOption(dtypeOption())
  .addOption(shardOption())
  .option('--overwrite', 'replace a non-empty output folder')
  .action((src: string, out: string, o: { sharedRate?: number | null; dtype?: SaveDtype; maxShardSize: number; overwrite?: boolean }) => {
    checkOut(out);
    checkTokenizerFolder(src);
    const p = fileProgress('merge');
    const t0 = Date.now();
    try {
      const r = sourceNonFinite(src, out, () => mergeCheckpoint(src, out, { sharedRate: sharedRateOf(o.sharedRate), dtype: o.dtype, maxShardBytes: o.maxShardSize, overwrite: o.overwrite, onProgress: p.onProgress }));
      p.stop();
      const c = r.coefficients[0].map((v) => v.toFixed(3)).join(', ');
      console.log(`wrote ${out}: dense LlamaForCausalLM, ${r.config.num_hidden_layers} layers, in ${((Date.now() - t0) / 1000).toFixed(1)} s (layer 0 coefficients: ${c})`);
    } finally {
      p.stop();
    }
  });

program
  .command('eval')
  .description('held-out loss and token accuracy of a checkpoint (any kind) on JSONL instruction data (response tokens only)')
  .argument('<model>', 'checkpoint folder')
  .requiredOption('--data <file>', 'JSONL instruction data')
  .option('--tokenizer <spec>', "'byte' or a tokenizer.json / folder (default: the model's tokenizer.json, else bytes)")
  .option('--seq-len <n>', 'tokens per sequence (default: 1024, or max_position_embeddings when smaller)', int(2))
  .option('--allow-long', "allow a --seq-len above the model's max_position_embeddings (a warning instead of exit 2)")
  .option('--pack', 'pack examples into full sequences')
  .option('--batch-size <n>', 'sequences per forward pass', int(1), 8)
  .addOption(deviceOption())
  .addOption(precisionOption())
  .option('--json', 'print JSON')
  .action(async (modelDir: string, o: DataOptions & { batchSize: number; device?: string; precision?: string; json?: boolean }) => {
    const info = readCheckpointInfo(modelDir);
    const seqLen = seqLenFor(o, info.config, modelDir);
    const device = deviceOf(o.device);
    const tok = tokenizerFor(modelDir, o.tokenizer, info.config.vocab_size);
    const rows = rowsOf(await loadData(o.data, tok, o.json), { ...o, seqLen }, tok);
    const model = loadModel(modelDir, { device, dtype: precisionOf(o.precision, device) });
    const b = bar(' eval |{bar}| {value}/{total} sequences | {tps} tok/s | ETA {eta_formatted}');
    if (!o.json) b.start(rows.length, 0, { tps: '-' });
    const t0 = Date.now();
    let positions = 0;
    let r: ReturnType<typeof evaluate>;
    try {
      r = evaluate(model, rows, {
        batchSize: o.batchSize,
        onBatch: (done, _total, n) => {
          positions += n;
          if (!o.json) b.update(done, { tps: Math.round(positions / Math.max(1e-3, (Date.now() - t0) / 1000)) });
        },
      });
    } finally {
      if (!o.json) b.stop();
    }
    if (!Number.isFinite(r.loss))
      throw new XftError(`${modelDir}: the loss is ${r.loss}: the model's weights overflow in the forward pass (the checkpoint is unusable)`, 'XFT_FORMAT');
    const result = { model: modelDir, kind: model.kind, precision: model.dtype, loss: r.loss, accuracy: r.accuracy, tokens: r.tokens, sequences: rows.length };
    if (o.json) console.log(JSON.stringify(result, null, 2));
    else console.log(`${modelDir} (${model.kind}): loss ${r.loss.toFixed(4)}, token accuracy ${(r.accuracy * 100).toFixed(2)}% over ${r.tokens} response tokens`);
    model.dispose();
  });

program
  .command('generate')
  .description('answer an instruction with a checkpoint (any kind), for spot checks: greedy or sampled, in the Magicoder template (no KV cache: slow on long outputs)')
  .argument('<model>', 'checkpoint folder')
  .argument('<prompt>', "the instruction ('-' reads it from standard input)")
  .option('--tokenizer <spec>', "'byte' or a tokenizer.json / folder (default: the model's tokenizer.json, else bytes)")
  .option('--max-new-tokens <n>', 'most tokens to generate', int(0), 256)
  .option('--temperature <t>', '0: greedy; > 0: sampling', num(0), 0)
  .option('--top-p <p>', 'nucleus sampling mass', num(1e-9, 1), 1)
  .option('--seed <n>', 'seed of the sampling', int(0), 0)
  .option('--raw', 'use the prompt as it is (no Magicoder template)')
  .addOption(deviceOption())
  .addOption(precisionOption())
  .action((modelDir: string, prompt: string, o: { tokenizer?: string; maxNewTokens: number; temperature: number; topP: number; seed: number; raw?: boolean; device?: string; precision?: string }) => {
    const info = readCheckpointInfo(modelDir);
    const tok = tokenizerFor(modelDir, o.tokenizer, info.config.vocab_size);
    const text = prompt === '-' ? fs.readFileSync(0, 'utf8') : prompt;
    const device = deviceOf(o.device);
    const model = loadModel(modelDir, { device, dtype: precisionOf(o.precision, device) });
    const r = generate(model, tok, text, {
      maxNewTokens: o.maxNewTokens, temperature: o.temperature, topP: o.topP, seed: o.seed, raw: o.raw,
      onToken: (piece) => process.stdout.write(piece),
    });
    process.stdout.write('\n');
    console.error(`xft: ${r.ids.length} tokens, stopped at ${r.stop === 'eos' ? 'the end-of-sequence token' : '--max-new-tokens'}`);
    model.dispose();
  });

program
  .command('demo')
  .description('the main job: pretrain a tiny Llama on code found on this machine, then SFT versus XFT (upcycle -> MoE -> learned merge) with equal budgets; writes a results table and loss curves')
  .option('-o, --out <dir>', 'output folder', 'xft-demo')
  .addOption(deviceOption())
  .option('--scale <x>', 'scale of the training budgets (1 = about 4 minutes on 2 CPU cores)', num(1e-3), 1)
  .option('--seed <n>', 'seed', int(0), 0)
  .addOption(new Option('--method <name>', "'xft': SFT versus XFT; 'upit': UpIT beside them (its rows in the table, its curve in the plot)").choices(['xft', 'upit']).default('xft'))
  .action((opts: { out: string; device?: string; scale: number; seed: number; method: 'xft' | 'upit' }) => {
    checkOut(opts.out);
    deviceOf(opts.device);
    const bars = new MultiBar({ format: ' {stage} |{bar}| {value}/{total} steps | loss {loss} | {tps} tok/s | ETA {eta_formatted}', hideCursor: true, clearOnComplete: false, noTTYOutput: true, notTTYSchedule: 10000 }, Presets.shades_classic);
    const open = new Map<string, SingleBar>();
    let r: ReturnType<typeof runDemo>;
    try {
      r = runDemo({
        out: opts.out, scale: opts.scale, seed: opts.seed, device: opts.device as Device | undefined, method: opts.method,
        log: (line) => bars.log(line + '\n'),
        progress: (stage, s) => {
          let one = open.get(stage);
          if (!one) {
            one = bars.create(s.steps, 0, { stage: stage.padEnd(8), loss: '-', tps: '-' });
            open.set(stage, one);
          }
          one.update(s.step, { loss: s.loss.toFixed(3), tps: Math.round(s.tokensPerSecond) });
        },
      });
    } finally {
      bars.stop(); // its timer would keep the process alive after an error
    }
    console.log('\n' + markdownTable(r));
    console.log(`wrote ${r.files.map((f) => path.join(opts.out, f)).join(', ')}`);
  });

const U = UPIT_DEFAULTS;
const tag = (k: keyof typeof UPIT_DEFAULTS) => `[${U[k].source}: ${U[k].value}]`;
program
  .command('upit')
  .description('UpIT (Hui et al. 2024): dense -> MoE from its own SFT checkpoints: prepare (SFT with epoch checkpoints), expand (genetic merging), seed + route (router init on lowest-PPL seed buckets), assemble, post-train; each stage writes a folder under --out and is skipped when complete')
  .argument('<dense>', 'dense checkpoint folder (θ0)')
  .requiredOption('--data <file>', 'JSONL instruction data')
  .requiredOption('--out <dir>', 'output folder: prepare/, expand/, seed/, route/, assemble/, post-train/ (the final MoE)')
  .option('--experts <E>', `experts of the MoE ${tag('experts')}`, int(2), U.experts.value)
  .option('--top-k <k>', `experts per token ${tag('topK')}`, int(1), U.topK.value)
  .addOption(new Option('--stage <name>', 'run only this stage (its inputs must be complete)').choices([...UPIT_STAGES]))
  .option('--seed <n>', 'seed of the data order, expansion, seed rows and router draw', int(0), 0)
  .option('--lr <lr>', `learning rate of the SFT and post-training ${tag('lr')}`, num(0), U.lr.value)
  .option('--prepare-epochs <n>', `stage-1 SFT epochs ${tag('prepareEpochs')}`, num(0), U.prepareEpochs.value)
  .option('--checkpoint-every <epochs>', `stage-1 checkpoint interval ${tag('checkpointEvery')}`, num(1e-6), U.checkpointEvery.value)
  .addOption(new Option('--keep <which>', `with more checkpoints than experts ${tag('keep')}`).choices(['latest', 'first-half']).default(U.keep.value))
  .option('--first-half', 'ablation: experts from the first-half checkpoints (--keep first-half)')
  .option('--no-expand', 'ablation: no genetic expansion; stage 1 saves E checkpoints instead')
  .addOption(new Option('--parents <rule>', `parent selection ${tag('parents')}`).choices(['least-similar', 'random']).default(U.parents.value))
  .option('--random-parents', 'ablation: random parents (--parents random)')
  .addOption(new Option('--similarity <metric>', `parent similarity ${tag('similarity')}`).choices(['cosine', 'l2']).default(U.similarity.value))
  .option('--drop-rate <p>', `DARE drop rate ${tag('dropRate')}`, num(0, 0.999999), U.dropRate.value)
  .option('--exclude-used-pairs', '[choice] never breed the same pair twice (default: pairs may recur)')
  .option('--no-router-init', 'ablation: no routing-vector pre-optimization (the router is drawn at random; seed and route are skipped)')
  .option('--seed-fraction <f>', `seed data fraction ${tag('seedFraction')}`, num(1e-9, 1), U.seedFraction.value)
  .addOption(new Option('--buckets <mode>', `seed bucket assignment ${tag('buckets')}`).choices(['ppl', 'balanced', 'random']).default(U.buckets.value))
  .option('--random-buckets', 'ablation: router init on random buckets (--buckets random)')
  .option('--gamma <γ>', `γ·L_lm + (1-γ)·L_aux of the routing stage ${tag('gamma')}`, num(0, 1), U.gamma.value)
  .option('--route-epochs <n>', `routing-vector training epochs ${tag('routeEpochs')}`, num(1e-9), U.routeEpochs.value)
  .option('--router-lr-scale <x>', `routing vectors' lr multiple ${tag('routerLrScale')}`, num(1e-9), U.routerLrScale.value)
  .addOption(new Option('--route-train <set>', `what trains with the routing vector ${tag('routeTrain')}`).choices(['ffn+router', 'router']).default(U.routeTrain.value))
  .addOption(new Option('--trunk <source>', `the MoE's non-FFN weights ${tag('trunk')}`).choices(['average', 'last', 'theta0']).default(U.trunk.value))
  .option('--shared-trunk', `${tag('sharedTrunk')} the seed and route stages see each expert's FFNs on the MoE's trunk (--trunk), not on its own checkpoint`)
  .option('--joint-router', `${tag('jointRouter')} after assembly, train the routers alone for one pass over the seed rows (softmax cross-entropy of their buckets, at lr x --router-lr-scale)`)
  .option('--post-epochs <n>', `post-training epochs ${tag('postEpochs')}`, num(1e-9), U.postEpochs.value)
  .option('--balance-loss <w>', `weight of the Switch balance loss in post-training ${tag('balanceLossWeight')}`, num(0), U.balanceLossWeight.value)
  .option('--batch-size <n>', `sequences per optimizer step ${tag('batchSize')}`, int(1), U.batchSize.value)
  .option('--micro-batch <n>', 'sequences per forward pass', int(1))
  .option('--seq-len <n>', 'tokens per sequence (default: 1024, or max_position_embeddings when smaller)', int(2))
  .option('--tokenizer <spec>', "'byte' or a tokenizer.json / folder (default: the model's tokenizer.json, else bytes)")
  .addOption(deviceOption())
  .addOption(new Option('--precision <dtype>', 'compute dtype (default: bf16 on the GPU, f32 on the CPU)').choices(['bf16', 'f32']))
  .addHelpText('after', `
Defaults: [paper] from the UpIT sources (arXiv 2410.01610 and its reviews and summaries), [choice] ours where
they are silent (../shared/UPIT.md; no official code exists). Ablations of the paper's Table 2:
--no-expand, --random-parents, --no-router-init, --random-buckets, --first-half.
${Object.entries(U).map(([k, v]) => `  ${k.padEnd(18)} ${String(v.value).padEnd(14)} [${v.source}] ${v.note}`).join('\n')}`)
  .action(async (dense: string, o: {
    data: string; out: string; experts: number; topK: number; stage?: UpitStage; seed: number; lr: number; prepareEpochs: number; checkpointEvery: number;
    keep: 'latest' | 'first-half'; firstHalf?: boolean; expand: boolean; parents: 'least-similar' | 'random'; randomParents?: boolean; similarity: 'cosine' | 'l2';
    dropRate: number; excludeUsedPairs?: boolean; routerInit: boolean; seedFraction: number; buckets: 'ppl' | 'balanced' | 'random'; randomBuckets?: boolean;
    gamma: number; routeEpochs: number; routerLrScale: number; routeTrain: 'ffn+router' | 'router'; trunk: 'average' | 'last' | 'theta0'; postEpochs: number;
    jointRouter?: boolean; sharedTrunk?: boolean; balanceLoss: number; batchSize: number; microBatch?: number; seqLen?: number; tokenizer?: string; device?: string; precision?: 'f32' | 'bf16';
  }) => {
    checkOut(o.out);
    if (o.topK > o.experts) throw new UsageError(`upit: --top-k ${o.topK} is out of range: expected 1 to --experts ${o.experts}`);
    const t0 = Date.now();
    const r = await upit({
      dense, data: o.data, out: o.out, experts: o.experts, topK: o.topK, stage: o.stage, seed: o.seed, lr: o.lr, prepareEpochs: o.prepareEpochs,
      checkpointEvery: o.checkpointEvery, keep: o.firstHalf ? 'first-half' : o.keep, expand: o.expand, parents: o.randomParents ? 'random' : o.parents,
      similarity: o.similarity, dropRate: o.dropRate, excludeUsedPairs: o.excludeUsedPairs ?? false, routerInit: o.routerInit, seedFraction: o.seedFraction,
      buckets: o.randomBuckets ? 'random' : o.buckets, gamma: o.gamma, routeEpochs: o.routeEpochs, routerLrScale: o.routerLrScale, routeTrain: o.routeTrain,
      trunk: o.trunk, jointRouter: o.jointRouter ?? false, sharedTrunk: o.sharedTrunk ?? false, postEpochs: o.postEpochs, balanceLossWeight: o.balanceLoss, batchSize: o.batchSize, microBatch: o.microBatch, seqLen: o.seqLen,
      tokenizer: o.tokenizer, device: o.device === undefined ? undefined : deviceOf(o.device), precision: o.precision,
      onLog: (line) => console.error(`xft upit: ${line}`),
    });
    if (r.skipped.length) console.log(`complete already, skipped: ${r.skipped.join(', ')}`);
    console.log(`ran ${r.ran.length ? r.ran.join(', ') : 'nothing'} in ${((Date.now() - t0) / 1000).toFixed(1)} s; ${o.stage ? `stage ${o.stage}: ${r.moe}` : `the UpIT MoE: ${r.moe}`}`);
  });

/** The exit code for an error. */
/**
 * A streamed upcycle/merge writes what it reads: a non-finite value on the way out came from the
 * source checkpoint (unusable input, exit 3), named as such rather than by the temporary file.
 */
function sourceNonFinite<T>(src: string, out: string, run: () => T): T {
  try {
    return run();
  } catch (err) {
    if (err instanceof XftError && err.code === 'XFT_NONFINITE') {
      const what = /: (\S+) holds a non-finite value[^;]*/.exec(err.message);
      throw new XftError(`${src}: the checkpoint holds non-finite weights (${what ? `${what[1]}: NaN or ±Inf` : err.message}); nothing was written to ${out}`, 'XFT_FORMAT');
    }
    throw err;
  }
}

/**
 * A library message in the CLI's words: without the internal prefix naming a method or function
 * (`Tensor.empty: `, `upcycleCheckpoint: `) and with API option names as the flags that set them.
 */
export function cliMessage(message: string): string {
  return message.replace(/^(?:[A-Z]\w*\.\w+|[a-z]+[A-Z]\w*): /, '').replace(/\bpass overwrite: true\b/g, 'pass --overwrite')
    .replace(/\bpass sharedRate: null\b/g, 'pass --shared-rate none');
}

export function exitCodeOf(err: unknown): number {
  if (err instanceof CommanderError) return err.exitCode === 0 ? EXIT.ok : EXIT.usage;
  if (err instanceof UsageError) return EXIT.usage;
  const code = (err as { code?: string }).code;
  // XFT_DEVICE (a CUDA device that is not available, tensors on two devices) is a runtime failure, as XFT_CUDA
  if (code === 'XFT_FORMAT' || code === 'XFT_SHAPE' || code === 'XFT_DTYPE' || code === 'XFT_VALUE' || code === 'XFT_TYPE') return EXIT.input;
  return EXIT.failure;
}

async function main(): Promise<void> {
  program.exitOverride();
  program.commands.forEach((c) => c.exitOverride());
  try {
    await program.parseAsync(process.argv);
  } catch (err) {
    if (err instanceof CommanderError) {
      process.exitCode = exitCodeOf(err);
      return;
    }
    console.error(`xft: ${cliMessage((err as Error).message)}`);
    process.exitCode = exitCodeOf(err);
    // an error is final: a progress bar's timer or a worker left behind must not keep the process alive
    setTimeout(() => process.exit(), 2000).unref();
  }
}

void main();
