// The bf16 compute path (mixed precision): bf16 weights and activations with fp32 accumulation,
// f32 gradients and master weights in the optimizer. Checked against the f32 model on the same
// (bf16-representable) weights, the XFT invariants in bf16, training and exact resumption.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Tensor } from '../lib/index';
import { tinyConfig } from '../lib/config';
import { createDense, upcycle, mergeable, toDense } from '../lib/xft';
import { saveModel, loadModel } from '../lib/checkpoint';
import { ByteTokenizer, toRows } from '../lib/data';
import { train, saveTrainState, loadTrainState, disposeState } from '../lib/train';
import { MergedFFN, type Model } from '../lib/model';
import { relErr, rng } from './helpers/ref';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-bf16-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

const config = tinyConfig({ hidden_size: 32, intermediate_size: 64, num_attention_heads: 4, num_key_value_heads: 2 });
const B = 2, T = 16;
const R = rng(3);
const idsArr = Array.from({ length: B * T }, () => R.int(0, 259));
const tgtArr = Array.from({ length: B * T }, (_, i) => (i % 4 === 0 ? -1 : R.int(0, 259)));

function logitsOf(m: Model): Float32Array {
  const ids = Tensor.from(idsArr, [B * T], { dtype: 'i32' });
  const l = m.logits(ids, B, T);
  const a = l.toArray() as Float32Array;
  l.dispose();
  ids.dispose();
  return a;
}

function gradsOf(m: Model): Map<string, Float32Array> {
  const ids = Tensor.from(idsArr, [B * T], { dtype: 'i32' }), targets = Tensor.from(tgtArr, [B * T], { dtype: 'i32' });
  m.zeroGrad();
  m.forward(ids, targets, B, T, { training: true, seed: 1n });
  m.backward();
  const g = new Map(m.trainableParams().map((p) => [p.name, p.grad!.toArray() as Float32Array]));
  ids.dispose();
  targets.dispose();
  return g;
}

/** An f32 model and a bf16 model with the same (bf16-rounded) weights. */
function pair(seed: number): [Model, Model] {
  const b = createDense(config, { seed, std: 0.1, dtype: 'bf16' });
  const f = createDense(config, { seed, std: 0.1 });
  f.params().forEach((p, i) => p.value.copy_(b.params()[i].value.cast('f32')));
  return [f, b];
}

t.test('a bf16 model computes the f32 model (same weights) within bf16 rounding; its gradients are f32', async (t) => {
  const [f, b] = pair(1);
  t.equal(b.dtype, 'bf16');
  t.ok(b.params().every((p) => p.value.dtype === 'bf16'), 'all weights bf16');
  const e = relErr(logitsOf(b), logitsOf(f));
  t.ok(e <= 2e-2 && e > 0, `logits: relative error ${e.toExponential(2)} <= 2e-2 (and not 0: the activations are bf16)`);
  const gf = gradsOf(f), gb = gradsOf(b);
  let worst = 0;
  for (const [n, v] of gf) worst = Math.max(worst, relErr(gb.get(n)!, v));
  t.ok(worst <= 6e-2, `gradients: worst relative error over ${gf.size} parameters ${worst.toExponential(2)} <= 6e-2`);
  t.ok(b.params().every((p) => p.grad!.dtype === 'f32'), 'gradients are f32');
  [f, b].forEach((m) => m.dispose());
});

