// UpIT stage 3 (UPIT.md §7.5, §7.6): seed rows and per-row NLL (against a per-row evaluate), bucket
// assignment (a partition of D_s, the argmin recomputed by brute force, identical experts all to
// expert 0, balanced and random modes, a warning per empty bucket), the FFN-input probe of
// Model.forward, the routing-vector probe's gradient against finite differences, and
// preoptimizeRouting on a tiny model (mean σ(r·x) >= 0.9 over the bucket's tokens, the trunk
// untouched, an empty bucket leaving r at 0 with a warning, readRoutingVectors' typed errors).
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { tinyConfig } from '../lib/config';
import { createDense } from '../lib/xft';
import { type Sample, toRows, seededRandom } from '../lib/data';
import { evaluate } from '../lib/train';
import { loadModel, saveModel } from '../lib/checkpoint';
import { Tensor } from '../lib/tensor';
import { SafetensorsReader, writeSafetensors } from '../lib/safetensors';
import type { Model } from '../lib/model';
import { seedIndices, rowLosses, assignBuckets, argminNaNLast } from '../lib/upit/seed';
import { preoptimizeRouting, readRoutingVectors, readProbeStats, routingProbe, routingVectorName, ROUTING_VECTORS_FILE } from '../lib/upit/route';
import * as routerOps from '../lib/ops_router';
import { throwsCode, close, exact } from './helpers/check';
import { SKIP_NO_CUDA } from './helpers/ref';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-upit-route-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

const SEQ = 16;
const config = tinyConfig({ hidden_size: 32, intermediate_size: 64, num_attention_heads: 4, num_key_value_heads: 2 });

/** n samples of 4..SEQ tokens: a masked prompt then a response, from a seed; padded rows of SEQ tokens. */
function makeRows(n: number, seed: number, vocab = 200): Sample[] {
  const rand = seededRandom(seed);
  const samples: Sample[] = Array.from({ length: n }, () => {
    const len = 4 + Math.floor(rand() * (SEQ - 3)), prompt = 1 + Math.floor(rand() * (len - 2));
    const ids = Array.from({ length: len }, () => 1 + Math.floor(rand() * (vocab - 1)));
    const targets = ids.map((_, i) => (i >= prompt && i + 1 < len ? ids[i + 1] : -1));
    return { ids, targets };
  });
  return toRows(samples, SEQ, 'pad', 0);
}

/**
 * A random tiny expert. With `offset`, every embedding row gets one shared vector of that size added:
 * hidden states then share a direction, as real LLMs' do (anisotropy), which a routing vector can find.
 */
function saveExpert(name: string, seed: number, std = 0.3, offset = 0): string {
  const dir = path.join(tmp, name);
  const m = createDense(config, { seed, std });
  if (offset) {
    const e = m.embed.value.toArray(), d = config.hidden_size, g = seededRandom(seed);
    const shared = Array.from({ length: d }, () => (g() < 0.5 ? -offset : offset));
    for (let i = 0; i < e.length; i++) e[i] += shared[i % d];
    const t = Tensor.from(e, m.embed.value.shape);
    m.embed.value.copy_(t);
    t.dispose();
  }
  saveModel(m, dir);
  m.dispose();
  return dir;
}

/** Every tensor of two checkpoint folders, by name: equal bit for bit (the names in `changed` must differ instead). */
function compareFolders(a: string, b: string, changed: (name: string) => boolean): { same: string[]; differ: string[] } {
  const ra = new SafetensorsReader(a), rb = new SafetensorsReader(b);
  const same: string[] = [], differ: string[] = [];
  for (const n of ra.names()) {
    const x = ra.readF32(n), y = rb.readF32(n);
    const eq = x.length === y.length && x.every((v, i) => Object.is(v, y[i]));
    (eq === !changed(n) ? same : differ).push(n);
  }
  return { same, differ };
}

