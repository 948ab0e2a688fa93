// The training loop with the reference's optimizer and precisions (lib/optim): Adafactor on dense and MoE
// models (expert stacks keep [E, R] + [E, C] statistics), bf16 weights updated in place with and without
// stochastic rounding, mixed precision; losses fall, runs are deterministic, a resumed Adafactor run
// (state saved and loaded) continues with the losses of an unbroken one, and a state resumed with
// another optimizer or precision is refused with an XftError.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { tinyConfig } from '../lib/config';
import { createDense, upcycle } from '../lib/xft';
import { ByteTokenizer, toRows } from '../lib/data';
import { train, saveTrainState, loadTrainState, disposeState, type TrainOptions } from '../lib/train';
import type { Model } from '../lib/model';
import { throwsCode } from './helpers/check';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-optim-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

const tok = new ByteTokenizer();
const text = ['errors.ts', 'config.ts', 'data.ts'].map((f) => fs.readFileSync(path.join(__dirname, '..', 'lib', f), 'utf8')).join('\n');
const ids = tok.encode(text).slice(0, 24 * 17);
const rows = toRows([{ ids: ids.slice(0, -1), targets: ids.slice(1) }], 16, 'pack', tok.pad); // 24 sequences of 16
const config = tinyConfig({ hidden_size: 32, intermediate_size: 64, num_attention_heads: 4, num_key_value_heads: 2 });

const dense = (seed: number, dtype: 'f32' | 'bf16' = 'f32') => createDense(config, { seed }).cast(dtype);
const moe = (seed: number, dtype: 'f32' | 'bf16' = 'f32') => {
  const d = createDense(config, { seed });
  const m = upcycle(d, { experts: 4, topK: 3, seed: 1 }).cast(dtype);
  d.dispose();
  return m;
};

/** every weight as one flat array (compared with sameBits: tap's deep diff of large unequal arrays is slow) */
function weights(m: Model): number[] {
  return m.params().flatMap((p) => Array.from(p.value.toArray()));
}
function sameBits(a: number[], b: number[]): boolean {
  return a.length === b.length && a.every((x, i) => Object.is(x, b[i]));
}

t.test('Adafactor: the loss falls, runs are deterministic, statistics are factored as transformers', async (t) => {
  const opts: TrainOptions = { lr: 2e-2, batchSize: 8, epochs: 3, warmupSteps: 1, seed: 3, optimizer: 'adafactor' };
  const m1 = moe(1), m2 = moe(1);
  const r1 = train(m1, rows, opts), r2 = train(m2, rows, opts);
  t.ok(r1.losses.at(-1)! < r1.losses[0] - 0.5, `MoE loss falls: ${r1.losses[0].toFixed(3)} -> ${r1.losses.at(-1)!.toFixed(3)}`);
  t.same(r2.losses, r1.losses, 'deterministic');
  t.equal(r1.state.optimizer, 'adafactor');
  t.equal(r1.state.m.size, 0, 'no first moments (beta1 = None)');
  const up = m1.params().find((p) => /experts\.weight_up|mlp\.up/.test(p.name) && p.value.shape.length === 3)!;
  t.ok(up, 'an expert stack');
  t.same(r1.state.row!.get(up.name)!.shape, up.value.shape.slice(0, 2), 'expert stack: row statistics [E, R]');
  t.same(r1.state.col!.get(up.name)!.shape, [up.value.shape[0], up.value.shape[2]], 'expert stack: column statistics [E, C]');
  const norm = m1.params().find((p) => p.value.shape.length === 1)!;
  t.same(r1.state.v.get(norm.name)!.shape, norm.value.shape, 'a vector: the full second moment');
  [m1, m2].forEach((m) => m.dispose());
  [r1.state, r2.state].forEach(disposeState);
});

