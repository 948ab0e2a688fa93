// Checkpoints on an epoch schedule (lib/checkpoint_schedule.ts, `xft train --save-checkpoints-every`), UPIT.md
// §7.4: 2 epochs at 0.25 give exactly 8 checkpoints, the last at the final step (the weights of the run's
// output); a run killed in the middle and resumed writes the same set, none twice, with the same weights.
import t from 'tap';
import * as fs from 'node:fs';
import { spawnSync } from 'node:child_process';
import { checkpointEpochs, checkpointSteps, listEpochCheckpoints } from '../lib/checkpoint_schedule';
import { SafetensorsReader } from '../lib/safetensors';
import { loadModel } from '../lib/checkpoint';
import { CLI, DATA, cliWorkspace, env } from './helpers/cli';
import { throwsCode } from './helpers/check';

t.test('checkpointSteps: round(j·F·S) for j = 1 … epochs/F', async (t) => {
  t.same(checkpointSteps(10, 0.25, 2), [3, 5, 8, 10, 13, 15, 18, 20], '2 epochs of 10 steps at 0.25: 8, the last the final step (halves round up)');
  t.same(checkpointSteps(4, 0.25, 2), [1, 2, 3, 4, 5, 6, 7, 8], 'one step apart');
  t.same(checkpointSteps(7, 1, 3), [7, 14, 21], 'every epoch');
  t.same(checkpointSteps(10, 0.1, 0.3), [1, 2, 3], '0.3 / 0.1 counts 3 (no floating-point loss)');
  t.same(checkpointSteps(10, 0.4, 1), [4, 8], 'F not dividing the epochs: the last scheduled one before the end');
  t.same(checkpointSteps(10, 3, 2), [], 'F beyond the run: none');
  t.same(checkpointEpochs(0.1, 3), [0.1, 0.2, 0.3], 'the epochs recorded, without floating-point noise');
  throwsCode(t, () => checkpointSteps(3, 0.25, 2), 'XFT_VALUE', /less than one step apart.*every >= 0\.333/, 'an interval under one step');
  throwsCode(t, () => checkpointSteps(0, 0.25, 2), 'XFT_VALUE', /stepsPerEpoch/, 'no steps per epoch');
  throwsCode(t, () => checkpointSteps(10, 0, 2), 'XFT_VALUE', /every/, 'every 0');
  throwsCode(t, () => checkpointSteps(10, 0.5, -1), 'XFT_VALUE', /epochs/, 'negative epochs');
  t.same(listEpochCheckpoints('/nonexistent/run'), [], 'a run without scheduled checkpoints lists none');
});

t.test('xft train --save-checkpoints-every 0.25: 8 checkpoints over 2 epochs; killed and resumed, the same set', async (t) => {
  const { at, xft } = cliWorkspace('xft-ckpt-schedule-', t.teardown);
  const help = xft('train', '--help');
  t.match(help.out.replace(/\s+/g, ' '), /--save-checkpoints-every <epochs>.*<out>\.checkpoints\/checkpoint-<step>/, 'xft train --help documents it');
  // 40 examples, batch 4: S = 10 steps per epoch, 20 steps
  const args = ['train', 'dense', ...DATA, '--batch-size', '4', '--micro-batch', '4', '--epochs', '2', '--lr', '1e-3', '--optim', 'adamw', '--save-checkpoints-every', '0.25'];
  const full = xft(...args, '--out', 'full');
  t.equal(full.code, 0, full.err);
  t.match(full.out, /checkpoints every 0\.25 epoch: after steps 3, 5, 8, 10, 13, 15, 18, 20/);
  const listed = listEpochCheckpoints(at('full'));
  t.same(listed.map((c) => [c.epoch, c.step]), [[0.25, 3], [0.5, 5], [0.75, 8], [1, 10], [1.25, 13], [1.5, 15], [1.75, 18], [2, 20]], 'exactly 8, sorted by epoch, the last at the final step');
  t.same(listed.map((c) => c.dir), listed.map((c) => at(`full.checkpoints/checkpoint-${c.step}`)), 'in <out>.checkpoints/checkpoint-<step>');
  const cfg = JSON.parse(fs.readFileSync(`${listed[7].dir}/config.json`, 'utf8'));
  t.match(cfg, { xft_epoch: 2, xft_step: 20, model_type: 'llama' }, 'config.json records xft_epoch and xft_step');
  const m = loadModel(listed[0].dir);
  t.equal(m.kind, 'dense', 'a checkpoint loads');
  m.dispose();
  const last = new SafetensorsReader(listed[7].dir), out = new SafetensorsReader(at('full'));
  t.ok(out.names().every((n) => Buffer.compare(last.readBytes(n), out.readBytes(n)) === 0), 'the last checkpoint holds the weights of the run\'s output');
  t.not(Buffer.compare(new SafetensorsReader(listed[0].dir).readBytes('lm_head.weight'), last.readBytes('lm_head.weight')), 0, 'the first holds earlier weights');

  // killed (SIGKILL) at step 10 with a resumable state from step 8; resumed: the same set, none rewritten
  const killed = spawnSync(process.execPath, [...process.execArgv, CLI, ...args, '--save-every', '4', '--out', 'part'],
    { cwd: at('.'), env: { ...env, XFT_TEST_DIE_AT_STEP: '0:10' }, encoding: 'utf8' });
  t.equal(killed.signal, 'SIGKILL', 'the first run is killed');
  t.same(listEpochCheckpoints(at('part')).map((c) => c.step), [3, 5, 8], 'it wrote the checkpoints before step 10');
  const before = [3, 5, 8].map((s) => fs.statSync(at(`part.checkpoints/checkpoint-${s}/model.safetensors`)).mtimeMs);
  const other = xft('train', 'dense', '--out', 'part', '--resume', '--save-checkpoints-every', '0.5');
  t.equal(other.code, 3, 'resuming with another schedule exits 3');
  t.match(other.err, /holds a run with --save-checkpoints-every 0\.25/, 'and says why');
  const resumed = xft('train', 'dense', '--out', 'part', '--resume');
  t.equal(resumed.code, 0, resumed.err);
  t.match(resumed.out, /resuming at step 8/);
  const part = listEpochCheckpoints(at('part'));
  t.same(part.map((c) => [c.epoch, c.step]), listed.map((c) => [c.epoch, c.step]), 'the resumed run ends with the same 8 checkpoints');
  t.same([3, 5, 8].map((s) => fs.statSync(at(`part.checkpoints/checkpoint-${s}/model.safetensors`)).mtimeMs), before, 'none of the earlier ones written again');
  part.forEach((c, i) => {
    const a = new SafetensorsReader(c.dir), b = new SafetensorsReader(listed[i].dir);
    t.ok(a.names().every((n) => Buffer.compare(a.readBytes(n), b.readBytes(n)) === 0), `checkpoint-${c.step}: the weights of the unbroken run`);
  });

  // a new run over earlier checkpoints: an error unless --overwrite, which removes them first
  fs.renameSync(at('full.checkpoints'), at('next.checkpoints'));
  const refused = xft(...args, '--out', 'next');
  t.equal(refused.code, 1, 'without --overwrite, earlier checkpoints there stop a new run (exit 1)');
  t.match(refused.err, /next\.checkpoints holds checkpoints of an earlier run/);
  const again = xft(...args, '--out', 'next', '--overwrite', '--steps', '2');
  t.equal(again.code, 0, again.err);
  t.same(listEpochCheckpoints(at('next')), [], '--overwrite: the earlier checkpoints are gone (2 steps save none)');
});
