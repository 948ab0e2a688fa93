// The `xft` command line end to end: the pipeline upcycle -> train -> train --merge -> merge -> eval,
// --help everywhere, exit codes, Ctrl-C saving a resumable state that continues the run exactly.
// (Faults: test/72.cli_faults.ts; output folder claims: test/73.cli_claims.ts.)
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { tinyConfig } from '../lib/config';
import { createDense } from '../lib/xft';
import { saveModel, readCheckpointInfo } from '../lib/checkpoint';
import { SafetensorsReader } from '../lib/safetensors';

// many CLI child processes (each loads the TypeScript sources: seconds apiece): about 4 min on 2 busy
// cores, near the runner's 5-minute default; the whole file gets 10 (tap's root setTimeout tells the runner)
t.setTimeout(600_000);

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'xft-cli-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
const at = (name: string) => path.join(tmp, name);
const CLI = path.join(__dirname, '..', 'lib', 'cli.ts');
// the child runs the TypeScript CLI through the same loader as this test, on the CPU unless
// XFT_TEST_CLI_DEVICE=auto (then the CLI's own default: the GPU, in bf16, when there is one)
const env = process.env.XFT_TEST_CLI_DEVICE === 'auto' ? { ...process.env } : { ...process.env, XFT_DEVICE: 'cpu' };

