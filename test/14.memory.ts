// Memory over time: a synchronous loop that creates and disposes tensors, and a long synchronous
// MoE train(), keep the process's resident memory flat. Each runs in a child process that samples
// RSS after a warm-up; the slope through the samples is the memory kept per step.
// (Before dispose() released everything native at once, an N-API wrap and finalizer per tensor waited
// for the event loop: ~250 B per tensor, ~15-25 KB per train() step.)
import t from 'tap';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';

const lib = (f: string) => JSON.stringify(path.join(__dirname, '..', 'lib', f));

/** Theil-Sen slope of y over x: the median of the pairwise slopes, unmoved by a one-off step of V8's
 * (a leak moves every pair). */
const slopeSource = `
function slope(points) {
  const s = [];
  for (let i = 0; i < points.length; i++)
    for (let j = i + 1; j < points.length; j++) s.push((points[j][1] - points[i][1]) / (points[j][0] - points[i][0]));
  s.sort((a, b) => a - b);
  return s.length % 2 ? s[s.length >> 1] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}`;

// V8's own memory moves by megabytes while a process warms up; these flags hold it still so that the
// slope measures what xft keeps:
// --expose-gc: gc() before each sample, so that garbage V8 has not collected yet does not count
//   (gc() does not run N-API finalizers: leftovers that wait for them still show);
// --max-semi-space-size=1: V8 would otherwise grow its young generation once mid-run (a 4 MB step);
// --no-opt: TurboFan's code and compile memory grows while it warms up;
// --no-flush-bytecode: the bytecode of functions not run lately is dropped after some collections.
const V8_FLAGS = ['--expose-gc', '--max-semi-space-size=1', '--no-opt', '--no-flush-bytecode'];

function child(body: string, flags: string[]): Record<string, number> {
  const r = spawnSync(process.execPath, [...flags, ...process.execArgv, '-e', `${slopeSource}\n${body}`], {
    encoding: 'utf8', env: { ...process.env, XFT_DEVICE: 'cpu' }, timeout: 120_000,
  });
  if (r.status !== 0) throw new Error(`child failed (${r.status ?? r.signal}): ${r.stderr}`);
  return JSON.parse(r.stdout.trim().split('\n').pop()!);
}

t.test('creating and disposing tensors in a synchronous loop keeps RSS flat', async (t) => {
  // the drill: iterations of ~25 tensors through ops, all disposed; no gc() and no event-loop turn
  const r = child(`
const { Tensor, ops, memoryStats } = require(${lib('index.ts')});
const perIteration = 26, iterations = 2000, warm = 400, points = [];
const live0 = memoryStats().hostTensors;
for (let i = 0; i < iterations; i++) {
  const x = Tensor.randn([8, 16], { seed: i }), w = Tensor.ones([16]);
  const n = ops.rmsnorm(x, w), s = ops.swiglu(n.y, x), a = ops.add(s, x), c = a.cast('bf16'), b = c.cast('f32');
  const logits = Tensor.randn([8, 3], { seed: i }), r = ops.routeShared(logits, { topK: 3 });
  const v = b.reshape([16, 8]), cl = v.clone(), sq = ops.sumSquares([cl, x]), z = Tensor.zeros([4], { dtype: 'i32' });
  const e = Tensor.from([1, 2, 3, 4]), tn = ops.tanh(e), f = Tensor.full([3], 2), u = Tensor.uniform([5], { seed: 1 });
  sq.item();
  for (const t of [x, w, n.y, n.rstd, s, a, c, b, logits, cl, sq, z, e, tn, f, u]) t.dispose();
  r.dispose();
  if (i === warm) { gc(); gc(); }
  if (i > warm && i % 100 === 0) { gc(); points.push([i * perIteration, process.memoryUsage().rss]); }
}
console.log(JSON.stringify({ bytesPerTensor: slope(points), leftAlive: memoryStats().hostTensors - live0, tensors: iterations * perIteration }));`, V8_FLAGS);
  t.equal(r.leftAlive, 0, 'every tensor was released');
  // the slope is noisy on a loaded 2-core machine (5-22 B measured with the fix in place); the leak it guards against was ~250 B
  t.ok(r.bytesPerTensor < 64, `RSS grows ${r.bytesPerTensor.toFixed(1)} B per tensor created and disposed (${r.tensors} tensors; was ~250 B)`);
});

t.test('a long synchronous MoE train() keeps RSS flat', async (t) => {
  const r = child(`
const { createDense, upcycle, train, memoryStats } = require(${lib('index.ts')});
const { tinyConfig } = require(${lib('config.ts')});
const config = tinyConfig({ hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, vocab_size: 32 });
const dense = createDense(config, { seed: 1 });
const moe = upcycle(dense, { experts: 4, topK: 3 });
dense.dispose();
const rows = [];
for (let i = 0; i < 4; i++) {
  const ids = Array.from({ length: 8 }, (_, j) => (i * 7 + j * 3) % 32);
  rows.push({ ids, targets: ids.map((x, j) => (j % 2 ? x : -100)) });
}
const warm = 200, steps = warm + 1000, points = [];
// counted inside the run at both ends (after it, the trainer's own buffers are gone too)
let live, last;
train(moe, rows, { lr: 1e-3, batchSize: 2, steps, onStep: (s) => {
  if (s.step === warm) { live = memoryStats().hostTensors; gc(); gc(); }
  if (s.step === steps) last = memoryStats().hostTensors;
  if (s.step > warm && s.step % 50 === 0) { gc(); points.push([s.step, process.memoryUsage().rss]); }
} });
console.log(JSON.stringify({ bytesPerStep: slope(points), liveGrowth: last - live, steps: steps - warm, rss: points.map((p) => p[1]) }));`, V8_FLAGS);
  t.equal(r.liveGrowth, 0, 'no tensor accumulates over the steps');
  t.ok(r.bytesPerStep < 1024, `RSS slope ${(r.bytesPerStep / 1024).toFixed(2)} KB/step over ${r.steps} steps (below 1 KB/step; was ~15-25 KB/step)`);
  t.comment(`RSS (MB) every 50 steps: ${(r.rss as unknown as number[]).map((b) => (b / 2 ** 20).toFixed(1)).join(' ')}`);
});
