// UpIT option jointRouter (../shared/UPIT.md A6, §7.6): after assembly the routers alone train on the seed
// buckets with the softmax cross-entropy of the bucket labels. On a toy whose buckets are separable (each
// bucket's rows use their own range of token ids, whose embeddings share a direction) the router's top-1 accuracy on the seed labels reaches
// >= 0.9; its loss before training equals a float64 recomputation from the FFN inputs; the first AdamW step
// moves every router entry against the sign of the float64 gradient; nothing but the routers changes; the
// argument checks. The pipeline's --joint-router: test/93.upit_pipeline.ts.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Tensor, memoryStats } from '../lib/index';
import { tinyConfig } from '../lib/config';
import { createDense, upcycle } from '../lib/xft';
import { loadModel, saveModel } from '../lib/checkpoint';
import { SafetensorsReader } from '../lib/safetensors';
import { MoeFFN } from '../lib/model';
import type { Sample } from '../lib/data';
import { trainJointRouter, JOINT_ROUTER_FILE } from '../lib/upit/joint_router';
import { rng } from './helpers/ref';
import { exact, throwsCode } from './helpers/check';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-upit-jr-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
const at = (name: string) => path.join(tmp, name);

const E = 3, V = 96, T = 16;
const config = tinyConfig({ hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 2, num_hidden_layers: 2, vocab_size: V });
const dense = createDense(config, { seed: 3 });
// separable by construction: token v of bucket e = v E / V gets a strong common direction u_e (one-hot
// axes) added to its random embedding, so each bucket's FFN inputs lie in their own cone
{
  const d = config.hidden_size, emb = dense.embed.value.toArray();
  for (let v = 0; v < V; v++) emb[v * d + Math.floor((v * E) / V)] += 1;
  const next = Tensor.from(emb, dense.embed.value.shape);
  dense.embed.value.copy_(next);
  next.dispose();
}
const moe = upcycle(dense, { experts: E, topK: 2, router: 'linear', sharedExpert: false, noise: false, balanceLoss: 'switch', balanceLossWeight: 0.01, seed: 5 });
saveModel(moe, at('moe'));
dense.dispose();
moe.dispose();

/** rows of bucket e draw their tokens from [e V / E, (e + 1) V / E); the second half of each row is the response */
function rows(perBucket: number, seed: number): { rows: Sample[]; labels: number[] } {
  const r = rng(seed), out: Sample[] = [], labels: number[] = [];
  for (let i = 0; i < perBucket * E; i++) {
    const e = i % E, lo = (e * V) / E, span = V / E;
    const ids = Int32Array.from({ length: T }, () => lo + Math.floor(r.next() * span));
    const targets = Int32Array.from({ length: T }, (_, j) => (j >= T / 2 && j + 1 < T ? ids[j + 1] : -1));
    out.push({ ids, targets });
    labels.push(e);
  }
  return { rows: out, labels };
}

/** per layer, the FFN inputs x [tokens, d] of the counted tokens, and their labels (float64 copies) */
function ffnInputs(dir: string, data: { rows: Sample[]; labels: number[] }): { x: Float64Array[][]; y: number[] } {
  const model = loadModel(dir);
  const L = model.blocks.length, x: Float64Array[][] = Array.from({ length: L }, () => []), y: number[] = [];
  const d = model.config.hidden_size;
  for (let i = 0; i < data.rows.length; i++) {
    const row = data.rows[i];
    const ids = Tensor.from(row.ids, [T], { dtype: 'i32' }), tg = Tensor.from(row.targets, [T], { dtype: 'i32' });
    model.forward(ids, tg, 1, T, {
      training: false,
      ffnInput: (l, h) => {
        const v = h.toArray();
        for (let j = 0; j < T; j++) if (row.targets[j] >= 0) x[l].push(Float64Array.from(v.subarray(j * d, (j + 1) * d)));
      },
    });
    for (let j = 0; j < T; j++) if (row.targets[j] >= 0) y.push(data.labels[i]);
    ids.dispose();
    tg.dispose();
  }
  model.dispose();
  return { x, y };
}

function routerOf(dir: string, l: number): Float32Array {
  return new SafetensorsReader(dir).readF32(`model.layers.${l}.mlp.gate.gate_network.weight`);
}

/** mean CE over layers and tokens, and its gradient per layer, in float64 */
function reference(dir: string, data: { rows: Sample[]; labels: number[] }) {
  const { x, y } = ffnInputs(dir, data);
  const L = x.length, d = config.hidden_size, N = y.length * L;
  let loss = 0, correct = 0;
  const grads = Array.from({ length: L }, () => new Float64Array(E * d));
  for (let l = 0; l < L; l++) {
    const w = routerOf(dir, l);
    x[l].forEach((xt, i) => {
      const z = Array.from({ length: E }, (_, e) => xt.reduce((a, v, k) => a + v * w[e * d + k], 0));
      const m = Math.max(...z), s = z.reduce((a, v) => a + Math.exp(v - m), 0);
      loss += m + Math.log(s) - z[y[i]];
      if (z.indexOf(m) === y[i]) correct++;
      for (let e = 0; e < E; e++) {
        const g = (Math.exp(z[e] - m) / s - (e === y[i] ? 1 : 0)) / N;
        for (let k = 0; k < d; k++) grads[l][e * d + k] += g * xt[k];
      }
    });
  }
  return { loss: loss / N, accuracy: correct / N, grads };
}

