/**
 * bench/kernels: the three XFT kernel families beside their references, measured in one run.
 *   grouped GEMM (forward, dx, dw)  TFLOP/s beside a dense cuBLAS GEMM of equal FLOPs and torch._grouped_mm
 *   routing                         time beside the PyTorch eager reference and the HBM floor
 *   merge forward / backward        time beside the HBM floor and PyTorch
 * The PyTorch side is bench/torch_kernels.py, run on the same GPU by this script.
 * Usage: node dist/bench/kernels.js [--shape xft-1.3b|small|tiny] [--out file.json] [--no-torch]
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Tensor, backend, ops, synchronize, type Device } from '../lib/index';
import { packageRoot } from '../lib/native';
import { printTable } from './table';

interface Shape { name: string; T: number; d: number; f: number; E: number; K: number }
const SHAPES: Shape[] = [
  { name: 'xft-1.3b', T: 16384, d: 2048, f: 5504, E: 8, K: 6 },
  { name: 'small', T: 2048, d: 512, f: 1376, E: 8, K: 6 },
  { name: 'tiny', T: 256, d: 64, f: 176, E: 8, K: 6 },
];

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

/** Median milliseconds of `fn` (synchronized around each repetition). */
function time(fn: () => void, reps: number, warmup = 3): number {
  for (let i = 0; i < warmup; i++) fn();
  synchronize();
  const ms: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = process.hrtime.bigint();
    fn();
    synchronize();
    ms.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  ms.sort((a, b) => a - b);
  return ms[Math.floor(ms.length / 2)];
}

interface Row { op: string; xft_ms: number; xft_rate: string; reference: string; ref_ms: number | null; ratio: string; target?: string }

function torchTimes(s: Shape): Record<string, number | string> | null {
  const script = path.join(packageRoot(), 'bench', 'torch_kernels.py');
  const r = spawnSync('python3', [script, '--tokens', `${s.T}`, '--hidden', `${s.d}`, '--ffn', `${s.f}`, '--experts', `${s.E}`, '--topk', `${s.K}`], { encoding: 'utf8' });
  if (r.status !== 0) {
    console.error(`PyTorch reference failed: ${(r.stderr || r.error?.message || '').slice(-500)}`);
    return null;
  }
  return JSON.parse(r.stdout.trim().split('\n').pop()!);
}

