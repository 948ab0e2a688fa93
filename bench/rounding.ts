/**
 * bench/rounding: what stochastic rounding buys bf16 weights updated in place (`--precision bf16`).
 * A tiny Llama is first trained briefly in f32 (so that it has something to fine-tune), then three
 * copies continue on the same data with the same optimizer and a small learning rate: f32 weights,
 * bf16 weights rounded to nearest (an update below half a bf16 ulp, ~0.2-0.4% of the weight, is lost),
 * and bf16 weights rounded stochastically (kept on average). Prints the held-out loss every `--every`
 * steps side by side, and its change over the fine-tune.
 *
 * Usage: node dist/bench/rounding.js [--optim adafactor|adamw] [--lr 2e-5] [--steps 300] [--every 50] [--device cpu|cuda] [--json file]
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { backend, type Device } from '../lib/index';
import { packageRoot } from '../lib/native';
import { llamaConfig } from '../lib/config';
import { copyDense, createDense } from '../lib/xft';
import { ByteTokenizer, toRows } from '../lib/data';
import { disposeState, evaluate, train } from '../lib/train';
import type { OptimizerKind } from '../lib/optim';
import { printTable } from './table';

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

const optim = arg('--optim', 'adafactor') as OptimizerKind;
const lr = Number(arg('--lr', '2e-5')), steps = Number(arg('--steps', '300')), every = Number(arg('--every', '50'));
const device = arg('--device', backend().kind) as Device;

const tok = new ByteTokenizer();
const lib = path.join(packageRoot(), 'lib');
const text = fs.readdirSync(lib).filter((f) => f.endsWith('.ts')).sort().map((f) => fs.readFileSync(path.join(lib, f), 'utf8')).join('\n');
const ids = tok.encode(text).slice(0, 288 * 65);
const all = toRows([{ ids: ids.slice(0, -1), targets: ids.slice(1) }], 64, 'pack', tok.pad);
// the last 32 sequences are held out: the curves are their loss, free of the batch-to-batch noise of training losses
const rows = all.slice(0, -32), held = all.slice(-32);
const config = llamaConfig({ hidden_size: 64, intermediate_size: 176, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 259 });

// a short f32 pretraining, so that the fine-tunes start from a model that has learned something
const base = createDense(config, { seed: 0, device });
const pre = train(base, rows, { lr: 3e-3, batchSize: 8, steps: 150, warmupSteps: 10, seed: 1 });
disposeState(pre.state);
console.log(`${device}, ${optim}, lr ${lr}, ${steps} steps of 8 x 64 tokens; pretrained to loss ${pre.losses.at(-1)!.toFixed(4)}`);

const modes = [
  { name: 'f32', dtype: 'f32' as const, stochasticRounding: false },
  { name: 'bf16 nearest', dtype: 'bf16' as const, stochasticRounding: false },
  { name: 'bf16 stochastic', dtype: 'bf16' as const, stochasticRounding: true },
];
const curves: Record<string, number[]> = {};
for (const m of modes) {
  const model = copyDense(base).cast(m.dtype);
  const t0 = Date.now();
  const curve = [evaluate(model, held).loss];
  const r = train(model, rows, {
    lr, batchSize: 8, steps, seed: 2, optimizer: optim, clip: 0, masterWeights: false, stochasticRounding: m.stochasticRounding,
    onStep: (s) => void (s.step % every === 0 && curve.push(evaluate(model, held).loss)),
  });
  curves[m.name] = curve;
  console.log(`${m.name}: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  disposeState(r.state);
  model.dispose();
}
base.dispose();

type Row = Record<string, string | number>;
const out: Row[] = curves.f32.map((_, k) => ({ step: k * every, ...Object.fromEntries(modes.map((m) => [m.name, curves[m.name][k]])) }));
out.push({ step: 'change', ...Object.fromEntries(modes.map((m) => [m.name, curves[m.name].at(-1)! - curves[m.name][0]])) });
printTable<Row>(`held-out loss (${optim}, lr ${lr}, bf16 weights without master copy)`, ['step', ...modes.map((m) => m.name)], out, (v, c) => (c === 'step' ? String(v) : v.toFixed(4)));
const json = process.argv.indexOf('--json');
if (json >= 0) fs.writeFileSync(process.argv[json + 1], JSON.stringify({ device, optim, lr, steps, curves }, null, 2));
