/**
 * Checkpoints on an epoch schedule (`xft train --save-checkpoints-every F`; UpIT's stage 1 saves one every
 * 0.25 epoch, ../shared/UPIT.md): which optimizer steps save one, and the folders a run wrote.
 *
 * A run with S optimizer steps per epoch saves after step round(j·F·S), j = 1 … ⌊epochs/F⌋ (round half
 * up), so 2 epochs at F = 0.25 give 8 checkpoints, the last at the final step. They go to
 * `<out>.checkpoints/checkpoint-<step>/`, each a complete dense checkpoint folder whose config.json
 * records `"xft_epoch": j·F` and `"xft_step": step`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { XftError } from './errors';
import { expectInt, expectNumber } from './validate';
import { readConfigJson } from './config';
import { recoverFolder } from './folder';

/** Slack for the floating-point products j·F·S and epochs/F (e.g. 0.3 / 0.1 = 2.9999999999999996). */
const EPS = 1e-9;

/** The optimizer steps (1-based, ascending, distinct) after which a checkpoint is saved. */
export function checkpointSteps(stepsPerEpoch: number, every: number, epochs: number): number[] {
  const op = 'checkpointSteps';
  const S = expectInt(op, 'stepsPerEpoch', stepsPerEpoch, 1);
  const F = expectNumber(op, 'every', every, 'a positive number of epochs', (v) => v > 0);
  const n = expectNumber(op, 'epochs', epochs, 'a positive number of epochs', (v) => v > 0);
  if (F * S < 1 - EPS)
    throw new XftError(`${op}: checkpoints every ${F} epoch would be less than one step apart (${S} steps per epoch); expected every >= ${1 / S}`, 'XFT_VALUE');
  const count = Math.floor(n / F + EPS);
  const steps: number[] = [];
  for (let j = 1; j <= count; j++) steps.push(Math.floor(j * F * S + 0.5 + EPS));
  return steps;
}

/** The epoch j·F of each scheduled step (same order as checkpointSteps). */
export function checkpointEpochs(every: number, count: number): number[] {
  return Array.from({ length: count }, (_, j) => Number(((j + 1) * every).toPrecision(12)));
}

export interface EpochCheckpoint {
  dir: string;
  epoch: number;
  step: number;
}

/** Where a train run with --out `out` writes its scheduled checkpoints. */
export function checkpointsFolder(out: string): string {
  return `${out.replace(/[/\\]+$/, '')}.checkpoints`;
}

/** The folder of the checkpoint saved after `step`. */
export function checkpointDir(out: string, step: number): string {
  return path.join(checkpointsFolder(out), `checkpoint-${step}`);
}

/**
 * The scheduled checkpoints a train run with --out `out` has written (none: []), sorted by epoch. A
 * folder is listed when its config.json records xft_epoch and xft_step; one that does not is XFT_FORMAT.
 */
export function listEpochCheckpoints(out: string): EpochCheckpoint[] {
  const root = checkpointsFolder(out);
  if (!fs.existsSync(root)) return [];
  const found: EpochCheckpoint[] = [];
  for (const name of fs.readdirSync(root)) {
    if (!/^checkpoint-\d+$/.test(name)) continue;
    const dir = path.join(root, name);
    recoverFolder(dir);
    const file = path.join(dir, 'config.json');
    if (!fs.existsSync(file)) continue;
    const raw = readConfigJson(file);
    const epoch = raw.xft_epoch, step = raw.xft_step;
    if (typeof epoch !== 'number' || !(epoch > 0) || typeof step !== 'number' || !Number.isSafeInteger(step) || step < 1 || name !== `checkpoint-${step}`)
      throw new XftError(`${file}: a scheduled checkpoint must record "xft_epoch" (> 0) and "xft_step" (its folder's step), got ${JSON.stringify({ xft_epoch: epoch, xft_step: step })}`, 'XFT_FORMAT');
    found.push({ dir, epoch, step });
  }
  return found.sort((a, b) => a.epoch - b.epoch || a.step - b.step);
}
