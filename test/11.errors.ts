// Typed errors: bad shapes, dtypes, devices, values, and use after dispose.
import t from 'tap';
import { Tensor, XftError, ops, disposeAll, manualSeed, memoryStats, upcycle, countParameters } from '../lib/index';
import { CUDA } from './helpers/ref';
import { native } from '../lib/native';

function throwsCode(t: TapTest, fn: () => unknown, code: string, match?: RegExp, what?: string) {
  try {
    fn();
    t.fail(`${what ?? 'call'} should throw ${code}`);
  } catch (err) {
    t.ok(err instanceof XftError, `${what ?? 'call'}: throws XftError (${(err as Error).message})`);
    t.equal((err as XftError).code, code, `${what ?? 'call'}: code ${code}`);
    if (match) t.match((err as Error).message, match, `${what ?? 'call'}: message names the problem`);
  }
}
type TapTest = tap.Test;

t.test('tensor creation errors', async (t) => {
  throwsCode(t, () => Tensor.from([1, 2, 3], [2, 2]), 'XFT_SHAPE', /3 elements but shape \[2, 2\] needs 4/, 'numel mismatch');
  throwsCode(t, () => Tensor.zeros([2, -1]), 'XFT_SHAPE', /shape/, 'negative dim');
  throwsCode(t, () => Tensor.zeros([1.5]), 'XFT_SHAPE', /shape/, 'fractional dim');
  throwsCode(t, () => Tensor.zeros([2], { dtype: 'f16' as never }), 'XFT_DTYPE', /dtype/, 'unknown dtype');
  throwsCode(t, () => Tensor.zeros([2], { device: 'tpu' as never }), 'XFT_DEVICE', /device/, 'unknown device');
  throwsCode(t, () => Tensor.from([1.5], [1], { dtype: 'i32' }), 'XFT_DTYPE', /data\[0\]/, 'non-integer i32 data');
  throwsCode(t, () => Tensor.from('abc' as never, [3]), 'XFT_TYPE', /data/, 'string data');
  throwsCode(t, () => Tensor.from([1, 2], [2]).reshape([3]), 'XFT_SHAPE', /reshape/, 'bad reshape');
  throwsCode(t, () => Tensor.from([1, 2], [2]).narrow(1, 2), 'XFT_SHAPE', /narrow/, 'bad narrow');
  throwsCode(t, () => Tensor.from([1, 2], [2]).item(), 'XFT_SHAPE', /one element/, 'item of many');
  throwsCode(t, () => Tensor.uniform([2], { low: 1, high: 0 }), 'XFT_VALUE', /high/, 'uniform high < low');
  throwsCode(t, () => Tensor.randn([2], { seed: 0.5 }), 'XFT_TYPE', /seed/, 'fractional seed');
  throwsCode(t, () => Tensor.zeros([2]).copy_(Tensor.zeros([3])), 'XFT_SHAPE', /copy_/, 'copy_ size mismatch');
});