t.test('joint router on separable buckets: top-1 >= 0.9 on the seed labels, the loss down, only the routers changed', async (t) => {
  const data = rows(12, 1);
  const log: string[] = [];
  const r = trainJointRouter(at('moe'), data.rows, data.labels, at('trained'), { lr: 0.05, epochs: 4, batchSize: 6, microBatch: 3, seed: 2, onLog: (l) => log.push(l) });
  t.equal(r.steps, 4 * 6, 'steps: 36 rows / 6 per step x 4 epochs');
  t.ok(r.after.accuracy >= 0.9, `top-1 accuracy after: ${r.after.accuracy.toFixed(3)} (before ${r.before.accuracy.toFixed(3)})`);
  t.ok(r.after.loss < r.before.loss, `loss ${r.before.loss.toFixed(4)} -> ${r.after.loss.toFixed(4)}`);
  const ref = reference(at('trained'), data);
  t.ok(Math.abs(ref.accuracy - r.after.accuracy) < 1e-9 && Math.abs(ref.loss - r.after.loss) < 1e-5 * ref.loss,
    `the fit after, recomputed in float64 from the written model: ${ref.accuracy.toFixed(4)} / ${ref.loss.toFixed(6)}`);
  const report = JSON.parse(fs.readFileSync(path.join(at('trained'), JOINT_ROUTER_FILE), 'utf8'));
  t.match(report, { rows: 36, steps: 24, epochs: 4, lr: 0.05, before: r.before, after: r.after }, `${JOINT_ROUTER_FILE} records the fit before and after`);
  t.match(log.join('\n'), /before: top-1 .*%[\s\S]*after: top-1/, 'the log says both');
  const a = new SafetensorsReader(at('moe')), b = new SafetensorsReader(at('trained'));
  t.same(b.names().sort(), a.names().sort(), 'the same tensors');
  for (const name of a.names())
    if (/gate_network/.test(name)) t.notSame(Array.from(b.readF32(name)), Array.from(a.readF32(name)), `${name} trained`);
    else exact(t, b.readF32(name), a.readF32(name), `${name} as read`);
  t.equal(loadModel(at('trained')).blocks.every((x) => x.ffn instanceof MoeFFN), true, 'loads as an MoE');
});

t.test('bf16 compute: f32 masters of the routers, the MoE written in its own dtype, the rest as read', async (t) => {
  const data = rows(6, 11);
  const r = trainJointRouter(at('moe'), data.rows, data.labels, at('bf16'), { lr: 0.05, epochs: 3, batchSize: 6, dtype: 'bf16' });
  t.ok(r.after.loss < r.before.loss, `loss ${r.before.loss.toFixed(4)} -> ${r.after.loss.toFixed(4)}`);
  t.ok(Math.abs(r.before.loss - reference(at('moe'), data).loss) < 0.05, 'the bf16 loss before near the float64 one');
  const a = new SafetensorsReader(at('moe')), b = new SafetensorsReader(at('bf16'));
  for (const name of a.names()) {
    t.equal(b.info(name).dtype, a.info(name).dtype, `${name}: the MoE's dtype`);
    if (!/gate_network/.test(name)) exact(t, b.readF32(name), a.readF32(name), `${name}: as read, not rounded to bf16`);
  }
});

t.test('the loss before training and the first step against float64', async (t) => {
  const data = rows(4, 7);
  const ref = reference(at('moe'), data);
  const lr = 1e-3;
  const r = trainJointRouter(at('moe'), data.rows, data.labels, at('one-step'), { lr, batchSize: data.rows.length, clip: 0 });
  t.equal(r.steps, 1, 'one pass of one batch: one step');
  t.ok(Math.abs(r.before.loss - ref.loss) <= 1e-5 * ref.loss, `loss before ${r.before.loss} = float64 ${ref.loss}`);
  t.equal(r.before.accuracy, ref.accuracy, 'accuracy before = float64');
  // AdamW's first step moves each entry by lr g / (|g| + eps): against the sign of its gradient
  let checked = 0, wrong = 0;
  for (let l = 0; l < ref.grads.length; l++) {
    const w0 = routerOf(at('moe'), l), w1 = routerOf(at('one-step'), l);
    ref.grads[l].forEach((g, i) => {
      if (Math.abs(g) < 1e-6) return;
      checked++;
      const step = (w1[i] - w0[i]) / lr;
      if (!(Math.abs(step + Math.sign(g)) < 1e-2)) wrong++;
    });
  }
  t.ok(checked > 100, `${checked} router entries with a clear gradient`);
  t.equal(wrong, 0, 'each moved by -lr sign(g)');
});