function xft(...args: string[]) {
  const r = spawnSync(process.execPath, [...process.execArgv, CLI, ...args], { cwd: tmp, env, encoding: 'utf8' });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

const config = tinyConfig({ hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 2, num_hidden_layers: 2 });
const dense = createDense(config, { seed: 1 });
saveModel(dense, at('dense'));
dense.dispose();
fs.writeFileSync(at('data.jsonl'), Array.from({ length: 40 }, (_, i) => JSON.stringify({ instruction: `Add ${i} and ${2 * i}.`, response: `return ${3 * i};` })).join('\n') + '\n');
const DATA = ['--data', 'data.jsonl', '--seq-len', '200'];

t.test('--help on every command', async (t) => {
  const top = xft('--help');
  t.equal(top.code, 0);
  for (const c of ['info', 'plan', 'upcycle', 'train', 'merge', 'eval', 'generate', 'demo']) t.match(top.out, new RegExp(`\\n  ${c}\\b`), `lists ${c}`);
  t.match(top.out, /Exit codes: 0 success, 1 runtime failure, 2 usage error, 3 unusable input, 130 interrupted/);
  for (const [c, opt] of [['upcycle', '--experts'], ['train', '--merge'], ['merge', '--shared-rate'], ['eval', '--data'], ['demo', '--scale'], ['info', '--json'], ['plan', '--gpu-memory']]) {
    const r = xft(c, '--help');
    t.equal(r.code, 0, `${c} --help exits 0`);
    t.match(r.out, opt, `${c} --help shows ${opt}`);
  }
});

t.test('the pipeline: upcycle -> MoE fine-tune -> merge learning -> merge -> eval', async (t) => {
  let r = xft('upcycle', 'dense', 'moe', '--experts', '4', '--top-k', '3');
  t.equal(r.code, 0, `upcycle: ${r.err}`);
  t.equal(readCheckpointInfo(at('moe')).kind, 'moe');
  r = xft('train', 'moe', ...DATA, '--out', 'moe-ft', '--batch-size', '8', '--steps', '3', '--lr', '1e-3', '--held-out', '8', '--eval-every', '2', '--recompute');
  t.equal(r.code, 0, `train MoE: ${r.err}`);
  t.match(r.out, /MoE fine-tuning: .*, activation recomputation/);
  t.match(r.out, /held-out: loss \d+\.\d+, token accuracy/);
  const log = JSON.parse(fs.readFileSync(at('moe-ft/xft_train.json'), 'utf8'));
  t.equal(log.losses.length, 3, 'three steps logged');
  t.equal(log.evals.length, 1, 'one evaluation during training (step 2), then the final one');
  t.match(r.out, /step 2: held-out loss \d+\.\d+/);
  r = xft('train', 'moe-ft', '--merge', ...DATA, '--out', 'merge', '--batch-size', '8', '--steps', '2', '--lr', '1e-2', '--precision', 'bf16');
  t.equal(r.code, 0, `train --merge: ${r.err}`);
  t.match(r.out, /merge learning/);
  t.equal(readCheckpointInfo(at('merge')).kind, 'merged');
  const alpha = new SafetensorsReader(at('merge')).readF32('model.layers.0.mlp.average_weights');
  t.ok(alpha.some((v) => v !== 0), 'α moved from 0');
  const expert = 'model.layers.1.mlp.calculator.experts.weight_down.3.weight';
  t.same(new SafetensorsReader(at('merge')).readBytes(expert), new SafetensorsReader(at('moe-ft')).readBytes(expert),
    'a bf16 merge-learning run copies the frozen f32 experts bit for bit');
  t.notOk(new SafetensorsReader(at('merge')).has('model.layers.0.mlp.gate.gate_network.0.weight'), 'no router in the merge checkpoint');
  r = xft('merge', 'merge', 'final');
  t.equal(r.code, 0, `merge: ${r.err}`);
  t.equal(readCheckpointInfo(at('final')).kind, 'dense');
  t.same(JSON.parse(fs.readFileSync(at('final/config.json'), 'utf8')).architectures, ['LlamaForCausalLM']);
  r = xft('train', 'final', ...DATA, '--out', 'sft-bf16', '--batch-size', '8', '--steps', '2', '--precision', 'mixed');
  t.equal(r.code, 0, `train --precision mixed: ${r.err}`);
  t.match(r.out, /SFT of the dense model: .*, precision mixed/);
  // on the CPU the chain stays f32; on a GPU its default bf16 runs (no master) wrote 'final' as bf16
  const sourceDtype = new SafetensorsReader(at('final')).info('lm_head.weight').dtype;
  t.equal(new SafetensorsReader(at('sft-bf16')).info('lm_head.weight').dtype, sourceDtype, `written back in the source's dtype (${sourceDtype}; f32 rounded from the f32 master weights)`);
  if (process.env.XFT_TEST_CLI_DEVICE !== 'auto') t.equal(sourceDtype, 'F32', 'the CPU run wrote f32 all along');
  const g = xft('generate', 'final', 'Add 2 and 3.', '--max-new-tokens', '5');
  t.equal(g.code, 0, `generate: ${g.err}`);
  t.match(g.err, /xft: \d+ tokens, stopped at/, 'generate reports its tokens');
  const a = xft('eval', 'final', ...DATA, '--json'), b = xft('eval', 'merge', ...DATA, '--json');
  t.equal(a.code, 0, a.err);
  const ea = JSON.parse(a.out), eb = JSON.parse(b.out);
  t.ok(ea.tokens > 0 && ea.tokens === eb.tokens, `${ea.tokens} response tokens`);
  t.ok(Math.abs(ea.loss - eb.loss) <= 1e-4 * eb.loss, `the merged dense model scores as the merge model (${ea.loss} vs ${eb.loss})`);
});

t.test('the reference recipe: --optim adafactor --precision bf16 (--stochastic-rounding) --clip 0; bad combinations exit 2', async (t) => {
  const r = xft('train', 'dense', ...DATA, '--out', 'recipe', '--batch-size', '8', '--steps', '2', '--optim', 'adafactor', '--precision', 'bf16', '--stochastic-rounding', '--clip', '0', '--grad-dtype', 'bf16');
  t.equal(r.code, 0, `train: ${r.err}`);
  t.match(r.out, /precision bf16 \(stochastic rounding\), adafactor, clip off/);
  const log = JSON.parse(fs.readFileSync(at('recipe/xft_train.json'), 'utf8'));
  t.same([log.optim, log.precision, log.clip], ['adafactor', 'bf16', 0], 'the run settings are logged');
  t.equal(new SafetensorsReader(at('recipe')).info('lm_head.weight').dtype, 'BF16', 'bf16 weights (no master) are written as they are, bf16');
  const cases: [string[], RegExp][] = [
    [['--stochastic-rounding', '--precision', 'mixed'], /--stochastic-rounding .* needs --precision bf16 \(this run: mixed\)/],
    [['--optim', 'sgd'], /--optim.*adamw, adafactor/],
    [['--precision', 'fp16'], /--precision.*mixed, bf16, f32/],
    [['--clip', '-1'], /--clip/],
    [['--grad-dtype', 'bf16', '--precision', 'f32'], /--grad-dtype bf16 needs bf16 weights/],
  ];
  for (const [extra, msg] of cases) {
    const b = xft('train', 'dense', ...DATA, '--out', 'bad', '--steps', '1', ...extra);
    t.equal(b.code, 2, `${extra.join(' ')} exits 2`);
    t.match(b.err, msg, `and says why: ${b.err.trim().split('\n').at(-1)}`);
  }
  t.notOk(fs.existsSync(at('bad')), 'nothing written');
});

t.test('exit codes: 2 usage, 3 unusable input, 1 runtime failure', async (t) => {
  const cases: [string[], number, RegExp][] = [
    [['frobnicate'], 2, /unknown command/],
    [['upcycle', 'dense', 'x', '--top-k', 'six'], 2, /--top-k.*integer/],
    [['upcycle', 'dense', 'x', '--router', 'rnn'], 2, /--router.*mlp, linear/],
    [['train', 'dense', '--out', 'x'], 2, /--data/],
    [['train', 'dense', '--data', 'data.jsonl', '--out', 'x', '--eval-every', '5'], 2, /--eval-every needs held-out/],
    [['train', 'dense', '--out', 'x', '--resume'], 1, /x\.resume: no trainer_state\.json/],
    [['merge', 'moe', 'x', '--shared-rate', '2'], 2, /--shared-rate/],
    [['upcycle', 'dense', 'x', '--experts', '4', '--top-k', '5'], 2, /--top-k 5 is out of range: expected 2 to --experts 4/],
    [['merge', 'dense', 'x'], 3, /dense checkpoint/],
    [['train', 'dense', '--data', 'data.jsonl', '--seq-len', '16', '--out', 'x'], 3, /no sequence keeps a response token/],
    [['eval', 'no-such-folder', '--data', 'data.jsonl'], 1, /no such folder/],
    [['upcycle', 'dense', 'moe'], 1, /not empty.*--overwrite/],
  ];
  fs.writeFileSync(at('bad.jsonl'), '{"instruction": "a", "response": "b"}\nnot json\n');
  cases.push([['eval', 'dense', '--data', 'bad.jsonl'], 3, /bad\.jsonl:2: not valid JSON/]);
  for (const [args, code, msg] of cases) {
    const r = xft(...args);
    t.equal(r.code, code, `xft ${args.join(' ')} exits ${code}`);
    t.match(r.err, msg, `and says why: ${r.err.trim().split('\n').at(-1)}`);
  }
  t.notOk(fs.existsSync(at('x')), 'no output written by a failed command');
});

t.test('Ctrl-C saves a resumable state (exit 130); --resume ends where an unbroken run ends', async (t) => {
  const args = ['train', 'dense', ...DATA, '--batch-size', '4', '--steps', '120', '--lr', '1e-3', '--save-every', '3', '--optim', 'adamw'];
  const full = xft(...args, '--out', 'full');
  t.equal(full.code, 0, full.err);
  const child = spawn(process.execPath, [...process.execArgv, CLI, ...args, '--out', 'part'], { cwd: tmp, env });
  let err = '';
  const code = await new Promise<number | null>((resolve) => {
    child.stderr.on('data', (d) => {
      const before = err;
      err += d;
      if (!/saved a resumable state/.test(before) && /saved a resumable state/.test(err)) child.kill('SIGINT');
    });
    child.on('exit', (c) => resolve(c));
  });
  t.equal(code, 130, 'exit code 130');
  t.match(err, /saved the state at step \d+\/120 in .*part\.resume; continue with: xft train dense --out .*part --resume/);
  t.notOk(fs.existsSync(at('part')), 'no output checkpoint yet');
  const other = xft('train', 'dense', '--out', 'part', '--resume', '--optim', 'adafactor');
  t.equal(other.code, 3, 'resuming with another optimizer exits 3');
  t.match(other.err, /part\.resume holds a run with --optim adamw; it continues only with the same setting \(given: adafactor\)/, 'and says why');
  const resumed = xft('train', 'dense', '--out', 'part', '--resume', '--optim', 'adamw');
  t.equal(resumed.code, 0, resumed.err);
  t.match(resumed.out, /resuming at step \d+/);
  t.notOk(fs.existsSync(at('part.resume')), 'the resume state is removed once the run completes');
  const a = JSON.parse(fs.readFileSync(at('full/xft_train.json'), 'utf8')).losses, b = JSON.parse(fs.readFileSync(at('part/xft_train.json'), 'utf8')).losses;
  t.equal(b.length, 120);
  t.same(b, a, 'the interrupted and resumed run has the losses of the unbroken run');
  t.same(new SafetensorsReader(at('part')).readF32('lm_head.weight'), new SafetensorsReader(at('full')).readF32('lm_head.weight'), 'and the same weights');
});
