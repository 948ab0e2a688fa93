// UpIT stage 4 (../shared/UPIT.md §7.1, §7.7, §7.8): the Switch balance loss (routeShared's probs, switchLoss
// and their backward on the CPU: values, uniform routing, finite differences through a whole MoE), the
// gating invariants, and assembleMoe (distinct expert stacks, router rows from routing vectors, trunk mean,
// reduction to vanilla upcycling, save/load), with `xft eval`, `generate` and `merge` on an UpIT MoE.
// CUDA against the CPU twin: test/37.cuda_switch.ts.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { Tensor, ops } from '../lib/index';
import { tinyConfig, type MoeConfig } from '../lib/config';
import { createDense, upcycle } from '../lib/xft';
import { loadModel, saveModel, readCheckpointInfo, type CheckpointInfo } from '../lib/checkpoint';
import { SafetensorsReader, writeSafetensors } from '../lib/safetensors';
import { MoeFFN, type Model } from '../lib/model';
import { assembleMoe, trunkExpert } from '../lib/upit/assemble';
import { rng, softmax } from './helpers/ref';
import { close, exact, throwsCode } from './helpers/check';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-upit-asm-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
const at = (name: string) => path.join(tmp, name);

// ---- the Switch balance loss ----

/** L = w N Σ_i f_i P_i in float64 with f_i = load_i / (T S) held fixed, P_i = mean_t softmax(z_t)_i. */
function refSwitch(z: ArrayLike<number>, T: number, N: number, f: number[], w: number): number {
  let L = 0;
  for (let t = 0; t < T; t++) {
    const p = softmax(Array.from(z).slice(t * N, (t + 1) * N));
    for (let i = 0; i < N; i++) L += (w * N * f[i] * p[i]) / T;
  }
  return L;
}

t.test('switch loss: probs, value, uniform routing = 1', async (t) => {
  for (const [T, N, K, shared] of [[37, 8, 2, false], [20, 7, 6, true], [1, 4, 4, false], [64, 16, 1, false]] as const) {
    const z = rng(100 + T + N).array(T * N, 2);
    const logits = Tensor.from(z, [T, N]);
    const r = ops.routeShared(logits, { topK: K, shared, probs: true });
    const want = new Array(N).fill(0);
    for (let t = 0; t < T; t++) softmax(z.slice(t * N, (t + 1) * N)).forEach((p, i) => (want[i] += p));
    close(t, r.probs!.toArray(), want, 1e-6, `T=${T} N=${N}: probs = Σ_t softmax(z_t)`);
    const S = shared ? K - 1 : K, load = Array.from(r.load.toArray());
    t.equal(load.reduce((a, b) => a + b, 0), T * S, 'Σ load = T·S');
    const L = ops.switchLoss(r.probs!, r.load, { tokens: T, selected: S, weight: 0.5 });
    close(t, L.toArray(), [refSwitch(z, T, N, load.map((l) => l / (T * S)), 0.5)], 1e-6, `T=${T} N=${N}: loss`);
    [L, logits].forEach((x) => x.dispose());
    r.dispose();
  }
  // uniform P (equal logits; ties send every token to the first experts: f is not uniform) -> 1
  const T = 12, N = 6;
  const flat = Tensor.zeros([T, N]);
  let r = ops.routeShared(flat, { topK: 2, shared: false, probs: true });
  t.same(Array.from(r.load.toArray()), [T, T, 0, 0, 0, 0], 'equal logits: ties go to the lower experts');
  let L = ops.switchLoss(r.probs!, r.load, { tokens: T, selected: 2, weight: 1 });
  close(t, L.toArray(), [1], 1e-6, 'uniform router probabilities: L_load = 1');
  r.dispose();
  L.dispose();
  // uniform f (each token prefers experts t, t+1 mod N): balanced load -> 1 for any P
  const z = Array.from({ length: T * N }, (_, k) => { const t = Math.floor(k / N), i = k % N; return i === t % N ? 3 : i === (t + 1) % N ? 2 : 0.1 * i; });
  const rot = Tensor.from(z, [T, N]);
  r = ops.routeShared(rot, { topK: 2, shared: false, probs: true });
  t.same(Array.from(r.load.toArray()), new Array(N).fill(4), 'rotated preferences: uniform load');
  L = ops.switchLoss(r.probs!, r.load, { tokens: T, selected: 2, weight: 1 });
  close(t, L.toArray(), [1], 1e-6, 'uniform assignments: L_load = 1');
  const u = ops.switchLoss(Tensor.full([N], T / N), Tensor.full([N], (2 * T) / N), { tokens: T, selected: 2 });
  close(t, u.toArray(), [0.01], 1e-6, 'uniform P and f: weight·1 (default weight 0.01)');
  [flat, rot, L, u].forEach((x) => x.dispose());
  r.dispose();
  // no tokens: loss 0, gradient 0
  const e = ops.switchLoss(Tensor.zeros([4]), Tensor.zeros([4]), { tokens: 0, selected: 2 });
  t.same(Array.from(e.toArray()), [0], 'T = 0: loss 0');
  t.same(Array.from(ops.switchLossBackward(Tensor.zeros([4]), { tokens: 0, selected: 2 }).toArray()), [0, 0, 0, 0], 'T = 0: dprobs 0');
});

