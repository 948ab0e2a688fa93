// Checkpoints with Hugging Face names: dense (LlamaForCausalLM), MoE (the XFT reference's names),
// merge (experts + average_weights); upcycle and merge on disk equal the in-memory pipeline.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Tensor } from '../lib/index';
import { tinyConfig, llamaConfig } from '../lib/config';
import { createDense, upcycle, mergeable, toDense } from '../lib/xft';
import { loadModel, saveModel, readCheckpointInfo, upcycleCheckpoint, mergeCheckpoint, mixingCoefficients, saveMergeCheckpoint } from '../lib/checkpoint';
import { SafetensorsReader, writeSafetensors } from '../lib/safetensors';
import type { Model } from '../lib/model';
import { DenseFFN, MergedFFN } from '../lib/model';
import { relErr, rng, roundBf16, refCoefficients } from './helpers/ref';
import { close, exact, throwsCode } from './helpers/check';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-ckpt-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
const dir = (name: string) => path.join(tmp, name);

const config = tinyConfig({ hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 40, num_hidden_layers: 2 });
const B = 2, T = 6;
const R = rng(7);
const ids = Tensor.from(Array.from({ length: B * T }, () => R.int(0, 40)), [B * T], { dtype: 'i32' });

function logitsOf(m: Model): Float32Array {
  const l = m.logits(ids, B, T);
  const a = l.toArray() as Float32Array;
  l.dispose();
  return a;
}

function paramsOf(m: Model): Map<string, Float32Array> {
  return new Map(m.params().map((p) => [p.name, p.value.toArray() as Float32Array]));
}

function sameParams(t: tap.Test, a: Model, b: Model, what: string) {
  const pa = paramsOf(a), pb = paramsOf(b);
  t.same([...pa.keys()], [...pb.keys()], `${what}: the same parameter names in the same order`);
  let diff = 0;
  for (const [n, v] of pa) {
    const w = pb.get(n)!;
    if (!w || w.length !== v.length) diff++;
    else for (let i = 0; i < v.length; i++) if (v[i] !== w[i]) { diff++; break; }
  }
  t.equal(diff, 0, `${what}: every parameter bit-identical`);
}

/** The tensor names transformers' LlamaForCausalLM has for this config. */
function hfDenseNames(L: number): string[] {
  const names = ['model.embed_tokens.weight', 'model.norm.weight', 'lm_head.weight'];
  for (let i = 0; i < L; i++)
    for (const n of ['input_layernorm', 'post_attention_layernorm', 'self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj'])
      names.push(`model.layers.${i}.${n}.weight`);
  return names.sort();
}

