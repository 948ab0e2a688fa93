// xft's logits against an independent float64 Llama (scripts/hf_reference.py, written from
// transformers' modeling_llama.py; numpy only) on checkpoints xft wrote: a dense model with
// grouped-query attention, rope_theta 100000 and linear rope_scaling 4 (DeepSeek-Coder's), and the
// dense model the XFT pipeline merges out of an upcycled, perturbed MoE. When torch and transformers
// are importable (the GPU host), the checkpoints are also loaded with LlamaForCausalLM.from_pretrained;
// with torch (CI: Debian's python3-torch), the gradients of a dense checkpoint are checked against autograd.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { Tensor } from '../lib/index';
import { llamaConfig } from '../lib/config';
import { createDense, upcycle, mergeable, toDense } from '../lib/xft';
import { saveModel, mergeCheckpoint, loadModel } from '../lib/checkpoint';
import { MergedFFN, type Model } from '../lib/model';
import { relErr, rng } from './helpers/ref';
import { PYTHON, numpyOrSkip } from './helpers/python';

const skip = numpyOrSkip(t);
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-hf-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

const config = llamaConfig({
  hidden_size: 48, intermediate_size: 80, num_hidden_layers: 2, num_attention_heads: 6, num_key_value_heads: 2, vocab_size: 61,
  rope_theta: 100000, rope_scaling: { type: 'linear', factor: 4 }, rms_norm_eps: 1e-6, max_position_embeddings: 64,
});
const B = 2, T = 12;
const R = rng(11);
const ids = Array.from({ length: B }, () => Array.from({ length: T }, () => R.int(0, 61)));

function xftLogits(m: Model): number[] {
  const input = Tensor.from(ids.flat(), [B * T], { dtype: 'i32' });
  const l = m.logits(input, B, T);
  const a = Array.from(l.toArray());
  l.dispose();
  input.dispose();
  return a;
}

function reference(dir: string): { numpy: number[]; transformers: number[] | null; error: string | null } {
  const idsFile = path.join(tmp, 'ids.json'), out = path.join(tmp, 'out.json');
  fs.writeFileSync(idsFile, JSON.stringify(ids));
  const r = spawnSync(PYTHON, [path.join(__dirname, '..', 'scripts', 'hf_reference.py'), dir, idsFile, out], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`hf_reference.py failed: ${r.stderr}`);
  const j = JSON.parse(fs.readFileSync(out, 'utf8'));
  return { numpy: j.numpy.flat(2), transformers: j.transformers ? j.transformers.flat(2) : null, error: j.transformers_error };
}

function compare(t: tap.Test, dir: string, m: Model, what: string) {
  const got = xftLogits(m), ref = reference(dir);
  t.equal(ref.numpy.length, got.length, `${what}: ${B}x${T}x${config.vocab_size} logits`);
  const e = relErr(got, ref.numpy);
  t.ok(e <= 1e-5, `${what}: xft vs the float64 reference, relative error ${e.toExponential(2)} <= 1e-5`);
  if (ref.transformers) {
    const e2 = relErr(got, ref.transformers);
    t.ok(e2 <= 1e-5, `${what}: xft vs transformers LlamaForCausalLM, relative error ${e2.toExponential(2)} <= 1e-5`);
  } else if (process.env.XFT_REQUIRE_TRANSFORMERS === '1') t.fail(`${what}: XFT_REQUIRE_TRANSFORMERS=1 but transformers did not run: ${ref.error}`);
  else t.comment(`transformers not run: ${ref.error}`);
}

t.test('a dense checkpoint (GQA, rope_theta 1e5, linear rope_scaling 4) computes what transformers computes', { skip }, async (t) => {
  const m = createDense(config, { seed: 21, std: 0.2 });
  saveModel(m, path.join(tmp, 'dense'));
  compare(t, path.join(tmp, 'dense'), m, 'dense');
  // the scaling matters: without it the reference disagrees
  const plain = llamaConfig({ ...config, rope_scaling: null });
  const cfg = JSON.parse(fs.readFileSync(path.join(tmp, 'dense', 'config.json'), 'utf8'));
  fs.writeFileSync(path.join(tmp, 'dense', 'config.json'), JSON.stringify({ ...cfg, rope_scaling: plain.rope_scaling }));
  t.ok(relErr(xftLogits(m), reference(path.join(tmp, 'dense')).numpy) > 1e-3, 'the check sees a wrong rope_scaling');
  m.dispose();
});

