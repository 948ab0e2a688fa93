// The vocabulary-sized kernels at Qwen's V = 151,936 on CUDA against their CPU twins: cross-entropy
// forward and backward (f32 and bf16 logits, masked rows, the last id) and the embedding forward and
// backward, with every new device allocation poisoned. Runs under the emulated CUDA backend in CI
// (cuda/dev/emu/check.sh); the CPU side is checked against float64 in test/58.
import t, { type Test } from 'tap';
import { Tensor, ops } from '../lib/index';
import { SKIP_NO_CUDA, rng } from './helpers/ref';
import { close } from './helpers/check';
import { TOL, pair, seed, setupGpuTest } from './helpers/gpu';

const V = 151936;
setupGpuTest(t);

function same(t: Test, got: ArrayLike<number>, want: ArrayLike<number>, what: string): void {
  let differ = 0;
  for (let i = 0; i < Math.max(got.length, want.length); i++) if (!(got[i] === want[i])) differ++;
  t.ok(differ === 0 && got.length === want.length, `${what}: ${differ} of ${want.length} differ`);
}

t.test(`cross-entropy at V = ${V}: CUDA vs CPU`, { skip: SKIP_NO_CUDA }, async (t) => {
  for (const dtype of ['f32', 'bf16'] as const) {
    const R = 4, g = rng(seed());
    const ids = [V - 1, -100, g.int(0, V), 151643];
    const targets = Tensor.from(ids, [R], { dtype: 'i32' }), targetsCuda = targets.to('cuda');
    const logits = pair([R, V], dtype, { std: 3 }), dLoss = pair([R], 'f32');
    const a = ops.crossEntropy(logits.cpu, targets), b = ops.crossEntropy(logits.cuda, targetsCuda);
    close(t, b.losses.toArray(), a.losses.toArray(), TOL.f32, `${dtype}: losses`);
    same(t, b.predictions.toArray(), a.predictions.toArray(), `${dtype}: predictions`);
    const da = ops.crossEntropyBackward(logits.cpu, targets, dLoss.cpu), db = ops.crossEntropyBackward(logits.cuda, targetsCuda, dLoss.cuda);
    close(t, db.toArray(), da.toArray(), TOL[dtype], `${dtype}: dLogits`);
    for (const x of [targets, targetsCuda, logits.cpu, logits.cuda, dLoss.cpu, dLoss.cuda, a.losses, a.predictions, b.losses, b.predictions, da, db]) x.dispose();
  }
});

t.test(`embedding at V = ${V}: CUDA vs CPU`, { skip: SKIP_NO_CUDA }, async (t) => {
  for (const dtype of ['f32', 'bf16'] as const) {
    const d = 16, g = rng(seed());
    const idList = Array.from({ length: 64 }, (_, i) => (i % 8 === 0 ? V - 1 : g.int(0, V)));
    const ids = Tensor.from(idList, [2, 32], { dtype: 'i32' }), idsCuda = ids.to('cuda');
    const table = pair([V, d], dtype), dOut = pair([2, 32, d], dtype);
    same(t, ops.embedding(idsCuda, table.cuda).toArray(), ops.embedding(ids, table.cpu).toArray(), `${dtype}: rows`);
    same(t, ops.embeddingBackward(idsCuda, dOut.cuda, V).toArray(), ops.embeddingBackward(ids, dOut.cpu, V).toArray(), `${dtype}: dTable bit-identical`);
    for (const x of [ids, idsCuda, table.cpu, table.cuda, dOut.cpu, dOut.cuda]) x.dispose();
  }
});
