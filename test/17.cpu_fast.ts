// The fast CPU backend: the caching host allocator (reuse, no mmap after the first training step, the
// cap, emptyCache, no stale data behind a zero fill) and the vectorized kernels against their plain
// reference paths (XFT_CPU_REFERENCE=1, read at each call) on awkward sizes, fast exp's accuracy, NaN
// and infinity handling, and results independent of the thread count.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import * as v8 from 'node:v8';
import * as vm from 'node:vm';
import { Tensor, ops, memoryStats, emptyCache, setHostCacheLimit, createDense, upcycle, Trainer, disposeState, tinyConfig, XftError } from '../lib/index';
import { randomTensor, rng } from './helpers/ref';
import { close, exact } from './helpers/check';

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;
const MiB = 2 ** 20;

/** fn's results with the plain reference kernels (XFT_CPU_REFERENCE=1) */
function reference<R>(fn: () => R): R {
  const before = process.env.XFT_CPU_REFERENCE;
  process.env.XFT_CPU_REFERENCE = '1';
  try {
    return fn();
  } finally {
    if (before === undefined) delete process.env.XFT_CPU_REFERENCE;
    else process.env.XFT_CPU_REFERENCE = before;
  }
}

const arr = (x: Tensor) => Array.from(x.toArray());

t.test('host cache: a freed block is reused by the next allocation of its size class', async (t) => {
  const a = Tensor.zeros([100_000]);
  a.dispose();
  const s0 = memoryStats();
  t.ok(s0.hostCachedBytes >= 400_000, `the freed 400 kB block is cached (${s0.hostCachedBytes} B)`);
  const b = Tensor.zeros([99_000]); // a slightly smaller size: the same class
  const s1 = memoryStats();
  t.equal(s1.hostMaps, s0.hostMaps, 'no new mapping');
  t.equal(s1.hostCacheHits, s0.hostCacheHits + 1, 'a cache hit');
  t.ok(s1.hostCachedBytes < s0.hostCachedBytes, 'the block left the cache');
  b.dispose();
});

t.test('host cache: a reused block holds no stale data where zeros are promised', async (t) => {
  for (const n of [16_384 + 3, 300_000]) {
    const dirty = Tensor.full([n], 7.5);
    dirty.dispose();
    const hits = memoryStats().hostCacheHits;
    const z = Tensor.zeros([n]);
    t.equal(memoryStats().hostCacheHits, hits + 1, `${n}: the dirty block was reused`);
    t.ok(arr(z).every((v) => v === 0), `${n}: Tensor.zeros is all zeros on a reused block`);
    z.dispose();
  }
});

t.test('host cache: training steps after the first map no memory', async (t) => {
  const dense = createDense(tinyConfig(), { seed: 1 });
  const model = upcycle(dense, { experts: 4, topK: 2, seed: 1 });
  dense.dispose();
  const r = rng(3), V = tinyConfig().vocab_size;
  const rows = Array.from({ length: 16 }, () => {
    const ids = Array.from({ length: 33 }, () => r.int(0, V));
    return { ids: ids.slice(0, -1), targets: ids.slice(1) };
  });
  const run = new Trainer(model, rows, { lr: 1e-3, batchSize: 4, steps: 4, seed: 1 });
  run.step();
  run.step();
  const warm = memoryStats();
  run.step();
  run.step();
  const after = memoryStats();
  t.equal(after.hostMaps - warm.hostMaps, 0, 'two more steps: no mmap');
  t.equal(after.hostUnmaps - warm.hostUnmaps, 0, 'two more steps: no munmap');
  t.ok(after.hostCacheHits > warm.hostCacheHits, `their large blocks came from the cache (${after.hostCacheHits - warm.hostCacheHits} hits)`);
  disposeState(run.state);
  model.dispose();
});

