// MoE checkpoints xft writes, read as the XFT reference reads them (test/helpers/reference_gate.py,
// numpy only, written from the reference's config class and gate modules): the config validates, no key
// falls back to the reference's DeepSeek-Coder defaults, the gate class of each variant has exactly the
// tensors the checkpoint holds, and its routing (weights per expert, importance) is xft's. Controls: the
// configs earlier xft wrote for the ablations, which the reference misreads or cannot load.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { Tensor, ops } from '../lib/index';
import { tinyConfig } from '../lib/config';
import { createDense } from '../lib/xft';
import { GATE_TYPES, loadModel, saveModel, upcycleCheckpoint } from '../lib/checkpoint';
import type { MoeFFN } from '../lib/model';
import type { UpcycleOptions } from '../lib/xft';
import { close } from './helpers/check';
import { rng } from './helpers/ref';
import { PYTHON, numpyOrSkip } from './helpers/python';

const skip = numpyOrSkip(t);

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-gates-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
const dir = (name: string) => path.join(tmp, name);

const d = 32, L = 2, T = 24;
const config = tinyConfig({ hidden_size: d, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 40, num_hidden_layers: L });
const R = rng(21);
/** FFN inputs per layer [L][T][d] */
const X = Array.from({ length: L }, () => Array.from({ length: T }, () => Array.from({ length: d }, () => 3 * R.normal())));

interface Reference {
  config_error: string | null;
  defaulted: string[];
  gate_class: string | null;
  gate_error?: string;
  tensor_errors: string[];
  layers: { weights: number[][]; importance: number[] }[];
}

function reference(folder: string): Reference {
  const xFile = path.join(tmp, 'x.json'), out = path.join(tmp, 'gate.json');
  fs.writeFileSync(xFile, JSON.stringify(X));
  const r = spawnSync(PYTHON, [path.join(__dirname, 'helpers', 'reference_gate.py'), folder, xFile, out], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`reference_gate.py failed: ${r.stderr}`);
  return JSON.parse(fs.readFileSync(out, 'utf8'));
}

/** xft's routing of X through the loaded checkpoint's routers: weights per expert [T][E] and importance, per layer. */
function xftRouting(folder: string): { weights: number[][]; importance: number[] }[] {
  const m = loadModel(folder);
  const out = m.blocks.map((b, l) => {
    const f = b.ffn as MoeFFN, E = f.experts;
    const w = f.router.map((p) => ({ a: p.value.toArray() as Float32Array, rows: p.value.shape[0], cols: p.value.shape[1] }));
    const matT = (x: number[], p: (typeof w)[number]) => Array.from({ length: p.rows }, (_, i) => x.reduce((s, v, j) => s + v * p.a[i * p.cols + j], 0));
    const logits = X[l].map((x) => (w.length === 2 ? matT(matT(x, w[0]).map(Math.tanh), w[1]) : matT(x, w[0])));
    const N = logits[0].length;
    const r = ops.routeShared(Tensor.from(logits.flat(), [T, N]), { topK: f.moe.num_selects, normalize: f.moe.normalize_weights, shared: f.moe.shared_expert });
    const ex = r.experts.toArray(), g = r.weights.toArray(), K = f.moe.num_selects;
    const weights = Array.from({ length: T }, (_, t) => {
      const row = new Array<number>(E).fill(0);
      for (let s = 0; s < K; s++) row[ex[t * K + s]] += g[t * K + s];
      return row;
    });
    const importance = Array.from(r.importance.toArray());
    r.dispose();
    return { weights, importance };
  });
  m.dispose();
  return out;
}

// DeepSeek-Coder's config keys and forms (transformers writes them so), which the reference's class also reads
function denseSource(): string {
  const m = createDense(config, { seed: 9 });
  saveModel(m, dir('dense'));
  m.dispose();
  const file = path.join(dir('dense'), 'config.json');
  const c = JSON.parse(fs.readFileSync(file, 'utf8'));
  const text = JSON.stringify({ ...c, bos_token_id: 32013, eos_token_id: 32014, rope_theta: 100000, rope_scaling: { factor: 4, type: 'linear' }, max_position_embeddings: 16384 }, null, 2)
    .replace('"factor": 4,', '"factor": 4.0,').replace('"rope_theta": 100000,', '"rope_theta": 100000.0,');
  fs.writeFileSync(file, text);
  return dir('dense');
}

