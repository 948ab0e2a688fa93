/**
 * bench/kernels: the XFT kernel families beside their references, measured in one run.
 *   grouped GEMM (forward, dx, dw)  TFLOP/s beside a dense cuBLAS GEMM of equal FLOPs and torch._grouped_mm
 *   routing                         time beside the PyTorch eager reference and the HBM floor
 *   merge forward / backward        time beside the HBM floor and PyTorch
 *   attention (causal, fwd, bwd)    TFLOP/s beside F.scaled_dot_product_attention (flash backend on the GPU)
 *   fused SwiGLU FFN (MoE rows)     gate/up as one GEMM reading x through the routing order, SwiGLU in the
 *                                   epilogue, beside XFT's unfused ops and PyTorch eager (x[order], two
 *                                   matmuls, silu * mul; the whole FFN forward + backward through autograd)
 * The PyTorch side is bench/torch_kernels.py, run on the same device by this script (on the CPU only
 * its attention). If it fails, this script stops with its error and exit status 1 (--no-torch runs
 * without it).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Tensor, backend, ops, type Device } from '../lib/index';
import { packageRoot } from '../lib/native';
import { arg, time, printTable } from './table';

/** the PyTorch side's interpreter: XFT_PYTHON (as the tests), else python3 on the PATH */
const PYTHON = process.env.XFT_PYTHON ?? 'python3';

const USAGE = `Usage: node dist/bench/kernels.js [--shape xft-1.3b|small|tiny] [--out file.json] [--no-torch] [--help]
  --shape     one shape (default: xft-1.3b and small on the GPU, tiny on the CPU)
  --out       the JSON results (default bench/out/kernels.json)
  --no-torch  skip the PyTorch references (bench/torch_kernels.py); otherwise a failing reference
              stops the run with exit status 1`;

/** T tokens of width d, FFN f, E experts top-K; attention over the same tokens as B sequences of `seq`. */
interface Shape { name: string; T: number; d: number; f: number; E: number; K: number; attn: { B: number; seq: number; H: number; Hkv: number; hd: number } }
const SHAPES: Shape[] = [
  { name: 'xft-1.3b', T: 16384, d: 2048, f: 5504, E: 8, K: 6, attn: { B: 8, seq: 2048, H: 16, Hkv: 16, hd: 128 } },
  { name: 'small', T: 2048, d: 512, f: 1376, E: 8, K: 6, attn: { B: 4, seq: 512, H: 8, Hkv: 8, hd: 64 } },
  { name: 'tiny', T: 256, d: 64, f: 176, E: 8, K: 6, attn: { B: 2, seq: 128, H: 4, Hkv: 2, hd: 16 } },
];



interface Row { op: string; xft_ms: number; xft_rate: string; reference: string; ref_ms: number | null; ratio: string; target?: string }

type TorchResult = Record<string, number | string> & { missing: Record<string, string> };

/** bench/torch_kernels.py's JSON for this shape; throws (with its stderr) when it fails. */
function torchTimes(s: Shape, device: Device): TorchResult {
  const script = path.join(packageRoot(), 'bench', 'torch_kernels.py');
  const a = s.attn;
  const args = [script, '--device', device, '--attention', `${a.B},${a.seq},${a.H},${a.Hkv},${a.hd}`];
  if (device === 'cuda') args.push('--tokens', `${s.T}`, '--hidden', `${s.d}`, '--ffn', `${s.f}`, '--experts', `${s.E}`, '--topk', `${s.K}`);
  const r = spawnSync(PYTHON, args, { encoding: 'utf8', maxBuffer: 1 << 24 });
  const last = (r.stdout ?? '').trim().split('\n').pop() ?? '';
  if (r.status !== 0 || !last.startsWith('{'))
    throw new Error(`the PyTorch reference (${PYTHON} ${args.join(' ')}) failed with ${r.error?.message ?? `exit status ${r.status}`}:\n` +
      `${(r.stderr || '').slice(-1500)}\n(run with --no-torch to measure XFT alone)`);
  return JSON.parse(last) as TorchResult;
}

