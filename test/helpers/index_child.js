// The index-taking native ops of the CPU backend called straight through the addon (no TypeScript
// checks in front) with corrupted index tensors: out of range (1e6, -7, INT_MIN/MAX), duplicates,
// bad group offsets. Plain JavaScript so that test/13.index_safety.ts can run it under valgrind
// (memcheck) in a child process: an out-of-bounds access or an output element left unwritten
// (read back and summed here) is a memcheck error; a wrong value or a missing XFT_INDEX exits 1.
'use strict';
const path = require('node:path');

const root = path.join(__dirname, '..', '..');
const addon = process.env.XFT_ADDON_PATH ? require(path.resolve(process.env.XFT_ADDON_PATH)) : require('node-gyp-build')(root);
const F32 = 0, I32 = 2;
let failures = 0, checks = 0;

function check(ok, what) {
  checks++;
  if (!ok) {
    failures++;
    console.error(`not ok: ${what}`);
  }
}

// storages are handles owned by a JS object (binding/addon.cc alloc/free); the owners live as long as the process
const owners = [];
const storage = (bytes) => {
  const owner = {};
  owners.push(owner);
  return addon.alloc(0, bytes, owner);
};

function tensor(dtype, values) {
  const data = dtype === I32 ? Int32Array.from(values) : Float32Array.from(values);
  const s = storage(Math.max(1, data.length) * 4);
  if (data.length) addon.upload(s, dtype, data, 0);
  return s;
}
// an output: fresh host memory, uninitialised (valgrind sees every element read before it is written)
const out = (n) => storage(Math.max(1, n) * 4);
const read = (s, dtype, n) => Array.from(addon.download(s, dtype, n, 0));
const random = (n, seed) => Array.from({ length: n }, (_, i) => Math.sin(seed * 7.13 + i * 1.618) * 2);
// every element defined and finite (reading them all is what makes valgrind check them)
const finite = (values) => values.every((v) => Number.isFinite(v));

function throwsIndex(fn, what) {
  try {
    fn();
    check(false, `${what}: expected XFT_INDEX`);
  } catch (err) {
    check(err && err.code === 'XFT_INDEX' && /experts\[\d+, \d+\] = -?\d+/.test(err.message), `${what}: XFT_INDEX naming the entry (${err && err.message})`);
  }
}

// ---- routeSharedBackward: corrupted experts are refused before anything is written
{
  const T = 5, N = 7, K = 4;
  const logits = tensor(F32, random(T * N, 1)), dW = tensor(F32, random(T * K, 2)), dI = tensor(F32, random(N, 3));
  for (const [shared, bad] of [[true, 1e6], [true, 0], [true, -7], [true, N + 1], [false, N], [false, -1], [true, -2147483648], [true, 2147483647]]) {
    const experts = Array.from({ length: T * K }, (_, i) => (shared ? 1 + (i % N) : i % N));
    experts[(T - 1) * K + 1] = bad;
    const ex = tensor(I32, experts), dL = out(T * N);
    throwsIndex(() => addon.routeBackward(logits, F32, T, N, K, true, shared, ex, dW, dI, dL), `routeBackward shared=${shared} expert ${bad}`);
  }
  // a filled experts tensor, as routing.experts.fill_(0) / fill_(1e6) would leave it
  for (const v of [0, 1e6, -7]) {
    const ex = tensor(I32, new Array(T * K).fill(v)), dL = out(T * N);
    throwsIndex(() => addon.routeBackward(logits, F32, T, N, K, false, true, ex, dW, null, dL), `routeBackward experts filled with ${v}`);
  }
  // valid experts still work, every output written
  const ex = tensor(I32, Array.from({ length: T * K }, (_, i) => (i % K === K - 1 ? 0 : 1 + ((i * 3) % N)))), dL = out(T * N);
  addon.routeBackward(logits, F32, T, N, K, true, true, ex, dW, dI, dL);
  check(finite(read(dL, F32, T * N)), 'routeBackward valid experts: dLogits defined');
}