t.test('host cache: the cap, emptyCache and the finalizer', async (t) => {
  const limit = memoryStats().hostCacheLimitBytes;
  t.teardown(() => setHostCacheLimit(limit));
  setHostCacheLimit(1 * MiB);
  const unmaps = memoryStats().hostUnmaps;
  const blocks = Array.from({ length: 4 }, () => Tensor.zeros([150_000])); // 600 kB each
  blocks.forEach((b) => b.dispose());
  const s = memoryStats();
  t.ok(s.hostCachedBytes <= 1 * MiB, `the cache keeps at most its limit (${s.hostCachedBytes} B <= 1 MiB)`);
  t.ok(s.hostUnmaps >= unmaps + 3, 'the blocks over the limit were unmapped');
  setHostCacheLimit(0);
  t.equal(memoryStats().hostCachedBytes, 0, 'a limit of 0 empties the cache');
  setHostCacheLimit(256 * MiB);

  // 64 MiB touched, freed into the cache, then returned to the system
  const big = Tensor.full([16 * MiB], 1);
  big.dispose();
  t.ok(memoryStats().hostCachedBytes >= 64 * MiB, 'the freed 64 MiB are cached');
  const rssCached = process.memoryUsage().rss;
  emptyCache();
  const rssEmpty = process.memoryUsage().rss;
  t.equal(memoryStats().hostCachedBytes, 0, 'emptyCache leaves nothing cached');
  t.ok(rssCached - rssEmpty > 48 * MiB, `emptyCache returned the memory (RSS ${((rssCached - rssEmpty) / MiB).toFixed(1)} MiB lower)`);

  // a forgotten tensor's finalizer returns its block to the cache
  const live = memoryStats().hostTensors;
  (() => {
    for (let i = 0; i < 20; i++) Tensor.zeros([50_000]);
  })();
  for (let i = 0; i < 10 && memoryStats().hostTensors > live; i++) {
    gc();
    await new Promise((r) => setImmediate(r));
  }
  t.ok(memoryStats().hostTensors <= live, 'collected tensors released their blocks');
  t.ok(memoryStats().hostCachedBytes > 0, 'into the cache');

  for (const bad of [-1, NaN, Infinity, '1' as unknown as number]) {
    let code = '';
    try {
      setHostCacheLimit(bad);
    } catch (e) {
      code = e instanceof XftError ? e.code : String(e);
    }
    t.equal(code, 'XFT_VALUE', `setHostCacheLimit(${String(bad)}) throws XFT_VALUE`);
  }
});

// sizes around the vector width (8 f32 lanes, 16 bf16), 1, and large enough for threads
const SIZES = [1, 7, 8, 9, 31, 33, 1003, 200_003];

t.test('elementwise kernels: the same bits as the reference path', async (t) => {
  for (const dtype of ['f32', 'bf16'] as const)
    for (const n of SIZES) {
      const a = randomTensor([n], n, { dtype, scale: 4 }), b = randomTensor([n], n + 1, { dtype }), c = randomTensor([n], n + 2, { dtype });
      const fast = () => {
        const h = ops.swiglu(a.t, b.t), sum = ops.add(a.t, b.t), { dg, du } = ops.swigluBackward(a.t, b.t, c.t);
        const y = ops.axpby(0.5, a.t, -2, Tensor.from(b.values, [n], { dtype }));
        return { h: arr(h), sum: arr(sum), dg: arr(dg), du: arr(du), y: arr(y) };
      };
      const got = fast(), want = reference(fast);
      exact(t, got.sum, want.sum, `${dtype} n=${n}: add`);
      exact(t, got.y, want.y, `${dtype} n=${n}: axpby`);
      // swiglu: only exp differs (fast exp vs expf, within 1 ulp)
      const tol = dtype === 'f32' ? 2e-6 : 8e-3;
      close(t, got.h, want.h, tol, `${dtype} n=${n}: swiglu`);
      close(t, got.dg, want.dg, tol, `${dtype} n=${n}: swiglu dg`);
      close(t, got.du, want.du, tol, `${dtype} n=${n}: swiglu du`);
    }
});

t.test('fast exp: accurate over the whole range, NaN and infinities handled', async (t) => {
  // sigmoid(g) = h / g for u = 1: exp(-g) over [-104, 104] against float64
  const g: number[] = [];
  for (let x = -104; x <= 104; x += 0.0137) g.push(x);
  g.push(-87.5, -88.8, 88.5, 88.8, -1e-30, 1e-30, 0);
  const G = Tensor.from(g, [g.length]), U = Tensor.full([g.length], 1);
  const h = arr(ops.swiglu(G, U));
  let worst = 0;
  for (let i = 0; i < g.length; i++) {
    const want = g[i] / (1 + Math.exp(-Math.fround(g[i])));
    const err = Math.abs(h[i] - want) / Math.max(Math.abs(want), 1e-38);
    if (Math.abs(want) > 1e-30) worst = Math.max(worst, err);
  }
  t.ok(worst < 4e-7, `silu within ${worst.toExponential(2)} relative of float64 (< 4e-7, ~3 ulp)`);
  const special = arr(ops.swiglu(Tensor.from([NaN, Infinity, -Infinity, 100], [4]), Tensor.full([4], 1)));
  t.ok(Number.isNaN(special[0]), 'silu(NaN) = NaN');
  t.equal(special[1], Infinity, 'silu(+inf) = inf');
  t.ok(Number.isNaN(special[2]) || special[2] === 0, 'silu(-inf) = -inf * 0 (NaN, as expf gives)');
  t.equal(special[3], 100, 'silu(100) = 100');
  // a NaN logit makes its row's loss NaN; a -inf logit has probability 0
  const logits = Tensor.from([1, NaN, 2, 3, 1, -Infinity, 2, 3], [2, 4]);
  const { losses } = ops.crossEntropy(logits, Tensor.from([0, 0], [2], { dtype: 'i32' }));
  const l = arr(losses);
  t.ok(Number.isNaN(l[0]), 'a NaN logit gives a NaN loss, not a hidden one');
  const lse = Math.log(Math.exp(1) + Math.exp(2) + Math.exp(3));
  t.ok(Math.abs(l[1] - (lse - 1)) < 1e-6, 'a -inf logit adds nothing to the softmax');
});

