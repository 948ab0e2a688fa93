// The XFT pipeline with a real vocabulary at tiny width: createDense with the family's vocab_size,
// an SFT step, a MoE upcycle and a step, the merge, and `xft eval` through the CLI with the
// tokenizer the checkpoints carried along. Used by test/56 and test/57 (two fixtures each).
import type { Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { tinyConfig } from '../../lib/config';
import { createDense } from '../../lib/xft';
import { loadModel, mergeCheckpoint, readCheckpointInfo, saveModel, upcycleCheckpoint } from '../../lib/checkpoint';
import { train, evaluate, disposeState } from '../../lib/train';
import { HfTokenizer, encodeDataFile, toRows } from '../../lib/data';
import { CODE_SAMPLES, type Fixture } from './tokenizers';

const CLI = path.join(__dirname, '..', '..', 'lib', 'cli.ts');
const SEQ = 56;

export function vocabPipeline(t: Test, f: Fixture, tmp: string): void {
  const at = (name: string) => path.join(tmp, `${f.name}-${name}`);
  const tok = new HfTokenizer(f.dir);
  const data = at('data.jsonl');
  fs.writeFileSync(data, CODE_SAMPLES.slice(0, 4).map((s, i) => JSON.stringify({ instruction: `Explain snippet ${i}.`, response: s.slice(0, 120) })).join('\n') + '\n');
  const rows = toRows(encodeDataFile(data, tok).samples, SEQ, 'pad', tok.pad);
  t.ok(rows.every((r) => Array.from(r.ids).every((v) => v >= 0 && v < f.vocabSize)), 'ids within the vocabulary');

  const config = tinyConfig({ vocab_size: f.vocabSize, hidden_size: 16, intermediate_size: 24, num_attention_heads: 2, num_key_value_heads: 1, num_hidden_layers: 1 });
  const dense = createDense(config, { seed: 3 });
  t.same(dense.embed.value.shape, [f.vocabSize, 16], `embedding [${f.vocabSize}, 16]`);
  saveModel(dense, at('dense'), { copyFrom: f.dir });
  const sft = train(dense, rows, { lr: 1e-2, batchSize: rows.length, steps: 2, clip: 1 });
  t.ok(Math.abs(sft.losses[0] - Math.log(f.vocabSize)) < 0.5, `initial loss ${sft.losses[0].toFixed(3)} ≈ ln V = ${Math.log(f.vocabSize).toFixed(3)}`);
  t.ok(sft.losses[1] < sft.losses[0], `SFT steps lower the loss: ${sft.losses.map((l) => l.toFixed(3)).join(', ')}`);
  disposeState(sft.state);
  dense.dispose();

  upcycleCheckpoint(at('dense'), at('moe'), { experts: 4, topK: 2 });
  const moe = loadModel(at('moe'));
  t.equal(moe.kind, 'moe');
  const step = train(moe, rows, { lr: 1e-2, batchSize: rows.length, steps: 1 });
  t.ok(Number.isFinite(step.losses[0]), `MoE step: loss ${step.losses[0].toFixed(3)}`);
  saveModel(moe, at('moe-ft'), { copyFrom: at('moe') });
  disposeState(step.state);
  moe.dispose();
  mergeCheckpoint(at('moe-ft'), at('final'));
  t.equal(readCheckpointInfo(at('final')).config.vocab_size, f.vocabSize);
  for (const file of ['tokenizer.json', 'tokenizer_config.json'])
    t.ok(fs.readFileSync(at(`final/${file}`)).equals(fs.readFileSync(path.join(f.dir, file))), `${file} carried along dense -> moe -> moe-ft -> final`);

  const final = loadModel(at('final'));
  const expected = evaluate(final, rows, { batchSize: rows.length });
  final.dispose();
  const r = spawnSync(process.execPath, [...process.execArgv, CLI, 'eval', at('final'), '--data', data, '--seq-len', String(SEQ), '--json'],
    { env: { ...process.env, XFT_DEVICE: 'cpu' }, encoding: 'utf8' });
  t.equal(r.status, 0, `xft eval: ${r.stderr}`);
  const out = JSON.parse(r.stdout || '{}');
  t.equal(out.tokens, expected.tokens, `xft eval with the copied tokenizer: ${out.tokens} response tokens`);
  t.ok(Math.abs(out.loss - expected.loss) <= 1e-5 * expected.loss, `and the loss of the same model (${out.loss} vs ${expected.loss})`);
  t.ok(fs.existsSync(`${data}.xft-tokens`), 'the data file has its token cache');
}
