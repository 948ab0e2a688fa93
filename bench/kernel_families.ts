/**
 * bench/kernel_families: every kernel family once, on small shapes, on the default device, each
 * checked against the CPU twin. It is the body scripts/gpu-check.sh runs under compute-sanitizer
 * (memcheck, racecheck): small enough to finish in seconds there, wide enough to launch every
 * family: fills and casts, embedding, rmsnorm, rope, attention (head dims 64 and 128, GQA), grouped
 * GEMM (f32, bf16 vector and scalar paths), SwiGLU, elementwise, routing, permute/unpermute, load
 * estimate, router linears, cross-entropy, merge, AdamW and Adafactor, through one training step of
 * tiny models, plus the router linears and an odd-shaped GEMM directly.
 * Prints one line per family ("family <name> ok|FAIL ...") and exits 1 if any result is off.
 * Usage: node dist/bench/kernel_families.js [--family name ...] [--list] [--help]
 */
import { Tensor, backend, ops, synchronize, type Device } from '../lib/index';
import { llamaConfig, type LlamaConfig } from '../lib/config';
import { createDense, upcycle, mergeable } from '../lib/xft';
import { Trainer, disposeState } from '../lib/train';
import type { Model } from '../lib/model';
import type { OptimizerKind } from '../lib/optim';
import { seededRandom, type Sample } from '../lib/data';

const USAGE = `Usage: node dist/bench/kernel_families.js [--family name ...] [--list] [--help]
  every kernel family once on small shapes on the default device (CUDA when present), checked
  against the CPU; --family runs only the named ones (repeatable), --list names them`;

interface ModelCase { kind: 'dense' | 'moe' | 'merge'; dtype: 'f32' | 'bf16'; config: LlamaConfig; optimizer: OptimizerKind; router?: 'mlp' | 'linear'; experts?: number; topK?: number }

/** head dim 64 (hidden 128, 2 heads) and 128 with GQA (hidden 256, 2 heads, 1 KV head) */
const HD64 = llamaConfig({ hidden_size: 128, intermediate_size: 352, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2, vocab_size: 300 });
const HD128 = llamaConfig({ hidden_size: 256, intermediate_size: 688, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, vocab_size: 300 });

const MODELS: Record<string, ModelCase> = {
  'dense-f32-adamw': { kind: 'dense', dtype: 'f32', config: HD64, optimizer: 'adamw' },
  'dense-bf16-hd128-adafactor': { kind: 'dense', dtype: 'bf16', config: HD128, optimizer: 'adafactor' },
  'moe-bf16-mlp-router': { kind: 'moe', dtype: 'bf16', config: HD64, optimizer: 'adamw', router: 'mlp', experts: 8, topK: 6 },
  'moe-f32-linear-router': { kind: 'moe', dtype: 'f32', config: HD64, optimizer: 'adamw', router: 'linear', experts: 4, topK: 2 },
  'merge-bf16': { kind: 'merge', dtype: 'bf16', config: HD64, optimizer: 'adamw' },
};
const DIRECT = ['router-linear', 'gemm-odd'] as const;
const FAMILIES = [...Object.keys(MODELS), ...DIRECT];
const TOL = { f32: 1e-4, bf16: 3e-2 };

function buildModel(c: ModelCase, device: Device): Model {
  const dense = createDense(c.config, { seed: 11, device, dtype: c.dtype });
  if (c.kind === 'dense') return dense;
  const moe = upcycle(dense, { experts: c.experts ?? 8, topK: c.topK ?? 6, seed: 11, router: c.router ?? 'mlp', routerInit: 'reference' });
  dense.dispose();
  if (c.kind === 'moe') return moe;
  const mg = mergeable(moe, { sharedRate: 0.75 });
  moe.dispose();
  return mg;
}

/** losses of two training steps (forward + backward + optimizer) on `device` */
function twoSteps(c: ModelCase, device: Device): number[] {
  const model = buildModel(c, device);
  const random = seededRandom(5), V = c.config.vocab_size;
  const rows: Sample[] = Array.from({ length: 4 }, () => {
    const ids = Array.from({ length: 33 }, () => Math.floor(random() * V));
    return { ids: ids.slice(0, -1), targets: ids.slice(1) };
  });
  const run = new Trainer(model, rows, { lr: 1e-3, batchSize: 2, steps: 2, seed: 3, optimizer: c.optimizer });
  const losses = [run.step()!.loss, run.step()!.loss];
  run.dispose();
  disposeState(run.state);
  model.dispose();
  return losses;
}

function relDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let num = 0, den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / Math.max(den, 1e-30));
}