t.test('row kernels: cross-entropy, rmsnorm, attention near the reference path', async (t) => {
  for (const [R, V] of [[1, 1], [3, 7], [5, 17], [64, 259], [7, 5003]]) {
    const z = randomTensor([R, V], R * V, { scale: 3 });
    const targets = Tensor.from(Array.from({ length: R }, (_, i) => (i === 1 ? -1 : (i * 7) % V)), [R], { dtype: 'i32' });
    const dl = randomTensor([R], 5);
    const run = () => {
      const { losses, predictions } = ops.crossEntropy(z.t, targets);
      const dz = ops.crossEntropyBackward(z.t, targets, dl.t);
      return { losses: arr(losses), predictions: arr(predictions), dz: arr(dz) };
    };
    const got = run(), want = reference(run);
    exact(t, got.predictions, want.predictions, `[${R}, ${V}]: argmax`);
    close(t, got.losses, want.losses, 2e-6, `[${R}, ${V}]: losses`);
    close(t, got.dz, want.dz, 2e-6, `[${R}, ${V}]: dlogits`);
  }
  for (const [R, d] of [[1, 2], [3, 7], [9, 33], [130, 64], [5, 1000]]) {
    const x = randomTensor([R, d], R + d), w = randomTensor([d], d), dy = randomTensor([R, d], R * d);
    const { y, rstd } = ops.rmsnorm(x.t, w.t);
    const { dx, dw } = ops.rmsnormBackward(x.t, w.t, rstd, dy.t);
    // float64 reference
    const yr: number[] = [], dxr: number[] = [], dwr = new Array(d).fill(0);
    for (let r = 0; r < R; r++) {
      const row = x.values.slice(r * d, r * d + d), g = dy.values.slice(r * d, r * d + d);
      const rs = 1 / Math.sqrt(row.reduce((a, v) => a + v * v, 0) / d + 1e-6);
      const dot = row.reduce((a, v, i) => a + w.values[i] * g[i] * v, 0) / d;
      for (let i = 0; i < d; i++) {
        yr.push(row[i] * rs * w.values[i]);
        dxr.push(rs * (w.values[i] * g[i] - row[i] * rs * rs * dot));
        dwr[i] += g[i] * row[i] * rs;
      }
    }
    close(t, arr(y), yr, 1e-5, `rmsnorm [${R}, ${d}]: y`);
    close(t, arr(dx), dxr, 1e-5, `rmsnorm [${R}, ${d}]: dx`);
    close(t, arr(dw!), dwr, 1e-5, `rmsnorm [${R}, ${d}]: dw`);
  }
  for (const [B, T, H, Hkv, hd] of [[1, 1, 1, 1, 1], [2, 9, 4, 2, 3], [1, 33, 2, 1, 16], [2, 70, 3, 3, 64]]) {
    const q = randomTensor([B * T, H * hd], T, { scale: 2 }), k = randomTensor([B * T, Hkv * hd], T + 1, { scale: 2 });
    const v = randomTensor([B * T, Hkv * hd], T + 2), dout = randomTensor([B * T, H * hd], T + 3);
    const o = { batch: B, heads: H, kvHeads: Hkv };
    const run = () => {
      const { out, lse } = ops.attention(q.t, k.t, v.t, o);
      const g = ops.attentionBackward(q.t, k.t, v.t, out, lse, dout.t, o);
      return { out: arr(out), lse: arr(lse), dq: arr(g.dq), dk: arr(g.dk), dv: arr(g.dv) };
    };
    const got = run(), want = reference(run);
    for (const key of ['out', 'lse', 'dq', 'dk', 'dv'] as const)
      close(t, got[key], want[key], 1e-5, `attention B=${B} T=${T} H=${H}/${Hkv} hd=${hd}: ${key}`);
  }
});

