// Typed errors: bad shapes, dtypes, devices, values, and use after dispose.
import t from 'tap';
import { Tensor, XftError, ops } from '../lib/index';
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
