// The training loop on the CPU: loss decreases on real text, runs are deterministic, a resumed run
// continues with the losses of an unbroken one, the XFT stages train what they should; a diverging
// run stops at the first non-finite step, a collapsed one is warned about, one run per model.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { tinyConfig } from '../lib/config';
import { createDense, upcycle, mergeable } from '../lib/xft';
import { ByteTokenizer, toRows } from '../lib/data';
import { train, trainAsync, evaluate, learningRate, saveTrainState, loadTrainState, disposeState } from '../lib/train';
import { writeSafetensors, writeFolderAtomic } from '../lib/safetensors';
import { XftError } from '../lib/errors';
import { throwsCode } from './helpers/check';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-train-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

// real text: this package's own TypeScript sources, byte-tokenized and packed
const tok = new ByteTokenizer();
const text = ['errors.ts', 'config.ts', 'data.ts'].map((f) => fs.readFileSync(path.join(__dirname, '..', 'lib', f), 'utf8')).join('\n');
const ids = tok.encode(text).slice(0, 8 * 33 * 12);
const rows = toRows([{ ids: ids.slice(0, -1), targets: ids.slice(1) }], 32, 'pack', tok.pad);
const config = tinyConfig({ hidden_size: 32, intermediate_size: 64, num_attention_heads: 4, num_key_value_heads: 2 });

t.test('the learning-rate schedule: linear warmup, then linear decay to 0', async (t) => {
  t.same([0, 1, 2, 3, 4, 5, 6, 7].map((s) => learningRate(s, 1, 2, 8)), [0.5, 1, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]);
});

t.test('loss decreases on real text, and runs are deterministic', async (t) => {
  const run = () => {
    const m = createDense(config, { seed: 1 });
    const seen: number[] = [];
    const r = train(m, rows, { lr: 3e-3, batchSize: 8, microBatch: 4, epochs: 4, warmupSteps: 2, seed: 3, onStep: (s) => seen.push(s.gradNorm) });
    const ev = evaluate(m, rows.slice(0, 8));
    m.dispose();
    disposeState(r.state);
    return { losses: r.losses, grads: seen, ev };
  };
  const a = run();
  t.ok(a.losses.length >= 8, `${a.losses.length} steps`);
  const first = a.losses[0], lastLoss = a.losses[a.losses.length - 1];
  t.ok(first > 5 && first < 6, `starts near ln(259) = 5.56 (${first.toFixed(3)})`);
  t.ok(lastLoss < first - 1.5, `loss falls: ${first.toFixed(3)} -> ${lastLoss.toFixed(3)}`);
  t.ok(a.ev.accuracy > 0.05 && a.ev.loss < first, `eval loss ${a.ev.loss.toFixed(3)}, token accuracy ${a.ev.accuracy.toFixed(3)}`);
  t.ok(a.grads.every((g) => g > 0 && Number.isFinite(g)), 'finite gradient norms');
  const b = run();
  t.same(b.losses, a.losses, 'a second run with the same seed gives the same losses, bit for bit');
});

t.test('a resumed run continues with the losses of an unbroken run', async (t) => {
  const opts = { lr: 2e-3, batchSize: 4, epochs: 2, warmupSteps: 1, seed: 5, weightDecay: 0.1 };
  const m1 = createDense(config, { seed: 2 });
  const full = train(m1, rows, opts);
  const m2 = createDense(config, { seed: 2 });
  const half = train(m2, rows, { ...opts, stopAfter: 5 });
  saveTrainState(path.join(tmp, 'ckpt'), m2, half.state);
  const m3 = createDense(config, { seed: 99 }); // other weights: the checkpoint must restore them
  const state = loadTrainState(path.join(tmp, 'ckpt'), m3);
  t.equal(state.step, 5);
  const rest = train(m3, rows, { ...opts, resume: state });
  t.same([...half.losses, ...rest.losses], full.losses, 'the same losses as the unbroken run');
  [m1, m2, m3].forEach((m) => m.dispose());
  [full.state, half.state, state].forEach(disposeState);
});

t.test('trainAsync stops on an abort signal after a whole step; resumed, it ends where an unbroken run ends', async (t) => {
  const opts = { lr: 2e-3, batchSize: 4, epochs: 1, seed: 6 };
  const m1 = createDense(config, { seed: 3 });
  const full = train(m1, rows, opts);
  const m2 = createDense(config, { seed: 3 });
  const stop = new AbortController();
  // the abort arrives from the event loop (as SIGINT would), not from inside the step
  const half = await trainAsync(m2, rows, { ...opts, signal: stop.signal, onStep: (s) => { if (s.step === 3) setImmediate(() => stop.abort()); } });
  t.equal(half.interrupted, true, 'interrupted');
  t.equal(half.state.step, 3, 'after step 3');
  const rest = await trainAsync(m2, rows, { ...opts, resume: half.state });
  t.equal(rest.interrupted, false);
  t.same([...half.losses, ...rest.losses], full.losses, 'the same losses as the unbroken run');
  const p1 = m1.params().map((p) => Array.from(p.value.toArray())), p2 = m2.params().map((p) => Array.from(p.value.toArray()));
  t.same(p2, p1, 'the same weights');
  [m1, m2].forEach((m) => m.dispose());
  [full.state, half.state].forEach(disposeState);
});