function runDirect(name: (typeof DIRECT)[number], device: Device): number {
  const dtype = 'bf16';
  const pair = (shape: number[], seed: number) => {
    const cpu = Tensor.randn(shape, { seed, dtype });
    return { cpu, dev: cpu.to(device) };
  };
  let worst = 0;
  if (name === 'router-linear') {
    for (const [T, N, d] of [[300, 7, 64], [45, 15, 70], [9, 32, 8]]) {
      const x = pair([T, d], 1), w = pair([N, d], 2), dy = pair([T, N], 3);
      const yc = ops.routerLinear(x.cpu, w.cpu), yd = ops.routerLinear(x.dev, w.dev);
      const bc = ops.routerLinearBackward(x.cpu, w.cpu, dy.cpu), bd = ops.routerLinearBackward(x.dev, w.dev, dy.dev);
      worst = Math.max(worst, relDiff(yd.toArray(), yc.toArray()), relDiff(bd.dx!.toArray(), bc.dx!.toArray()), relDiff(bd.dw!.toArray(), bc.dw!.toArray()));
      [x.cpu, x.dev, w.cpu, w.dev, dy.cpu, dy.dev, yc, yd, bc.dx, bc.dw, bd.dx, bd.dw].forEach((t) => t?.dispose());
    }
  } else {
    // grouped GEMM with an odd k (the scalar-load path) and empty groups
    const M = 50, n = 24, k = 37, E = 4;
    const x = pair([M, k], 4), w = pair([E, n, k], 5), dy = pair([M, n], 6);
    const off = [0, 20, 20, 50, 50];
    const oc = Tensor.from(off, [E + 1], { dtype: 'i32' }), od = oc.to(device);
    const yc = ops.groupedGemm(x.cpu, w.cpu, oc), yd = ops.groupedGemm(x.dev, w.dev, od);
    const bc = ops.groupedGemmBackward(x.cpu, w.cpu, oc, dy.cpu), bd = ops.groupedGemmBackward(x.dev, w.dev, od, dy.dev);
    worst = Math.max(relDiff(yd.toArray(), yc.toArray()), relDiff(bd.dx!.toArray(), bc.dx!.toArray()), relDiff(bd.dw!.toArray(), bc.dw!.toArray()));
    [x.cpu, x.dev, w.cpu, w.dev, dy.cpu, dy.dev, oc, od, yc, yd, bc.dx, bc.dw, bd.dx, bd.dw].forEach((t) => t?.dispose());
  }
  return worst;
}

function main(): number {
  const argv = process.argv.slice(2);
  if (argv.includes('--help') || argv.includes('-h')) {
    console.log(USAGE);
    return 0;
  }
  if (argv.includes('--list')) {
    console.log(FAMILIES.join('\n'));
    return 0;
  }
  const asked = argv.flatMap((a, i) => (argv[i - 1] === '--family' ? [a] : []));
  const unknown = asked.filter((f) => !FAMILIES.includes(f));
  if (unknown.length) throw new Error(`unknown --family ${unknown.join(', ')} (expected ${FAMILIES.join(', ')})`);
  const b = backend();
  const device: Device = b.kind;
  console.log(`kernel families on ${device === 'cuda' ? b.name : 'the CPU'} (checked against the CPU twins)`);
  let failed = 0;
  for (const f of asked.length ? asked : FAMILIES) {
    const t0 = Date.now();
    let line: string;
    try {
      if (f in MODELS) {
        const c = MODELS[f];
        const got = twoSteps(c, device), want = device === 'cpu' ? got : twoSteps(c, 'cpu');
        const err = Math.max(...got.map((g, i) => Math.abs(g - want[i]) / Math.max(Math.abs(want[i]), 1e-6)));
        const ok = got.every(Number.isFinite) && err <= TOL[c.dtype];
        if (!ok) failed++;
        line = `family ${f} ${ok ? 'ok' : 'FAIL'} losses ${got.map((v) => v.toFixed(5)).join(', ')} vs cpu ${want.map((v) => v.toFixed(5)).join(', ')} (rel ${err.toExponential(2)} <= ${TOL[c.dtype]})`;
      } else {
        const err = runDirect(f as (typeof DIRECT)[number], device);
        const ok = Number.isFinite(err) && err <= 1e-2;
        if (!ok) failed++;
        line = `family ${f} ${ok ? 'ok' : 'FAIL'} rel ${err.toExponential(2)} <= 1e-2`;
      }
      synchronize();
    } catch (err) {
      failed++;
      line = `family ${f} FAIL ${(err as Error).message.split('\n')[0]}`;
    }
    console.log(`${line} [${Date.now() - t0} ms]`);
  }
  console.log(failed ? `${failed} famil${failed === 1 ? 'y' : 'ies'} failed` : 'all families ok');
  return failed ? 1 : 0;
}

try {
  process.exitCode = main();
} catch (err) {
  console.error(`bench/kernel_families: ${(err as Error).message}`);
  process.exitCode = 1;
}
