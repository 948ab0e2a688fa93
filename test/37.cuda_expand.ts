// The expand kernels (cuda/expand.cu: UpIT's delta dots and fused DARE crossover) on CUDA against their CPU
// twin (binding/cpu/expand.cc), bit for bit: the dots' reduction order and the counter-based keep masks are
// the same on both, so any difference is a bug. Fresh random inputs (the seed is printed), every new device
// allocation poisoned (NaN / -1) so that an output element left unwritten fails. Shapes cover the scalar
// tails of a lane's group of 4, one block, several, and the most (256, lanes wrapping around past 65536
// groups), several passes of 8 others; expandPool on CUDA writes the child the CPU writes.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Tensor, ops } from '../lib/index';
import { tinyConfig } from '../lib/config';
import { createDense } from '../lib/xft';
import { loadModel, saveModel } from '../lib/checkpoint';
import { SafetensorsReader } from '../lib/safetensors';
import { dareMerge, deltaDots } from '../lib/upit/ops';
import { expandPool } from '../lib/upit/expand';
import { SKIP_NO_CUDA } from './helpers/ref';
import { exact } from './helpers/check';
import { fastCases, pair, seed, setupGpuTest } from './helpers/gpu';

setupGpuTest(t);

const DOTS: { n: number; others: number; what: string }[] = [
  { n: 1, others: 1, what: 'one element' },
  { n: 7, others: 10, what: 'a partial group, two passes of others' },
  { n: 1003, others: 3, what: 'one block' },
  { n: 5003, others: 2, what: 'five blocks, the last partial' },
  { n: 4 * 65536 + 9, others: 2, what: 'lanes wrap around' },
];

for (const dtype of ['f32', 'bf16'] as const)
  t.test(`deltaDots: CUDA = CPU bit for bit, ${dtype}`, { skip: SKIP_NO_CUDA }, async (t) => {
    for (const c of fastCases(t, DOTS, (c) => c.n * c.others, 20000)) {
      const b0 = pair([c.n], dtype), a = pair([c.n], dtype), others = Array.from({ length: c.others }, () => pair([c.n], dtype));
      const cpu = deltaDots(b0.cpu, a.cpu, [a.cpu, ...others.map((o) => o.cpu)]);
      const gpu = deltaDots(b0.cuda, a.cuda, [a.cuda, ...others.map((o) => o.cuda)]);
      exact(t, gpu, cpu, `${c.what} (n ${c.n}, ${c.others + 1} products)`);
      [b0, a, ...others].forEach((p) => { p.cpu.dispose(); p.cuda.dispose(); });
    }
  });

const CHILD: { n: number; p: number; what: string }[] = [
  { n: 1, p: 0.5, what: 'one element' },
  { n: 1000, p: 0, what: 'p = 0' },
  { n: 5003, p: 0.5, what: 'p = 0.5, 20 blocks' },
  { n: 2000, p: 0.9, what: 'p = 0.9' },
];

for (const dtype of ['f32', 'bf16'] as const)
  for (const out of ['f32', 'bf16'] as const)
    t.test(`dareMerge: CUDA = CPU bit for bit, ${dtype} -> ${out}`, { skip: SKIP_NO_CUDA }, async (t) => {
      for (const c of CHILD) {
        const b0 = pair([c.n], dtype, { std: 0.02 }), a = pair([c.n], dtype, { std: 0.02 }), b = pair([c.n], dtype, { std: 0.02 });
        const o = { alpha: 0.3125, beta: 0.6875, dropRate: c.p, seed: seed(), tensorId: c.n % 7, dtype: out };
        const cc = dareMerge(b0.cpu, a.cpu, b.cpu, o), cg = dareMerge(b0.cuda, a.cuda, b.cuda, o);
        t.equal(cg.device, 'cuda');
        exact(t, cg.toArray(), cc.toArray(), `${c.what} (n ${c.n})`);
        [b0, a, b].forEach((p) => { p.cpu.dispose(); p.cuda.dispose(); });
        [cc, cg].forEach((x) => x.dispose());
      }
    });

// XFT_TEST_FAST=1 (CI's shake and asan runs) leaves it out: the op tests above cover the kernels there
t.test('expandPool on CUDA writes the children of the CPU, bit for bit', { skip: SKIP_NO_CUDA || process.env.XFT_TEST_FAST === '1' }, async (t) => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-cuda-expand-'));
  t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
  const at = (n: string) => path.join(tmp, n);
  const config = tinyConfig({ hidden_size: 16, intermediate_size: 24, num_attention_heads: 2, num_key_value_heads: 1, vocab_size: 24, num_hidden_layers: 1 });
  const base = createDense(config, { seed: 1 });
  saveModel(base, at('base'));
  base.dispose();
  const pool = [2, 3].map((s) => {
    const m = loadModel(at('base'));
    for (const p of m.params()) {
      const d = Tensor.randn(p.value.shape, { seed: seed(), std: 0.01 }), v = ops.add(p.value, d);
      p.value.copy_(v);
      [d, v].forEach((x) => x.dispose());
    }
    saveModel(m, at(`m${s}`));
    m.dispose();
    return at(`m${s}`);
  });
  const cpu = expandPool({ base: at('base'), pool, experts: 3, out: at('cpu'), seed: 3 });
  const gpu = expandPool({ base: at('base'), pool, experts: 3, out: at('cuda'), seed: 3, device: 'cuda' });
  t.same(gpu.rounds.map((r) => [r.parents, r.alpha, r.similarity]), cpu.rounds.map((r) => [r.parents, r.alpha, r.similarity]), 'the same parents, α and similarities');
  const a = new SafetensorsReader(cpu.rounds[0].child), b = new SafetensorsReader(gpu.rounds[0].child);
  t.ok(a.names().every((n) => Buffer.compare(a.readBytes(n), b.readBytes(n)) === 0), 'the child: the same bits');
});
