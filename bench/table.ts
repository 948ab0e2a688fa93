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