t.test('switch loss: gradient into the logits through P only, against finite differences', async (t) => {
  for (const [T, N, K, shared] of [[9, 6, 2, false], [7, 5, 3, true], [5, 4, 4, false]] as const) {
    const z = rng(7 + T * N).array(T * N, 1.5);
    const logits = Tensor.from(z, [T, N]);
    const S = shared ? K - 1 : K, w = 0.7;
    const r = ops.routeShared(logits, { topK: K, shared, probs: true });
    const load = Array.from(r.load.toArray()), f = load.map((l) => l / (T * S));
    const dProbs = ops.switchLossBackward(r.load, { tokens: T, selected: S, weight: w, dLoss: 1 });
    close(t, dProbs.toArray(), f.map((fi) => (w * N * fi) / T), 1e-6, `T=${T} N=${N}: dprobs = w N f / T`);
    const zeroW = Tensor.zeros([T, K]);
    const dz = ops.routeSharedBackward(logits, r, zeroW, { dProbs }).toArray();
    const h = 1e-4, fd: number[] = [];
    for (let k = 0; k < T * N; k++) {
      const zp = z.slice(), zm = z.slice();
      zp[k] += h;
      zm[k] -= h;
      fd.push((refSwitch(zp, T, N, f, w) - refSwitch(zm, T, N, f, w)) / (2 * h));
    }
    if (K === N) {
      // every expert taken by every token: f uniform, L = w Σ P_i = w whatever the logits, so no gradient
      t.ok(fd.every((v) => Math.abs(v) < 1e-6) && Array.from(dz).every((v) => Math.abs(v) < 1e-7), `T=${T} N=${N} k = N: L constant, dlogits 0`);
    } else close(t, dz, fd, 1e-4, `T=${T} N=${N} shared=${shared}: dlogits vs finite differences (f constant)`);
    // linear in the two gradients: dWeights and dProbs together = the sum of each alone
    const dW = Tensor.from(rng(3).array(T * K), [T, K]);
    const both = ops.routeSharedBackward(logits, r, dW, { dProbs }).toArray();
    const only = ops.routeSharedBackward(logits, r, dW).toArray();
    close(t, both, Array.from(only, (v, i) => v + dz[i]), 1e-6, 'dWeights and dProbs add');
    [logits, dProbs, zeroW, dW].forEach((x) => x.dispose());
    r.dispose();
  }
  const load = Tensor.zeros([4]);
  throwsCode(t, () => ops.switchLoss(Tensor.zeros([3]), load, { tokens: 4, selected: 2 }), 'XFT_SHAPE', /probs/, 'probs of the wrong length');
  throwsCode(t, () => ops.switchLoss(Tensor.zeros([4]), load, { tokens: 4, selected: 5 }), 'XFT_VALUE', /selected/, 'selected > N');
  throwsCode(t, () => ops.switchLossBackward(load, { tokens: -1, selected: 1 }), 'XFT_VALUE', /tokens/, 'negative tokens');
  throwsCode(t, () => ops.routeShared(Tensor.zeros([2, 4]), { topK: 2, probs: 'yes' as unknown as boolean }), 'XFT_TYPE', /probs/, 'probs not a boolean');
  load.dispose();
});

