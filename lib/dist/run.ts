/**
 * What `xft train` needs around the data-parallel trainer: the default micro-batch for a world size,
 * held-out evaluation split over ranks, and the fault-injection hook of the tests
 * (XFT_TEST_DIE_AT_STEP / XFT_TEST_HANG_AT_STEP).
 */
import { XftError } from '../errors';
import { evaluate } from '../train';
import type { Model } from '../model';
import type { Sample } from '../data';
import type { Collectives } from './collectives';

/** The largest micro-batch <= 8 that splits the batch evenly over `world` ranks (min(8, batch) in one process when it divides). */
export function defaultMicroBatch(batch: number, world: number): number {
  const perRank = Math.max(1, Math.floor(batch / world));
  for (let m = Math.min(8, perRank); m > 1; m--) if (perRank % m === 0 && batch % (m * world) === 0) return m;
  return 1;
}

/**
 * Mean loss and token accuracy over `rows`, each rank evaluating rows r, r + W, r + 2W, ...: the
 * sums over ranks (the same numbers on every rank). A collective: every rank calls it.
 */
export function evaluateParallel(model: Model, rows: readonly Sample[], batchSize: number, g: Collectives): { loss: number; accuracy: number; tokens: number } {
  const mine = rows.filter((_, i) => i % g.worldSize === g.rank);
  const ev = mine.length ? evaluate(model, mine, { batchSize }) : { loss: 0, accuracy: 0, tokens: 0 };
  const [sum, correct, tokens] = g.sum([ev.loss * ev.tokens, ev.accuracy * ev.tokens, ev.tokens]);
  return { loss: tokens ? sum / tokens : 0, accuracy: tokens ? correct / tokens : 0, tokens: Math.round(tokens) };
}

/**
 * Tests of the fault handling: XFT_TEST_DIE_AT_STEP=<rank>:<step> kills that rank (SIGKILL) after
 * the step; XFT_TEST_HANG_AT_STEP=<rank>:<step> makes it hang there (blocked, no collective). Returns
 * the hook for this rank, or null.
 */
export function testFaultHook(rank: number, env: Record<string, string | undefined> = process.env): ((step: number) => void) | null {
  const at = (name: string): number | null => {
    const v = env[name];
    if (!v) return null;
    const m = /^(\d+):(\d+)$/.exec(v.trim());
    if (!m) throw new XftError(`${name}: expected <rank>:<step> but received ${JSON.stringify(v)}`, 'XFT_VALUE');
    return Number(m[1]) === rank ? Number(m[2]) : null;
  };
  const die = at('XFT_TEST_DIE_AT_STEP'), hang = at('XFT_TEST_HANG_AT_STEP');
  if (die === null && hang === null) return null;
  return (step) => {
    if (step === die) process.kill(process.pid, 'SIGKILL');
    if (step === hang) for (;;) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 60_000);
  };
}
