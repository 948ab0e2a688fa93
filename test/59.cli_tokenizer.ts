// The CLI on bad tokenizer files: exit 3 and a message naming the file; `xft upcycle` copies no
// garbage tokenizer.json into its output (it checks the files it would copy before writing anything).
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { tinyConfig } from '../lib/config';
import { createDense } from '../lib/xft';
import { saveModel } from '../lib/checkpoint';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-clitok-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
const at = (name: string) => path.join(tmp, name);
const CLI = path.join(__dirname, '..', 'lib', 'cli.ts');
const xft = (...args: string[]) => {
  const r = spawnSync(process.execPath, [...process.execArgv, CLI, ...args], { cwd: tmp, env: { ...process.env, XFT_DEVICE: 'cpu' }, encoding: 'utf8' });
  return { code: r.status, err: r.stderr };
};

const dense = createDense(tinyConfig({ hidden_size: 16, intermediate_size: 24, num_attention_heads: 2, num_key_value_heads: 1, num_hidden_layers: 1 }), { seed: 1 });
saveModel(dense, at('dense'));
dense.dispose();
fs.writeFileSync(at('data.jsonl'), JSON.stringify({ instruction: 'a', response: 'b' }) + '\n');

t.test('upcycle refuses a garbage tokenizer.json and writes nothing', async (t) => {
  fs.writeFileSync(at('dense/tokenizer.json'), '{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": [');
  const r = xft('upcycle', 'dense', 'moe', '--experts', '2', '--top-k', '2');
  t.equal(r.code, 3, 'exit 3');
  t.match(r.err, `${path.join('dense', 'tokenizer.json')}: the tokenizer is not valid JSON`, 'names the file');
  t.notOk(fs.existsSync(at('moe')), 'no output folder');
});

t.test('eval: tokenizer.json {} and a garbage tokenizer_config.json', async (t) => {
  fs.writeFileSync(at('dense/tokenizer.json'), '{}');
  let r = xft('eval', 'dense', '--data', 'data.jsonl', '--seq-len', '64');
  t.equal(r.code, 3, 'tokenizer.json {}: exit 3');
  t.match(r.err, /dense\/tokenizer\.json: not a Hugging Face tokenizer\.json/);
  fs.rmSync(at('dense/tokenizer.json'));
  fs.writeFileSync(at('dense/tokenizer_config.json'), '\u0000garbage');
  r = xft('upcycle', 'dense', 'moe', '--experts', '2', '--top-k', '2');
  t.equal(r.code, 3, 'garbage tokenizer_config.json: exit 3');
  t.match(r.err, /dense\/tokenizer_config\.json: the tokenizer config is not valid JSON/, 'names tokenizer_config.json');
  t.notOk(fs.existsSync(at('moe')));
});