const config = tinyConfig({ hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 2, num_hidden_layers: 2 });
const B = 2, L = 6;
const ids = Tensor.from(Array.from({ length: B * L }, (_, i) => (i * 7 + 3) % 64), [B * L], { dtype: 'i32' });
const targets = Tensor.from(Array.from({ length: B * L }, (_, i) => (i % 3 === 0 ? -1 : (i * 5 + 1) % 64)), [B * L], { dtype: 'i32' });
t.teardown(() => [ids, targets].forEach((x) => x.dispose()));

/** An MoE whose experts differ (each stack perturbed per expert), so that routing matters. */
function distinctMoe(seed: number, moe: { experts: number; topK: number; balanceLossWeight?: number }): Model {
  const dense = createDense(config, { seed });
  const m = upcycle(dense, { ...moe, sharedExpert: false, router: 'linear', noise: false, balanceLoss: 'switch', seed });
  dense.dispose();
  for (const b of m.blocks) {
    const f = b.ffn as MoeFFN;
    for (const p of [f.gate, f.up, f.down]) p.value.copy_(Tensor.from(Array.from(p.value.toArray(), (v, i) => v * (1 + 0.3 * Math.sin(i * 0.37 + seed))), p.value.shape));
  }
  return m;
}

t.test('switch loss in an MoE: the router gradient of the aux loss against finite differences', async (t) => {
  const m = distinctMoe(3, { experts: 4, topK: 2, balanceLossWeight: 1 });
  const f0 = m.blocks[0].ffn as MoeFFN;
  t.equal(f0.moe.balance_loss, 'switch');
  const aux = () => {
    const r = m.forward(ids, targets, B, L, { training: true });
    m.release();
    return r.auxLoss;
  };
  const a0 = aux();
  t.ok(a0 >= 2 * 0.999, `aux = Σ over 2 layers of E Σ f P >= 1 each (Cauchy-Schwarz bound for top-k is loose): ${a0}`);
  m.zeroGrad();
  m.forward(ids, targets, B, L, { training: true });
  m.backward({ scale: 0, auxScale: 1 });
  const router = f0.router[0];
  const g = router.grad!.toArray();
  const picks = [0, 5, 37, 64 + 3, 127];
  const w = router.value, h = 2e-3;
  const fd = picks.map((k) => {
    const v = Array.from(w.toArray());
    const base = v[k];
    v[k] = base + h;
    w.copy_(Tensor.from(v, w.shape));
    const up = aux();
    v[k] = base - h;
    w.copy_(Tensor.from(v, w.shape));
    const down = aux();
    v[k] = base;
    w.copy_(Tensor.from(v, w.shape));
    return (up - down) / (2 * h);
  });
  close(t, picks.map((k) => g[k]), fd, 2e-2, 'dL_aux/dW_router (layer 0) vs finite differences');
  t.ok(picks.some((k) => Math.abs(g[k]) > 1e-6), 'the gradient is not zero');
  // the cv² default is unchanged: no probs, a different loss
  const cv = upcycle(createDense(config, { seed: 3 }), { experts: 4, topK: 2, sharedExpert: false, router: 'linear', noise: false });
  t.equal((cv.blocks[0].ffn as MoeFFN).moe.balance_loss, undefined, 'upcycle without balanceLoss: the XFT default (cv²)');
  cv.dispose();
  m.dispose();
});

t.test('gating: top-k weights sum to 1; k = E with identical experts gives the dense output', async (t) => {
  const z = Tensor.from(rng(5).array(40 * 8, 3), [40, 8]);
  for (const k of [1, 2, 5, 8]) {
    const r = ops.routeShared(z, { topK: k, shared: false });
    const w = r.weights.toArray();
    let worst = 0;
    for (let i = 0; i < 40; i++) worst = Math.max(worst, Math.abs(Array.from(w.subarray(i * k, (i + 1) * k)).reduce((a, b) => a + b, 0) - 1));
    t.ok(worst < 1e-6, `top-${k}: every token's weights sum to 1 (worst ${worst.toExponential(1)})`);
    r.dispose();
  }
  z.dispose();
  const dense = createDense(config, { seed: 9 });
  const want = dense.logits(ids, B, L).toArray();
  for (const k of [4, 2]) {
    const moe = upcycle(dense, { experts: 4, topK: k, sharedExpert: false, router: 'linear', noise: false, balanceLoss: 'switch', seed: 2 });
    close(t, moe.logits(ids, B, L).toArray(), want, 1e-5, `E = 4, k = ${k}, identical experts: MoE logits = dense logits`);
    moe.dispose();
  }
  dense.dispose();
});