t.test('seedIndices: round(0.01·n) distinct ascending indices, seeded', async (t) => {
  const s = seedIndices(1000);
  t.equal(s.length, 10, '|D_s| = round(0.01·1000) = 10');
  t.ok(s.every((x, i) => Number.isInteger(x) && x >= 0 && x < 1000 && (i === 0 || x > s[i - 1])), 'distinct, ascending, in range');
  t.same(seedIndices(1000), s, 'deterministic');
  t.notSame(seedIndices(1000, 0.01, 7), s, 'another seed, another draw');
  t.equal(seedIndices(1234).length, 12, 'round(12.34) = 12');
  t.equal(seedIndices(1250).length, 13, 'round(12.5) = 13');
  t.equal(seedIndices(30).length, 1, 'at least one row');
  t.same(seedIndices(5, 1), [0, 1, 2, 3, 4], 'fraction 1: every row');
  throwsCode(t, () => seedIndices(0), 'XFT_VALUE', /n/, 'n = 0');
  throwsCode(t, () => seedIndices(10, 0), 'XFT_VALUE', /fraction/, 'fraction 0');
  throwsCode(t, () => seedIndices(10, 1.5), 'XFT_VALUE', /fraction/, 'fraction > 1');
  throwsCode(t, () => seedIndices(10, 0.1, -1), 'XFT_VALUE', /seed/, 'negative seed');
});

t.test('rowLosses: the mean NLL of each row equals a per-row evaluate', async (t) => {
  const m = createDense(config, { seed: 3, std: 0.3 });
  const rows = makeRows(9, 11);
  rows.push({ ids: rows[0].ids, targets: new Int32Array(SEQ).fill(-1) }); // no target tokens
  const one = rowLosses(m, rows, { microBatch: 1 });
  const four = rowLosses(m, rows, { microBatch: 4 });
  const ref = rows.slice(0, 9).map((r) => evaluate(m, [r]).loss);
  close(t, one.slice(0, 9), ref, 1e-12, 'one row per forward vs evaluate');
  close(t, four.slice(0, 9), ref, 1e-5, 'four rows per forward vs evaluate (padded rows are independent)');
  t.ok(ref.every((x) => x > 0 && Number.isFinite(x)), 'finite positive losses');
  t.ok(Number.isNaN(one[9]) && Number.isNaN(four[9]), 'a row without target tokens: NaN');
  // rows of two lengths in one call
  const short = { ids: rows[1].ids.slice(0, 8), targets: rows[1].targets.slice(0, 8) };
  const mixed = rowLosses(m, [rows[2], short, rows[3]]);
  close(t, [mixed[0], mixed[2]], [ref[2], ref[3]], 1e-5, 'rows of two lengths: each batch one length');
  close(t, [mixed[1]], [evaluate(m, [short]).loss], 1e-12, 'the short row');
  throwsCode(t, () => rowLosses(m, [{ ids: [1, 2], targets: [2, 999] }]), 'XFT_VALUE', /rows\[0\]\.targets\[1\]/, 'a target >= vocab');
  throwsCode(t, () => rowLosses(m, rows, { microBatch: 0 }), 'XFT_VALUE', /microBatch/, 'microBatch 0');
  throwsCode(t, () => rowLosses(m, [{ ids: [1, 2], targets: [2] }]), 'XFT_SHAPE', /rows\[0\]/, 'ids and targets of two lengths');
  m.dispose();
});

