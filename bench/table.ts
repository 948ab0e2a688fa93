import { synchronize } from '../lib/index';

/** The benchmarks' tables: one row per measurement, columns padded, numbers formatted per column. */
export function printTable<R extends object>(title: string, cols: (keyof R & string)[], rows: R[], format: (v: number, col: string) => string): void {
  const cell = (r: R, c: keyof R & string) => {
    const v = r[c] as unknown;
    return typeof v === 'number' ? format(v, c) : v === null || v === undefined ? '-' : String(v);
  };
  const widths = cols.map((c) => Math.max(c.length, ...rows.map((r) => cell(r, c).length)));
  console.log(`\n${title}`);
  console.log(cols.map((c, i) => c.padEnd(widths[i])).join(' | '));
  console.log(widths.map((w) => '-'.repeat(w)).join('-|-'));
  for (const r of rows) console.log(cols.map((c, i) => cell(r, c).padEnd(widths[i])).join(' | '));
}

/** The value after `name` on the command line, if any. */
export function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

/** Median milliseconds of `fn` (synchronized around each repetition). */
export function time(fn: () => void, reps: number, warmup = 3): number {
  for (let i = 0; i < warmup; i++) fn();
  synchronize();
  const ms: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = process.hrtime.bigint();
    fn();
    synchronize();
    ms.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  ms.sort((a, b) => a - b);
  return ms[Math.floor(ms.length / 2)];
}