// ---- assembleMoe ----

/** n dense checkpoints that differ (seeds), written as bf16 or f32. */
function denseFolders(prefix: string, seeds: number[], dtype: 'f32' | 'bf16' = 'f32'): string[] {
  return seeds.map((s) => {
    const dir = at(`${prefix}-${s}`);
    const m = createDense(config, { seed: s });
    saveModel(m, dir, { dtype });
    m.dispose();
    return dir;
  });
}

/** A routing folder as preoptimizeRouting writes it: the dense expert plus routing_vectors.safetensors. */
function routingFolder(name: string, expert: string, seed: number): { dir: string; vectors: Float32Array[] } {
  const dir = at(name);
  fs.cpSync(expert, dir, { recursive: true });
  const d = config.hidden_size, r = rng(seed);
  const vectors = Array.from({ length: config.num_hidden_layers }, () => Float32Array.from(r.array(d)));
  writeSafetensors(path.join(dir, 'routing_vectors.safetensors'), vectors.map((v, l) => ({ name: `model.layers.${l}.routing_vector`, dtype: 'F32' as const, shape: [d], bytes: () => new Uint8Array(v.buffer) })));
  return { dir, vectors };
}

const E = 3;
const experts = denseFolders('expert', [11, 12, 13]);
const trunk = denseFolders('ckpt', [21, 22, 23, 24]);

t.test('§7.7 assembly: stacks bit for bit, router rows, trunk mean, save/load under HF names', async (t) => {
  const routing = experts.map((dir, e) => routingFolder(`routing-${e}`, dir, 500 + e));
  const out = at('moe-77');
  const info: CheckpointInfo = assembleMoe({ experts, routing: routing.map((r) => r.dir), trunk, out, topK: 2 });
  t.equal(info.kind, 'moe');
  t.match(info.moe, { num_experts: E, num_selects: 2, gate_type: 'linear', shared_expert: false, gate_noise: false, balance_loss: 'switch', balance_loss_weight: 0.01 } as Partial<MoeConfig>);
  const back = readCheckpointInfo(out);
  t.same(back.moe, info.moe, 'config.json reads back the same MoE config');
  t.equal(back.raw.gate_type, 'TopKBalancedNoisyGate', "the reference's gate class for no shared expert");
  const r = new SafetensorsReader(out);
  const names = r.names();
  t.ok(names.includes('model.layers.1.mlp.calculator.experts.weight_down.2.weight'), 'expert tensors under the reference names');
  t.ok(names.includes('model.layers.0.mlp.gate.gate_network.weight'), 'the linear router under the reference name');
  t.notOk(names.some((n) => n.includes('weight_noise')), 'no noise weights');
  for (let e = 0; e < E; e++) {
    const src = new SafetensorsReader(experts[e]);
    for (let l = 0; l < config.num_hidden_layers; l++)
      for (const g of ['gate', 'up', 'down'])
        exact(t, r.readF32(`model.layers.${l}.mlp.calculator.experts.weight_${g}.${e}.weight`), src.readF32(`model.layers.${l}.mlp.${g}_proj.weight`), `expert ${e} layer ${l} ${g}: bit for bit`);
  }
  for (let l = 0; l < config.num_hidden_layers; l++) {
    const w = r.readF32(`model.layers.${l}.mlp.gate.gate_network.weight`);
    for (let e = 0; e < E; e++) exact(t, w.subarray(e * config.hidden_size, (e + 1) * config.hidden_size), routing[e].vectors[l], `router row ${e} of layer ${l} = r_${e}^(${l})`);
  }
  const trunkReaders = trunk.map((d) => new SafetensorsReader(d));
  for (const name of ['model.embed_tokens.weight', 'model.layers.1.self_attn.k_proj.weight', 'model.layers.0.input_layernorm.weight', 'model.norm.weight', 'lm_head.weight']) {
    const vs = trunkReaders.map((x) => x.readF32(name));
    const mean = Array.from(vs[0], (_, i) => vs.reduce((a, v) => a + v[i], 0) / vs.length);
    close(t, r.readF32(name), mean, 1e-7, `${name} = mean of the ${trunk.length} trunk checkpoints`);
  }
  // loads as a Model, and saving that model writes the same tensors
  const m = loadModel(out);
  t.equal(m.kind, 'moe');
  saveModel(m, at('moe-77-resaved'));
  const r2 = new SafetensorsReader(at('moe-77-resaved'));
  t.same(r2.names().sort(), names.slice().sort(), 'save after load: the same names');
  for (const n of names) exact(t, r2.readF32(n), r.readF32(n), `round trip ${n}`);
  m.dispose();
  t.ok(fs.readdirSync(tmp).every((f) => !f.includes('.tmp')), 'no temporary folder left');
  // a second assembly into the same folder is refused; bad inputs are typed errors
  throwsCode(t, () => assembleMoe({ experts, routing: null, trunk, out }), 'XFT_IO', /moe-77/, 'an existing output folder');
  throwsCode(t, () => assembleMoe({ experts: [experts[0]], routing: null, trunk, out: at('x1') }), 'XFT_VALUE', /experts/, 'one expert');
  throwsCode(t, () => assembleMoe({ experts, routing: [routing[0].dir], trunk, out: at('x2') }), 'XFT_VALUE', /routing/, 'routing of another length');
  throwsCode(t, () => assembleMoe({ experts, routing: null, trunk: [], out: at('x3') }), 'XFT_VALUE', /trunk/, 'no trunk');
  throwsCode(t, () => assembleMoe({ experts, routing: null, trunk, out: at('x4'), topK: 4 }), 'XFT_VALUE', /topK/, 'topK > E');
  const other = at('other-config');
  const o = createDense(tinyConfig({ hidden_size: 32, intermediate_size: 64, num_attention_heads: 4, num_key_value_heads: 2, num_hidden_layers: 2 }), { seed: 1 });
  saveModel(o, other);
  o.dispose();
  throwsCode(t, () => assembleMoe({ experts: [...experts.slice(0, 2), other], routing: null, trunk, out: at('x5') }), 'XFT_SHAPE', /other-config/, 'an expert of another architecture');
  t.notOk(fs.existsSync(at('x5')), 'nothing written on error');
});

