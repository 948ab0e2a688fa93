/**
 * bench/train: tokens/s and peak device memory of a training step (forward, backward, AdamW) for
 * the dense model, its MoE upcycle (8 experts, top-6, shared expert, mlp router with noise, balance
 * loss) and the merge model (learned mixing coefficients over the frozen experts), at a few sizes,
 * beside the same models written plainly in PyTorch eager (bench/torch_train.py: autocast bf16,
 * SDPA attention, a Python loop over experts as the reference does, torch.optim.AdamW), timed on the
 * same GPU in the same run.
 *
 * MFU: model FLOPs per token over the step time, against the GPU's dense bf16 peak (named in the
 * output; --peak-tflops overrides). Model FLOPs per token = 6 per trained weight + 4 per frozen one
 * (forward 2, input gradient 2, weight gradient 2 only when trained) over the weights a token
 * multiplies (attention, the FFN: for the MoE the router and the K experts a token uses, the head;
 * not the embedding lookup) + the causal attention term 6·L·H·hd·T (QKᵀ and PV over half the
 * context, forward and backward: half of PaLM's 12·L·H·hd·T).
 * --profile adds one profiled step per model after the timed ones: a per-kernel time breakdown by op
 * family (bench/profile.ts: CUDA events around every native op on the GPU; the host's wall clock on
 * the CPU and the emulated CUDA backend, labelled so).
 * If the PyTorch side fails (any model, out of memory included), this script stops with its error
 * and exit status 1 (--no-torch runs without it). The PyTorch side runs on the GPU only.
 * Usage: see USAGE below (--help).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { backend, memoryStats, resetPeakMemory, synchronize, type Device } from '../lib/index';
import { packageRoot } from '../lib/native';
import { arg, printTable } from './table';
import { OpProfiler, type Profile } from './profile';

/** the PyTorch side's interpreter: XFT_PYTHON (as the tests), else python3 on the PATH */
const PYTHON = process.env.XFT_PYTHON ?? 'python3';
import { llamaConfig, type LlamaConfig } from '../lib/config';
import { createDense, upcycle, mergeable, countParameters } from '../lib/xft';
import { Trainer, disposeState } from '../lib/train';
import type { Model } from '../lib/model';
import { seededRandom, type Sample } from '../lib/data';

const USAGE = `Usage: node dist/bench/train.js [--size tiny|small|100m] [--dtype bf16|f32] [--steps N] [--profile] [--peak-tflops X] [--out file.json] [--no-torch] [--help]
  --size      one size (default: small and 100m on the GPU, tiny on the CPU)
  --dtype     bf16 (default on the GPU) or f32 (default on the CPU)
  --steps     timed steps after two warm-up steps (default 10 on the GPU, 3 on the CPU)
  --profile   one more step per model, profiled: time by op family (CUDA events; wall clock on the CPU)
  --peak-tflops  the dense bf16 peak for MFU (default: from the GPU's name, e.g. H100/H200 SXM 989)
  --out       the JSON results (default bench/out/train.json)
  --no-torch  skip the PyTorch eager reference (bench/torch_train.py, GPU only); otherwise a failing
              reference stops the run with exit status 1`;

interface Size { name: string; config: LlamaConfig; batch: number; seqLen: number }
const SIZES: Size[] = [
  { name: 'tiny', config: llamaConfig({ hidden_size: 64, intermediate_size: 176, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 259 }), batch: 2, seqLen: 64 },
  { name: 'small', config: llamaConfig({ hidden_size: 512, intermediate_size: 1376, num_hidden_layers: 4, num_attention_heads: 8, num_key_value_heads: 8, vocab_size: 8192 }), batch: 8, seqLen: 512 },
  // ~96M parameters dense; its 8-expert top-6 upcycle has ~0.4B
  { name: '100m', config: llamaConfig({ hidden_size: 768, intermediate_size: 2048, num_hidden_layers: 10, num_attention_heads: 12, num_key_value_heads: 12, vocab_size: 16384 }), batch: 8, seqLen: 1024 },
];
const KINDS = ['dense', 'moe', 'merge'] as const;
type Kind = (typeof KINDS)[number];


/** Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by GPU name, from the vendors' datasheets. */
const BF16_PEAKS: [RegExp, number, string][] = [
  [/H200/i, 989, 'H200 SXM dense bf16 989 TFLOP/s'], [/H100.*PCIe/i, 756, 'H100 PCIe dense bf16 756 TFLOP/s'],
  [/H100|GH200/i, 989, 'H100 SXM dense bf16 989 TFLOP/s'], [/A100/i, 312, 'A100 dense bf16 312 TFLOP/s'],
  [/L40S/i, 362, 'L40S dense bf16 362 TFLOP/s'], [/A10G?\b/i, 125, 'A10 dense bf16 125 TFLOP/s'],
];

/** the peak MFU is measured against, and its name; null when unknown (the CPU, an unlisted GPU) */
function peakOf(device: Device, name: string | undefined): { tflops: number; what: string } | null {
  const given = arg('--peak-tflops');
  if (given !== undefined) {
    const v = Number(given);
    if (!(v > 0)) throw new Error(`--peak-tflops expects a positive number, got ${given}`);
    return { tflops: v, what: `--peak-tflops ${v}` };
  }
  if (device !== 'cuda') return null;
  const hit = BF16_PEAKS.find(([re]) => re.test(name ?? ''));
  return hit ? { tflops: hit[1], what: hit[2] } : null;
}

/** model FLOPs per trained token (see the header): weights a token multiplies, 6 each trained, 4 each frozen, plus causal attention */
export function modelFlopsPerToken(kind: Kind, c: LlamaConfig, seqLen: number, moe = { experts: 8, topK: 6 }): number {
  const d = c.hidden_size, f = c.intermediate_size, L = c.num_hidden_layers, H = c.num_attention_heads, hd = d / H;
  const attnW = d * H * hd + 2 * d * c.num_key_value_heads * hd + H * hd * d;
  const N = moe.experts - 1;
  const ffnW = kind === 'moe' ? moe.topK * 3 * d * f + d * N + N * N + d * N : 3 * d * f;
  const perTokenW = L * (attnW + ffnW) + d * c.vocab_size;
  const attention = 6 * L * H * hd * seqLen;
  return (kind === 'merge' ? 4 : 6) * perTokenW + attention;
}

interface Measure { ms: number; tokensPerSecond: number; peakBytes: number; parameters: number; trainable: number; loss: number; profile?: Profile }

function build(kind: Kind, s: Size, dtype: 'f32' | 'bf16', device: Device): Model {
  const dense = createDense(s.config, { seed: 1, device, dtype });
  if (kind === 'dense') return dense;
  const moe = upcycle(dense, { experts: 8, topK: 6, seed: 1 });
  dense.dispose();
  if (kind === 'moe') return moe;
  const mg = mergeable(moe, { sharedRate: 0.75 });
  moe.dispose();
  return mg;
}

