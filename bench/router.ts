/**
 * bench/router: the small-N router linears (cuda/router_linear.cu) beside the path they replace (the
 * grouped GEMM with one group, its 128 x 256 tile) and the HBM floor (x read once, y / dx written
 * once; backward: x read and dx written once; w negligible; datasheet HBM bandwidth), at the 1.3B shape (16384 tokens of width 2048) for N = 7 and 15 (8 and 16
 * experts). Forward, and backward (dx + dW accumulated into an f32 gradient) separately.
 * Usage: node dist/bench/router.js [--tokens T] [--hidden d] [--dtype bf16|f32] [--out file.json] [--help]
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Tensor, backend, ops } from '../lib/index';
import { packageRoot } from '../lib/native';
import { arg, time, printTable } from './table';

const USAGE = `Usage: node dist/bench/router.js [--tokens T] [--hidden d] [--dtype bf16|f32] [--out file.json] [--help]
  --tokens, --hidden  the shape (default 16384 x 2048 on the GPU, 512 x 256 on the CPU)
  --dtype             bf16 (default on the GPU) or f32
  --out               the JSON results (default bench/out/router.json)`;



function main() {
  if (process.argv.includes('--help') || process.argv.includes('-h')) {
    console.log(USAGE);
    return;
  }
  const b = backend();
  const device = b.kind;
  const gpu = device === 'cuda';
  const T = Number(arg('--tokens') ?? (gpu ? 16384 : 512)), d = Number(arg('--hidden') ?? (gpu ? 2048 : 256));
  const dtype = (arg('--dtype') ?? (gpu ? 'bf16' : 'f32')) as 'f32' | 'bf16';
  if (!(T > 0 && d > 0) || !['f32', 'bf16'].includes(dtype)) throw new Error(`bad --tokens/--hidden/--dtype\n${USAGE}`);
  const es = dtype === 'bf16' ? 2 : 4, reps = gpu ? 20 : 3;
  const hbm = b.name && /H200/.test(b.name) ? 4.8e12 : b.name && /H100/.test(b.name) ? 3.35e12 : null;
  const rows: Record<string, unknown>[] = [];
  const x = Tensor.randn([T, d], { seed: 1, dtype, device });
  const offsets = Tensor.from([0, T], [2], { dtype: 'i32', device });
  for (const N of [7, 15]) {
    const w = Tensor.randn([N, d], { seed: 2, dtype, device, std: 0.02 }), dy = Tensor.randn([T, N], { seed: 3, dtype, device });
    const w3 = w.reshape([1, N, d]);
    const grad = Tensor.zeros([N, d], { device });
    const fwdNew = time(() => ops.routerLinear(x, w).dispose(), reps);
    const fwdOld = time(() => ops.groupedGemm(x, w3, offsets, { validate: false }).dispose(), reps);
    const bwdNew = time(() => ops.routerLinearBackward(x, w, dy, { dw: grad }).dx!.dispose(), reps);
    const bwdOld = time(() => ops.groupedGemmBackward(x, w3, offsets, dy, { dw: grad.reshape([1, N, d]), validate: false }).dx!.dispose(), reps);
    const floorF = hbm ? ((T * d + T * N) * es / hbm) * 1e3 : null, floorB = hbm ? ((2 * T * d + T * N) * es / hbm) * 1e3 : null;
    rows.push({ op: `forward N=${N}`, router_ms: fwdNew, gemm_ms: fwdOld, speedup: `${(fwdOld / fwdNew).toFixed(2)}x`, hbm_floor_ms: floorF, of_floor: floorF ? `${(fwdNew / floorF).toFixed(2)}x` : '-' });
    rows.push({ op: `backward N=${N}`, router_ms: bwdNew, gemm_ms: bwdOld, speedup: `${(bwdOld / bwdNew).toFixed(2)}x`, hbm_floor_ms: floorB, of_floor: floorB ? `${(bwdNew / floorB).toFixed(2)}x` : '-' });
    [w, dy, grad].forEach((t) => t.dispose());
  }
  x.dispose();
  offsets.dispose();
  printTable(`router linears: ${T} tokens x d=${d}, ${dtype} on ${gpu ? b.name : 'CPU'} (speedup = grouped GEMM time / router kernel time; floor: x read once${hbm ? '' : ', unknown HBM bandwidth here'}; backward = dx + dW into f32)`,
    ['op', 'router_ms', 'gemm_ms', 'speedup', 'hbm_floor_ms', 'of_floor'], rows, (v) => v.toFixed(3));
  const out = arg('--out') ?? path.join(packageRoot(), 'bench', 'out', 'router.json');
  fs.mkdirSync(path.dirname(out), { recursive: true });
  fs.writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), backend: b, T, d, dtype, rows }, null, 2));
  console.log(`\nwrote ${out}`);
}

try {
  main();
} catch (err) {
  console.error(`bench/router: ${(err as Error).message}`);
  process.exitCode = 1;
}
