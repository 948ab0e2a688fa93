// Upcycling and merging a checkpoint on disk stream: the peak memory of the process stays near one
// FFN weight, far below the model. Measured in a child process (peak RSS), on a model whose MoE
// checkpoint is ~460 MB and whose FFN weights are 3 MB each.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { llamaConfig } from '../lib/config';
import { configJson } from '../lib/checkpoint';
import { writeShards } from '../lib/safetensors';
import { Tensor } from '../lib/tensor';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-stream-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

// d = 512, f = 1536: an FFN weight is 0.79M f32 values (3.1 MB); 6 layers; the dense model is ~82 MB
const config = llamaConfig({ hidden_size: 512, intermediate_size: 1536, num_hidden_layers: 6, num_attention_heads: 8, num_key_value_heads: 8, vocab_size: 1024 });
const d = config.hidden_size, f = config.intermediate_size;
const names: [string, number[]][] = [['model.embed_tokens.weight', [1024, d]]];
for (let i = 0; i < config.num_hidden_layers; i++) {
  const p = `model.layers.${i}`;
  names.push([`${p}.input_layernorm.weight`, [d]], [`${p}.self_attn.q_proj.weight`, [d, d]], [`${p}.self_attn.k_proj.weight`, [d, d]], [`${p}.self_attn.v_proj.weight`, [d, d]],
    [`${p}.self_attn.o_proj.weight`, [d, d]], [`${p}.post_attention_layernorm.weight`, [d]], [`${p}.mlp.gate_proj.weight`, [f, d]], [`${p}.mlp.up_proj.weight`, [f, d]], [`${p}.mlp.down_proj.weight`, [d, f]]);
}
names.push(['model.norm.weight', [d]], ['lm_head.weight', [1024, d]]);
const src = path.join(tmp, 'dense');
fs.mkdirSync(src);
let seed = 0;
writeShards(src, names.map(([name, shape]) => ({ name, dtype: 'F32' as const, shape, tensor: () => Tensor.randn(shape, { seed: seed++, std: 0.02 }), dispose: true })));
fs.writeFileSync(path.join(src, 'config.json'), JSON.stringify(configJson('dense', config, null, null, 'F32')));

const script = (body: string) => `
const ck = require(${JSON.stringify(path.join(__dirname, '..', 'lib', 'checkpoint.ts'))});
const before = process.memoryUsage().rss;
${body}
console.log(JSON.stringify({ before, peak: process.resourceUsage().maxRSS * 1024 }));`;

function run(body: string): { before: number; peak: number } {
  const r = spawnSync(process.execPath, [...process.execArgv, '-e', script(body)], { encoding: 'utf8', env: { ...process.env, XFT_DEVICE: 'cpu' } });
  if (r.status !== 0) throw new Error(r.stderr);
  return JSON.parse(r.stdout.trim().split('\n').at(-1)!);
}

const MB = 2 ** 20;
const dirSize = (dir: string) => fs.readdirSync(dir).reduce((a, n) => a + fs.statSync(path.join(dir, n)).size, 0);

t.test('upcycle and merge on disk stay near one tensor of memory', async (t) => {
  const moe = path.join(tmp, 'moe'), dense = path.join(tmp, 'merged');
  const up = run(`ck.upcycleCheckpoint(${JSON.stringify(src)}, ${JSON.stringify(moe)}, { experts: 8, topK: 6, chunkElements: 1 << 18 });`);
  const moeBytes = dirSize(moe), ffn = f * d * 4;
  t.ok(moeBytes > 400 * MB, `the MoE checkpoint is ${(moeBytes / MB).toFixed(0)} MB`);
  const upGrowth = up.peak - up.before;
  t.ok(upGrowth < 0.2 * moeBytes, `upcycle: peak RSS grew by ${(upGrowth / MB).toFixed(1)} MB (< 20% of the ${(moeBytes / MB).toFixed(0)} MB written; one FFN weight is ${(ffn / MB).toFixed(1)} MB)`);
  const mg = run(`ck.mergeCheckpoint(${JSON.stringify(moe)}, ${JSON.stringify(dense)}, { chunkElements: 1 << 18 });`);
  const mgGrowth = mg.peak - mg.before;
  t.ok(mgGrowth < 0.2 * moeBytes, `merge: peak RSS grew by ${(mgGrowth / MB).toFixed(1)} MB (< 20% of the ${(moeBytes / MB).toFixed(0)} MB read)`);
  t.ok(Math.abs(dirSize(dense) - dirSize(src)) < 64 * 1024, `the merged checkpoint has the dense model's size (${(dirSize(dense) / MB).toFixed(1)} MB)`);
});