t.test('every tensor released, after a run and after a refused one', async (t) => {
  const data = rows(2, 9);
  const before = memoryStats().hostTensors;
  trainJointRouter(at('moe'), data.rows, data.labels, at('leak'), { lr: 1e-3, batchSize: 3, microBatch: 1 });
  t.equal(memoryStats().hostTensors, before, 'after training: as many live tensors as before');
  throwsCode(t, () => trainJointRouter(at('moe'), data.rows, data.labels, at('leak'), { lr: 1e-3 }), 'XFT_IO', /exists|overwrite/, 'an existing output folder');
  t.equal(memoryStats().hostTensors, before, 'after a refused call too');
  const diverge = trainJointRouter.bind(null, at('moe'), data.rows, data.labels, at('leak-nan'), { lr: 2e38, batchSize: 1, clip: 0 });
  try {
    const r = diverge();
    t.fail(`a diverging run returned ${JSON.stringify(r)}`);
  } catch (err) {
    t.match((err as Error).message, /not finite/, `a diverging run: ${(err as Error).message}`);
  }
  t.notOk(fs.existsSync(at('leak-nan')) && fs.existsSync(path.join(at('leak-nan'), 'config.json')), 'a diverging run writes no checkpoint');
  t.equal(memoryStats().hostTensors, before, 'after a diverging run too');
});

t.test('more than 32 experts: the grouped GEMM path, as the MoE routes them', async (t) => {
  const wideE = 40;
  const d = createDense(config, { seed: 4 });
  const m = upcycle(d, { experts: wideE, topK: 2, router: 'linear', sharedExpert: false, noise: false, seed: 6 });
  saveModel(m, at('moe-40'));
  d.dispose();
  m.dispose();
  const data = rows(14, 13);
  data.labels = data.labels.map((_, i) => i % wideE);
  const before = memoryStats().hostTensors;
  const r = trainJointRouter(at('moe-40'), data.rows, data.labels, at('trained-40'), { lr: 0.05, epochs: 3, batchSize: 7 });
  t.ok(r.after.loss < r.before.loss && r.after.accuracy > r.before.accuracy, `loss ${r.before.loss.toFixed(3)} -> ${r.after.loss.toFixed(3)}, top-1 ${r.before.accuracy.toFixed(3)} -> ${r.after.accuracy.toFixed(3)}`);
  t.equal(memoryStats().hostTensors, before, 'no tensor left live');
  const a = new SafetensorsReader(at('moe-40')), b = new SafetensorsReader(at('trained-40'));
  t.equal(b.info('model.layers.0.mlp.gate.gate_network.weight').shape[0], wideE, `a [${wideE}, d] router`);
  for (const name of a.names()) if (!/gate_network/.test(name)) exact(t, b.readF32(name), a.readF32(name), `${name} as read`);
});

t.test('argument checks', async (t) => {
  const data = rows(1, 3);
  throwsCode(t, () => trainJointRouter(at('moe'), data.rows, data.labels.slice(1), at('x1'), { lr: 1e-3 }), 'XFT_TYPE', /labels/, 'labels of another length');
  throwsCode(t, () => trainJointRouter(at('moe'), data.rows, [0, 1, E], at('x2'), { lr: 1e-3 }), 'XFT_VALUE', /\[0, 3\) for labels\[2\]/, 'a label past the experts');
  throwsCode(t, () => trainJointRouter(at('moe'), data.rows, [0, 1.5, 2], at('x2'), { lr: 1e-3 }), 'XFT_VALUE', /labels\[1\]/, 'a fractional label');
  throwsCode(t, () => trainJointRouter(at('moe'), data.rows, 'abc' as unknown as number[], at('x2'), { lr: 1e-3 }), 'XFT_TYPE', /labels/, 'a string');
  const typed = trainJointRouter(at('moe'), data.rows, Int32Array.from(data.labels), at('typed'), { lr: 1e-3 });
  t.equal(typed.steps, 1, 'an Int32Array of labels is taken as an array is');
  throwsCode(t, () => trainJointRouter(at('moe'), data.rows, data.labels, at('x3'), { lr: 0 }), 'XFT_VALUE', /lr/, 'lr 0');
  throwsCode(t, () => trainJointRouter(at('moe'), data.rows, data.labels, at('moe'), { lr: 1e-3 }), 'XFT_VALUE', /out/, 'out = the MoE');
  throwsCode(t, () => trainJointRouter(at('nothing'), data.rows, data.labels, at('x4'), { lr: 1e-3 }), 'XFT_IO', /does not exist/, 'no MoE');
  const d = createDense(config, { seed: 1 });
  saveModel(d, at('dense'));
  d.dispose();
  throwsCode(t, () => trainJointRouter(at('dense'), data.rows, data.labels, at('x5'), { lr: 1e-3 }), 'XFT_VALUE', /an MoE checkpoint/, 'a dense checkpoint');
  for (const x of ['x1', 'x2', 'x3', 'x4', 'x5']) t.notOk(fs.existsSync(at(x)), `${x}: nothing written`);
});