t.test('dense: Hugging Face names and config.json; f32 round trip is exact, bf16 rounds to nearest even', async (t) => {
  const m = createDense(config, { seed: 3 });
  saveModel(m, dir('dense'));
  const cfg = JSON.parse(fs.readFileSync(path.join(dir('dense'), 'config.json'), 'utf8'));
  t.same(cfg.architectures, ['LlamaForCausalLM']);
  t.equal(cfg.model_type, 'llama');
  t.equal(cfg.torch_dtype, 'float32');
  t.equal(cfg.hidden_act, 'silu');
  for (const k of ['hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'vocab_size', 'rms_norm_eps', 'rope_theta', 'max_position_embeddings'])
    t.equal(cfg[k], (config as unknown as Record<string, unknown>)[k], `config.json ${k}`);
  t.same(new SafetensorsReader(dir('dense')).names().sort(), hfDenseNames(2), 'exactly the LlamaForCausalLM tensor names');
  t.equal(readCheckpointInfo(dir('dense')).kind, 'dense');
  const back = loadModel(dir('dense'));
  sameParams(t, m, back, 'f32 round trip');
  exact(t, logitsOf(back), logitsOf(m), 'same logits');

  saveModel(m, dir('dense-bf16'), { dtype: 'bf16', maxShardBytes: 20_000 });
  const files = fs.readdirSync(dir('dense-bf16'));
  t.ok(files.includes('model.safetensors.index.json') && files.filter((f) => /^model-\d{5}-of-\d{5}\.safetensors$/.test(f)).length > 1, `sharded: ${files.join(' ')}`);
  t.equal(JSON.parse(fs.readFileSync(path.join(dir('dense-bf16'), 'config.json'), 'utf8')).torch_dtype, 'bfloat16');
  t.equal(new SafetensorsReader(dir('dense-bf16')).info('lm_head.weight').dtype, 'BF16');
  const b16 = loadModel(dir('dense-bf16'));
  const want = m.lmHead.value.toArray(), got = b16.lmHead.value.toArray();
  exact(t, got, Array.from(want, roundBf16), 'bf16 weights are the f32 weights rounded to nearest even');
  [m, back, b16].forEach((x) => x.dispose());
});

t.test('a checkpoint as transformers writes it (bf16, rotary inv_freq, rope_scaling linear) loads', async (t) => {
  const m = createDense(config, { seed: 4 });
  const d = dir('hf');
  fs.mkdirSync(d);
  const entries = m.params().map((p) => ({ name: p.name, dtype: 'BF16' as const, shape: p.value.shape, tensor: () => p.value }));
  entries.push({ name: 'model.layers.0.self_attn.rotary_emb.inv_freq', dtype: 'F32' as const, shape: [4], tensor: () => Tensor.ones([4]) } as never);
  writeSafetensors(path.join(d, 'model.safetensors'), entries, { format: 'pt' });
  fs.writeFileSync(path.join(d, 'config.json'), JSON.stringify({
    ...config, architectures: ['LlamaForCausalLM'], model_type: 'llama', torch_dtype: 'bfloat16', hidden_act: 'silu', attention_bias: false,
    rope_scaling: { type: 'linear', factor: 4.0 }, transformers_version: '4.46.0', bos_token_id: 1, eos_token_id: 2, use_cache: true,
  }));
  fs.writeFileSync(path.join(d, 'tokenizer.json'), '{"hf": true}');
  const info = readCheckpointInfo(d);
  t.same(info.config.rope_scaling, { type: 'linear', factor: 4 }, 'rope_scaling read');
  const back = loadModel(d);
  t.equal(back.kind, 'dense');
  // RoPE scaling changes the function: the same weights without it give other logits
  const plain = createDense(config, { seed: 4 });
  for (const [a, b] of back.params().map((p, i) => [p, plain.params()[i]] as const)) b.value.copy_(a.value);
  t.ok(relErr(logitsOf(back), logitsOf(plain)) > 1e-4, 'linear rope scaling is applied');
  // derived checkpoints keep bf16, the tokenizer, and the HF fields
  upcycleCheckpoint(d, dir('hf-moe'), { experts: 4, topK: 3 });
  t.ok(fs.existsSync(path.join(dir('hf-moe'), 'tokenizer.json')), 'tokenizer.json copied');
  const moeCfg = JSON.parse(fs.readFileSync(path.join(dir('hf-moe'), 'config.json'), 'utf8'));
  t.same(moeCfg.rope_scaling, { type: 'linear', factor: 4 });
  t.equal(moeCfg.torch_dtype, 'bfloat16');
  t.equal(new SafetensorsReader(dir('hf-moe')).info('model.layers.1.mlp.calculator.experts.weight_down.3.weight').dtype, 'BF16');
  t.notOk(new SafetensorsReader(dir('hf-moe')).has('model.layers.0.self_attn.rotary_emb.inv_freq'), 'inv_freq is not carried');
  [back, plain].forEach((x) => x.dispose());

  for (const [field, value, code] of [
    ['rope_scaling', { type: 'dynamic', factor: 2 }, 'XFT_VALUE'], ['hidden_act', 'gelu', 'XFT_VALUE'], ['model_type', 'mistral', 'XFT_FORMAT'],
    ['attention_bias', true, 'XFT_VALUE'], ['tie_word_embeddings', true, 'XFT_VALUE'],
  ] as const) {
    const bad = dir(`bad-${field}`);
    fs.mkdirSync(bad);
    fs.copyFileSync(path.join(d, 'model.safetensors'), path.join(bad, 'model.safetensors'));
    fs.writeFileSync(path.join(bad, 'config.json'), JSON.stringify({ ...config, [field]: value }));
    throwsCode(t, () => loadModel(bad), code, new RegExp(field), `${field}: ${JSON.stringify(value)}`);
  }
});

t.test('MoE: the reference names and config fields; round trip; upcycle on disk = upcycle in memory', async (t) => {
  const dense = createDense(config, { seed: 5 });
  saveModel(dense, dir('d5'));
  for (const router of ['mlp', 'linear'] as const) {
    const moe = upcycle(dense, { experts: 4, topK: 3, router, seed: 9 });
    saveModel(moe, dir(`moe-${router}`));
    const names = new Set(new SafetensorsReader(dir(`moe-${router}`)).names());
    for (let i = 0; i < 2; i++) {
      for (const g of ['gate', 'up', 'down']) for (let e = 0; e < 4; e++) t.ok(names.has(`model.layers.${i}.mlp.calculator.experts.weight_${g}.${e}.weight`), `layer ${i} ${g} expert ${e}`);
      const router_names = router === 'mlp' ? ['gate.gate_network.0.weight', 'gate.gate_network.2.weight'] : ['gate.gate_network.weight'];
      for (const n of [...router_names, 'gate.weight_noise.weight']) t.ok(names.has(`model.layers.${i}.mlp.${n}`), `layer ${i} ${n}`);
      t.notOk(names.has(`model.layers.${i}.mlp.gate_proj.weight`), 'no dense FFN names');
    }
    const cfg = JSON.parse(fs.readFileSync(path.join(dir(`moe-${router}`), 'config.json'), 'utf8'));
    t.match(cfg, { num_experts: 4, num_selects: 3, gate_network: router, gate_type: 'TopKUniversalBalancedNoisyGate', model_type: 'llama_moe_upscaling', gate_add_noise: true, gate_balance_loss_weight: 0.01 });
    const back = loadModel(dir(`moe-${router}`));
    t.equal(back.kind, 'moe');
    sameParams(t, moe, back, `${router} MoE round trip`);

    upcycleCheckpoint(dir('d5'), dir(`moe-disk-${router}`), { experts: 4, topK: 3, router, seed: 9, chunkElements: 100 });
    const disk = loadModel(dir(`moe-disk-${router}`));
    sameParams(t, moe, disk, `${router}: upcycleCheckpoint (100-element chunks) = upcycle`);
    [moe, back, disk].forEach((x) => x.dispose());
  }
  dense.dispose();
});

t.test('merge: average_weights and λ in the checkpoint; merge on disk = toDense in memory', async (t) => {
  const dense = createDense(config, { seed: 6 });
  const moe = upcycle(dense, { experts: 4, topK: 3, seed: 2 });
  // make the experts differ (as after fine-tuning)
  for (const b of moe.blocks) for (const p of b.ffn.params()) if (p.name.includes('experts')) p.value.copy_(Tensor.randn(p.value.shape, { seed: p.name.length * 31 + 1, std: 0.05 }));
  saveModel(moe, dir('moe6'));
  for (const rate of [0.75, null] as const) {
    const mg = mergeable(moe, { sharedRate: rate });
    mg.blocks.forEach((b, i) => (b.ffn as MergedFFN).alpha.value.copy_(Tensor.randn((b.ffn as MergedFFN).alpha.value.shape, { seed: 40 + i })));
    const name = `merge-${rate}`;
    saveModel(mg, dir(name));
    const cfg = JSON.parse(fs.readFileSync(path.join(dir(name), 'config.json'), 'utf8'));
    t.equal(cfg.shared_expert_weight, rate, `shared_expert_weight ${rate}`);
    t.same(cfg.architectures, ['LlamaWeightedForCausalLM']);
    t.same(new SafetensorsReader(dir(name)).info('model.layers.1.mlp.average_weights').shape, [rate === null ? 4 : 3]);
    const info = readCheckpointInfo(dir(name));
    t.equal(info.kind, 'merged');
    t.equal(info.sharedRate, rate);
    const back = loadModel(dir(name));
    sameParams(t, mg, back, `merge (λ ${rate}) round trip`);
    t.same(back.trainableParams().map((p) => p.name), mg.blocks.map((_, i) => `model.layers.${i}.mlp.average_weights`), 'only α is trainable after loading');

    const merged = toDense(mg);
    const r = mergeCheckpoint(dir(name), dir(`${name}-dense`), { chunkElements: 77 });
    const alpha0 = (mg.blocks[0].ffn as MergedFFN).alpha.value.toArray();
    close(t, r.coefficients[0], refCoefficients(alpha0, rate), 1e-12, 'coefficients of layer 0');
    const disk = loadModel(dir(`${name}-dense`));
    t.equal(disk.kind, 'dense');
    t.same(new SafetensorsReader(dir(`${name}-dense`)).names().sort(), hfDenseNames(2), 'the merged checkpoint has exactly the LlamaForCausalLM names');
    const pm = paramsOf(merged), pd = paramsOf(disk);
    let worst = 0;
    for (const [n, v] of pm) worst = Math.max(worst, relErr(pd.get(n)!, v));
    t.ok(worst <= 1e-6, `mergeCheckpoint = toDense: worst relative error ${worst.toExponential(2)} <= 1e-6`);
    t.ok(relErr(logitsOf(disk), logitsOf(mg)) <= 1e-5, 'the merged dense model computes the merge model');
    [mg, back, merged, disk].forEach((x) => x.dispose());
  }
  // a merge model trained from the MoE checkpoint: frozen tensors copied from it, α from the model
  const learned = mergeable(moe, { sharedRate: 0.75 });
  learned.blocks.forEach((b, i) => (b.ffn as MergedFFN).alpha.value.copy_(Tensor.randn([3], { seed: 60 + i })));
  saveMergeCheckpoint(learned, dir('moe6'), dir('merge-from-src'));
  const back = loadModel(dir('merge-from-src'));
  sameParams(t, learned, back, 'saveMergeCheckpoint round trip');
  throwsCode(t, () => saveMergeCheckpoint(moe, dir('moe6'), dir('y')), 'XFT_VALUE', /merge model/, 'an MoE model is not a merge model');
  [learned, back].forEach((x) => x.dispose());
  // an MoE checkpoint merges with the initial coefficients (α = 0)
  const init = mergeable(moe);
  const initDense = toDense(init);
  mergeCheckpoint(dir('moe6'), dir('moe6-init'), { dtype: 'bf16' });
  const disk = loadModel(dir('moe6-init'));
  const w = initDense.blocks[1].ffn.params()[2].value.toArray();
  close(t, disk.blocks[1].ffn.params()[2].value.toArray(), Array.from(w, roundBf16), 1e-6, 'MoE checkpoint, λ = 0.75, α = 0, written as bf16');
  throwsCode(t, () => mergeCheckpoint(dir('merge-0.75'), dir('x'), { sharedRate: 0.5 }), 'XFT_VALUE', /shared rate 0\.75/, 'a merge checkpoint keeps its λ');
  throwsCode(t, () => mergeCheckpoint(dir('moe6'), dir('x'), { sharedRate: 1.5 }), 'XFT_VALUE', /sharedRate/, 'λ out of range');
  throwsCode(t, () => mergeCheckpoint(dir('d5'), dir('x')), 'XFT_VALUE', /dense checkpoint/, 'merging a dense checkpoint');
  throwsCode(t, () => upcycleCheckpoint(dir('moe6'), dir('x')), 'XFT_VALUE', /moe checkpoint/, 'upcycling an MoE checkpoint');
  t.notOk(fs.existsSync(dir('x')), 'nothing written on error');
  t.same(mixingCoefficients([0, 0, 0], 0.75), [0.75, 1 / 12, 1 / 12, 1 / 12]);
  [init, initDense, disk, moe, dense].forEach((x) => x.dispose());
});

t.test('bad checkpoints get typed errors naming the tensor; writes never replace user files or leave partial folders', async (t) => {
  const m = createDense(config, { seed: 8 });
  saveModel(m, dir('d8'));
  throwsCode(t, () => saveModel(m, dir('d8')), 'XFT_IO', /not empty.*overwrite/, 'an existing folder is not replaced without overwrite');
  saveModel(m, dir('d8'), { overwrite: true });
  t.ok(fs.existsSync(path.join(dir('d8'), 'config.json')), 'overwrite replaces it');
  throwsCode(t, () => loadModel(dir('nothing-here')), 'XFT_IO', /no such folder/, 'a missing folder');

  // a tensor missing, a wrong shape, an extra tensor
  const r = new SafetensorsReader(dir('d8'));
  const write = (name: string, entries: { name: string; shape: number[] }[]) => {
    fs.mkdirSync(dir(name));
    fs.copyFileSync(path.join(dir('d8'), 'config.json'), path.join(dir(name), 'config.json'));
    writeSafetensors(path.join(dir(name), 'model.safetensors'), entries.map((e) => ({ name: e.name, dtype: 'F32' as const, shape: e.shape, tensor: () => Tensor.zeros(e.shape), dispose: true })));
  };
  const all = r.names().map((n) => ({ name: n, shape: r.info(n).shape }));
  write('missing', all.filter((e) => e.name !== 'model.layers.1.mlp.up_proj.weight'));
  throwsCode(t, () => loadModel(dir('missing')), 'XFT_FORMAT', /model\.layers\.1\.mlp\.up_proj\.weight/, 'missing tensor named');
  write('shape', all.map((e) => (e.name === 'model.norm.weight' ? { ...e, shape: [31] } : e)));
  throwsCode(t, () => loadModel(dir('shape')), 'XFT_SHAPE', /model\.norm\.weight has shape \[31\], expected \[32\]/, 'wrong shape named');
  write('extra', [...all, { name: 'model.layers.0.mlp.bias', shape: [3] }]);
  throwsCode(t, () => loadModel(dir('extra')), 'XFT_FORMAT', /unexpected tensor.*model\.layers\.0\.mlp\.bias/, 'unknown tensor named');

  // a failure in the middle of a write leaves no folder under the final name and no temporary folder
  const before = fs.readdirSync(tmp).length;
  const broken = createDense(config, { seed: 9 });
  broken.blocks[1].q.value.dispose();
  throwsCode(t, () => saveModel(broken, dir('partial')), 'XFT_DISPOSED', /./, 'write fails half way');
  t.notOk(fs.existsSync(dir('partial')), 'no partial checkpoint under the final name');
  t.equal(fs.readdirSync(tmp).length, before, 'no temporary folder left behind');
  m.dispose();
});

t.test('non-finite weights: saveModel refuses them over a good folder; loadModel refuses a checkpoint holding them', async (t) => {
  const m = createDense(config, { seed: 10 });
  saveModel(m, dir('good'));
  const good = fs.readFileSync(path.join(dir('good'), 'model.safetensors'));
  (m.blocks[0].ffn as DenseFFN).down.value.narrow(0, 1).fill_(NaN);
  throwsCode(t, () => saveModel(m, dir('good'), { overwrite: true }), 'XFT_NONFINITE', /model\.layers\.0\.mlp\.down_proj\.weight holds a non-finite value/, 'saveModel with a NaN weight');
  t.same(fs.readFileSync(path.join(dir('good'), 'model.safetensors')), good, 'the good checkpoint is kept');
  throwsCode(t, () => saveModel(m, dir('nan-new')), 'XFT_NONFINITE', /non-finite/, 'a new folder');
  t.notOk(fs.existsSync(dir('nan-new')), 'nothing written');
  t.same(fs.readdirSync(tmp).filter((n) => n.startsWith('.good') || n.startsWith('.nan-new')), [], 'no temporary or lock left behind');
  // a checkpoint with an infinite weight (written elsewhere): patch one value in the file
  fs.cpSync(dir('good'), dir('inf'), { recursive: true });
  const file = path.join(dir('inf'), 'model.safetensors');
  const info = new SafetensorsReader(dir('inf')).info('lm_head.weight');
  const bytes = fs.readFileSync(file);
  bytes.writeFloatLE(-Infinity, info.offset + 4 * 5);
  fs.writeFileSync(file, bytes);
  throwsCode(t, () => loadModel(dir('inf')), 'XFT_FORMAT', /inf\/model\.safetensors: lm_head\.weight holds a non-finite value \(NaN or ±Inf\) at element 5/, 'loadModel');
  m.dispose();
});

t.test('config.json that is not an object, or a folder, names the file (XFT_FORMAT)', async (t) => {
  for (const [name, content] of [['null', 'null'], ['array', '[]'], ['number', '5'], ['garbage', '{"hidden_size": ']] as const) {
    fs.mkdirSync(dir(`cfg-${name}`));
    fs.writeFileSync(path.join(dir(`cfg-${name}`), 'config.json'), content);
    throwsCode(t, () => readCheckpointInfo(dir(`cfg-${name}`)), 'XFT_FORMAT', new RegExp(`cfg-${name}/config\\.json`), `config.json ${content}`);
  }
  fs.mkdirSync(path.join(dir('cfg-dir'), 'config.json'), { recursive: true });
  throwsCode(t, () => readCheckpointInfo(dir('cfg-dir')), 'XFT_FORMAT', /cfg-dir\/config\.json.*EISDIR/, 'config.json a folder');
});

t.test('config: rope_scaling forms and the llama checks', async (t) => {
  t.same(llamaConfig({ ...config, rope_scaling: { rope_type: 'linear', factor: 2 } } as never).rope_scaling, { rope_type: 'linear', factor: 2 }, 'rope_type spelling, kept as written');
  t.equal(llamaConfig({ ...config, rope_scaling: { rope_type: 'default' } } as never).rope_scaling, null, 'default = none');
  throwsCode(t, () => llamaConfig({ ...config, head_dim: 16 } as never), 'XFT_VALUE', /head_dim/, 'head_dim that differs');
});
