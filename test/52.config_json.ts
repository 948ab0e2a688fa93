// config.json as the reference and transformers read it: every path that writes config.json (upcycle,
// merge, a loaded model saved again (SFT / MoE training), a merge model's checkpoint) keeps the source's
// keys and values as written (4.0 stays 4.0, unknown keys, nested objects, null, key order); the keys
// loaders fill with their own defaults are written; each routing variant gets the reference's gate
// class and reads back; the router initialisations draw what they say, deterministically.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parse as parseLossless, stringify as stringifyLossless } from 'lossless-json';
import { Tensor } from '../lib/index';
import { configJsonText, tinyConfig } from '../lib/config';
import { createDense, upcycle, mergeable } from '../lib/xft';
import { GATE_TYPES, loadModel, mergeCheckpoint, readCheckpointInfo, saveMergeCheckpoint, saveModel, upcycleCheckpoint } from '../lib/checkpoint';
import { MoeFFN } from '../lib/model';
import { exact, throwsCode } from './helpers/check';
import { cliWorkspace } from './helpers/cli';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-config-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
const dir = (name: string) => path.join(tmp, name);
const config = tinyConfig({ hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 40, num_hidden_layers: 2 });

// DeepSeek-Coder's config.json as transformers writes it (sorted keys, Python floats), plus keys xft
// does not know: nested objects, arrays, null, numbers in several written forms
const SOURCE = `{
  "_name_or_path": "deepseek-ai/deepseek-coder-1.3b-base",
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "bos_token_id": 32013,
  "eos_token_id": 32014,
  "hidden_act": "silu",
  "hidden_size": 32,
  "initializer_range": 0.02,
  "intermediate_size": 48,
  "max_position_embeddings": 16384,
  "model_type": "llama",
  "num_attention_heads": 4,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-06,
  "rope_scaling": {"factor": 4.0, "type": "linear"},
  "rope_theta": 100000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "float32",
  "transformers_version": "4.33.1",
  "use_cache": true,
  "vocab_size": 40,
  "x_unknown": {"nested": [1.50, 2e3, null, {"deep": 0.10}], "whole": 7.0, "none": null, "text": "4.0"},
  "x_big": 12345678901234567890
}
`;
/** keys the output may change: the kind's architecture, model type and dtype */
const CHANGED = new Set(['architectures', 'model_type', 'torch_dtype']);

type Doc = Record<string, unknown>;
const readDoc = (d: string) => parseLossless(fs.readFileSync(path.join(d, 'config.json'), 'utf8')) as Doc;
const sourceDoc = parseLossless(SOURCE) as Doc;

function denseSource(name: string, text = SOURCE): string {
  const m = createDense(config, { seed: 5 });
  saveModel(m, dir(name));
  m.dispose();
  fs.writeFileSync(path.join(dir(name), 'config.json'), text);
  return dir(name);
}

/** Every source key other than CHANGED is in `out` with the same written form, in the source's order. */
function keepsSource(t: tap.Test, out: Doc, what: string) {
  const kept = Object.keys(sourceDoc).filter((k) => !CHANGED.has(k));
  const differ = kept.filter((k) => stringifyLossless(out[k]) !== stringifyLossless(sourceDoc[k]));
  t.same(differ, [], `${what}: every unchanged source key written as it was (4.0, 1e-06, 100000.0, nested, null, 20-digit integer)`);
  const order = Object.keys(out).filter((k) => k in sourceDoc);
  t.same(order, Object.keys(sourceDoc), `${what}: the source's keys in the source's order`);
}