t.test('the dense model merged out of an MoE (on disk) computes what transformers computes', { skip }, async (t) => {
  const dense = createDense(config, { seed: 22, std: 0.2 });
  const moe = upcycle(dense, { experts: 4, topK: 3, seed: 1 });
  for (const b of moe.blocks) for (const p of b.ffn.params()) if (p.name.includes('experts')) p.value.copy_(Tensor.randn(p.value.shape, { seed: p.name.length, std: 0.2 }));
  const mg = mergeable(moe);
  mg.blocks.forEach((b, i) => (b.ffn as MergedFFN).alpha.value.copy_(Tensor.randn([3], { seed: 5 + i })));
  saveModel(mg, path.join(tmp, 'merge'));
  mergeCheckpoint(path.join(tmp, 'merge'), path.join(tmp, 'merged'));
  const final = loadModel(path.join(tmp, 'merged'));
  compare(t, path.join(tmp, 'merged'), final, 'merged');
  const inMemory = toDense(mg);
  t.ok(relErr(xftLogits(inMemory), xftLogits(mg)) <= 1e-5, 'and it equals the merge model it came from');
  [dense, moe, mg, final, inMemory].forEach((x) => x.dispose());
});

t.test('gradients of a dense checkpoint against torch autograd (float64)', { skip }, async (t) => {
  const m = createDense(config, { seed: 23, std: 0.2 });
  const dir = path.join(tmp, 'dense-grad');
  saveModel(m, dir);
  const targets = ids.map((row, b) => row.map((_, i) => (i % 5 === b ? -1 : R.int(0, 61))));
  const idsFile = path.join(tmp, 'ids-grad.json'), tgtFile = path.join(tmp, 'targets-grad.json'), out = path.join(tmp, 'out-grad.json');
  fs.writeFileSync(idsFile, JSON.stringify(ids));
  fs.writeFileSync(tgtFile, JSON.stringify(targets));
  const r = spawnSync(PYTHON, [path.join(__dirname, '..', 'scripts', 'hf_reference.py'), dir, idsFile, out, tgtFile], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`hf_reference.py failed: ${r.stderr}`);
  const ref = JSON.parse(fs.readFileSync(out, 'utf8'));
  if (!ref.torch) {
    if (process.env.XFT_REQUIRE_TORCH === '1') t.fail(`XFT_REQUIRE_TORCH=1 but torch did not run: ${ref.torch_error}`);
    else t.comment(`torch not run: ${ref.torch_error}`);
    m.dispose();
    return;
  }
  const input = Tensor.from(ids.flat(), [B * T], { dtype: 'i32' }), tgt = Tensor.from(targets.flat(), [B * T], { dtype: 'i32' });
  m.zeroGrad();
  const f = m.forward(input, tgt, B, T, { training: true });
  m.backward();
  t.ok(Math.abs(f.loss - ref.torch.loss) <= 1e-5 * ref.torch.loss, `loss ${f.loss.toFixed(6)} = torch's ${ref.torch.loss.toFixed(6)}`);
  const params = m.params();
  t.equal(params.length, Object.keys(ref.torch.grads).length, `a gradient for each of the ${params.length} weights`);
  for (const p of params) {
    const want: number[] | undefined = ref.torch.grads[p.name];
    if (!want) {
      t.fail(`${p.name}: no torch gradient`);
      continue;
    }
    const e = relErr(p.grad!.toArray(), want);
    t.ok(e <= 1e-5, `${p.name}: relative error ${e.toExponential(2)} <= 1e-5`);
  }
  [input, tgt].forEach((x) => x.dispose());
  m.dispose();
});