for (const precision of ['f32', 'mixed', 'bf16', 'bf16+sr'] as const)
  t.test(`Adafactor ${precision}: a resumed run (state saved and loaded) continues with the losses of an unbroken run`, async (t) => {
    const dtype = precision === 'f32' ? 'f32' : 'bf16';
    const opts: TrainOptions = {
      lr: 1e-2, batchSize: 4, steps: 4, warmupSteps: 1, seed: 5, optimizer: 'adafactor',
      masterWeights: precision === 'mixed', stochasticRounding: precision === 'bf16+sr',
    };
    const m1 = moe(2, dtype);
    const full = train(m1, rows, opts);
    const m2 = moe(2, dtype);
    const half = train(m2, rows, { ...opts, stopAfter: 2 });
    const dir = path.join(tmp, `resume-${precision}`);
    saveTrainState(dir, m2, half.state);
    const m3 = moe(77, dtype);
    const state = loadTrainState(dir, m3);
    t.equal(state.optimizer, 'adafactor', 'the optimizer is saved');
    t.equal(state.row!.size + state.v.size, m3.trainableParams().length, 'statistics of every parameter saved and loaded');
    t.equal(state.master!.size, precision === 'mixed' ? m3.trainableParams().length : 0, precision === 'mixed' ? 'master weights saved' : 'no master weights');
    const rest = train(m3, rows, { ...opts, resume: state });
    t.same([...half.losses, ...rest.losses], full.losses, 'the same losses as the unbroken run');
    t.ok(sameBits(weights(m3), weights(m1)), 'the same weights');
    if (dtype === 'bf16') t.ok(m3.params().every((p) => p.value.dtype === 'bf16'), 'weights stay bf16');
    [m1, m2, m3].forEach((m) => m.dispose());
    [full.state, half.state, state].forEach(disposeState);
  });

t.test('bf16 weights in place: no master copy; stochastic rounding draws differ from round to nearest, deterministically', async (t) => {
  const opts: TrainOptions = { lr: 1e-2, batchSize: 8, steps: 6, seed: 2, masterWeights: false };
  for (const optimizer of ['adamw', 'adafactor'] as const) {
    const a = dense(4, 'bf16'), b = dense(4, 'bf16'), c = dense(4, 'bf16');
    const rn = train(a, rows, { ...opts, optimizer });
    const sr1 = train(b, rows, { ...opts, optimizer, stochasticRounding: true });
    const sr2 = train(c, rows, { ...opts, optimizer, stochasticRounding: true });
    t.equal(rn.state.master!.size, 0, `${optimizer}: no master weights`);
    t.ok(rn.losses.at(-1)! < rn.losses[0] - 0.2 && sr1.losses.at(-1)! < sr1.losses[0] - 0.2,
      `${optimizer}: the loss falls (nearest ${rn.losses[0].toFixed(3)} -> ${rn.losses.at(-1)!.toFixed(3)}, stochastic -> ${sr1.losses.at(-1)!.toFixed(3)})`);
    t.same(sr2.losses, sr1.losses, `${optimizer}: stochastic rounding is deterministic for a seed`);
    t.notOk(sameBits(weights(b), weights(a)), `${optimizer}: and rounds otherwise than nearest`);
    [a, b, c].forEach((m) => m.dispose());
    [rn.state, sr1.state, sr2.state].forEach(disposeState);
  }
});

