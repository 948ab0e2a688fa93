// Tensors: round trips for every dtype and device, bf16 rounding, fills, random, views, copies.
import t from 'tap';
import { Tensor, backend, manualSeed, type Device } from '../lib/index';
import { CUDA, SKIP_NO_CUDA, expectedBackend, roundBf16, rng } from './helpers/ref';

const devices: [Device, false | string][] = [['cpu', false], ['cuda', SKIP_NO_CUDA]];

t.test('backend reports a device', async (t) => {
  const b = backend();
  t.ok(b.kind === 'cpu' || b.kind === 'cuda');
  t.equal(typeof b.compiledWithCuda, 'boolean');
  if (b.kind === 'cuda') {
    t.type(b.name, 'string');
    t.ok(b.computeCapability![0] >= 8, 'compute capability 8.0 or newer');
    t.ok(b.totalMemory! > 0);
  } else {
    t.type(b.reason, 'string', 'says why there is no GPU');
  }
  t.equal(b.kind === 'cuda', CUDA);
});

for (const [device, skip] of devices) {
  t.test(`round trips on ${device}`, { skip }, async (t) => {
    const r = rng(1);
    const f = Float32Array.from({ length: 257 }, () => r.normal() * 100);
    const a = Tensor.from(f, [257], { device });
    t.same(a.toArray(), f, 'f32 exact');
    t.equal(a.device, device);
    t.same(a.shape, [257]);
    const ints = Int32Array.from({ length: 33 }, (_, i) => (i - 16) * 123456789);
    const b = Tensor.from(ints, [3, 11], { dtype: 'i32', device });
    t.same(b.toArray(), ints, 'i32 exact');
    t.ok(b.toArray() instanceof Int32Array);
    const c = Tensor.from(f, [257], { dtype: 'bf16', device });
    const back = c.toArray();
    t.ok(back instanceof Float32Array, 'bf16 comes back as Float32Array');
    t.same(Array.from(back), Array.from(f, roundBf16), 'bf16 rounds to nearest even');
    const empty = Tensor.from([], [0, 5], { device });
    t.equal(empty.toArray().length, 0, 'zero-element tensors work');
    const scalar = Tensor.from([7], [], { device });
    t.equal(scalar.item(), 7, 'rank-0 tensor');
    for (const x of [a, b, c, empty, scalar]) x.dispose();
  });

  t.test(`fills and random on ${device}`, { skip }, async (t) => {
    t.same(Array.from(Tensor.zeros([2, 3], { device }).toArray()), [0, 0, 0, 0, 0, 0]);
    t.same(Array.from(Tensor.full([4], 2.5, { device, dtype: 'bf16' }).toArray()), [2.5, 2.5, 2.5, 2.5]);
    t.same(Array.from(Tensor.full([2], -3, { device, dtype: 'i32' }).toArray()), [-3, -3]);
    const n = Tensor.randn([100000], { seed: 42, device }).toArray();
    let mean = 0, sq = 0;
    for (const v of n) mean += v / n.length;
    for (const v of n) sq += (v - mean) ** 2 / n.length;
    t.ok(Math.abs(mean) < 0.02, `randn mean ${mean}`);
    t.ok(Math.abs(Math.sqrt(sq) - 1) < 0.02, `randn std ${Math.sqrt(sq)}`);
    t.same(Tensor.randn([64], { seed: 42, device }).toArray(), n.slice(0, 64), 'same seed, same values (prefix-stable)');
    t.notSame(Tensor.randn([64], { seed: 43, device }).toArray(), n.slice(0, 64), 'another seed, other values');
    const u = Tensor.uniform([10000], { seed: 7, low: -2, high: 3, device }).toArray();
    t.ok(u.every((v) => v >= -2 && v < 3), 'uniform within [low, high)');
    const ids = Tensor.uniform([5000], { seed: 9, low: 0, high: 50, dtype: 'i32', device }).toArray();
    t.ok(ids.every((v) => Number.isInteger(v) && v >= 0 && v < 50), 'i32 uniform are integers in range');
    t.equal(new Set(ids).size, 50, 'every integer drawn');
    manualSeed(5);
    const s1 = Tensor.randn([8], { device }).toArray();
    manualSeed(5);
    const s2 = Tensor.randn([8], { device }).toArray();
    t.same(s1, s2, 'manualSeed makes unseeded draws reproducible');
  });

  t.test(`views, copies and casts on ${device}`, { skip }, async (t) => {
    const a = Tensor.from([0, 1, 2, 3, 4, 5], [2, 3], { device });
    const v = a.reshape([3, -1]);
    t.same(v.shape, [3, 2]);
    t.same(Array.from(v.toArray()), [0, 1, 2, 3, 4, 5]);
    const row = a.narrow(1, 1);
    t.same(Array.from(row.toArray()), [3, 4, 5], 'narrow selects rows');
    row.fill_(9);
    t.same(Array.from(a.toArray()), [0, 1, 2, 9, 9, 9], 'narrow is a view');
    const c = a.clone();
    c.fill_(1);
    t.same(Array.from(a.toArray()), [0, 1, 2, 9, 9, 9], 'clone is a copy');
    const h = a.cast('bf16').cast('i32');
    t.equal(h.dtype, 'i32');
    t.same(Array.from(h.toArray()), [0, 1, 2, 9, 9, 9]);
    t.same(Array.from(Tensor.from([1.7, -1.7, 2.5], [3], { device }).cast('i32').toArray()), [1, -1, 2], 'cast to i32 truncates');
    const dst = Tensor.zeros([2, 3], { device });
    dst.copy_(a);
    t.same(Array.from(dst.toArray()), [0, 1, 2, 9, 9, 9]);
    a.dispose();
    t.ok(v.disposed && row.disposed, 'disposing a tensor disposes its views');
  });
}