t.test('upcycle, merge, saving a loaded model, saving a merge model: the source config as written', async (t) => {
  const src = denseSource('src');
  upcycleCheckpoint(src, dir('moe'), { experts: 4, topK: 3, seed: 1 });
  const moe = readDoc(dir('moe'));
  keepsSource(t, moe, 'upcycleCheckpoint');
  const text = fs.readFileSync(path.join(dir('moe'), 'config.json'), 'utf8');
  t.match(text, /"factor": 4\.0,/, 'the text keeps "factor": 4.0');
  t.match(text, /"rms_norm_eps": 1e-06,/, 'and "rms_norm_eps": 1e-06');
  t.match(text, /"x_big": 12345678901234567890,/, 'and a 20-digit integer digit for digit');
  t.equal(moe.gate_type, GATE_TYPES.xft, 'the XFT gate class');
  t.match(text, /"score_scale_factor": 1\.0,/, 'floats xft sets are written as floats');

  mergeCheckpoint(dir('moe'), dir('merged'));
  keepsSource(t, readDoc(dir('merged')), 'mergeCheckpoint (from the MoE xft wrote)');
  t.notOk('num_experts' in readDoc(dir('merged')), 'the dense output has no MoE keys');

  // the paths of `xft train`: a loaded dense or MoE model saved again, a merge model's checkpoint
  const dense = loadModel(src);
  saveModel(dense, dir('sft'));
  keepsSource(t, readDoc(dir('sft')), 'saveModel of a loaded dense model');
  const up = upcycle(dense, { experts: 4, topK: 3, seed: 1 });
  saveModel(up, dir('moe-mem'));
  keepsSource(t, readDoc(dir('moe-mem')), 'saveModel of an in-memory upcycle');
  t.equal(fs.readFileSync(path.join(dir('moe-mem'), 'config.json'), 'utf8'), text, 'in-memory and on-disk upcycle write the same config.json');
  const merge = mergeable(loadModel(dir('moe')));
  saveMergeCheckpoint(merge, dir('moe'), dir('merge-ckpt'));
  keepsSource(t, readDoc(dir('merge-ckpt')), 'saveMergeCheckpoint');
  saveModel(loadModel(dir('merge-ckpt')), dir('merge-again'));
  keepsSource(t, readDoc(dir('merge-again')), 'a loaded merge checkpoint saved again');
  for (const m of [dense, up, merge]) m.dispose();
});

t.test('number forms: an integer the source wrote stays an integer, a float stays a float', async (t) => {
  const src = denseSource('int-factor', SOURCE.replace('"factor": 4.0', '"factor": 4').replace('"rope_theta": 100000.0', '"rope_theta": 100000'));
  upcycleCheckpoint(src, dir('int-moe'), { experts: 4, topK: 3 });
  const text = fs.readFileSync(path.join(dir('int-moe'), 'config.json'), 'utf8');
  t.match(text, /"factor": 4,/, '"factor": 4 written back as 4 (as it was)');
  t.match(text, /"rope_theta": 100000,/, '"rope_theta": 100000 as it was');
  t.equal(readCheckpointInfo(dir('int-moe')).config.rope_scaling?.factor, 4, 'and reads as factor 4');
});

t.test('keys loaders fill with their own defaults are written', async (t) => {
  // a config without rope_scaling, rope_theta and token ids (the reference would assume linear 4.0 and 32014)
  const bare = JSON.parse(SOURCE);
  for (const k of ['rope_scaling', 'rope_theta', 'bos_token_id', 'eos_token_id']) delete bare[k];
  const src = denseSource('bare', JSON.stringify(bare, null, 2));
  upcycleCheckpoint(src, dir('bare-moe'), { experts: 4, topK: 3 });
  mergeCheckpoint(dir('bare-moe'), dir('bare-merged'));
  for (const d of ['bare-moe', 'bare-merged']) {
    const text = fs.readFileSync(path.join(dir(d), 'config.json'), 'utf8');
    const c = JSON.parse(text);
    t.equal(c.rope_scaling, null, `${d}: rope_scaling null (no scaling), not left out`);
    t.match(text, /"rope_theta": 10000\.0/, `${d}: rope_theta 10000.0, a float`);
    for (const k of ['pad_token_id', 'bos_token_id', 'eos_token_id']) t.ok(k in c && c[k] === null, `${d}: ${k} null, not left out`);
  }
  // a config made in code (no source): the same keys, floats as floats
  saveModel(createDense(config), dir('code'));
  const text = fs.readFileSync(path.join(dir('code'), 'config.json'), 'utf8');
  const c = JSON.parse(text);
  t.equal(c.rope_scaling, null, 'made in code: rope_scaling null');
  t.ok(c.pad_token_id === null && 'pad_token_id' in c, 'made in code: pad_token_id null');
  t.match(text, /"rope_theta": 10000\.0/, 'made in code: rope_theta 10000.0');
  t.match(text, /"initializer_range": 0\.02/, 'made in code: initializer_range 0.02');
});