t.test('bf16 gradients: linear and expert weights accumulate bf16 gradients, the rest f32; training follows the f32-gradient run', async (t) => {
  const opts: TrainOptions = { lr: 1e-2, batchSize: 8, microBatch: 4, steps: 5, seed: 3, optimizer: 'adafactor', masterWeights: false };
  const a = moe(8, 'bf16'), b = moe(8, 'bf16');
  const ra = train(a, rows, opts), rb = train(b, rows, { ...opts, gradDtype: 'bf16' });
  const kinds = b.trainableParams().map((p) => `${p.name.includes('embed') ? 'embed' : p.value.shape.length >= 2 ? 'matrix' : 'vector'}:${p.grad!.dtype}`);
  t.same([...new Set(kinds)].sort(), ['embed:f32', 'matrix:bf16', 'vector:f32'], 'bf16 gradients for the GEMM weights, f32 for the embedding and vectors');
  t.ok(a.trainableParams().every((p) => p.grad!.dtype === 'f32'), 'the default: f32 gradients');
  const gap = Math.max(...rb.losses.map((l, i) => Math.abs(l - ra.losses[i])));
  t.ok(rb.losses.at(-1)! < rb.losses[0] - 0.2 && gap < 0.05, `the loss falls (${rb.losses[0].toFixed(3)} -> ${rb.losses.at(-1)!.toFixed(3)}), within ${gap.toFixed(4)} of f32 gradients`);
  const c = moe(8);
  throwsCode(t, () => train(c, rows, { ...opts, gradDtype: 'bf16' }), 'XFT_VALUE', /gradDtype/, 'bf16 gradients of an f32 model');
  [a, b, c].forEach((m) => m.dispose());
  [ra.state, rb.state].forEach(disposeState);
});

t.test('a state resumed with another optimizer or precision is refused (XFT_VALUE); bad options and files too', async (t) => {
  const m = dense(6, 'bf16');
  const af = train(m, rows, { lr: 1e-3, batchSize: 8, steps: 1, optimizer: 'adafactor', masterWeights: true });
  throwsCode(t, () => train(m, rows, { lr: 1e-3, batchSize: 8, steps: 2, resume: af.state }), 'XFT_VALUE', /saved by a 'adafactor' run; this run uses 'adamw'/, 'Adafactor state, AdamW run');
  throwsCode(t, () => train(m, rows, { lr: 1e-3, batchSize: 8, steps: 2, optimizer: 'adafactor', masterWeights: false, resume: af.state }), 'XFT_VALUE', /master weights/, 'mixed state, bf16 run');
  const aw = train(m, rows, { lr: 1e-3, batchSize: 8, steps: 1, masterWeights: false });
  throwsCode(t, () => train(m, rows, { lr: 1e-3, batchSize: 8, steps: 2, optimizer: 'adafactor', masterWeights: false, resume: aw.state }), 'XFT_VALUE', /'adamw' run/, 'AdamW state, Adafactor run');
  throwsCode(t, () => train(m, rows, { lr: 1e-3, batchSize: 8, steps: 2, masterWeights: true, resume: aw.state }), 'XFT_VALUE', /no master weights/, 'bf16 state, mixed run');
  throwsCode(t, () => train(m, rows, { lr: 1e-3, batchSize: 8, optimizer: 'sgd' as never }), 'XFT_VALUE', /optimizer/, 'unknown optimizer');
  throwsCode(t, () => train(m, rows, { lr: 1e-3, batchSize: 8, masterWeights: 'no' as never }), 'XFT_VALUE', /masterWeights/, 'non-boolean masterWeights');
  throwsCode(t, () => train(m, rows, { lr: 1e-3, batchSize: 8, stochasticRounding: 1 as never }), 'XFT_VALUE', /stochasticRounding/, 'non-boolean stochasticRounding');
  // files: an unknown optimizer in trainer_state.json, AdamW moments in an Adafactor state
  const dir = path.join(tmp, 'bad');
  saveTrainState(dir, m, af.state);
  const json = path.join(dir, 'trainer_state.json'), info = JSON.parse(fs.readFileSync(json, 'utf8'));
  fs.writeFileSync(json, JSON.stringify({ ...info, optimizer: 'sgd' }));
  throwsCode(t, () => loadTrainState(dir, m), 'XFT_FORMAT', /unknown optimizer "sgd"/, 'unknown optimizer in the file');
  saveTrainState(dir, m, { ...aw.state, optimizer: 'adafactor' });
  throwsCode(t, () => loadTrainState(dir, m), 'XFT_FORMAT', /unexpected tensor m\./, 'first moments in an Adafactor state');
  m.dispose();
  [af.state, aw.state].forEach(disposeState);
});