// ---- grouped GEMM with offsets that break 0 = o_0 <= ... <= o_E = M: fully defined outputs
function refGemm(x, w, offsets, M, n, k, E) {
  const o = [];
  for (let e = 0; e <= E; e++) o.push(Math.max(e ? o[e - 1] : 0, Math.min(Math.max(offsets[e], 0), M)));
  const y = new Array(M * n).fill(0), dx = new Array(M * k).fill(0), dw = new Array(E * n * k).fill(0);
  for (let e = 0; e < E; e++)
    for (let r = o[e]; r < o[e + 1]; r++)
      for (let j = 0; j < n; j++) {
        let s = 0;
        for (let i = 0; i < k; i++) s += x[r * k + i] * w[(e * n + j) * k + i];
        y[r * n + j] = s;
        for (let i = 0; i < k; i++) {
          dx[r * k + i] += y[r * n + j] * w[(e * n + j) * k + i]; // dy = y here
          dw[(e * n + j) * k + i] += y[r * n + j] * x[r * k + i];
        }
      }
  return { y, dx, dw };
}
const near = (a, b) => a.length === b.length && a.every((v, i) => Math.abs(v - b[i]) <= 1e-4 * (1 + Math.abs(b[i])));
{
  const M = 9, n = 3, k = 5, E = 3;
  const xv = random(M * k, 4), wv = random(E * n * k, 5);
  const x = tensor(F32, xv), w = tensor(F32, wv);
  for (const offsets of [[0, 3, 6, 7], [2, 3, 6, 9], [0, 5, 3, 9], [-4, 2, 1e6, 9], [5, 5, 5, 5], [0, 0, 0, 0], [9, 0, 0, 0],
    [-2147483648, 2147483647, -1, 4], [0, 3, 6, 12]]) {
    const o = tensor(I32, offsets), y = out(M * n);
    addon.groupedGemmForward(x, w, o, y, F32, M, n, k, E);
    const ref = refGemm(xv, wv, offsets, M, n, k, E);
    const yv = read(y, F32, M * n);
    check(finite(yv) && near(yv, ref.y), `groupedGemm offsets ${offsets}: y defined, zero outside the groups`);
    const dy = tensor(F32, ref.y), dx = out(M * k), dw = out(E * n * k);
    addon.groupedGemmBackward(x, w, o, dy, dx, dw, F32, M, n, k, E, false, F32);
    const dxv = read(dx, F32, M * k), dwv = read(dw, F32, E * n * k);
    check(finite(dxv) && near(dxv, ref.dx), `groupedGemmBackward offsets ${offsets}: dx defined`);
    check(finite(dwv) && near(dwv, ref.dw), `groupedGemmBackward offsets ${offsets}: dw defined`);
  }
}