t.test('each variant as the reference reads it: its gate class, its tensors, xft\'s routing', { skip }, async (t) => {
  const src = denseSource();
  const variants: [string, UpcycleOptions, string][] = [
    ['xft, mlp router', {}, GATE_TYPES.xft],
    ['no normalization', { normalize: false }, GATE_TYPES.noNormalization],
    ['no shared expert', { sharedExpert: false }, GATE_TYPES.noSharedExpert],
    ['no shared expert, linear router, no noise', { sharedExpert: false, router: 'linear', noise: false, topK: 2 }, GATE_TYPES.noSharedExpert],
    ['xft, linear router, reference init', { router: 'linear', routerInit: 'reference' }, GATE_TYPES.xft],
  ];
  for (const [what, options, gate] of variants) {
    const out = dir(what.replace(/\W+/g, '-'));
    upcycleCheckpoint(src, out, { experts: 5, topK: 3, seed: 3, ...options });
    const ref = reference(out);
    t.equal(ref.config_error, null, `${what}: LlamaMoEUpscalingConfig accepts the config (rope_scaling factor a float)`);
    t.same(ref.defaulted, [], `${what}: no key falls back to the reference's DeepSeek-Coder defaults`);
    t.equal(ref.gate_class, gate, `${what}: the reference builds ${gate}`);
    t.same(ref.tensor_errors, [], `${what}: the gate modules have exactly the checkpoint's gate tensors, in its shapes`);
    const mine = xftRouting(out);
    t.equal(ref.layers.length, L, `${what}: every layer routed`);
    for (let l = 0; l < Math.min(L, ref.layers.length); l++) {
      close(t, mine[l].weights.flat(), ref.layers[l].weights.flat(), 1e-5, `${what}, layer ${l}: routing weight of every expert for every token`);
      close(t, mine[l].importance, ref.layers[l].importance, 1e-5, `${what}, layer ${l}: importance (the balance loss input)`);
    }
  }
});

t.test('controls: what earlier xft wrote for the ablations, and an integer rope_scaling factor', { skip }, async (t) => {
  const src = fs.existsSync(dir('dense')) ? dir('dense') : denseSource();
  // gate_type TopKUniversalBalancedNoisyGate with the ablation only under "xft"
  const old = (name: string, options: UpcycleOptions, xft: object) => {
    upcycleCheckpoint(src, dir(name), { experts: 5, topK: 3, seed: 3, ...options });
    const file = path.join(dir(name), 'config.json');
    fs.writeFileSync(file, JSON.stringify({ ...JSON.parse(fs.readFileSync(file, 'utf8')), gate_type: GATE_TYPES.xft, xft }));
    return dir(name);
  };
  const noNorm = old('old-no-norm', { normalize: false }, { normalize_weights: false, shared_expert: true });
  const ref = reference(noNorm), mine = xftRouting(noNorm);
  t.same(ref.tensor_errors, [], 'old no-normalization MoE: loads in the reference');
  const diff = Math.max(...mine[0].weights.flat().map((v, i) => Math.abs(v - ref.layers[0].weights.flat()[i])));
  t.ok(diff > 1e-3, `old no-normalization MoE: the reference routes it differently (normalized), max weight difference ${diff.toFixed(3)}`);
  const noShared = old('old-no-shared', { sharedExpert: false }, { normalize_weights: true, shared_expert: false });
  t.ok(reference(noShared).tensor_errors.some((e) => /shape \[5, 32\], module \[4, 32\]/.test(e)), 'old no-shared-expert MoE: the reference cannot load its router');
  // the source's integer factor is written back as it was, and the reference refuses it as it would the source
  const file = path.join(dir('old-no-shared'), 'config.json');
  const c = JSON.parse(fs.readFileSync(file, 'utf8'));
  fs.writeFileSync(file, JSON.stringify({ ...c, rope_scaling: { factor: 4, type: 'linear' } }));
  t.match(reference(dir('old-no-shared')).config_error ?? '', /factor must be a float > 1, got 4/, 'an integer factor fails the reference\'s validation');
  delete c.pad_token_id;
  fs.writeFileSync(file, JSON.stringify(c));
  t.same(reference(dir('old-no-shared')).defaulted, ['pad_token_id'], 'a missing pad_token_id falls back to the reference\'s 32014');
});