t.test('assignBuckets: a partition of D_s; each row to its lowest-NLL expert (§7.5)', async (t) => {
  const D = makeRows(1000, 5);
  const seed = seedIndices(D.length, 0.01, 3);
  t.equal(seed.length, Math.round(0.01 * D.length), '|D_s| = round(0.01·|D|)');
  const Ds = seed.map((i) => D[i]);
  const experts = [saveExpert('e0', 1), saveExpert('e1', 2), saveExpert('e2', 3)];
  const lines: string[] = [];
  const b = assignBuckets(experts, Ds, { onLog: (l) => lines.push(l), microBatch: 4 });
  t.equal(b.bucket.length, Ds.length, 'one bucket per row');
  t.ok(b.bucket.every((e) => Number.isInteger(e) && e >= 0 && e < 3), 'buckets in [0, E)');
  t.same(b.sizes, [0, 1, 2].map((e) => b.bucket.filter((x) => x === e).length), 'sizes count the rows');
  t.equal(b.sizes.reduce((a, x) => a + x, 0), Ds.length, 'a partition: every row in exactly one bucket');
  t.ok(lines.some((l) => /sizes \[/.test(l)), 'the sizes are logged');
  // brute force: every expert loaded again, every row evaluated alone
  const brute = experts.map((dir) => {
    const m = loadModel(dir);
    const l = Ds.map((r) => evaluate(m, [r]).loss);
    m.dispose();
    return l;
  });
  brute.forEach((l, e) => close(t, b.losses[e], l, 1e-5, `expert ${e}: losses vs a per-row evaluate`));
  const want = Ds.map((_, i) => argminNaNLast(brute.map((l) => l[i])));
  t.same(b.bucket, want, 'the argmin, recomputed by brute force');
  t.ok(new Set(b.bucket).size >= 2, `the experts differ: buckets ${JSON.stringify(b.sizes)}`);

  // identical experts: every row to expert 0, and a warning per empty bucket
  const same: string[] = [];
  const c = assignBuckets([experts[1], experts[1], experts[1]], Ds, { onLog: (l) => same.push(l) });
  t.ok(c.bucket.every((e) => e === 0), 'identical experts: every row to expert 0 (ties to the lower index)');
  t.same(c.sizes, [Ds.length, 0, 0]);
  t.equal(same.filter((l) => /warning.*expert [12].*empty/.test(l)).length, 2, 'a warning for each empty bucket');

  // balanced: the argmin of per-expert z-scores
  const z = assignBuckets(experts, Ds, { mode: 'balanced' });
  const zs = z.losses.map((l) => {
    const mean = l.reduce((a, x) => a + x, 0) / l.length, sd = Math.sqrt(l.reduce((a, x) => a + (x - mean) ** 2, 0) / l.length);
    return l.map((x) => (x - mean) / sd);
  });
  t.same(z.bucket, Ds.map((_, i) => argminNaNLast(zs.map((s) => s[i]))), "balanced: argmin of each expert's z-scored losses");
  t.same(z.losses, b.losses, 'balanced: the same losses');

  // random: a seeded deal, sizes within 1, no expert run
  const r1 = assignBuckets(experts, Ds, { mode: 'random', seed: 4 }), r2 = assignBuckets(experts, Ds, { mode: 'random', seed: 4 });
  t.same(r1.bucket, r2.bucket, 'random: deterministic under the seed');
  t.ok(Math.max(...r1.sizes) - Math.min(...r1.sizes) <= 1, `random: sizes within 1 (${r1.sizes})`);
  t.ok(r1.losses.every((l) => l.length === 0), 'random: no losses computed');

  t.equal(argminNaNLast([NaN, 2, 1, 1]), 2, 'NaN never wins; ties to the lower index');
  t.equal(argminNaNLast([NaN, NaN]), 0, 'all NaN: expert 0');
  throwsCode(t, () => assignBuckets([], Ds), 'XFT_VALUE', /experts/, 'no experts');
  throwsCode(t, () => assignBuckets([path.join(tmp, 'nope')], Ds), 'XFT_IO', /experts\[0\]/, 'a missing folder');
  throwsCode(t, () => assignBuckets(experts, Ds, { mode: 'best' as never }), 'XFT_VALUE', /mode/, 'an unknown mode');
});

t.test('Model.forward ffnInput: each layer FFN input once, the forward unchanged', async (t) => {
  const m = createDense(config, { seed: 4, std: 0.3 });
  const rows = makeRows(2, 8);
  const ids = Tensor.from([...rows[0].ids, ...rows[1].ids], [2 * SEQ], { dtype: 'i32' });
  const targets = Tensor.from([...rows[0].targets, ...rows[1].targets], [2 * SEQ], { dtype: 'i32' });
  const plain = m.forward(ids, targets, 2, SEQ, { training: false });
  const seen: { layer: number; shape: number[]; x: Float32Array }[] = [];
  const probed = m.forward(ids, targets, 2, SEQ, { training: false, ffnInput: (layer, x) => seen.push({ layer, shape: [...x.shape], x: x.toArray() as Float32Array }) });
  t.equal(probed.loss, plain.loss, 'the loss is unchanged, bit for bit');
  t.same(seen.map((s) => s.layer), [0, 1], 'called once per layer, in order');
  t.ok(seen.every((s) => s.shape[0] === 2 * SEQ && s.shape[1] === config.hidden_size), 'x is [B*T, d]');
  // x is post_attention_layernorm(h): each row has RMS near the norm weight (1 at init)
  const rms = Math.sqrt(seen[0].x.slice(0, 32).reduce((a, v) => a + v * v, 0) / 32);
  t.ok(Math.abs(rms - 1) < 1e-3, `x is RMS-normalized (row RMS ${rms.toFixed(5)})`);
  // training with recomputation: the probe runs in the forward only, not again in the backward's replay
  let calls = 0;
  m.forward(ids, targets, 2, SEQ, { training: true, recompute: true, ffnInput: () => calls++ });
  m.backward();
  t.equal(calls, 2, 'recompute: one call per layer');
  throwsCode(t, () => m.forward(ids, targets, 2, SEQ, { training: false, ffnInput: 3 as never }), 'XFT_TYPE', /ffnInput/, 'a probe that is not a function');
  ids.dispose(), targets.dispose();
  m.dispose();
});

t.test('routingProbeLoss: stats accumulate, dh = −σ(−h)·scale on counted tokens, stable at large |h|', async (t) => {
  const hv = [0.3, -1.2, 45, -45, 0, 2.5, -0.7, 88], tv = [1, -1, 2, 3, -100, 4, 5, 6];
  const sp = (z: number) => Math.max(z, 0) + Math.log1p(Math.exp(-Math.abs(z))), sg = (z: number) => 1 / (1 + Math.exp(-z));
  for (const dtype of ['f32', 'bf16'] as const) {
    const h = Tensor.from(hv, [hv.length, 1], { dtype }), targets = Tensor.from(tv, [tv.length], { dtype: 'i32' }), stats = Tensor.full([3], 1);
    const hr = Array.from(h.toArray());
    const dh = routerOps.routingProbeLoss(h, targets, { stats, scale: 0.5 })!;
    routerOps.routingProbeLoss(h, targets, { stats, dh: false });
    const counted = hr.filter((_, i) => tv[i] >= 0);
    const want = [1 + 2 * counted.reduce((a, z) => a + sp(-z), 0), 1 + 2 * counted.reduce((a, z) => a + sg(z), 0), 1 + 2 * counted.length];
    close(t, stats.toArray(), want, 1e-6, `${dtype}: stats += (Σ softplus(−h), Σ σ(h), count), twice`);
    t.ok(Array.from(stats.toArray()).every(Number.isFinite), `${dtype}: finite at h = ±45, 88`);
    t.equal(dh.dtype, dtype);
    close(t, dh.toArray(), hr.map((z, i) => (tv[i] >= 0 ? -sg(-z) * 0.5 : 0)), dtype === 'f32' ? 1e-6 : 1e-2, `${dtype}: dh`);
    t.ok(tv.every((v, i) => v >= 0 || dh.toArray()[i] === 0), `${dtype}: dh is 0 on ignored tokens`);
    for (const u of [h, targets, stats, dh]) u.dispose();
  }
  const h = Tensor.zeros([4, 1]), tg = Tensor.zeros([4], { dtype: 'i32' });
  throwsCode(t, () => routerOps.routingProbeLoss(h, tg, {} as never), 'XFT_TYPE', /stats/, 'no stats');
  throwsCode(t, () => routerOps.routingProbeLoss(h, tg, { stats: Tensor.zeros([2]) }), 'XFT_SHAPE', /stats/, 'stats of another shape');
  throwsCode(t, () => routerOps.routingProbeLoss(h, Tensor.zeros([3], { dtype: 'i32' }), { stats: Tensor.zeros([3]) }), 'XFT_SHAPE', /targets/, 'targets of another length');
  throwsCode(t, () => routerOps.routingProbeLoss(Tensor.zeros([4, 2]), tg, { stats: Tensor.zeros([3]) }), 'XFT_SHAPE', /h/, 'h of two columns');
  throwsCode(t, () => routerOps.routingProbeLoss(h, tg, { stats: Tensor.zeros([3]), scale: NaN }), 'XFT_VALUE', /scale/, 'a NaN scale');
});

t.test('routingProbe: softplus(−x·r) and σ(x·r) over the counted tokens; dr against finite differences', async (t) => {
  const g = seededRandom(21), N = 12, d = 8;
  const xv = Float32Array.from({ length: N * d }, () => g() * 2 - 1), rv = Float32Array.from({ length: d }, () => g() - 0.5);
  const mask = Array.from({ length: N }, (_, i) => (i % 3 === 1 ? 0 : 1));
  const x = Tensor.from(xv, [N, d]), targets = Tensor.from(mask.map((m, i) => (m ? i + 1 : -1)), [N], { dtype: 'i32' });
  const probe = (xx: Tensor, r: Float32Array, grad?: Tensor) => {
    const rt = Tensor.from(r, [1, d]), stats = Tensor.zeros([3]);
    routingProbe(xx, rt, targets, grad ? { stats, grad, scale: 0.5 } : { stats });
    const s = readProbeStats(stats);
    rt.dispose(), stats.dispose();
    return s;
  };
  // host reference in double
  let refLoss = 0, refSig = 0;
  const refGrad = new Float64Array(d);
  for (let n = 0; n < N; n++) {
    if (!mask[n]) continue;
    let h = 0;
    for (let k = 0; k < d; k++) h += xv[n * d + k] * rv[k];
    refLoss += Math.log1p(Math.exp(-h));
    refSig += 1 / (1 + Math.exp(-h));
    for (let k = 0; k < d; k++) refGrad[k] += (-1 / (1 + Math.exp(h))) * xv[n * d + k] * 0.5;
  }
  const grad = Tensor.full([1, d], 0.25);
  const s = probe(x, rv, grad);
  t.equal(s.tokens, 8, 'counts the tokens with targets >= 0');
  close(t, [s.lossSum, s.sigmoidSum], [refLoss, refSig], 1e-6, 'loss and σ sums vs float64');
  const dr = Array.from(grad.toArray(), (v) => v - 0.25);
  close(t, dr, refGrad, 1e-5, 'dr accumulates into grad (+=) vs float64');
  const eps = 1e-2, fd = Array.from({ length: d }, (_, k) => {
    const p = Float32Array.from(rv), q = Float32Array.from(rv);
    p[k] += eps, q[k] -= eps;
    return (0.5 * (probe(x, p).lossSum - probe(x, q).lossSum)) / (2 * eps);
  });
  close(t, dr, fd, 1e-3, 'dr vs central finite differences');
  // bf16 x: r is rounded for the product, dr still accumulates in f32
  const xb = x.cast('bf16'), gb = Tensor.zeros([1, d]);
  const sb = probe(xb, rv, gb);
  close(t, [sb.lossSum], [refLoss], 2e-2, 'bf16 x: loss near the f32 one');
  close(t, gb.toArray(), refGrad, 3e-2, 'bf16 x: dr near the f32 one');
  const stats = Tensor.zeros([3]);
  throwsCode(t, () => routingProbe(x, Tensor.zeros([1, d + 1]), targets, { stats }), 'XFT_SHAPE', /r/, 'r of another width');
  throwsCode(t, () => routingProbe(x, Tensor.zeros([1, d]), targets.narrow(0, N - 1).clone(), { stats }), 'XFT_SHAPE', /targets/, 'targets of another length');
  throwsCode(t, () => routingProbe(x, Tensor.zeros([1, d]), targets, { stats, grad: Tensor.zeros([d]) }), 'XFT_SHAPE', /grad/, 'a grad of another shape');
  for (const u of [x, targets, grad, xb, gb, stats]) u.dispose();
});

/** The expert of the routing tests (made once, by whichever test runs first: each runs alone under --grep). */
function routeExpert(): string {
  const dir = path.join(tmp, 'route-expert');
  return fs.existsSync(dir) ? dir : saveExpert('route-expert', 9, 0.1, 0.3);
}

/** mean σ(r^(l)·x^(l)) over layers and response tokens of `rows`, from the saved folder, on the host. */
function meanSigmoidOf(m: Model, rows: readonly Sample[], vectors: Float32Array[]): number {
  let sum = 0, n = 0;
  for (const r of rows) {
    const ids = Tensor.from(r.ids, [SEQ], { dtype: 'i32' }), targets = Tensor.from(r.targets, [SEQ], { dtype: 'i32' });
    m.forward(ids, targets, 1, SEQ, {
      training: false,
      ffnInput: (l, x) => {
        const xv = x.toArray(), d = vectors[l].length;
        for (let t = 0; t < SEQ; t++) {
          if (r.targets[t] < 0) continue;
          let h = 0;
          for (let k = 0; k < d; k++) h += xv[t * d + k] * vectors[l][k];
          sum += 1 / (1 + Math.exp(-h));
          n++;
        }
      },
    });
    ids.dispose(), targets.dispose();
  }
  return sum / n;
}

t.test('preoptimizeRouting: σ(r·x) >= 0.9 over the bucket, trunk frozen, vectors saved (§7.6)', async (t) => {
  const expert = routeExpert();
  const rows = makeRows(16, 17);
  const out = path.join(tmp, 'route-out'), lines: string[] = [];
  const t0 = Date.now();
  const res = preoptimizeRouting(expert, rows, out, { lr: 5e-3, epochs: 4, batchSize: 8, microBatch: 4, onLog: (l) => lines.push(l) });
  t.comment(`ffn+router: ${res.steps} steps in ${Date.now() - t0} ms, mean σ ${res.meanSigmoid.toFixed(4)}`);
  t.equal(res.steps, 8, '4 epochs of 2 steps');
  t.ok(res.meanSigmoid >= 0.9, `mean σ(r·x) over the bucket's tokens ${res.meanSigmoid.toFixed(4)} >= 0.9`);
  t.equal(res.vectors.length, config.num_hidden_layers);
  const saved = readRoutingVectors(out);
  t.same(saved.map((v) => Array.from(v)), res.vectors.map((v) => Array.from(v)), 'readRoutingVectors returns what was trained');
  const { differ } = compareFolders(expert, out, (n) => /\.mlp\./.test(n));
  t.same(differ, [], 'trunk tensors bit-identical to the expert, every FFN tensor trained');
  const m = loadModel(out);
  t.equal(m.kind, 'dense', 'the output loads as a dense checkpoint');
  close(t, [meanSigmoidOf(m, rows, saved)], [res.meanSigmoid], 1e-5, 'mean σ recomputed from the saved folder');
  m.dispose();
  t.ok(lines.some((l) => /epoch 4\/4/.test(l)), 'epochs logged');
  const meta = JSON.parse(new SafetensorsReader(path.join(out, ROUTING_VECTORS_FILE)).metadata.xft_upit_route);
  t.equal(meta.steps, 8, 'the run is described in the file metadata');
  throwsCode(t, () => preoptimizeRouting(expert, rows, out, { lr: 5e-3 }), 'XFT_IO', /not empty/, 'an existing output folder without overwrite');

  // r alone: the model is written unchanged
  const outR = path.join(tmp, 'route-router');
  const rr = preoptimizeRouting(expert, rows, outR, { lr: 5e-3, train: 'router', gamma: 0.5 });
  t.ok(rr.meanSigmoid >= 0.9, `router only: mean σ ${rr.meanSigmoid.toFixed(4)} >= 0.9`);
  t.same(compareFolders(expert, outR, () => false).differ, [], "router only: every model tensor is the expert's");

  // bf16 compute: the trunk still bit-identical (taken from the file), the FFNs trained from f32 masters
  const outB = path.join(tmp, 'route-bf16');
  const rb = preoptimizeRouting(expert, rows.slice(0, 8), outB, { lr: 5e-3, epochs: 2, dtype: 'bf16' });
  t.ok(rb.steps === 2 && rb.meanSigmoid > 0.5, `bf16: trains (mean σ ${rb.meanSigmoid.toFixed(4)})`);
  t.same(compareFolders(expert, outB, (n) => /\.mlp\./.test(n)).differ, [], 'bf16: trunk untouched, FFNs trained');
});

t.test('preoptimizeRouting: an empty bucket leaves r at 0 and warns', async (t) => {
  const expert = routeExpert();
  for (const [name, rows] of [['empty', []], ['no-targets', [{ ids: new Int32Array(SEQ).fill(3), targets: new Int32Array(SEQ).fill(-1) }]]] as const) {
    const out = path.join(tmp, `route-${name}`), lines: string[] = [];
    const res = preoptimizeRouting(expert, rows, out, { lr: 5e-3, onLog: (l) => lines.push(l) });
    t.equal(res.steps, 0, `${name}: no steps`);
    t.ok(Number.isNaN(res.meanSigmoid), `${name}: no tokens, mean σ NaN`);
    t.ok(readRoutingVectors(out).every((v) => v.length === config.hidden_size && v.every((x) => x === 0)), `${name}: the vectors are 0`);
    t.same(compareFolders(expert, out, () => false).differ, [], `${name}: the model is unchanged`);
    t.ok(lines.some((l) => /warning/.test(l)), `${name}: a warning`);
  }
});

t.test('preoptimizeRouting and readRoutingVectors: typed errors', async (t) => {
  const expert = routeExpert(), rows = makeRows(2, 1);
  throwsCode(t, () => preoptimizeRouting(expert, rows, path.join(tmp, 'x1'), {} as never), 'XFT_TYPE', /lr/, 'no lr');
  throwsCode(t, () => preoptimizeRouting(expert, rows, path.join(tmp, 'x2'), { lr: 1e-3, gamma: 2 }), 'XFT_VALUE', /gamma/, 'gamma > 1');
  throwsCode(t, () => preoptimizeRouting(expert, rows, path.join(tmp, 'x3'), { lr: 1e-3, train: 'all' as never }), 'XFT_VALUE', /train/, 'an unknown train set');
  throwsCode(t, () => preoptimizeRouting(path.join(tmp, 'nope'), rows, path.join(tmp, 'x4'), { lr: 1e-3 }), 'XFT_IO', /nope/, 'a missing expert');
  throwsCode(t, () => preoptimizeRouting(expert, [{ ids: [1, 300], targets: [2, 3] }], path.join(tmp, 'x5'), { lr: 1e-3 }), 'XFT_VALUE', /rows\[0\]\.ids\[1\]/, 'an id >= vocab');
  throwsCode(t, () => preoptimizeRouting(expert, rows, expert, { lr: 1e-3 }), 'XFT_VALUE', /out/, "out = the expert's folder");
  t.notOk(fs.existsSync(path.join(tmp, 'x1')), 'nothing written on a bad call');

  // a folder whose routing file is missing, incomplete, misshaped or of another dtype
  const base = path.join(tmp, 'rv-base');
  preoptimizeRouting(expert, [], base, { lr: 1e-3 });
  const variant = (name: string, entries: { name: string; dtype: 'F32' | 'BF16'; shape: number[]; value: number }[]) => {
    const dir = path.join(tmp, `rv-${name}`);
    fs.cpSync(base, dir, { recursive: true });
    writeSafetensors(path.join(dir, ROUTING_VECTORS_FILE), entries.map((e) => ({ name: e.name, dtype: e.dtype, shape: e.shape, tensor: () => Tensor.full(e.shape, e.value) })));
    return dir;
  };
  const d = config.hidden_size, ok = (l: number) => ({ name: routingVectorName(l), dtype: 'F32' as const, shape: [d], value: 0.5 });
  t.same(readRoutingVectors(variant('ok', [ok(0), ok(1)])).map((v) => v[3]), [0.5, 0.5], 'a well-formed file reads back');
  const missing = path.join(tmp, 'rv-missing');
  fs.cpSync(base, missing, { recursive: true });
  fs.rmSync(path.join(missing, ROUTING_VECTORS_FILE));
  throwsCode(t, () => readRoutingVectors(missing), 'XFT_IO', /routing_vectors/, 'no file');
  throwsCode(t, () => readRoutingVectors(variant('one', [ok(0)])), 'XFT_FORMAT', /layers\.1\.routing_vector/, 'a layer missing');
  throwsCode(t, () => readRoutingVectors(variant('extra', [ok(0), ok(1), ok(2)])), 'XFT_FORMAT', /layers\.2/, 'a layer the model does not have');
  throwsCode(t, () => readRoutingVectors(variant('shape', [ok(0), { ...ok(1), shape: [d + 1] }])), 'XFT_SHAPE', /layers\.1\.routing_vector.*\[33\]/, 'a vector of another width');
  throwsCode(t, () => readRoutingVectors(variant('dtype', [ok(0), { ...ok(1), dtype: 'BF16' }])), 'XFT_DTYPE', /BF16/, 'a BF16 vector');
  exact(t, readRoutingVectors(base)[0], new Float32Array(d), 'zeros read back exactly');
});

t.test('stage 3 on CUDA agrees with the CPU: per-row NLL, buckets, routing vectors', { skip: SKIP_NO_CUDA }, async (t) => {
  const expert = routeExpert(), rows = makeRows(4, 29);
  const mc = loadModel(expert), mg = loadModel(expert, { device: 'cuda' });
  close(t, rowLosses(mg, rows, { microBatch: 2 }), rowLosses(mc, rows, { microBatch: 2 }), 1e-5, 'rowLosses');
  mc.dispose(), mg.dispose();
  const other = saveExpert('cuda-other', 2);
  const bc = assignBuckets([expert, other], rows), bg = assignBuckets([expert, other], rows, { device: 'cuda' });
  t.same(bg.bucket, bc.bucket, 'the same buckets');
  const opts = { lr: 5e-3, epochs: 1, batchSize: 4, microBatch: 2 };
  const rc = preoptimizeRouting(expert, rows, path.join(tmp, 'cuda-ref'), opts);
  const rg = preoptimizeRouting(expert, rows, path.join(tmp, 'cuda-run'), { ...opts, device: 'cuda' });
  close(t, rg.vectors.flatMap((v) => Array.from(v)), rc.vectors.flatMap((v) => Array.from(v)), 1e-4, 'routing vectors after one step');
  close(t, [rg.meanSigmoid], [rc.meanSigmoid], 1e-5, 'mean σ');
  t.same(compareFolders(path.join(tmp, 'cuda-ref'), path.join(tmp, 'cuda-run'), () => false).differ.filter((n) => !/\.mlp\./.test(n)), [], 'the same trunk');
});