t.test('XFT invariants in bf16: upcycled MoE = dense, toDense = merge model', async (t) => {
  const dense = createDense(config, { seed: 2, std: 0.1, dtype: 'bf16' });
  const want = logitsOf(dense);
  const moe = upcycle(dense, { experts: 4, topK: 3, seed: 4 });
  t.equal(moe.dtype, 'bf16');
  t.ok(moe.params().every((p) => p.value.dtype === 'bf16'), 'the MoE (router and noise included) is bf16');
  const e = relErr(logitsOf(moe), want);
  t.ok(e <= 1e-2, `upcycled MoE vs dense: relative error ${e.toExponential(2)} <= 1e-2`);
  for (const b of moe.blocks) for (const p of b.ffn.params()) if (p.name.includes('experts')) p.value.copy_(Tensor.randn(p.value.shape, { seed: p.name.length, std: 0.1, dtype: 'bf16' }));
  const mg = mergeable(moe);
  mg.blocks.forEach((b, i) => (b.ffn as MergedFFN).alpha.value.copy_(Tensor.randn([3], { seed: 7 + i })));
  t.equal((mg.blocks[0].ffn as MergedFFN).alpha.value.dtype, 'f32', 'α stays f32');
  const final = toDense(mg);
  t.equal(final.dtype, 'bf16');
  const e2 = relErr(logitsOf(final), logitsOf(mg));
  t.ok(e2 <= 1e-2, `toDense vs merge model: relative error ${e2.toExponential(2)} <= 1e-2`);
  [dense, moe, mg, final].forEach((m) => m.dispose());
});

t.test('bf16 checkpoints: saved as BF16 by default, loaded as bf16 exactly', async (t) => {
  const m = createDense(config, { seed: 5, dtype: 'bf16' });
  saveModel(m, path.join(tmp, 'b'));
  const cfg = JSON.parse(fs.readFileSync(path.join(tmp, 'b', 'config.json'), 'utf8'));
  t.equal(cfg.torch_dtype, 'bfloat16');
  const back = loadModel(path.join(tmp, 'b'), { dtype: 'bf16' });
  t.equal(back.dtype, 'bf16');
  t.same(Array.from(back.lmHead.value.toArray()), Array.from(m.lmHead.value.toArray()), 'bit-identical');
  const asF32 = loadModel(path.join(tmp, 'b'));
  t.equal(asF32.dtype, 'f32', 'the same checkpoint loads as f32 by default');
  [m, back, asF32].forEach((x) => x.dispose());
});

t.test('bf16 training: the loss falls like f32 training; a resumed run continues exactly', async (t) => {
  const tok = new ByteTokenizer();
  const text = ['errors.ts', 'config.ts'].map((f) => fs.readFileSync(path.join(__dirname, '..', 'lib', f), 'utf8')).join('\n');
  const ids = tok.encode(text).slice(0, 8 * 33 * 6);
  const rows = toRows([{ ids: ids.slice(0, -1), targets: ids.slice(1) }], 32, 'pack', tok.pad);
  const opts = { lr: 3e-3, batchSize: 8, microBatch: 4, epochs: 3, warmupSteps: 1, seed: 2 };
  const [f, b] = pair(6);
  const rf = train(f, rows, opts), rb = train(b, rows, opts);
  t.ok(b.params().every((p) => p.value.dtype === 'bf16'), 'weights stay bf16');
  t.ok(rb.state.master!.size === b.params().length && [...rb.state.master!.values()].every((m) => m.dtype === 'f32'), 'f32 master weights in the optimizer state');
  const lf = rf.losses.at(-1)!, lb = rb.losses.at(-1)!;
  t.ok(lb < rb.losses[0] - 1, `bf16 loss falls: ${rb.losses[0].toFixed(3)} -> ${lb.toFixed(3)}`);
  t.ok(Math.abs(lb - lf) / lf < 0.05, `and ends within 5% of f32 training (${lb.toFixed(4)} vs ${lf.toFixed(4)})`);
  // resume
  const [, b2] = pair(6);
  const half = train(b2, rows, { ...opts, stopAfter: 4 });
  saveTrainState(path.join(tmp, 'state'), b2, half.state);
  const [, b3] = pair(99);
  const state = loadTrainState(path.join(tmp, 'state'), b3);
  t.equal(state.master!.size, b3.params().length, 'master weights saved and loaded');
  const rest = train(b3, rows, { ...opts, resume: state });
  t.same([...half.losses, ...rest.losses], rb.losses, 'the resumed bf16 run has the losses of the unbroken one');
  [f, b, b2, b3].forEach((m) => m.dispose());
  [rf.state, rb.state, half.state, state].forEach(disposeState);
});
