// The inputs of test/helpers/dist_child.ts, also computed by test/68.dist.ts for the expected sums:
// n values of varied sign and magnitude from (rank, salt), so that the order of a sum shows in its bits.
export function distInput(rank: number, n: number, salt: number): number[] {
  const out: number[] = [];
  let s = (rank * 7919 + salt * 104729 + 1) >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    const u = s / 2 ** 32;
    out.push((u - 0.4) * 10 ** ((i % 5) - 2));
  }
  return out;
}
