// Shared setup of the GPU comparison tests (test/3x): fresh random inputs from a printed seed,
// the same tensors on both devices, poisoned device allocations, and the tolerances.
import t from 'tap';
import { Tensor, type DType } from '../../lib/index';
import { native } from '../../lib/native';
import { SKIP_NO_CUDA } from './ref';

/** fp32 1e-5, bf16 1e-2 relative (‖cuda − cpu‖ / ‖cpu‖); integer outputs are compared exactly. */
export const TOL: Record<'f32' | 'bf16', number> = { f32: 1e-5, bf16: 1e-2 };

/** XFT_TEST_SEED, else a fixed seed: a run repeats exactly (XFT_TEST_SEEDS in cuda/dev/emu/check.sh tries others). */
export const DEFAULT_TEST_SEED = 20261201;
const BASE_SEED = Number(process.env.XFT_TEST_SEED ?? DEFAULT_TEST_SEED);
let seedCounter = 0;
/** A fresh seed per call, derived from the run's printed base seed. */
export const seed = () => BASE_SEED * 1000 + seedCounter++;

/** Prints the seed and poisons every new allocation (NaN floats, -1 ints) while the test file runs. */
export function setupGpuTest(test: typeof t): void {
  test.comment(`random inputs from seed ${BASE_SEED} (XFT_TEST_SEED=${BASE_SEED} repeats them)`);
  test.before(() => {
    if (!SKIP_NO_CUDA) native.setPoison(true);
  });
  test.teardown(() => native.setPoison(false));
}

/** The same random tensor on the CPU and on the GPU. */
export function pair(shape: number[], dtype: DType, options: { std?: number } = {}) {
  const cpu = Tensor.randn(shape, { seed: seed(), dtype, std: options.std ?? 1 });
  return { cpu, cuda: cpu.to('cuda') };
}

/**
 * XFT_TEST_FAST=1 (CI's shake and asan emulation runs): only the cases whose `work` (a size, e.g.
 * M·n·k) is at most `limit` times XFT_TEST_FAST_SCALE (default 1; CI's AddressSanitizer runs, ~10x
 * slower, use less); the small and odd shapes (partial tiles, empty groups) stay, the large ones,
 * which cost minutes under emulation, go. Unset, every case runs.
 */
export function fastCases<C>(test: tap.Test, cases: C[], work: (c: C) => number, limit: number): C[] {
  if (process.env.XFT_TEST_FAST !== '1') return cases;
  const scale = Number(process.env.XFT_TEST_FAST_SCALE ?? 1);
  if (!(scale > 0)) throw new Error(`XFT_TEST_FAST_SCALE must be a number > 0, not ${JSON.stringify(process.env.XFT_TEST_FAST_SCALE)}`);
  const kept = cases.filter((c) => work(c) <= limit * scale);
  test.comment(`XFT_TEST_FAST=1: ${kept.length} of ${cases.length} cases (work <= ${limit * scale})`);
  return kept;
}
