// Data-parallel arithmetic without communication (lib/dist/shard.ts): the batch split, the buckets, the
// ZeRO partitions; and the data-parallel trainer (lib/dist/ddp.ts, zero.ts) in a world of one process,
// which must be the plain run: the same losses, the same weights, the same full optimizer state.
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { tinyConfig } from '../lib/config';
import { createDense, upcycle } from '../lib/xft';
import { ByteTokenizer, toRows } from '../lib/data';
import { train, disposeState, type TrainOptions } from '../lib/train';
import { stateTensors } from '../lib/optim';
import { rankBatch, buckets, flatPieces, shardSize, assignWhole } from '../lib/dist/shard';
import { DataParallel } from '../lib/dist/ddp';
import { SoloGroup } from '../lib/dist/collectives';
import { throwsCode } from './helpers/check';
import { planMemory } from '../lib/plan';
import type { Model } from '../lib/model';

t.test('rankBatch: the same micro-batches of a step, split contiguously over ranks; sizes that do not split are refused', async (t) => {
  t.same(rankBatch(12, 2, 1, 0), { microBatches: 6, localMicroBatches: 6, firstMicroBatch: 0, firstSequence: 0, sequences: 12 });
  t.same(rankBatch(12, 2, 3, 2), { microBatches: 6, localMicroBatches: 2, firstMicroBatch: 4, firstSequence: 8, sequences: 4 });
  // every micro-batch of the step is run by exactly one rank, whatever the world size
  for (const W of [1, 2, 3, 6]) {
    const seen = Array.from({ length: W }, (_, r) => rankBatch(12, 2, W, r)).flatMap((b) => Array.from({ length: b.localMicroBatches }, (_, k) => b.firstMicroBatch + k));
    t.same(seen, [0, 1, 2, 3, 4, 5], `world ${W}`);
  }
  throwsCode(t, () => rankBatch(12, 4, 2, 0), 'XFT_VALUE', /batch size 12 must be micro-batch × accumulation steps × world size: 3 micro-batches of 4 do not split over 2 ranks/, '4 micro-batches of 3 over 2 ranks');
  throwsCode(t, () => rankBatch(12, 5, 1, 0), 'XFT_VALUE', /micro-batch 5 must divide the batch size 12/, 'a micro-batch that does not divide');
  throwsCode(t, () => rankBatch(12, 2, 2, 2), 'XFT_VALUE', /rank 2 is out of range for a world of 2/, 'rank 2 of 2');
});

t.test('buckets follow the given order, cap their bytes, split dtypes; flat pieces tile each bucket; whole tensors balance', async (t) => {
  const ps = [10, 3, 7, 20, 1].map((numel, i) => ({ id: i, numel, gradDtype: 'f32' as const, valueDtype: (i === 4 ? 'bf16' : 'f32') as 'f32' | 'bf16' }));
  const bs = buckets(ps, (p) => p, 14 * 4, 3);
  t.same(bs.map((b) => b.params.map((p) => p.id)), [[0, 1], [2], [3], [4]], 'capped at 14 elements; a larger tensor alone; a new weight dtype opens a bucket');
  t.same(bs.map((b) => [b.numel, b.padded]), [[13, 15], [7, 9], [20, 21], [1, 3]]);
  for (const b of bs)
    for (let i = 0; i < b.params.length; i++) {
      // the ranks' pieces of a parameter are disjoint and cover it, and sit at their place in the shard
      const pieces = [0, 1, 2].map((r) => flatPieces(b, 3, r)[i]).filter((p) => p.end > p.start);
      t.equal(pieces.reduce((a, p) => a + p.end - p.start, 0), b.numels[i]);
      pieces.forEach((p, k) => k > 0 && t.equal(p.start, pieces[k - 1].end));
      for (const p of pieces) t.ok(p.shardOffset + p.end - p.start <= shardSize(b, 3));
    }
  t.same(assignWhole([5, 9, 1, 4, 4], 2), [1, 0, 1, 1, 0], 'largest first to the least loaded rank');
  t.same(assignWhole([5, 9], 1), [0, 0]);
});

