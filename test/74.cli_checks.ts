// The CLI's checks before any work: an output folder that cannot be written, a --seq-len past the
// model's max_position_embeddings, --device cuda without a GPU, a folder that is not a Llama
// checkpoint; and its messages in CLI words (flags, not API option names or internal prefixes).
import t from 'tap';
import * as fs from 'node:fs';
import { spawnSync } from 'node:child_process';
import { CLI, DATA, cliWorkspace, env } from './helpers/cli';
import { checkWritable } from '../lib/folder';

const { tmp, at, xft } = cliWorkspace('xft-cli-checks-', (fn) => t.teardown(fn));
const INTERNAL = /Tensor\.\w+:|upcycleCheckpoint|mergeCheckpoint|num_selects|options\.|overwrite:/;

t.test('an output folder that cannot be written fails at once with exit 1, before any work', async (t) => {
  const cases: [string[], RegExp][] = [
    [['train', 'dense', ...DATA, '--steps', '50', '--out', '/proc/forbidden'], /\/proc\/forbidden cannot be written: creating a folder in \/proc fails/],
    [['demo', '--out', '/proc/forbidden', '--scale', '0.05'], /\/proc\/forbidden cannot be written/],
  ];
  for (const [args, msg] of cases) {
    const r = xft(...args);
    t.equal(r.code, 1, `${args[0]} ${args.find((a) => a.includes('/'))}: exit 1`);
    t.match(r.err, msg, r.err.trim());
    t.notMatch(r.out + r.err, /SFT of the dense model|tokenize|data: |pretrain|upcycle \|/, 'before reading data, training or writing');
  }
});

t.test('checkWritable: a path below a file is refused with XFT_IO', async (t) => {
  fs.writeFileSync(at('a-file'), 'x');
  t.throws(() => checkWritable(at('a-file/out')), { code: 'XFT_IO', message: /a-file\/out cannot be written: .*a-file is not a folder/ });
  t.throws(() => checkWritable(at('a-file')), { code: 'XFT_IO', message: /a-file exists and is not a folder/ });
  t.doesNotThrow(() => checkWritable(at('new/deeper/out')), 'a folder that does not exist yet, below a writable one');
  t.notOk(fs.existsSync(at('new')), 'the check creates nothing');
});

t.test("--seq-len above max_position_embeddings is refused (exit 2) unless --allow-long, which warns", async (t) => {
  let r = xft('train', 'dense', '--data', 'data.jsonl', '--seq-len', '600', '--steps', '1', '--batch-size', '4', '--out', 'long');
  t.equal(r.code, 2, 'exit 2');
  t.match(r.err, /--seq-len 600 is longer than the model's max_position_embeddings 512 \(dense\/config\.json\).*--allow-long/);
  t.notOk(fs.existsSync(at('long')), 'nothing written');
  r = xft('train', 'dense', '--data', 'data.jsonl', '--seq-len', '600', '--allow-long', '--steps', '1', '--batch-size', '4', '--out', 'long');
  t.equal(r.code, 0, r.err);
  t.match(r.err, /xft: warning: --seq-len 600 is longer than the model's max_position_embeddings 512/);
  t.equal(JSON.parse(fs.readFileSync(at('long/xft_train.json'), 'utf8')).seqLen, 600);
  // without --seq-len: 1024, or max_position_embeddings (512 here) when smaller; no warning
  r = xft('train', 'dense', '--data', 'data.jsonl', '--steps', '1', '--batch-size', '4', '--out', 'default');
  t.equal(r.code, 0, r.err);
  t.notMatch(r.err, /warning/);
  t.equal(JSON.parse(fs.readFileSync(at('default/xft_train.json'), 'utf8')).seqLen, 512);
});

t.test('--device cuda where no CUDA device is available is exit 1 (a runtime failure), said in CLI words', async (t) => {
  // XFT_DEVICE=cpu makes the CPU the only device, on any host
  const cpuOnly = (...args: string[]) => {
    const r = spawnSync(process.execPath, [...process.execArgv, CLI, ...args], { cwd: tmp, env: { ...env, XFT_DEVICE: 'cpu' }, encoding: 'utf8' });
    return { code: r.status, err: r.stderr };
  };
  for (const args of [['demo', '--out', 'gpu-demo', '--device', 'cuda']]) {
    const r = cpuOnly(...args);
    t.equal(r.code, 1, `${args[0]}: exit 1`);
    t.match(r.err, /^xft: --device cuda: no CUDA device is available \(/m);
    t.notMatch(r.err, INTERNAL, 'no internal names');
  }
  t.notOk(fs.existsSync(at('gpu-demo')), 'nothing written');
});

t.test('messages name flags, not API options or internal functions', async (t) => {
  let r = xft('upcycle', 'dense', 'moe9', '--experts', '4', '--top-k', '9');
  t.equal(r.code, 2, '--top-k above --experts: exit 2 (a value out of range)');
  t.match(r.err, /upcycle: --top-k 9 is out of range: expected 2 to --experts 4/);
  t.notMatch(r.err, INTERNAL);
  fs.mkdirSync(at('full'));
  fs.writeFileSync(at('full/x'), 'x');
  r = xft('upcycle', 'dense', 'full', '--experts', '4', '--top-k', '2');
  t.equal(r.code, 1);
  t.match(r.err, /full exists and is not empty \(pass --overwrite to replace it\)/);
  t.notMatch(r.err, INTERNAL);
});

t.test('a folder that is not a Llama checkpoint says so (exit 3)', async (t) => {
  fs.mkdirSync(at('gpt2'));
  fs.writeFileSync(at('gpt2/config.json'), JSON.stringify({ model_type: 'gpt2', architectures: ['GPT2LMHeadModel'], n_embd: 768, n_layer: 12, n_head: 12, vocab_size: 50257 }));
  for (const args of [['upcycle', 'gpt2', 'gpt2-moe']]) {
    const r = xft(...args);
    t.equal(r.code, 3, `${args[0]}: exit 3`);
    t.match(r.err, /gpt2\/config\.json: not a Llama checkpoint \(model_type "gpt2", architectures GPT2LMHeadModel\)/);
  }
});

t.test('a demo scale too small for one batch is refused at once, and an error ends the process (no progress bar keeps it alive)', async (t) => {
  const t0 = Date.now();
  const r = xft('demo', '--out', at('demo-tiny'), '--scale', '0.001');
  t.equal(r.code, 3, 'exit 3');
  t.match(r.err, /--scale 0\.001 leaves no training sequences/);
  t.notMatch(r.err, /batchSize|runDemo/, 'said in CLI words');
  t.ok(Date.now() - t0 < 60_000, 'the process ended');
  t.notOk(fs.existsSync(at('demo-tiny/results.md')), 'nothing written');
});