t.test('A9 trunkExpert: the expert\'s FFNs bit for bit on the trunk the MoE gets, tensor for tensor', async (t) => {
  const moe = at('moe-77');  // the assembly above: same trunk
  const m = new SafetensorsReader(moe);
  for (const dtype of [undefined, 'bf16'] as const) {
    const out = at(`trunked-1${dtype ? `-${dtype}` : ''}`);
    const info = trunkExpert({ expert: experts[1], trunk, out, dtype });
    t.equal(info.kind, 'dense', 'a dense checkpoint');
    const r = new SafetensorsReader(out), src = new SafetensorsReader(experts[1]);
    t.same(r.names().sort(), src.names().sort(), "the expert's tensor names");
    for (const name of r.names()) {
      const ffn = /\.mlp\.(gate|up|down)_proj\./.exec(name);
      if (dtype) t.equal(r.info(name).dtype, 'BF16', `${name}: bf16`);
      else if (ffn) exact(t, r.readF32(name), src.readF32(name), `${name}: the expert's, bit for bit`);
      else exact(t, r.readF32(name), m.readF32(name), `${name}: the MoE's trunk tensor, bit for bit`);
    }
    t.ok(loadModel(out).kind === 'dense', 'loads');
  }
  throwsCode(t, () => trunkExpert({ expert: experts[0], trunk: [], out: at('y1') }), 'XFT_VALUE', /trunk/, 'no trunk');
  throwsCode(t, () => trunkExpert({ expert: at('moe-77'), trunk, out: at('y2') }), 'XFT_VALUE', /moe checkpoint; expected a dense one/, 'an MoE as the expert');
  throwsCode(t, () => trunkExpert({ expert: experts[0], trunk, out: at('trunked-1') }), 'XFT_IO', /trunked-1/, 'an existing output folder');
  t.notOk(fs.existsSync(at('y1')) || fs.existsSync(at('y2')), 'nothing written on error');
});