t.test('XFT stages: the MoE fine-tunes everything, merge learning trains only alpha', async (t) => {
  const dense = createDense(config, { seed: 4 });
  const moe = upcycle(dense, { experts: 4, topK: 3, seed: 1 });
  const before = evaluate(moe, rows.slice(0, 8)).loss;
  const r = train(moe, rows, { lr: 3e-3, batchSize: 8, epochs: 2, seed: 1 });
  t.ok(r.losses[r.losses.length - 1] < r.losses[0] - 0.5, `MoE loss falls: ${r.losses[0].toFixed(3)} -> ${r.losses[r.losses.length - 1].toFixed(3)}`);
  t.ok(evaluate(moe, rows.slice(0, 8)).loss < before, 'held-out loss improves');
  const merge = mergeable(moe, { sharedRate: 0.75 });
  t.same(merge.trainableParams().map((p) => p.name), [0, 1].map((i) => `model.layers.${i}.mlp.average_weights`), 'only alpha is trainable');
  const frozen = merge.params().filter((p) => !p.trainable).map((p) => p.value.toArray());
  const r2 = train(merge, rows, { lr: 1e-2, batchSize: 8, epochs: 1, seed: 2 });
  t.ok(r2.losses.every(Number.isFinite));
  t.ok(merge.params().filter((p) => !p.trainable).every((p, i) => Buffer.compare(Buffer.from(p.value.toArray().buffer), Buffer.from(frozen[i].buffer)) === 0), 'frozen weights unchanged');
  t.notSame(Array.from(merge.trainableParams()[0].value.toArray()), [0, 0, 0], 'alpha moved');
  [dense, moe, merge].forEach((m) => m.dispose());
  [r.state, r2.state].forEach(disposeState);
});

t.test('training options are checked', async (t) => {
  const m = createDense(config, { seed: 1 });
  t.throws(() => train(m, rows, { lr: -1, batchSize: 4 }), /lr/);
  t.throws(() => train(m, rows, { lr: 1e-3, batchSize: 4, microBatch: 3 }), /microBatch/);
  t.throws(() => train(m, rows, { lr: 1e-3, batchSize: 10000 }), /batchSize/);
  t.throws(() => train(m, [], { lr: 1e-3, batchSize: 1 }), /rows/);
  m.dispose();
});

t.test('divergence: a non-finite loss or gradient norm stops training on that step, before any update (XFT_NONFINITE)', async (t) => {
  const m = createDense(config, { seed: 1 });
  const seen: number[] = [];
  let before: Float32Array | null = null;
  try {
    train(m, rows, {
      lr: 1e20, clip: 0, batchSize: 8, steps: 10, seed: 3,
      onStep: (s) => {
        seen.push(s.step);
        before = m.lmHead.value.toArray() as Float32Array;
      },
    });
    t.fail('a diverging run should throw');
  } catch (err) {
    t.equal((err as XftError).code, 'XFT_NONFINITE', (err as Error).message);
    t.match((err as Error).message, /not finite at step \d+ .*weights and optimizer state of step \d+/);
  }
  t.ok(seen.length >= 1 && seen.length < 10, `stopped after ${seen.length} good step(s)`);
  t.same(m.lmHead.value.toArray(), before, 'the failing step updated nothing');
  // the model is free again once the run has thrown (its weights are still 1e20-sized: the next run diverges, not XFT_BUSY)
  throwsCode(t, () => train(m, rows, { lr: 0, batchSize: 8, steps: 1 }), 'XFT_NONFINITE', /step 1/, 'the next run on the model');
  m.dispose();
});