t.test('the cases of issue 10 are XftErrors, thrown before anything is allocated', async (t) => {
  const x = Tensor.randn([6, 8], { seed: 1 }), w = Tensor.randn([3, 5, 8], { seed: 2 }), offsets = Tensor.from([0, 2, 4, 6], [4], { dtype: 'i32' });
  const dy = Tensor.randn([6, 5], { seed: 3 }), stack = Tensor.randn([3, 4], { seed: 4 }), alpha = Tensor.zeros([2]), dm = Tensor.zeros([4]);
  const live = memoryStats().hostTensors;
  const fake = Object.create(Tensor.prototype) as Tensor;
  throwsCode(t, () => ops.add(fake, fake), 'XFT_TYPE', /a Tensor for a/, 'an object that only looks like a Tensor');
  throwsCode(t, () => fake.toArray(), 'XFT_TYPE', /Tensor.toArray/, 'a method called on it');
  throwsCode(t, () => fake.numel, 'XFT_TYPE', /Tensor.numel/, 'a getter read on it');
  throwsCode(t, () => fake.dispose(), 'XFT_TYPE', /Tensor.dispose/, 'dispose() on it');
  t.equal(fake.describe(), 'an object that is not a Tensor made by xft', 'describe() never throws (error messages use it)');
  t.notOk(Tensor.isTensor(fake), 'Tensor.isTensor tells it apart');
  throwsCode(t, () => Tensor.empty([2], null as never), 'XFT_TYPE', /options/, 'Tensor.empty options null');
  throwsCode(t, () => Tensor.from([1], [1], null as never), 'XFT_TYPE', /options/, 'Tensor.from options null');
  for (const bad of [null, 5, 'x'])
    throwsCode(t, () => ops.groupedGemm(x, w, offsets, bad as never), 'XFT_TYPE', /groupedGemm: .*options/, `groupedGemm options ${String(bad)}`);
  throwsCode(t, () => ops.groupedGemmBackward(x, w, offsets, dy, null as never), 'XFT_TYPE', /options/, 'groupedGemmBackward options null');
  throwsCode(t, () => ops.mergeExpertsBackward([stack], alpha, 0.5, [dm], null as never), 'XFT_TYPE', /options/, 'mergeExpertsBackward options null');
  throwsCode(t, () => x.reshape(null as never), 'XFT_SHAPE', /reshape.*shape/, 'reshape(null)');
  for (const seed of [1.5, NaN, 'abc', null]) throwsCode(t, () => manualSeed(seed as never), 'XFT_TYPE', /manualSeed.*seed/, `manualSeed(${String(seed)})`);
  // eslint-disable-next-line no-sparse-arrays
  throwsCode(t, () => ops.sumSquares([x, , x] as never), 'XFT_TYPE', /tensors\[1\]/, 'sumSquares on a sparse array');
  throwsCode(t, () => Tensor.from(new BigInt64Array(2) as never), 'XFT_TYPE', /data/, 'Tensor.from(BigInt64Array)');
  throwsCode(t, () => Tensor.from(['1', 2] as never), 'XFT_TYPE', /data\[0\]/, 'Tensor.from of strings');
  throwsCode(t, () => Tensor.from({ length: 2 ** 32 } as never), 'XFT_SHAPE', /elements/, 'Tensor.from({ length: 2**32 })');
  throwsCode(t, () => Tensor.zeros([2 ** 20, 2 ** 20]), 'XFT_SHAPE', /elements/, 'a tensor over the size limit');
  throwsCode(t, () => ops.crossEntropyBackward(x, offsets, undefined as never), 'XFT_TYPE', /dLoss/, 'crossEntropyBackward(l, t, undefined)');
  throwsCode(t, () => Tensor.randn([1000], { seed: 'bad' as never }), 'XFT_TYPE', /seed/, 'randn with a bad seed');
  throwsCode(t, () => Tensor.uniform([1000], { seed: 0.5 }), 'XFT_TYPE', /seed/, 'uniform with a bad seed');
  throwsCode(t, () => Tensor.full([2], 1.5, { dtype: 'i32' }), 'XFT_VALUE', /32-bit integer/, 'a fractional i32 fill');
  throwsCode(t, () => ops.tanh(x.narrow(1, 2)), 'XFT_SHAPE', /view/, 'a view into an op');
  throwsCode(t, () => upcycle({} as never), 'XFT_TYPE', /dense/, 'upcycle of a non-model');
  throwsCode(t, () => countParameters(null as never), 'XFT_TYPE', /Model/, 'countParameters(null)');
  t.equal(memoryStats().hostTensors, live, 'none of these calls allocated a tensor');
  const cyclic: Record<string, unknown> = { t: Tensor.zeros([2]) };
  cyclic.self = cyclic;
  cyclic.list = [cyclic, new Map([['m', Tensor.zeros([1])]])];
  disposeAll(cyclic);
  t.equal(memoryStats().hostTensors, live, 'disposeAll follows cycles, arrays, Maps and plain objects');
  disposeAll(x, w, offsets, dy, stack, alpha, dm);
});

t.test('use after dispose', async (t) => {
  const a = Tensor.zeros([4]);
  const view = a.reshape([2, 2]);
  a.dispose();
  a.dispose(); // idempotent
  t.ok(a.disposed);
  t.equal(String(a), 'Tensor(f32[4]@cpu, disposed)');
  throwsCode(t, () => a.toArray(), 'XFT_DISPOSED', /after dispose/, 'toArray');
  throwsCode(t, () => a.to('cpu'), 'XFT_DISPOSED', /after dispose/, 'to');
  throwsCode(t, () => a.reshape([2, 2]), 'XFT_DISPOSED', /after dispose/, 'reshape');
  throwsCode(t, () => ops.mergeExperts([view], Tensor.zeros([1]), 0.5), 'XFT_DISPOSED', /weights\[0\].*after dispose/, 'op input');
});

t.test('cuda unavailable is a clear error', { skip: CUDA ? 'a CUDA device is present' : false }, async (t) => {
  throwsCode(t, () => Tensor.zeros([2], { device: 'cuda' }), 'XFT_DEVICE', /cuda.*not available/, 'cuda tensor without a GPU');
});

t.test('native layer rejects what slips past', async (t) => {
  // the binding re-checks sizes even when called directly
  const s = native.alloc(0, 8, {});
  throwsCode(t, () => native.fillValue(s, 0, 100, 1), 'XFT_SHAPE', /holds 8 bytes/, 'fill beyond storage');
  throwsCode(t, () => native.fillValue({} as never, 0, 1, 1), 'XFT_TYPE', /storage/, 'not a storage');
  throwsCode(t, () => native.fillValue(s, 7, 1, 1), 'XFT_DTYPE', /dtype/, 'bad dtype code');
  throwsCode(t, () => native.alloc(0, -1, {}), 'XFT_SHAPE', /bytes/, 'negative size');
  throwsCode(t, () => native.fillValue(123456789 as never, 0, 1, 1), 'XFT_TYPE', /storage/, 'a number that names no storage');
  t.equal(native.free(s), true, 'free releases');
  t.equal(native.free(s), false, 'a second free is a no-op');
  throwsCode(t, () => native.fillValue(s, 0, 1, 1), 'XFT_DISPOSED', /after dispose/, 'disposed storage');
});