t.test('configJsonText: equal values keep the source form, changed ones are written anew', async (t) => {
  const source = parseLossless('{"b": 1.0, "a": {"factor": 4.0, "g": [1.0, 2]}, "c": null, "d": 2.50}') as Doc;
  t.equal(configJsonText({ a: { factor: 4, g: [1, 2] }, b: 1, c: null, d: 2.5 }, source).replace(/\s+/g, ''), '{"b":1.0,"a":{"factor":4.0,"g":[1.0,2]},"c":null,"d":2.50}', 'unchanged: as written, in the source order');
  t.equal(configJsonText({ a: { factor: 2, g: [1, 2] }, b: 1, c: 0, e: 'new' }, source).replace(/\s+/g, ''), '{"b":1.0,"a":{"factor":2.0,"g":[1.0,2]},"c":0,"e":"new"}', 'changed values new (a float key with a fraction), dropped keys dropped, new keys last');
  t.equal(configJsonText({ rope_theta: 5e5, shared_expert_weight: 1, num_experts: 8 }).replace(/\s+/g, ''), '{"rope_theta":500000.0,"shared_expert_weight":1.0,"num_experts":8}', 'no source: float keys with a fraction, integers as integers');
});

t.test('each routing variant: the reference\'s gate class and config, read back as the same MoE', async (t) => {
  const src = denseSource('variants');
  const variants = [
    { name: 'xft', options: {}, gate: GATE_TYPES.xft, N: 3 },
    { name: 'no-normalization', options: { normalize: false }, gate: GATE_TYPES.noNormalization, N: 3 },
    { name: 'no-shared-expert', options: { sharedExpert: false }, gate: GATE_TYPES.noSharedExpert, N: 4 },
    { name: 'no-shared-linear-no-noise', options: { sharedExpert: false, router: 'linear', noise: false }, gate: GATE_TYPES.noSharedExpert, N: 4 },
  ] as const;
  for (const v of variants) {
    const out = dir(`v-${v.name}`);
    upcycleCheckpoint(src, out, { experts: 4, topK: 3, seed: 2, ...v.options });
    const c = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8'));
    t.equal(c.gate_type, v.gate, `${v.name}: gate_type ${v.gate}`);
    t.equal(c.num_experts, 4, `${v.name}: num_experts E = 4 (the reference's gate routes over ${v.N} columns)`);
    t.equal(c.num_selects, 3, `${v.name}: num_selects K = 3`);
    const info = readCheckpointInfo(out);
    const m = loadModel(out);
    const f = m.blocks[0].ffn as MoeFFN;
    t.equal(f.moe.shared_expert, !('sharedExpert' in v.options), `${v.name}: reads back shared_expert`);
    t.equal(f.moe.normalize_weights, !('normalize' in v.options), `${v.name}: reads back normalize_weights`);
    t.same(info.moe, f.moe, `${v.name}: the checkpoint info agrees`);
    t.same(f.router[0].value.shape, [v.N, 32], `${v.name}: router [${v.N}, d]`);
    t.equal(f.noise === null, 'noise' in v.options, `${v.name}: a noise weight exactly when the gate has noise`);
    m.dispose();
  }
  // the reference's files carry no "xft" record: gate_type alone tells the variant
  for (const v of variants.slice(1, 3)) {
    const out = dir(`v-${v.name}`), file = path.join(out, 'config.json');
    const c = JSON.parse(fs.readFileSync(file, 'utf8'));
    delete c.xft;
    fs.writeFileSync(file, JSON.stringify(c));
    const moe = readCheckpointInfo(out).moe!;
    t.same([moe.shared_expert, moe.normalize_weights], v.name === 'no-normalization' ? [true, false] : [false, true], `${v.name} without "xft": from gate_type`);
  }
  // an xft checkpoint written before gate classes per variant (the ablation only under "xft") still loads
  const old = dir('v-no-normalization'), file = path.join(old, 'config.json');
  const c = JSON.parse(fs.readFileSync(file, 'utf8'));
  fs.writeFileSync(file, JSON.stringify({ ...c, gate_type: GATE_TYPES.xft, xft: { normalize_weights: false, shared_expert: true } }));
  t.equal(readCheckpointInfo(old).moe!.normalize_weights, false, 'an earlier xft no-normalization checkpoint still reads as one');
  fs.writeFileSync(file, JSON.stringify({ ...c, gate_type: GATE_TYPES.noNormalization, xft: { normalize_weights: true } }));
  throwsCode(t, () => readCheckpointInfo(old), 'XFT_FORMAT', /gate_type TopKUniversalBalancedNoNormalizationNoisyGate.*contradicts/, 'gate_type and the xft record disagree');
  fs.writeFileSync(file, JSON.stringify({ ...c, gate_type: 'SwitchBalancedGate' }));
  throwsCode(t, () => readCheckpointInfo(old), 'XFT_FORMAT', /gate_type "SwitchBalancedGate" is not supported.*TopKBalancedNoisyGate/, 'a gate class xft does not implement');
});