function runShape(s: Shape, device: Device, withTorch: boolean) {
  const reps = s.name === 'xft-1.3b' ? 10 : 20;
  const M = s.T * s.K;
  const torch = withTorch && device === 'cuda' ? torchTimes(s) : null;
  const ref = (k: string) => (torch && typeof torch[k] === 'number' ? (torch[k] as number) : null);
  const rows: Row[] = [];
  const tflops = (flop: number, ms: number) => `${(flop / (ms * 1e-3) / 1e12).toFixed(1)} TFLOP/s`;
  const dtype = device === 'cuda' ? 'bf16' : 'f32';

  // routing
  const logits = Tensor.randn([s.T, s.E - 1], { seed: 1, device, std: 2 });
  const routeMs = time(() => ops.routeShared(logits, { topK: s.K }).dispose(), reps * 5);
  const routing = ops.routeShared(logits, { topK: s.K });
  const routeBytes = s.T * (s.E - 1) * 4 + s.T * s.K * 4 * 3 + (s.E - 1) * 8 + (2 * s.E + 1) * 4;
  const bw = ref('copy_gbps');
  const routeFloor = bw ? (routeBytes / (bw * 1e9)) * 1e3 : null;
  rows.push({ op: 'routeShared', xft_ms: routeMs, xft_rate: `${(routeBytes / (routeMs * 1e-3) / 1e9).toFixed(1)} GB/s`,
    reference: 'PyTorch eager gate + sort', ref_ms: ref('route_eager'), ratio: ref('route_eager') ? `${(ref('route_eager')! / routeMs).toFixed(1)}x faster` : '-', target: '>= 5x' });
  rows.push({ op: 'routeShared', xft_ms: routeMs, xft_rate: '', reference: 'HBM floor', ref_ms: routeFloor,
    ratio: routeFloor ? `${(routeMs / routeFloor).toFixed(1)}x floor` : '-' });

  // grouped GEMM (the gate/up projection shape: [M, d] x [E, f, d])
  const x = Tensor.randn([M, s.d], { seed: 2, device, dtype });
  const w = Tensor.randn([s.E, s.f, s.d], { seed: 3, device, dtype, std: 0.02 });
  const dy = Tensor.randn([M, s.f], { seed: 4, device, dtype });
  const flop = 2 * M * s.f * s.d;
  const fwd = time(() => ops.groupedGemm(x, w, routing.offsets, { validate: false }).dispose(), reps);
  const dxMs = time(() => ops.groupedGemmBackward(x, w, routing.offsets, dy, { dw: false, validate: false }).dx!.dispose(), reps);
  const dwMs = time(() => ops.groupedGemmBackward(x, w, routing.offsets, dy, { dx: false, validate: false }).dw!.dispose(), reps);
  for (const [name, ms, dense, grouped] of [['groupedGemm fwd', fwd, 'dense_gemm_fwd', 'grouped_mm_fwd'], ['groupedGemm dx', dxMs, 'dense_gemm_dx', 'grouped_mm_dx'],
    ['groupedGemm dw', dwMs, 'dense_gemm_dw', 'grouped_mm_dw']] as const) {
    rows.push({ op: name, xft_ms: ms, xft_rate: tflops(flop, ms), reference: 'cuBLAS dense, equal FLOPs', ref_ms: ref(dense),
      ratio: ref(dense) ? `${((ref(dense)! / ms) * 100).toFixed(0)}% of cuBLAS` : '-', target: '>= 50%' });
    rows.push({ op: name, xft_ms: ms, xft_rate: '', reference: 'torch._grouped_mm', ref_ms: ref(grouped),
      ratio: ref(grouped) ? `${(ref(grouped)! / ms).toFixed(2)}x` : '-' });
  }
  for (const v of [x, dy]) v.dispose();

  // merge: gate, up [E, f, d], down [E, d, f]
  const stacks = [w, Tensor.randn([s.E, s.f, s.d], { seed: 5, device, dtype }), Tensor.randn([s.E, s.d, s.f], { seed: 6, device, dtype })];
  const alpha = Tensor.zeros([s.E - 1], { device });
  const grads = stacks.map((st, i) => Tensor.randn(st.shape.slice(1), { seed: 7 + i, device, dtype }));
  const mf = time(() => ops.mergeExperts(stacks, alpha, 0.75).forEach((m) => m.dispose()), reps);
  const mb = time(() => ops.mergeExpertsBackward(stacks, alpha, 0.75, grads).dispose(), reps);
  const eb = dtype === 'bf16' ? 2 : 4;
  const numel = 3 * s.f * s.d;
  const fwdBytes = numel * (s.E + 1) * eb, bwdBytes = numel * (s.E + 1) * eb;
  const floor = (b: number) => (bw ? (b / (bw * 1e9)) * 1e3 : null);
  rows.push({ op: 'mergeExperts fwd', xft_ms: mf, xft_rate: `${(fwdBytes / (mf * 1e-3) / 1e9).toFixed(0)} GB/s`, reference: 'HBM floor', ref_ms: floor(fwdBytes),
    ratio: floor(fwdBytes) ? `${(mf / floor(fwdBytes)!).toFixed(2)}x floor` : '-', target: '<= 1.5x' });
  rows.push({ op: 'mergeExperts fwd', xft_ms: mf, xft_rate: '', reference: 'PyTorch einsum', ref_ms: ref('merge_fwd'), ratio: ref('merge_fwd') ? `${(ref('merge_fwd')! / mf).toFixed(1)}x faster` : '-' });
  rows.push({ op: 'mergeExperts bwd', xft_ms: mb, xft_rate: `${(bwdBytes / (mb * 1e-3) / 1e9).toFixed(0)} GB/s`, reference: 'HBM floor', ref_ms: floor(bwdBytes),
    ratio: floor(bwdBytes) ? `${(mb / floor(bwdBytes)!).toFixed(2)}x floor` : '-' });
  rows.push({ op: 'mergeExperts fwd+bwd', xft_ms: mf + mb, xft_rate: '', reference: 'PyTorch autograd fwd+bwd', ref_ms: ref('merge_bwd'),
    ratio: ref('merge_bwd') ? `${(ref('merge_bwd')! / (mf + mb)).toFixed(1)}x faster` : '-' });
  for (const v of [...stacks, alpha, ...grads, logits]) v.dispose();
  routing.dispose();
  return { shape: s, device, dtype, torch, rows };
}

function main() {
  const b = backend();
  const device: Device = b.kind;
  const only = arg('--shape');
  const shapes = SHAPES.filter((s) => (only ? s.name === only : device === 'cuda' ? s.name !== 'tiny' : s.name === 'tiny'));
  const results = [];
  for (const s of shapes) {
    const r = runShape(s, device, !process.argv.includes('--no-torch'));
    printTable(`${s.name}: T=${s.T} d=${s.d} f=${s.f} E=${s.E} K=${s.K} on ${device === 'cuda' ? b.name : 'CPU'} (${r.dtype})`, ['op', 'xft_ms', 'xft_rate', 'reference', 'ref_ms', 'ratio', 'target'], r.rows, (v) => v.toFixed(3));
    results.push(r);
  }
  const out = arg('--out') ?? path.join(packageRoot(), 'bench', 'out', 'kernels.json');
  fs.mkdirSync(path.dirname(out), { recursive: true });
  fs.writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), backend: b, results }, null, 2));
  console.log(`\nwrote ${out}`);
}

main();
