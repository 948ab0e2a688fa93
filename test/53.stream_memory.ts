// Upcycling and merging a checkpoint on disk stream: the peak memory of the process stays near one
// FFN weight, as the README promises, far below the model. Measured in a child process (peak RSS), on a
// model whose MoE checkpoint is ~460 MB and whose FFN weights are 3 MB each, less the growth of the
// same run on a tiny model (what the process itself adds).
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
// the same pipeline on a model too small to matter measures what the process itself adds (the addon,
// the compiled sources, the heap); the big model may add only a few FFN weights to that
const small = llamaConfig({ hidden_size: 64, intermediate_size: 96, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 4, vocab_size: 64 });
const d = config.hidden_size, f = config.intermediate_size;

function writeDense(dir: string, c: typeof config): void {
  const d = c.hidden_size, f = c.intermediate_size, V = c.vocab_size;
  const names: [string, number[]][] = [['model.embed_tokens.weight', [V, d]]];
  for (let i = 0; i < c.num_hidden_layers; i++) {
    const p = `model.layers.${i}`;
    names.push([`${p}.input_layernorm.weight`, [d]], [`${p}.self_attn.q_proj.weight`, [d, d]], [`${p}.self_attn.k_proj.weight`, [d, d]], [`${p}.self_attn.v_proj.weight`, [d, d]],
      [`${p}.self_attn.o_proj.weight`, [d, d]], [`${p}.post_attention_layernorm.weight`, [d]], [`${p}.mlp.gate_proj.weight`, [f, d]], [`${p}.mlp.up_proj.weight`, [f, d]], [`${p}.mlp.down_proj.weight`, [d, f]]);
  }
  names.push(['model.norm.weight', [d]], ['lm_head.weight', [V, d]]);
  fs.mkdirSync(dir);
  let seed = 0;
  writeShards(dir, names.map(([name, shape]) => ({ name, dtype: 'F32' as const, shape, tensor: () => Tensor.randn(shape, { seed: seed++, std: 0.02 }), dispose: true })));
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(configJson('dense', c, null, null, 'F32')));
}
const src = path.join(tmp, 'dense'), smallSrc = path.join(tmp, 'small');
writeDense(src, config);
writeDense(smallSrc, small);

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

t.test('upcycle and merge on disk stay near one FFN weight of memory', async (t) => {
  const ffn = f * d * 4;
  // allowance over the process's own growth: the FFN weight being converted, its copy on the way out,
  // a few 1 MB chunks; the whole model would be 82 MB (dense) or 460 MB (MoE)
  const allowance = 4 * ffn;
  const upcycle = (from: string, to: string) => run(`ck.upcycleCheckpoint(${JSON.stringify(from)}, ${JSON.stringify(to)}, { experts: 8, topK: 6, chunkElements: 1 << 18 });`);
  const merge = (from: string, to: string) => run(`ck.mergeCheckpoint(${JSON.stringify(from)}, ${JSON.stringify(to)}, { chunkElements: 1 << 18 });`);
  const growth = (r: { before: number; peak: number }) => r.peak - r.before;
  const moe = path.join(tmp, 'moe'), dense = path.join(tmp, 'merged');
  const baseUp = growth(upcycle(smallSrc, path.join(tmp, 'small-moe')));
  const up = growth(upcycle(src, moe));
  const moeBytes = dirSize(moe);
  t.ok(moeBytes > 400 * MB, `the MoE checkpoint is ${(moeBytes / MB).toFixed(0)} MB`);
  t.ok(up - baseUp < allowance, `upcycle: peak RSS grew by ${(up / MB).toFixed(1)} MB, ${((up - baseUp) / MB).toFixed(1)} MB more than on a tiny model (< ${(allowance / MB).toFixed(1)} MB = 4 FFN weights of ${(ffn / MB).toFixed(1)} MB)`);
  const baseMerge = growth(merge(path.join(tmp, 'small-moe'), path.join(tmp, 'small-merged')));
  const mg = growth(merge(moe, dense));
  t.ok(mg - baseMerge < allowance, `merge: peak RSS grew by ${(mg / MB).toFixed(1)} MB, ${((mg - baseMerge) / MB).toFixed(1)} MB more than on a tiny model (< ${(allowance / MB).toFixed(1)} MB)`);
  t.ok(Math.abs(dirSize(dense) - dirSize(src)) < 64 * 1024, `the merged checkpoint has the dense model's size (${(dirSize(dense) / MB).toFixed(1)} MB)`);
});