/** mean and (population) std of a tensor's values */
function moments(x: Tensor): { mean: number; std: number; n: number } {
  const a = x.toArray() as Float32Array;
  let s = 0, s2 = 0;
  for (const v of a) {
    s += v;
    s2 += v * v;
  }
  const mean = s / a.length;
  return { mean, std: Math.sqrt(s2 / a.length - mean * mean), n: a.length };
}

t.test('router initialisation: uniform (default) and reference N(0, 0.02), deterministic under the seed', async (t) => {
  // d = 256 so that the router and noise weights have enough values for tight moment bounds
  const wide = tinyConfig({ hidden_size: 256, intermediate_size: 32, num_attention_heads: 4, num_key_value_heads: 4, vocab_size: 16, num_hidden_layers: 2 });
  const dense = createDense(wide, { seed: 1 });
  const ref = upcycle(dense, { experts: 8, topK: 6, seed: 4, routerInit: 'reference' });
  for (const b of ref.blocks) {
    const f = b.ffn as MoeFFN;
    for (const p of [...f.router, f.noise!]) {
      const m = moments(p.value);
      // the mean of n draws has std 0.02 / sqrt(n); the sample std is within a few percent for n >= 49
      t.ok(Math.abs(m.mean) < 5 * 0.02 / Math.sqrt(m.n), `${p.name}: mean ${m.mean.toExponential(2)} ~ 0 (n = ${m.n})`);
      t.ok(Math.abs(m.std - 0.02) < (m.n > 1000 ? 0.001 : 0.005), `${p.name}: std ${m.std.toFixed(5)} ~ 0.02`);
    }
  }
  const uni = upcycle(dense, { experts: 8, topK: 6, seed: 4 });
  for (const b of uni.blocks) {
    const f = b.ffn as MoeFFN;
    for (const p of f.router) {
      const a = p.value.toArray() as Float32Array, bound = 1 / Math.sqrt(p.value.shape[1]);
      const m = moments(p.value);
      t.ok(a.every((v) => Math.abs(v) <= bound), `${p.name}: uniform within ±1/sqrt(${p.value.shape[1]})`);
      t.ok(Math.abs(m.std - bound / Math.sqrt(3)) < 0.15 * bound, `${p.name}: std ${m.std.toFixed(4)} ~ bound/sqrt(3) = ${(bound / Math.sqrt(3)).toFixed(4)}`);
    }
    t.ok((f.noise!.value.toArray() as Float32Array).every((v) => v === 0), `${f.noise!.name}: zeros by default`);
  }
  // deterministic: the same seed draws the same bits, in memory and on disk; another seed draws others
  const again = upcycle(dense, { experts: 8, topK: 6, seed: 4, routerInit: 'reference' });
  const other = upcycle(dense, { experts: 8, topK: 6, seed: 5, routerInit: 'reference' });
  const f0 = (m: typeof ref) => m.blocks[0].ffn as MoeFFN;
  exact(t, f0(again).router[0].value.toArray(), f0(ref).router[0].value.toArray(), 'same seed: the same router weights');
  exact(t, f0(again).noise!.value.toArray(), f0(ref).noise!.value.toArray(), 'same seed: the same noise weights');
  t.notSame(Array.from(f0(other).router[0].value.toArray()), Array.from(f0(ref).router[0].value.toArray()), 'another seed: other weights');
  saveModel(dense, dir('wide'));
  upcycleCheckpoint(dir('wide'), dir('wide-moe'), { experts: 8, topK: 6, seed: 4, routerInit: 'reference' });
  const disk = loadModel(dir('wide-moe'));
  for (let i = 0; i < 2; i++) {
    const a = disk.blocks[i].ffn as MoeFFN, b = ref.blocks[i].ffn as MoeFFN;
    for (let j = 0; j < a.router.length; j++) exact(t, a.router[j].value.toArray(), b.router[j].value.toArray(), `layer ${i}: on-disk router ${j} = in-memory`);
    exact(t, a.noise!.value.toArray(), b.noise!.value.toArray(), `layer ${i}: on-disk noise = in-memory`);
  }
  throwsCode(t, () => upcycle(dense, { routerInit: 'normal' as never }), 'XFT_VALUE', /routerInit.*'uniform' or 'reference'|routerInit/, 'an unknown routerInit');
  throwsCode(t, () => upcycleCheckpoint(dir('wide'), dir('never'), { routerInit: 'normal' as never }), 'XFT_VALUE', /routerInit/, 'an unknown routerInit on disk');
  t.notOk(fs.existsSync(dir('never')), 'nothing written for a bad routerInit');
  for (const m of [dense, ref, uni, again, other, disk]) m.dispose();
});

