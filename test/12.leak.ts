// Memory is released deterministically by dispose(), and by the finalizer when forgotten.
import t from 'tap';
import * as v8 from 'node:v8';
import * as vm from 'node:vm';
import { Tensor, memoryStats, resetPeakMemory, ops, type Device } from '../lib/index';
import { SKIP_NO_CUDA } from './helpers/ref';

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;

const devices: [Device, false | string][] = [['cpu', false], ['cuda', SKIP_NO_CUDA]];

function live(device: Device) {
  const m = memoryStats();
  return device === 'cpu' ? { bytes: m.hostBytes, count: m.hostTensors } : { bytes: m.cudaBytes, count: m.cudaTensors };
}

for (const [device, skip] of devices) {
  t.test(`dispose releases at once on ${device}`, { skip }, async (t) => {
    const before = live(device);
    const rssBefore = process.memoryUsage().rss;
    const poolBefore = memoryStats().poolUsedBytes ?? 0;
    for (let i = 0; i < 2000; i++) {
      const a = Tensor.randn([256, 256], { seed: i, device });
      const b = a.cast('bf16');
      const logits = Tensor.randn([64, 7], { seed: i, device });
      const r = ops.routeShared(logits, { topK: 6 });
      if (i === 0) t.ok(live(device).bytes > before.bytes, 'allocations are counted');
      a.dispose();
      b.dispose();
      logits.dispose();
      r.dispose();
    }
    const after = live(device);
    t.equal(after.count, before.count, 'no tensor left alive');
    t.equal(after.bytes, before.bytes, 'no byte left allocated');
    if (device === 'cuda') t.equal(memoryStats().poolUsedBytes, poolBefore, 'the pool is back where it started');
    const grown = process.memoryUsage().rss - rssBefore;
    t.ok(grown < 64 * 2 ** 20, `process memory stays flat (grew ${(grown / 2 ** 20).toFixed(1)} MiB over ~1 GiB allocated)`);
  });

  t.test(`the finalizer frees forgotten tensors on ${device}`, { skip }, async (t) => {
    const before = live(device);
    (() => {
      for (let i = 0; i < 200; i++) Tensor.zeros([1024], { device });
    })();
    t.ok(live(device).count >= before.count, 'forgotten tensors are alive until collected');
    for (let i = 0; i < 10 && live(device).count > before.count; i++) {
      gc();
      await new Promise((r) => setImmediate(r));
    }
    t.equal(live(device).count, before.count, 'collected tensors released their memory');
  });
}

for (const [device, skip] of devices)
  t.test(`the peak of live bytes on ${device} is tracked and can be reset`, { skip }, async (t) => {
    const peak = () => (device === 'cpu' ? memoryStats().hostPeakBytes : memoryStats().cudaPeakBytes);
    resetPeakMemory();
    const base = live(device).bytes;
    t.equal(peak(), base, 'after a reset the peak is what is live');
    const a = Tensor.zeros([1 << 20], { device }), b = Tensor.zeros([1 << 19], { device });
    a.dispose();
    t.equal(peak(), base + 6 * 2 ** 20, 'the peak holds the most bytes live at once (4 MiB + 2 MiB)');
    b.dispose();
    t.equal(live(device).bytes, base);
    t.equal(peak(), base + 6 * 2 ** 20, 'and stays after they are freed');
    resetPeakMemory();
    t.equal(peak(), base, 'until the next reset');
  });