const tok = new ByteTokenizer();
const text = fs.readFileSync(path.join(__dirname, '..', 'lib', 'errors.ts'), 'utf8');
const ids = tok.encode(text).slice(0, 12 * 17 + 1);
const rows = toRows([{ ids: ids.slice(0, -1), targets: ids.slice(1) }], 16, 'pack', tok.pad);
const config = tinyConfig({ hidden_size: 16, intermediate_size: 32, num_attention_heads: 2, num_key_value_heads: 1, num_hidden_layers: 2 });

function run(make: () => Model, options: TrainOptions) {
  const m = make();
  const r = train(m, rows, options);
  const weights = new Map(m.params().map((p) => [p.name, p.value.toArray()]));
  const state = options.parallel instanceof DataParallel ? options.parallel.fullState(r.state) : r.state;
  const named = new Map(stateTensors(state).map(([n, x]) => [n, x.toArray()]));
  if (state !== r.state) disposeState(state);
  disposeState(r.state);
  (options.parallel as DataParallel | undefined)?.dispose();
  m.dispose();
  return { losses: r.losses, weights, state: named };
}

for (const optimizer of ['adamw', 'adafactor'] as const)
  t.test(`a world of one process is the plain run (${optimizer}; replicated and ZeRO stage 1; small buckets)`, async (t) => {
    const moe = () => {
      const d = createDense(config, { seed: 4 });
      const m = upcycle(d, { experts: 4, topK: 2, seed: 1 });
      d.dispose();
      return m;
    };
    const base: TrainOptions = { lr: 3e-3, batchSize: 4, microBatch: 2, steps: 3, warmupSteps: 1, seed: 2, optimizer, weightDecay: 0.1 };
    const plain = run(moe, base);
    for (const zero of [0, 1] as const) {
      const d = run(moe, { ...base, parallel: new DataParallel(new SoloGroup(), { zero, bucketBytes: 3000 }) });
      t.same(d.losses, plain.losses, `zero ${zero}: the same losses, bit for bit`);
      t.same([...d.weights.keys()], [...plain.weights.keys()]);
      t.ok([...plain.weights].every(([n, w]) => Buffer.compare(Buffer.from(w.buffer), Buffer.from(d.weights.get(n)!.buffer)) === 0), `zero ${zero}: the same weights`);
      t.same([...d.state.keys()].sort(), [...plain.state.keys()].sort(), `zero ${zero}: the full state has the same tensors`);
      t.ok([...plain.state].every(([n, w]) => Buffer.compare(Buffer.from(w.buffer), Buffer.from(d.state.get(n)!.buffer)) === 0), `zero ${zero}: and the same values`);
    }
  });

t.test('xft plan per rank: ZeRO stage 1 divides the optimizer state (AdamW by 1/W, Adafactor by whole tensors)', async (t) => {
  const src = { config: tinyConfig({ hidden_size: 64, intermediate_size: 128, num_attention_heads: 4, num_key_value_heads: 2, num_hidden_layers: 4 }), kind: 'dense' as const };
  for (const optimizer of ['adamw', 'adafactor'] as const)
    for (const precision of ['mixed', 'f32'] as const) {
      const one = planMemory(src, { optimizer, precision });
      const replicated = planMemory(src, { optimizer, precision, worldSize: 4 });
      const sharded = planMemory(src, { optimizer, precision, worldSize: 4, zero: 1 });
      t.same(replicated.peak, one.peak, `${optimizer} ${precision}: a replicated rank holds what one process does`);
      t.equal(sharded.worldSize, 4);
      const o1 = one.peak.optimizer, o4 = sharded.peak.optimizer;
      if (optimizer === 'adamw') {
        t.ok(Math.abs(o4 - o1 / 4) <= 4, `${optimizer} ${precision}: optimizer state ${o1} -> ${o4} bytes (1/4)`);
        t.ok(Math.abs(sharded.peak.gradients - one.peak.gradients * 1.25) <= 4, 'plus the reduce-scattered gradient shard');
      } else t.ok(o4 < o1 && o4 >= o1 / 4, `${optimizer} ${precision}: optimizer state ${o1} -> ${o4} bytes (the most loaded rank's whole tensors)`);
    }
  throwsCode(t, () => planMemory(src, { worldSize: 0 }), 'XFT_VALUE', /worldSize/, 'world size 0');
});