t.test('skipNonFinite: bad steps are skipped without an update, up to the limit', async (t) => {
  const m = createDense(config, { seed: 1 });
  const info: { step: number; skipped: boolean }[] = [], warnings: string[] = [];
  let after1: Float32Array | null = null;
  try {
    train(m, rows, {
      lr: 1e20, clip: 0, batchSize: 8, steps: 10, skipNonFinite: 2, onWarning: (w) => warnings.push(w),
      onStep: (s) => {
        info.push({ step: s.step, skipped: s.skipped });
        if (!s.skipped) after1 = m.lmHead.value.toArray() as Float32Array;
      },
    });
    t.fail('more bad steps than allowed should throw');
  } catch (err) {
    t.equal((err as XftError).code, 'XFT_NONFINITE', (err as Error).message);
    t.match((err as Error).message, /2 step\(s\) skipped already/);
  }
  t.equal(info.filter((s) => s.skipped).length, 2, 'two steps skipped');
  t.equal(warnings.filter((w) => /step skipped/.test(w)).length, 2, 'each skip is reported');
  t.same(m.lmHead.value.toArray(), after1, 'skipped steps change no weight');
  throwsCode(t, () => train(m, rows, { lr: 1e-3, batchSize: 8, skipNonFinite: -1 }), 'XFT_VALUE', /skipNonFinite/, 'a negative skipNonFinite');
  m.dispose();
});

t.test('a loss stuck at ln(vocab) gets a warning', async (t) => {
  const m = createDense(config, { seed: 1 });
  const warnings: string[] = [];
  const r = train(m, rows, { lr: 1e4, batchSize: 8, steps: 8, onWarning: (w) => warnings.push(w) });
  t.equal(warnings.length, 1, `one warning: ${warnings[0]}`);
  t.match(warnings[0], /ln\(vocab_size 259\).*uniform distribution/);
  disposeState(r.state);
  m.dispose();
  const fresh = createDense(config, { seed: 1 }), healthy: string[] = [];
  const r2 = train(fresh, rows, { lr: 3e-3, batchSize: 8, steps: 8, onWarning: (w) => healthy.push(w) });
  t.same(healthy, [], 'no warning for a run that learns');
  disposeState(r2.state);
  fresh.dispose();
});

t.test('one run per model: a second train / trainAsync on a model in training is refused (XFT_BUSY)', async (t) => {
  const m = createDense(config, { seed: 1 });
  const first = trainAsync(m, rows, { lr: 1e-3, batchSize: 8, steps: 3 });
  await t.rejects(trainAsync(m, rows, { lr: 1e-3, batchSize: 8, steps: 3 }), { code: 'XFT_BUSY' }, 'a second trainAsync');
  throwsCode(t, () => train(m, rows, { lr: 1e-3, batchSize: 8, steps: 1 }), 'XFT_BUSY', /already being trained/, 'a synchronous train meanwhile');
  const r = await first;
  t.equal(r.state.step, 3, 'the first run completes undisturbed');
  const other = createDense(config, { seed: 2 });
  const [a, b] = await Promise.all([trainAsync(m, rows, { lr: 1e-3, batchSize: 8, steps: 2 }), trainAsync(other, rows, { lr: 1e-3, batchSize: 8, steps: 2 })]);
  t.ok(a.state.step === 2 && b.state.step === 2, 'two models train at once');
  [r, a, b].forEach((x) => disposeState(x.state));
  m.dispose();
  other.dispose();
});

t.test('saveTrainState refuses a non-finite state and keeps the last good one; loadTrainState refuses one', async (t) => {
  const m = createDense(config, { seed: 1 });
  const r = train(m, rows, { lr: 1e-3, batchSize: 8, steps: 1 });
  const dir = path.join(tmp, 'nan.resume');
  saveTrainState(dir, m, r.state);
  const good = fs.readFileSync(path.join(dir, 'params.safetensors'));
  r.state.m.values().next().value!.fill_(NaN);
  throwsCode(t, () => saveTrainState(dir, m, r.state), 'XFT_NONFINITE', /m\..*non-finite/, 'a NaN moment');
  t.same(fs.readFileSync(path.join(dir, 'params.safetensors')), good, 'the saved state is untouched');
  t.same(fs.readdirSync(tmp).filter((n) => n.startsWith('.nan.resume')), [], 'no temporary or lock left behind');
  const loaded = loadTrainState(dir, m);
  t.equal(loaded.step, 1);
  disposeState(loaded);
  // a state written before this check existed (NaN inside) is refused on load
  fs.rmSync(dir, { recursive: true });
  writeFolderAtomic(dir, (d) => {
    writeSafetensors(path.join(d, 'params.safetensors'), m.params().map((p) => ({ name: p.name, dtype: 'F32' as const, shape: p.value.shape, tensor: () => p.value })));
    writeSafetensors(path.join(d, 'optimizer.safetensors'), [...r.state.m].map(([n, v]) => ({ name: `m.${n}`, dtype: 'F32' as const, shape: v.shape, tensor: () => v })), {}, { allowNonFinite: true });
    fs.writeFileSync(path.join(d, 'trainer_state.json'), '{"step": 1}');
  });
  throwsCode(t, () => loadTrainState(dir, m), 'XFT_FORMAT', /optimizer\.safetensors: m\..* non-finite/, 'loading a NaN state');
  disposeState(r.state);
  m.dispose();
});
