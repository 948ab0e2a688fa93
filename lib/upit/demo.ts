/**
 * UpIT at the scale of `xft demo --method upit` (lib/demo.ts): the pipeline of lib/upit/index.ts run in
 * this process on the demo's pretrained model and rows, its checkpoints in a work folder under the demo's
 * output. Budget: 2 epochs of SFT with a checkpoint every 0.5 epoch (4 checkpoints), expanded to 6 experts,
 * routing vectors pre-optimized on a quarter of the rows (the paper's 1% is under one row at this scale),
 * assembled (top-2, trunk average), post-trained 2 epochs with L_lm + 0.01 L_load: 4 epochs in all, the
 * paper's budget, against the demo's 5 for SFT and XFT.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Sample } from '../data';
import type { Device } from '../tensor';
import type { Model } from '../model';
import { copyDense } from '../xft';
import { train, disposeState, type StepInfo } from '../train';
import { loadModel, saveModel } from '../checkpoint';
import { checkpointSteps } from '../checkpoint_schedule';
import { expandPool } from './expand';
import { assignBuckets, seedIndices } from './seed';
import { preoptimizeRouting } from './route';
import { assembleMoe } from './assemble';

export const UPIT_DEMO = { experts: 6, topK: 2, prepareEpochs: 2, checkpointEvery: 0.5, seedFraction: 0.25, routeEpochs: 4, postEpochs: 2 } as const;

export interface UpitDemoOptions {
  /** a work folder for the checkpoints (removed at the end) */
  work: string;
  device: Device;
  lr: number;
  batchSize: number;
  seed: number;
  progress: (stage: string) => (info: StepInfo) => void;
  log: (line: string) => void;
}

/** UpIT from the pretrained `base` on `rows`: the last SFT checkpoint (dense) and the post-trained MoE, with their loss curves. */
export function runUpitDemo(base: Model, rows: readonly Sample[], o: UpitDemoOptions): { sft: Model; moe: Model; curves: { sft: number[]; post: number[] } } {
  const D = UPIT_DEMO;
  fs.rmSync(o.work, { recursive: true, force: true });
  fs.mkdirSync(o.work, { recursive: true });
  const at = (name: string) => path.join(o.work, name);
  // 1. prepare: SFT with a checkpoint every 0.5 epoch
  const base0 = at('theta0');
  saveModel(base, base0);
  const sft = copyDense(base);
  const steps = checkpointSteps(Math.floor(rows.length / o.batchSize), D.checkpointEvery, D.prepareEpochs);
  const pool: string[] = [];
  const sftRun = train(sft, rows, {
    lr: o.lr, batchSize: o.batchSize, epochs: D.prepareEpochs, warmupSteps: Math.round(steps[0] / 2), seed: o.seed + 3,
    onStep: (s) => {
      o.progress('upit-sft')(s);
      if (steps.includes(s.step)) {
        const dir = at(`checkpoint-${pool.length + 1}`);
        saveModel(sft, dir);
        pool.push(dir);
      }
    },
  });
  disposeState(sftRun.state);
  o.log(`upit: ${pool.length} SFT checkpoints`);
  // 2. expand to E experts
  const experts = pool.length < D.experts ? expandPool({ base: base0, pool, experts: D.experts, out: at('expand'), seed: o.seed, device: o.device, onLog: o.log }).pool : pool.slice(-D.experts);
  // 3. seed buckets by lowest PPL, routing vectors per expert
  const idx = seedIndices(rows.length, D.seedFraction, o.seed);
  const seedRows = idx.map((i) => rows[i]);
  const b = assignBuckets(experts, seedRows, { seed: o.seed, device: o.device, onLog: o.log });
  o.log(`upit: seed buckets ${b.sizes.join(', ')} of ${seedRows.length} rows`);
  const routed = experts.map((dir, e) => {
    const out = at(`route-${e}`);
    const mine = seedRows.filter((_, j) => b.bucket[j] === e);
    preoptimizeRouting(dir, mine, out, { lr: o.lr, epochs: D.routeEpochs, batchSize: Math.max(1, Math.min(o.batchSize, mine.length)), seed: o.seed, device: o.device, onLog: o.log });
    return out;
  });
  // 4. assemble, post-train
  assembleMoe({ experts: routed, routing: routed, trunk: pool, out: at('moe'), topK: D.topK, seed: o.seed });
  const moe = loadModel(at('moe'), { device: o.device });
  const post = train(moe, rows, { lr: o.lr, batchSize: o.batchSize, epochs: D.postEpochs, warmupSteps: Math.round(steps[0] / 2), seed: o.seed + 4, onStep: o.progress('upit-moe') });
  disposeState(post.state);
  fs.rmSync(o.work, { recursive: true, force: true });
  return { sft, moe, curves: { sft: sftRun.losses, post: post.losses } };
}