function measureXft(kind: Kind, s: Size, dtype: 'f32' | 'bf16', device: Device, steps: number, profile: boolean): Measure {
  synchronize();
  resetPeakMemory();
  const model = build(kind, s, dtype, device);
  const random = seededRandom(7), rand = () => Math.floor(random() * s.config.vocab_size);
  const total = steps + 2 + (profile ? 1 : 0);
  const rows: Sample[] = Array.from({ length: s.batch * total }, () => {
    const ids = Array.from({ length: s.seqLen + 1 }, rand);
    return { ids: ids.slice(0, -1), targets: ids.slice(1) };
  });
  const run = new Trainer(model, rows, { lr: 1e-4, batchSize: s.batch, steps: total, seed: 1 });
  const ms: number[] = [];
  let loss = 0;
  for (let i = 0; i < steps + 2; i++) {
    synchronize();
    const t0 = process.hrtime.bigint();
    loss = run.step()!.loss; // logEvery 1: reads the step record (synchronizes)
    synchronize();
    if (i >= 2) ms.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  ms.sort((a, b) => a - b);
  const med = ms[Math.floor(ms.length / 2)];
  let prof: Profile | undefined;
  if (profile) {
    const p = new OpProfiler();
    synchronize();
    const t0 = process.hrtime.bigint();
    p.start();
    run.step();
    synchronize();
    const stepMs = Number(process.hrtime.bigint() - t0) / 1e6;
    prof = p.stop(stepMs);
    p.dispose();
  }
  const st = memoryStats();
  const out = {
    ms: med, tokensPerSecond: (s.batch * s.seqLen) / (med / 1e3), peakBytes: device === 'cuda' ? st.cudaPeakBytes : st.hostPeakBytes,
    parameters: countParameters(model), trainable: countParameters(model, { trainableOnly: true }), loss, profile: prof,
  };
  run.dispose();
  disposeState(run.state);
  model.dispose();
  return out;
}

type TorchModel = { ms: number; peak_bytes: number; loss: number };

/** bench/torch_train.py's measurements for this size; throws (with its stderr) when it fails. */
function torchTimes(s: Size, dtype: string, steps: number): Record<Kind, TorchModel> {
  const c = s.config;
  const script = path.join(packageRoot(), 'bench', 'torch_train.py');
  const args = [script, '--hidden', `${c.hidden_size}`, '--ffn', `${c.intermediate_size}`, '--layers', `${c.num_hidden_layers}`,
    '--heads', `${c.num_attention_heads}`, '--kv-heads', `${c.num_key_value_heads}`, '--vocab', `${c.vocab_size}`, '--batch', `${s.batch}`,
    '--seq', `${s.seqLen}`, '--dtype', dtype, '--steps', `${steps}`];
  const r = spawnSync(PYTHON, args, { encoding: 'utf8', maxBuffer: 1 << 24 });
  const last = (r.stdout ?? '').trim().split('\n').pop() ?? '';
  const fail = (why: string) =>
    new Error(`the PyTorch reference (${PYTHON} ${args.join(' ')}) failed: ${why}\n${(r.stderr || '').slice(-1500)}\n(run with --no-torch to measure XFT alone)`);
  if (r.status !== 0 || !last.startsWith('{')) throw fail(r.error?.message ?? `exit status ${r.status}`);
  const j = JSON.parse(last) as Record<string, TorchModel | string>;
  for (const kind of KINDS) if (typeof j[kind] !== 'object') throw fail(`${kind}: ${String(j[kind])}`);
  return j as Record<Kind, TorchModel>;
}

interface Row { model: string; params: string; xft_ms: number; xft_tok_s: number; xft_tflops: number; mfu: string; torch_ms: number | null; torch_tok_s: number | null; torch_mfu: string; ratio: string; xft_peak_mib: number; torch_peak_mib: number | null; target?: string }

function count(n: number): string {
  return n >= 1e6 ? `${(n / 1e6).toFixed(1)}M` : n >= 1e3 ? `${(n / 1e3).toFixed(1)}K` : String(n);
}

function main() {
  if (process.argv.includes('--help') || process.argv.includes('-h')) {
    console.log(USAGE);
    return;
  }
  const b = backend();
  const device: Device = b.kind;
  const dtype = (arg('--dtype') ?? (device === 'cuda' ? 'bf16' : 'f32')) as 'f32' | 'bf16';
  const steps = Number(arg('--steps') ?? (device === 'cuda' ? 10 : 3));
  const only = arg('--size');
  const sizes = SIZES.filter((s) => (only ? s.name === only : device === 'cuda' ? s.name !== 'tiny' : s.name === 'tiny'));
  if (sizes.length === 0) throw new Error(`unknown --size ${only} (expected ${SIZES.map((s) => s.name).join(', ')})\n${USAGE}`);
  const profile = process.argv.includes('--profile');
  const peak = peakOf(device, b.name);
  const results = [];
  for (const s of sizes) {
    const torch = device === 'cuda' && !process.argv.includes('--no-torch') ? torchTimes(s, dtype, steps) : null;
    const rows: Row[] = [];
    for (const kind of KINDS) {
      const x = measureXft(kind, s, dtype, device, steps, profile);
      const tr = torch ? torch[kind] : null;
      const tokens = s.batch * s.seqLen;
      const flops = modelFlopsPerToken(kind, s.config, s.seqLen);
      const tflops = (flops * x.tokensPerSecond) / 1e12;
      const mfu = (ms: number) => (peak ? `${((100 * flops * tokens) / (ms / 1e3) / 1e12 / peak.tflops).toFixed(1)}%` : '-');
      rows.push({
        model: kind, params: `${count(x.parameters)} (${count(x.trainable)} trained)`,
        xft_ms: x.ms, xft_tok_s: Math.round(x.tokensPerSecond), xft_tflops: tflops, mfu: mfu(x.ms),
        torch_ms: tr?.ms ?? null, torch_tok_s: tr ? Math.round(tokens / (tr.ms / 1e3)) : null, torch_mfu: tr ? mfu(tr.ms) : '-',
        ratio: tr ? `${(tr.ms / x.ms).toFixed(2)}x` : '-', xft_peak_mib: Math.round(x.peakBytes / 2 ** 20), torch_peak_mib: tr ? Math.round(tr.peak_bytes / 2 ** 20) : null,
        target: kind === 'moe' ? '>= 1.00x' : undefined,
      });
      results.push({ size: s.name, kind, dtype, batch: s.batch, seqLen: s.seqLen, flopsPerToken: flops, tflops, mfu: peak ? (flops * x.tokensPerSecond) / 1e12 / peak.tflops : null, xft: x, torch: tr });
    }
    const c = s.config;
    printTable(`${s.name}: d=${c.hidden_size} f=${c.intermediate_size} L=${c.num_hidden_layers} H=${c.num_attention_heads} V=${c.vocab_size}, batch ${s.batch}x${s.seqLen}, ${dtype} on ${device === 'cuda' ? b.name : 'CPU'} (ratio = xft speed / PyTorch eager speed)`,
      ['model', 'params', 'xft_ms', 'xft_tok_s', 'xft_tflops', 'mfu', 'torch_ms', 'torch_tok_s', 'torch_mfu', 'ratio', 'xft_peak_mib', 'torch_peak_mib', 'target'], rows,
      (v, col) => (col.endsWith('tflops') ? v.toPrecision(3) : Number.isInteger(v) ? String(v) : v.toFixed(col.endsWith('ms') ? 2 : 0)));
    console.log(`MFU = model FLOPs per token x tokens/s / ${peak ? peak.what : 'peak (unknown here: --peak-tflops X sets it)'}; model FLOPs per token = ` +
      `6 per trained + 4 per frozen weight a token multiplies + causal attention 6·L·H·hd·T: ` +
      KINDS.map((k) => `${k} ${(modelFlopsPerToken(k, c, s.seqLen) / 1e6).toPrecision(4)} MFLOP`).join(', '));
    if (profile)
      for (const r of results.filter((r) => r.size === s.name && r.xft.profile)) {
        const p = r.xft.profile!;
        printTable(`${s.name} ${r.kind}: time by op family in one profiled step of ${p.stepMs.toFixed(2)} ms (${p.method === 'cuda events' ? 'CUDA events around each native op: device time' : 'wall clock around each native op (CPU or emulated backend: no device timers)'})`,
          ['family', 'ms', 'calls', 'share'], p.rows.map((x) => ({ family: x.family, ms: x.ms, calls: x.calls, share: `${(100 * x.share).toFixed(1)}%` })),
          (v) => (Number.isInteger(v) ? String(v) : v.toFixed(3)));
      }
  }
  const out = arg('--out') ?? path.join(packageRoot(), 'bench', 'out', 'train.json');
  fs.mkdirSync(path.dirname(out), { recursive: true });
  fs.writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), backend: b, peak, results }, null, 2));
  console.log(`\nwrote ${out}`);
}

try {
  main();
} catch (err) {
  console.error(`bench/train: ${(err as Error).message}`);
  process.exitCode = 1;
}