t.test('optimizer and MoE gather/scatter kernels: the same bits as the scalar loops', async (t) => {
  // AdamW as the plain formula in float32 steps (Math.fround after each operation)
  for (const n of SIZES) {
    const p = randomTensor([n], 1), g = randomTensor([n], 2), m = randomTensor([n], 3, { scale: 0.1 });
    const vv = rng(4).array(n, 0.01).map((x) => Math.abs(x));
    const v = Tensor.from(vv, [n]);
    const step = 3, lr = 1e-2, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1;
    const f = Math.fround;
    const bc1 = f(1 - Math.pow(f(b1), step)), bc2 = f(1 - Math.pow(f(b2), step));
    const want = p.values.map((pv, i) => {
      const gs = f(g.values[i] * 1);
      const mi = f(f(f(b1) * m.values[i]) + f(f(1 - f(b1)) * gs));
      const vi = f(f(f(b2) * f(vv[i])) + f(f(f(1 - f(b2)) * gs) * gs));
      return f(pv - f(f(lr) * f(f(f(mi / bc1) / f(f(Math.sqrt(f(vi / bc2))) + f(eps))) + f(f(wd) * pv))));
    });
    ops.adamw(p.t, g.t, m.t, v, { lr, step, beta1: b1, beta2: b2, eps, weightDecay: wd });
    exact(t, arr(p.t), want, `adamw n=${n}: every parameter as the float32 formula`);
  }
  const T = 37, K = 3, d = 19, n = T * K;
  const order = Tensor.from(Array.from({ length: n }, (_, i) => (i * 7) % n), [n], { dtype: 'i32' });
  const position = ops.invertPermutation(order);
  const x = randomTensor([T, d], 1), y = randomTensor([n, d], 2), gate = randomTensor([T, K], 3), dout = randomTensor([T, d], 4);
  const run = () => {
    const xp = ops.permute(x.t, order, K), dx = ops.permuteBackward(y.t, position, K);
    const out = ops.unpermute(y.t, position, gate.t), b = ops.unpermuteBackward(dout.t, y.t, position, gate.t);
    return { xp: arr(xp), dx: arr(dx), out: arr(out), dy: arr(b.dy), dg: arr(b.dg) };
  };
  const got = run(), want = reference(run);
  for (const key of ['xp', 'dx', 'out', 'dy', 'dg'] as const) exact(t, got[key], want[key], `permute family: ${key}`);
});

t.test('results do not depend on the thread count', async (t) => {
  // the same kernels on 1 thread (a child process) and on the default count (here): the same bits
  const script = `
const { ops } = require(${JSON.stringify(path.join(__dirname, '..', 'lib', 'index.ts'))});
const { randomTensor } = require(${JSON.stringify(path.join(__dirname, 'helpers', 'ref.ts'))});
const q = randomTensor([4 * 96, 4 * 32], 1).t, k = randomTensor([4 * 96, 2 * 32], 2).t, v = randomTensor([4 * 96, 2 * 32], 3).t;
const o = { batch: 4, heads: 4, kvHeads: 2 };
const a = ops.attention(q, k, v, o), g = ops.attentionBackward(q, k, v, a.out, a.lse, q, o);
const x = randomTensor([600, 512], 4).t, w = randomTensor([512], 5).t;
const r = ops.rmsnorm(x, w), rb = ops.rmsnormBackward(x, w, r.rstd, x);
const z = randomTensor([300, 4099], 6).t, tg = require(${JSON.stringify(path.join(__dirname, '..', 'lib', 'index.ts'))}).Tensor.from(Array.from({ length: 300 }, (_, i) => i), [300], { dtype: 'i32' });
const ce = ops.crossEntropy(z, tg), dz = ops.crossEntropyBackward(z, tg, ce.losses);
const s = ops.swiglu(x, x);
const all = [a.out, a.lse, g.dq, g.dk, g.dv, r.y, rb.dx, rb.dw, ce.losses, dz, s].map((t) => t.toArray());
console.log(JSON.stringify(all.map((v) => require('node:crypto').createHash('sha1').update(Buffer.from(new Float32Array(v).buffer)).digest('hex'))));`;
  const runWith = (threads: string) => {
    const r = spawnSync(process.execPath, [...process.execArgv, '-e', script], {
      encoding: 'utf8', env: { ...process.env, XFT_DEVICE: 'cpu', XFT_NUM_THREADS: threads, XFT_CPU_THREADS: threads },
    });
    if (r.status !== 0) throw new Error(r.stderr);
    return JSON.parse(r.stdout.trim().split('\n').at(-1)!) as string[];
  };
  t.same(runWith('1'), runWith('2'), 'attention, rmsnorm, cross-entropy, swiglu: 1 thread and 2 threads give the same bits');
});
