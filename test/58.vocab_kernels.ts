// The vocabulary-sized kernels at Qwen's V = 151,936 on the CPU: cross-entropy forward and backward
// and the embedding forward and backward against float64 loops (no argument spreads: a row of
// 151,936 values overflows `Math.max(...row)`), and the 64-bit row offsets of those kernels, which
// make R·V or V·d beyond 2^31 elements safe, checked at the index level without allocating 8 GB.
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Tensor, ops } from '../lib/index';
import { rng, roundBf16 } from './helpers/ref';
import { close } from './helpers/check';

const V = 151936;

t.test(`cross-entropy at V = ${V}: forward and backward vs float64`, async (t) => {
  for (const dtype of ['f32', 'bf16'] as const) {
    const R = 5, g = rng(7);
    const z = Float64Array.from({ length: R * V }, () => g.normal() * 3);
    if (dtype === 'bf16') for (let i = 0; i < z.length; i++) z[i] = roundBf16(z[i]);
    const targetIds = [0, V - 1, -100, 151643, 12345];
    const dLossV = [0.5, -1, 2, 1, 0.25];
    const logits = Tensor.from(Float32Array.from(z), [R, V], { dtype });
    const targets = Tensor.from(targetIds, [R], { dtype: 'i32' });
    const dLoss = Tensor.from(dLossV, [R]);
    const { losses, predictions } = ops.crossEntropy(logits, targets);
    const dLogits = ops.crossEntropyBackward(logits, targets, dLoss).toArray();
    const wantLoss: number[] = [], wantPred: number[] = [];
    const wantGrad = new Float64Array(R * V);
    for (let r = 0; r < R; r++) {
      let m = -Infinity, best = 0;
      for (let j = 0; j < V; j++)
        if (z[r * V + j] > m) {
          m = z[r * V + j];
          best = j;
        }
      let sum = 0;
      for (let j = 0; j < V; j++) sum += Math.exp(z[r * V + j] - m);
      const y = targetIds[r], ignored = y < 0;
      wantLoss.push(ignored ? 0 : m + Math.log(sum) - z[r * V + y]);
      wantPred.push(best);
      if (!ignored) for (let j = 0; j < V; j++) wantGrad[r * V + j] = (Math.exp(z[r * V + j] - m) / sum - (j === y ? 1 : 0)) * dLossV[r];
    }
    close(t, losses.toArray(), wantLoss, 1e-5, `${dtype}: losses ${Array.from(losses.toArray(), (v) => v.toFixed(3)).join(', ')}`);
    t.same(Array.from(predictions.toArray()), wantPred, `${dtype}: predictions (argmax over ${V})`);
    close(t, dLogits, wantGrad, dtype === 'f32' ? 1e-5 : 1e-2, `${dtype}: dLogits`);
    let masked = 0;
    for (let j = 0; j < V; j++) masked += Math.abs(dLogits[2 * V + j]);
    t.equal(masked, 0, 'a masked row has a zero gradient');
    for (const x of [logits, targets, dLoss, losses, predictions]) x.dispose();
  }
});

t.test(`embedding at V = ${V}: forward rows and backward sums vs loops`, async (t) => {
  const d = 16, g = rng(11);
  const table = Tensor.from(Float32Array.from({ length: V * d }, () => g.normal()), [V, d]);
  const tab = table.toArray();
  const idList = [0, V - 1, 151643, 151645, V - 1, 77, 0, 151935, 100000, 131072];
  const ids = Tensor.from(idList, [2, 5], { dtype: 'i32' });
  const out = ops.embedding(ids, table).toArray();
  let rowsOk = 0;
  idList.forEach((id, r) => {
    let same = true;
    for (let c = 0; c < d; c++) same &&= out[r * d + c] === tab[id * d + c];
    if (same) rowsOk++;
  });
  t.equal(rowsOk, idList.length, 'each row is the table row of its id, the last id included');
  const dOutV = Float32Array.from({ length: idList.length * d }, () => g.normal());
  const dTable = ops.embeddingBackward(ids, Tensor.from(dOutV, [2, 5, d]), V).toArray();
  t.equal(dTable.length, V * d);
  const want = new Float64Array(V * d);
  idList.forEach((id, r) => {
    for (let c = 0; c < d; c++) want[id * d + c] += dOutV[r * d + c];
  });
  close(t, dTable, want, 1e-6, 'dTable: the rows of each id summed, zero elsewhere');
  t.throws(() => ops.embedding(Tensor.from([V], [1], { dtype: 'i32' }), table), /id|range|V/, `an id of ${V} is out of range`);
  table.dispose();
});

/**
 * In the kernels that index [R, V] logits and [V, d] tables, every product of a row index and a
 * row length is formed in 64 bits (`(size_t)r * V`): with 32-bit ints, R·V ≥ 2^31 (14,135 rows of
 * 151,936 logits) would wrap. The index expressions are read from the sources.
 */
t.test('row offsets are 64-bit in the vocabulary kernels (CPU and CUDA sources)', async (t) => {
  const root = path.join(__dirname, '..');
  const files = ['binding/cpu/cross_entropy.cc', 'cuda/cross_entropy.cu', 'binding/cpu/embedding.cc', 'cuda/embedding.cu'];
  const rowLength = /\b(V|d|row_bytes)\b/;
  for (const f of files) {
    const src = fs.readFileSync(path.join(root, f), 'utf8').replace(/\/\/.*$/gm, '').replace(/\/\*[\s\S]*?\*\//g, '');
    // products `<index> * <row length>`: r * V, id * d, rows[j] * d, sorted[j] * d, v * d, ...
    const products = [...src.matchAll(/(\(size_t\)\s*)?\b([A-Za-z_]\w*(?:\[\w+\])?)\s*\*\s*([A-Za-z_]\w*)\b/g)].filter((m) => rowLength.test(m[3]) && /^(r|id|v|row|rows\[\w+\]|sorted\[\w+\]|i|j|t|tok)$/.test(m[2]));
    t.ok(products.length > 0, `${f}: ${products.length} row offsets found`);
    const narrow = products.filter((m) => !m[1]).map((m) => m[0]);
    t.same(narrow, [], `${f}: each is (size_t)-cast before the multiply`);
  }
  // the arithmetic the cast protects: the offset of the last logit of row 14,135 at V = 151,936
  const r = 14135;
  t.ok(r * V > 2 ** 31, `${r} x ${V} = ${r * V} > 2^31`);
  t.equal(Math.imul(r, V), r * V - 2 ** 32, 'in 32-bit ints it wraps negative');
});