t.test('§7.1 E copies of one checkpoint, routing null, trunk = θ: vanilla upcycling, dense logits', async (t) => {
  const theta = experts[0];
  for (const [seed, dtype] of [[0, 'f32'], [5, 'bf16']] as const) {
    const out = at(`moe-71-${seed}-${dtype}`);
    assembleMoe({ experts: [theta, theta, theta, theta], routing: null, trunk: [theta], out, topK: 2, seed, dtype });
    const dense = loadModel(theta);
    const ref = upcycle(dense, { sharedExpert: false, router: 'linear', experts: 4, topK: 2, noise: false, seed, balanceLoss: 'switch' });
    const got = loadModel(out);
    const a = got.params(), b = ref.params();
    t.same(a.map((p) => p.name), b.map((p) => p.name), `${dtype}: the same parameters`);
    if (dtype === 'f32') for (let i = 0; i < a.length; i++) exact(t, a[i].value.toArray(), b[i].value.toArray(), `${a[i].name} equals upcycle's`);
    else {
      // written as bf16: every tensor is upcycle's rounded once to bf16
      const rb = (p: Tensor) => p.cast('bf16').cast('f32');
      for (let i = 0; i < a.length; i++) exact(t, a[i].value.toArray(), rb(b[i].value).toArray(), `${a[i].name} equals upcycle's rounded to bf16`);
    }
    if (dtype === 'f32') close(t, got.logits(ids, B, L).toArray(), dense.logits(ids, B, L).toArray(), 1e-5, 'its logits equal dense θ\'s');
    [dense, ref, got].forEach((m) => m.dispose());
  }
});

function xft(...args: string[]) {
  const CLI = path.join(__dirname, '..', 'lib', 'cli.ts');
  const r = spawnSync(process.execPath, [...process.execArgv, CLI, ...args], { cwd: tmp, env: { ...process.env, XFT_DEVICE: 'cpu' }, encoding: 'utf8' });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

t.test('an UpIT MoE in xft eval, generate, train and the learned merge', async (t) => {
  const out = at('moe-cli');
  assembleMoe({ experts, routing: null, trunk, out, topK: 2, seed: 1 });
  fs.writeFileSync(at('data.jsonl'), Array.from({ length: 12 }, (_, i) => JSON.stringify({ instruction: `Add ${i}.`, response: `${i + 1}` })).join('\n') + '\n');
  let r = xft('eval', 'moe-cli', '--data', 'data.jsonl', '--seq-len', '200', '--json');
  t.equal(r.code, 0, `eval: ${r.err}`);
  t.equal(JSON.parse(r.out).kind, 'moe');
  r = xft('generate', 'moe-cli', 'hi', '--max-new-tokens', '3', '--raw');
  t.equal(r.code, 0, `generate: ${r.err}`);
  // XFT's learned merge: no shared expert, so the soup over all experts (--shared-rate none)
  r = xft('train', 'moe-cli', '--merge', '--shared-rate', 'none', '--data', 'data.jsonl', '--seq-len', '200', '--out', 'merge', '--batch-size', '4', '--steps', '1', '--lr', '1e-2');
  t.equal(r.code, 0, `train --merge --shared-rate none: ${r.err}`);
  t.equal(readCheckpointInfo(at('merge')).sharedRate, null, 'a soup merge checkpoint (λ none)');
  r = xft('merge', 'merge', 'final');
  t.equal(r.code, 0, `merge: ${r.err}`);
  t.equal(readCheckpointInfo(at('final')).kind, 'dense');
  r = xft('train', 'moe-cli', '--merge', '--data', 'data.jsonl', '--seq-len', '200', '--out', 'merge-bad', '--batch-size', '4', '--steps', '1');
  t.equal(r.code, 3, 'train --merge with the default λ on an MoE without a shared expert: exit 3');
  t.match(r.err, /no shared expert; pass --shared-rate none/, 'the message names the flag to pass');
  t.notOk(fs.existsSync(at('merge-bad')), 'nothing written');
  // the Switch loss for any upcycled MoE
  r = xft('upcycle', path.basename(experts[0]), 'moe-switch', '--experts', '4', '--top-k', '2', '--balance-kind', 'switch');
  t.equal(r.code, 0, `upcycle --balance-kind switch: ${r.err}`);
  t.equal(readCheckpointInfo(at('moe-switch')).moe!.balance_loss, 'switch', 'xft upcycle --balance-kind switch: the MoE config carries it');
});