function runShape(s: Shape, device: Device, withTorch: boolean) {
  const reps = s.name === 'xft-1.3b' ? 10 : 20;
  const M = s.T * s.K;
  const torch = withTorch ? torchTimes(s, device) : null;
  // a reference the script ran must be there; one this torch lacks by design is listed in `missing`
  const ref = (k: string): number | null => {
    if (!torch || (device !== 'cuda' && !k.startsWith('attention')) || torch.missing?.[k.replace(/_(fwd|dx|dw)$/, '')]) return null;
    if (typeof torch[k] !== 'number') throw new Error(`the PyTorch reference printed no ${k} (${JSON.stringify(torch).slice(0, 400)})`);
    return torch[k] as number;
  };
  const na = (k: string) => (torch?.missing?.[k] ? `n/a: ${torch.missing[k]}` : '-');
  const rows: Row[] = [];
  const tflops = (flop: number, ms: number) => {
    const rate = flop / (ms * 1e-3);
    return rate >= 1e11 ? `${(rate / 1e12).toFixed(1)} TFLOP/s` : `${(rate / 1e9).toFixed(2)} GFLOP/s`;
  };
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
      ratio: ref(grouped) ? `${(ref(grouped)! / ms).toFixed(2)}x` : na('grouped_mm') });
  }
  for (const v of [x, dy]) v.dispose();

  // the expert FFN over the routed rows: fused (gateUp, swigluDownBackward, gateUpBackward) beside the
  // unfused composition (permute, two GEMMs, swiglu, ...; what the layers ran before) and PyTorch eager
  const xt = Tensor.randn([s.T, s.d], { seed: 20, device, dtype });
  const wu = Tensor.randn([s.E, s.f, s.d], { seed: 21, device, dtype, std: 0.02 });
  const wd = Tensor.randn([s.E, s.d, s.f], { seed: 22, device, dtype, std: 0.02 });
  const dye = Tensor.randn([M, s.d], { seed: 23, device, dtype });
  const off = routing.offsets, gather = { gather: routing.order, gatherDiv: s.K, validate: false };
  const nv = { validate: false };
  const fusedFwd = () => {
    const { gu, h } = ops.gateUp(xt, w, wu, off, gather);
    const y = ops.groupedGemm(h, wd, off, nv);
    h.dispose();
    return { gu, y };
  };
  const fusedStep = () => {
    const { gu, y } = fusedFwd();
    const { dgu, h } = ops.swigluDownBackward(dye, wd, off, gu, nv);
    const dDown = ops.groupedGemmBackward(h, wd, off, dye, { dx: false, validate: false }).dw!;
    const b = ops.gateUpBackward(xt, w, wu, off, dgu, gather);
    for (const v of [gu, y, dgu, h, dDown, b.dx, b.dwGate, b.dwUp]) v!.dispose();
  };
  const unfusedFwd = () => {
    const xp = ops.permute(xt, routing.order, s.K, nv);
    const g = ops.groupedGemm(xp, w, off, nv), u = ops.groupedGemm(xp, wu, off, nv), a = ops.swiglu(g, u);
    const y = ops.groupedGemm(a, wd, off, nv);
    return { xp, g, u, a, y };
  };
  const unfusedStep = () => {
    const { xp, g, u, a, y } = unfusedFwd();
    const down = ops.groupedGemmBackward(a, wd, off, dye, nv);
    const { dg, du } = ops.swigluBackward(g, u, down.dx!);
    const bg = ops.groupedGemmBackward(xp, w, off, dg, nv), bu = ops.groupedGemmBackward(xp, wu, off, du, nv);
    const dxp = ops.add(bg.dx!, bu.dx!, { out: bg.dx! });
    for (const v of [xp, g, u, a, y, down.dx, down.dw, dg, du, dxp, bu.dx, bg.dw, bu.dw]) v!.dispose();
  };
  const gateUpOnly = () => {
    const { gu, h } = ops.gateUp(xt, w, wu, off, gather);
    gu.dispose();
    h.dispose();
  };
  const gateUpUnfused = () => {
    const xp = ops.permute(xt, routing.order, s.K, nv);
    const g = ops.groupedGemm(xp, w, off, nv), u = ops.groupedGemm(xp, wu, off, nv), a = ops.swiglu(g, u);
    for (const v of [xp, g, u, a]) v.dispose();
  };
  const ffnFlop = 2 * M * s.f * s.d;
  const guMs = time(gateUpOnly, reps), guUnfusedMs = time(gateUpUnfused, reps);
  const stepMs = time(fusedStep, reps), stepUnfusedMs = time(unfusedStep, reps);
  rows.push({ op: 'FFN gate/up fwd (fused)', xft_ms: guMs, xft_rate: tflops(2 * ffnFlop, guMs), reference: 'XFT unfused (permute, 2 GEMMs, swiglu)',
    ref_ms: guUnfusedMs, ratio: `${(guUnfusedMs / guMs).toFixed(2)}x` });
  rows.push({ op: 'FFN gate/up fwd (fused)', xft_ms: guMs, xft_rate: '', reference: 'PyTorch x[order], 2 matmuls, silu*mul', ref_ms: ref('ffn_gateup_fwd'),
    ratio: ref('ffn_gateup_fwd') ? `${(ref('ffn_gateup_fwd')! / guMs).toFixed(2)}x` : '-', target: '>= 1x' });
  rows.push({ op: 'FFN fwd+bwd (fused)', xft_ms: stepMs, xft_rate: tflops(9 * ffnFlop, stepMs), reference: 'XFT unfused', ref_ms: stepUnfusedMs,
    ratio: `${(stepUnfusedMs / stepMs).toFixed(2)}x` });
  rows.push({ op: 'FFN fwd+bwd (fused)', xft_ms: stepMs, xft_rate: '', reference: 'PyTorch eager + autograd', ref_ms: ref('ffn_fwdbwd'),
    ratio: ref('ffn_fwdbwd') ? `${(ref('ffn_fwdbwd')! / stepMs).toFixed(2)}x` : '-', target: '>= 1x' });
  for (const v of [xt, wu, wd, dye]) v.dispose();

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

  // causal attention, B sequences of `seq` tokens. FLOPs as FlashAttention counts them: forward
  // 4 B H seq^2 hd / 2 (QK^T and PV, half of the scores masked), backward 2.5x the forward (five
  // products; the XFT backward runs seven, its separate dQ pass recomputing S and dP).
  const at = s.attn;
  const q = Tensor.randn([at.B * at.seq, at.H * at.hd], { seed: 11, device, dtype });
  const kv = [12, 13].map((seed) => Tensor.randn([at.B * at.seq, at.Hkv * at.hd], { seed, device, dtype }));
  const dOut = Tensor.randn([at.B * at.seq, at.H * at.hd], { seed: 14, device, dtype });
  const opts = { batch: at.B, heads: at.H, kvHeads: at.Hkv };
  const fwdFlop = (4 * at.B * at.H * at.seq * at.seq * at.hd) / 2;
  const f = ops.attention(q, kv[0], kv[1], opts);
  const afwd = time(() => {
    const r = ops.attention(q, kv[0], kv[1], opts);
    r.out.dispose();
    r.lse.dispose();
  }, reps);
  const abwd = time(() => {
    const g = ops.attentionBackward(q, kv[0], kv[1], f.out, f.lse, dOut, opts);
    for (const x of [g.dq, g.dk, g.dv]) x.dispose();
  }, reps);
  const attnRef = torch ? `PyTorch ${torch.attention_reference}` : 'PyTorch SDPA';
  rows.push({ op: 'attention fwd', xft_ms: afwd, xft_rate: tflops(fwdFlop, afwd), reference: attnRef, ref_ms: ref('attention_fwd'),
    ratio: ref('attention_fwd') ? `${(ref('attention_fwd')! / afwd).toFixed(2)}x` : '-' });
  rows.push({ op: 'attention bwd', xft_ms: abwd, xft_rate: tflops(2.5 * fwdFlop, abwd), reference: '', ref_ms: null, ratio: '' });
  rows.push({ op: 'attention fwd+bwd', xft_ms: afwd + abwd, xft_rate: tflops(3.5 * fwdFlop, afwd + abwd), reference: attnRef,
    ref_ms: ref('attention_fwdbwd'), ratio: ref('attention_fwdbwd') ? `${(ref('attention_fwdbwd')! / (afwd + abwd)).toFixed(2)}x` : '-',
    target: at.hd === 128 && at.seq === 2048 ? '>= 0.6x' : undefined });
  for (const x of [q, ...kv, dOut, f.out, f.lse]) x.dispose();
  return { shape: s, device, dtype, torch, rows };
}

