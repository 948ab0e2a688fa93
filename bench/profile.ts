/**
 * bench/profile: a per-kernel time breakdown of whatever runs between start() and stop(), by op
 * family, for bench/train --profile. Every native op call is wrapped (the addon's functions, looked up
 * by the op wrappers at call time) and bracketed by two timestamps:
 *   CUDA         cudaEvents recorded on the op stream (cuda/timer.h): the device time from the op's
 *                first kernel starting to its last ending. What the device spends between ops
 *                (waiting for the host to launch) is the step time minus the sum, shown as a row.
 *   CPU, or the  the host's steady clock around each call, labelled "wall clock": on the CPU backend
 *   emulator     (and the host emulation of CUDA, which runs kernels as they are launched) the ops
 *                are synchronous, so this is their own time.
 */
import { backend } from '../lib/index';
import { native } from '../lib/native';

interface TimerNative {
  timerReset(device: number, count: number): void;
  timerRecord(device: number, slot: number): void;
  timerElapsed(device: number, from: number, to: number): number;
}

/** the addon functions that are not ops (memory, copies between host and device count as 'copies') */
const NOT_OPS = new Set(['alloc', 'free', 'setErrorClass', 'backend', 'memoryStats', 'resetPeakMemory', 'synchronize', 'trimPool',
  'setPoison', 'timerReset', 'timerRecord', 'timerElapsed', 'compiledWithCuda']);

/** op family of a native function name */
export function familyOf(fn: string): string {
  const rules: [RegExp, string][] = [
    [/^groupedGemm/, 'grouped GEMM (linears, experts)'], [/^attention/, 'attention'], [/^routerLinear/, 'router linears'],
    [/^route(Forward|Backward)/, 'routing (top-k, weights, sort)'], [/^(permute|unpermute|invertPermutation)/, 'permute / unpermute'],
    [/^(loadEstimate|balanceLoss)/, 'balance loss, load estimate'], [/^rmsnorm/, 'rmsnorm'], [/^rope/, 'rope'], [/^swiglu/, 'swiglu'],
    [/^embedding/, 'embedding'], [/^crossEntropy/, 'cross-entropy'], [/^merge/, 'merge (mixing coefficients)'],
    [/^(adamw|adafactor)/i, 'optimizer'], [/^(fill|cast)/, 'fills, casts'], [/^(copy|upload|download)/, 'copies'],
    [/^(add|axpby|tanh|routerNoise|sumSquares)/, 'elementwise (adds, tanh, noise, norms)'],
  ];
  for (const [re, name] of rules) if (re.test(fn)) return name;
  return fn;
}

export interface ProfileRow { family: string; ms: number; calls: number; share: number }
export interface Profile { method: string; stepMs: number; rows: ProfileRow[] }

const POOL = 1 << 16;

export class OpProfiler {
  readonly method: 'cuda events' | 'wall clock';
  readonly #device: number;
  readonly #timers = native as unknown as TimerNative;
  readonly #originals = new Map<string, (...a: unknown[]) => unknown>();
  #marks: { family: string; slot: number; ms: number }[] = [];
  #next = 0;
  #dropped = 0;

  constructor() {
    const b = backend();
    const emulated = b.kind === 'cuda' && /emulation/i.test(b.name ?? '');
    this.#device = b.kind === 'cuda' && !emulated ? 1 : 0;
    this.method = this.#device === 1 ? 'cuda events' : 'wall clock';
    this.#timers.timerReset(this.#device, this.#device === 1 ? POOL : 0);
  }

  /** wraps every native op; calls are recorded until stop() */
  start(): void {
    const addon = native as unknown as Record<string, unknown>;
    this.#marks = [];
    this.#next = 0;
    this.#dropped = 0;
    for (const [name, fn] of Object.entries(addon)) {
      if (typeof fn !== 'function' || NOT_OPS.has(name)) continue;
      const original = fn as (...a: unknown[]) => unknown;
      const family = familyOf(name);
      this.#originals.set(name, original);
      addon[name] = (...args: unknown[]) => {
        if (this.#device === 0) {
          const t0 = performance.now();
          const r = original.apply(addon, args);
          this.#marks.push({ family, slot: -1, ms: performance.now() - t0 });
          return r;
        }
        if (this.#next + 2 > POOL) {
          this.#dropped++;
          return original.apply(addon, args);
        }
        const slot = this.#next;
        this.#next += 2;
        this.#timers.timerRecord(1, slot);
        const r = original.apply(addon, args);
        this.#timers.timerRecord(1, slot + 1);
        this.#marks.push({ family, slot, ms: 0 });
        return r;
      };
    }
  }

  /** restores the native functions; `stepMs` is the measured time of what ran (for the shares and the gap row) */
  stop(stepMs: number): Profile {
    const addon = native as unknown as Record<string, unknown>;
    for (const [name, fn] of this.#originals) addon[name] = fn;
    this.#originals.clear();
    const by = new Map<string, ProfileRow>();
    for (const m of this.#marks) {
      const ms = m.slot >= 0 ? this.#timers.timerElapsed(1, m.slot, m.slot + 1) : m.ms;
      const row = by.get(m.family) ?? { family: m.family, ms: 0, calls: 0, share: 0 };
      row.ms += ms;
      row.calls++;
      by.set(m.family, row);
    }
    const rows = [...by.values()].sort((a, b) => b.ms - a.ms);
    const sum = rows.reduce((a, r) => a + r.ms, 0);
    rows.push({ family: this.#device === 1 ? 'between ops (device idle: launches, host work, syncs)' : 'outside ops (host: JavaScript, allocation)', ms: Math.max(0, stepMs - sum), calls: 0, share: 0 });
    if (this.#dropped) rows.push({ family: `(${this.#dropped} calls past the timer pool, not timed)`, ms: 0, calls: this.#dropped, share: 0 });
    for (const r of rows) r.share = stepMs > 0 ? r.ms / stepMs : 0;
    return { method: this.method, stepMs, rows };
  }

  dispose(): void {
    this.#timers.timerReset(this.#device, 0);
  }
}