t.test('xft upcycle --router-init: the help names the default, reference draws N(0, 0.02), a bad kind is a usage error', async (t) => {
  const { xft, at } = cliWorkspace('xft-config-cli-', t.teardown.bind(t));
  const help = xft('upcycle', '--help');
  t.match(help.out.replace(/\s+/g, ' '), /--router-init <kind>.*reference.*N\(0, 0\.02\).*\(choices: "uniform", "reference", default: "uniform"\)/, 'help: both kinds and the default');
  const r = xft('upcycle', 'dense', 'moe', '--experts', '4', '--top-k', '3', '--router-init', 'reference', '--seed', '3');
  t.equal(r.code, 0, `upcycle --router-init reference: ${r.err}`);
  const m = loadModel(at('moe'));
  const f = m.blocks[0].ffn as MoeFFN;
  const all = [...f.router, f.noise!].flatMap((p) => Array.from(p.value.toArray() as Float32Array));
  const std = Math.sqrt(all.reduce((a, v) => a + v * v, 0) / all.length);
  t.ok(Math.abs(std - 0.02) < 0.003, `router and noise weights: std ${std.toFixed(4)} ~ 0.02 (n = ${all.length})`);
  m.dispose();
  const bad = xft('upcycle', 'dense', 'moe2', '--router-init', 'normal');
  t.equal(bad.code, 2, 'an unknown --router-init is exit 2');
  t.match(bad.err, /--router-init.*uniform, reference/, 'naming the choices');
});