function main() {
  if (process.argv.includes('--help') || process.argv.includes('-h')) {
    console.log(USAGE);
    return;
  }
  const b = backend();
  const device: Device = b.kind;
  const only = arg('--shape');
  const shapes = SHAPES.filter((s) => (only ? s.name === only : device === 'cuda' ? s.name !== 'tiny' : s.name === 'tiny'));
  if (shapes.length === 0) throw new Error(`unknown --shape ${only} (expected ${SHAPES.map((s) => s.name).join(', ')})\n${USAGE}`);
  const results = [];
  for (const s of shapes) {
    const r = runShape(s, device, !process.argv.includes('--no-torch'));
    printTable(`${s.name}: T=${s.T} d=${s.d} f=${s.f} E=${s.E} K=${s.K}, attention ${s.attn.B}x${s.attn.seq} H=${s.attn.H} Hkv=${s.attn.Hkv} hd=${s.attn.hd} on ${device === 'cuda' ? b.name : 'CPU'} (${r.dtype})`, ['op', 'xft_ms', 'xft_rate', 'reference', 'ref_ms', 'ratio', 'target'], r.rows, (v) => v.toFixed(3));
    results.push(r);
  }
  const out = arg('--out') ?? path.join(packageRoot(), 'bench', 'out', 'kernels.json');
  fs.mkdirSync(path.dirname(out), { recursive: true });
  fs.writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), backend: b, results }, null, 2));
  console.log(`\nwrote ${out}`);
}

try {
  main();
} catch (err) {
  console.error(`bench/kernels: ${(err as Error).message}`);
  process.exitCode = 1;
}