// ---- MoE permutation with indices that are not a permutation
{
  const T = 4, K = 3, n = T * K, d = 5;
  const cases = [
    Array.from({ length: n }, (_, i) => (i * 5) % n), // a permutation
    Array.from({ length: n }, (_, i) => (i < 3 ? 1 : i)), // duplicates: 1 three times, 0 and 2 unmapped
    [1e6, -7, 0, 3, 3, 3, 2147483647, -2147483648, 11, 11, 5, 4], // out of range and duplicates
    new Array(n).fill(0),
    new Array(n).fill(-1),
  ];
  const xv = random(T * d, 6), yv = random(n * d, 7), gv = random(n, 8), dOutv = random(T * d, 9);
  const x = tensor(F32, xv), y = tensor(F32, yv), g = tensor(F32, gv), dOut = tensor(F32, dOutv);
  const ok = (p) => p >= 0 && p < n;
  for (const perm of cases) {
    const p = tensor(I32, perm);
    // invertPermutation: -1 where nothing maps, the largest source where several do
    const pos = out(n);
    addon.invertPermutation(p, pos, n);
    const want = new Array(n).fill(-1);
    perm.forEach((v, i) => { if (ok(v)) want[v] = Math.max(want[v], i); });
    check(JSON.stringify(read(pos, I32, n)) === JSON.stringify(want), `invertPermutation ${perm}`);
    // the gather and the combines: out-of-range entries read as zero rows
    const xp = out(n * d);
    addon.permuteForward(x, p, xp, F32, T, K, d);
    const xpv = read(xp, F32, n * d);
    check(near(xpv, xpv.map((_, j) => (ok(perm[(j / d) | 0]) ? xv[((perm[(j / d) | 0] / K) | 0) * d + (j % d)] : 0))), `permute ${perm}`);
    const dx = out(T * d), o = out(T * d);
    addon.permuteBackward(y, p, dx, F32, T, K, d);
    addon.unpermuteForward(y, p, g, o, F32, T, K, d);
    const wantDx = [], wantOut = [];
    for (let t = 0; t < T; t++)
      for (let c = 0; c < d; c++) {
        let a = 0, b = 0;
        for (let s = 0; s < K; s++) {
          const q = perm[t * K + s];
          if (ok(q)) (a += yv[q * d + c]), (b += gv[t * K + s] * yv[q * d + c]);
        }
        wantDx.push(a), wantOut.push(b);
      }
    check(near(read(dx, F32, T * d), wantDx), `permuteBackward ${perm}`);
    check(near(read(o, F32, T * d), wantOut), `unpermute ${perm}`);
    // unpermuteBackward: dy rows nothing maps to are zero, duplicates take the last pair
    const dy = out(n * d), dg = out(n);
    addon.unpermuteBackward(dOut, y, p, g, dy, dg, F32, T, K, d);
    const inverse = new Array(n).fill(-1);
    perm.forEach((v, i) => { if (ok(v)) inverse[v] = Math.max(inverse[v], i); });
    const wantDy = [];
    for (let i = 0; i < n; i++)
      for (let c = 0; c < d; c++) wantDy.push(inverse[i] < 0 ? 0 : gv[inverse[i]] * dOutv[((inverse[i] / K) | 0) * d + c]);
    const wantDg = perm.map((q, i) => {
      let a = 0;
      if (ok(q)) for (let c = 0; c < d; c++) a += dOutv[((i / K) | 0) * d + c] * yv[q * d + c];
      return a;
    });
    check(near(read(dy, F32, n * d), wantDy), `unpermuteBackward ${perm}: dy`);
    check(near(read(dg, F32, n), wantDg), `unpermuteBackward ${perm}: dg`);
  }
}

// ---- cross-entropy targets and embedding ids out of range: ignored rows, zero rows
{
  const R = 6, V = 4, d = 3;
  const lv = random(R * V, 10), logits = tensor(F32, lv), dLoss = tensor(F32, new Array(R).fill(0.5));
  const targets = [1e6, -7, 4, 3, -2147483648, 2147483647];
  const t = tensor(I32, targets), losses = out(R), preds = out(R), dl = out(R * V);
  addon.crossEntropyForward(logits, F32, t, R, V, losses, preds);
  addon.crossEntropyBackward(logits, F32, t, dLoss, R, V, dl);
  const lossv = read(losses, F32, R), dlv = read(dl, F32, R * V), pv = read(preds, I32, R);
  check(finite(lossv) && targets.every((x, r) => (x >= 0 && x < V) === (lossv[r] !== 0)), 'crossEntropy: out-of-range targets give 0 loss');
  check(pv.every((p) => p >= 0 && p < V), 'crossEntropy: predictions defined');
  check(finite(dlv) && targets.every((x, r) => x >= 0 && x < V || dlv.slice(r * V, r * V + V).every((v) => v === 0)), 'crossEntropyBackward: zero rows');

  const table = tensor(F32, random(V * d, 11)), ids = [2, 1e6, -7, 3, -2147483648, 2147483647];
  const idt = tensor(I32, ids), emb = out(R * d), dTable = out(V * d);
  addon.embeddingForward(idt, table, emb, F32, R, V, d);
  const ev = read(emb, F32, R * d);
  check(finite(ev) && ids.every((x, r) => x >= 0 && x < V || ev.slice(r * d, r * d + d).every((v) => v === 0)), 'embedding: zero rows for bad ids');
  addon.embeddingBackward(idt, tensor(F32, random(R * d, 12)), dTable, F32, R, V, d, false);
  check(finite(read(dTable, F32, V * d)), 'embeddingBackward: dTable defined');
}

console.log(`index ops: ${checks} checks, ${failures} failed`);
process.exit(failures ? 1 : 0);