t.test('bf16 rounding edge cases', async (t) => {
  const cases = [1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -9, -(1 + 2 ** -8), 3.4e38, 1e-40, Infinity, -Infinity, 0, -0, 65504, 1 / 3];
  const got = Tensor.from(cases, [cases.length], { dtype: 'bf16' }).toArray();
  t.same(Array.from(got), cases.map(roundBf16));
  t.equal(got[0], 1, 'a tie rounds to even (down)');
  t.equal(got[1], 1 + 2 ** -6, 'a tie rounds to even (up)');
  t.equal(got[4], Infinity, 'overflow past the largest bf16 rounds to infinity');
  t.ok(Number.isNaN(Tensor.from([NaN], [1], { dtype: 'bf16' }).item()), 'NaN stays NaN');
});

t.test('cross-device copies', { skip: SKIP_NO_CUDA }, async (t) => {
  const f = Float32Array.from(rng(3).array(1000));
  for (const dtype of ['f32', 'bf16', 'i32'] as const) {
    const data = dtype === 'i32' ? Int32Array.from(f, (v) => Math.round(v * 1000)) : f;
    const c = Tensor.from(data, [1000], { dtype });
    const g = c.to('cuda');
    t.equal(g.device, 'cuda');
    const back = g.to('cpu');
    t.same(back.toArray(), c.toArray(), `${dtype} cpu -> cuda -> cpu`);
    const gg = Tensor.randn([1000], { seed: 11, dtype: dtype === 'i32' ? 'f32' : dtype, device: 'cuda' });
    const cc = Tensor.randn([1000], { seed: 11, dtype: dtype === 'i32' ? 'f32' : dtype, device: 'cpu' });
    const a = gg.toArray(), b = cc.toArray();
    let maxd = 0;
    for (let i = 0; i < a.length; i++) maxd = Math.max(maxd, Math.abs(a[i] - b[i]));
    t.ok(maxd < 1e-5, `seeded randn agrees across devices (max diff ${maxd})`);
    t.same(Tensor.uniform([1000], { seed: 4, device: 'cuda' }).toArray(), Tensor.uniform([1000], { seed: 4 }).toArray(),
      'seeded uniform is bit-identical across devices');
    // a + (b - a) u with a != 0, as a weight init (±1/√2048): an FMA on the device alone would move the
    // last bit of about half the values (cuda/dev/emu/check.sh contract compiles the kernels that way)
    const bound = 1 / Math.sqrt(2048);
    for (const [low, high, dt] of [[-bound, bound, 'f32'], [-bound, bound, 'bf16'], [-3, 8, 'i32'], [-1000003, 1000001, 'i32']] as const) {
      const opts = { seed: 12, low, high, dtype: dt } as const;
      t.same(Tensor.uniform([4096], { ...opts, device: 'cuda' }).toArray(), Tensor.uniform([4096], opts).toArray(),
        `seeded uniform in [${low.toPrecision(4)}, ${high.toPrecision(4)}) ${dt} is bit-identical across devices`);
    }
  }
});

t.test('the backend is the one this machine should have (decided without asking the backend)', async (t) => {
  const b = backend();
  t.equal(b.kind, expectedBackend(b.compiledWithCuda), `kind ${b.kind} (${b.kind === 'cpu' ? b.reason : b.name})`);
});
