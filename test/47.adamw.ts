// adamw on the CPU: against a float64 AdamW (torch.optim.AdamW semantics) over several steps,
// gradient scaling, weight decay, the bf16/f32 compute copy, and errors.
import t from 'tap';
import { Tensor, ops, type DType } from '../lib/index';
import { rng, roundBf16 } from './helpers/ref';
import { close, exact, throwsCode } from './helpers/check';

interface Hyper {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  gradScale: number;
}

/** AdamW in float64, with the hyperparameters as the kernels see them (fp32: 0.999 is 0.99900001...). */
function refAdamW(p: number[], g: number[], m: number[], v: number[], step: number, hyper: Hyper) {
  const o = Object.fromEntries(Object.entries(hyper).map(([k, x]) => [k, Math.fround(x)])) as unknown as Hyper;
  for (let i = 0; i < p.length; i++) {
    const gs = g[i] * o.gradScale;
    m[i] = o.beta1 * m[i] + (1 - o.beta1) * gs;
    v[i] = o.beta2 * v[i] + (1 - o.beta2) * gs * gs;
    const mhat = m[i] / (1 - o.beta1 ** step), vhat = v[i] / (1 - o.beta2 ** step);
    p[i] -= o.lr * (mhat / (Math.sqrt(vhat) + o.eps) + o.weightDecay * p[i]);
  }
}

const hypers: Hyper[] = [
  { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, gradScale: 1 },
  { lr: 5e-2, beta1: 0.8, beta2: 0.95, eps: 1e-6, weightDecay: 0.1, gradScale: 0.25 },
];

for (const [hi, o] of hypers.entries())
  t.test(`four steps vs float64 AdamW (hyperparameters ${hi})`, async (t) => {
    const n = 1001;
    const R = rng(hi + 1);
    const p = Array.from(R.array(n)), m = new Array(n).fill(0), v = new Array(n).fill(0);
    const P = Tensor.from(p, [7, 143]), M = Tensor.zeros([7, 143]), Vt = Tensor.zeros([7, 143]);
    for (let step = 1; step <= 4; step++) {
      const g = Array.from(R.array(n, step));
      refAdamW(p, g, m, v, step, o);
      ops.adamw(P, Tensor.from(g, [7, 143]), M, Vt, { ...o, step });
      close(t, P.toArray(), p, 1e-6, `step ${step}: params`);
      close(t, M.toArray(), m, 1e-6, `step ${step}: m`);
      close(t, Vt.toArray(), v, 1e-6, `step ${step}: v`);
    }
  });

t.test('defaults: beta1 0.9, beta2 0.999, eps 1e-8, no weight decay; the first step moves by lr', async (t) => {
  const P = Tensor.from([1, -2, 3, 0.5], [4]), G = Tensor.from([10, -0.1, 1e-3, -5], [4]);
  ops.adamw(P, G, Tensor.zeros([4]), Tensor.zeros([4]), { lr: 0.01, step: 1 });
  close(t, P.toArray(), [0.99, -1.99, 2.99, 0.51], 1e-6, 'p - lr sign(g) at step 1');
});

for (const dtype of ['f32', 'bf16'] as DType[])
  t.test(`copyTo writes the updated params as ${dtype}`, async (t) => {
    const P = Tensor.randn([300], { seed: 1 }), G = Tensor.randn([300], { seed: 2 });
    const copy = Tensor.zeros([3, 100], { dtype });
    ops.adamw(P, G, Tensor.zeros([300]), Tensor.zeros([300]), { lr: 0.1, step: 1, weightDecay: 0.01, copyTo: copy });
    const want = Array.from(P.toArray(), (x) => (dtype === 'bf16' ? roundBf16(x) : x));
    exact(t, copy.toArray(), want, `copy equals the updated params, rounded to ${dtype}`);
  });

t.test('zero gradients with weight decay shrink the params by lr * wd', async (t) => {
  const P = Tensor.from([2, -4], [2]);
  ops.adamw(P, Tensor.zeros([2]), Tensor.zeros([2]), Tensor.zeros([2]), { lr: 0.1, step: 3, weightDecay: 0.5 });
  close(t, P.toArray(), [2 * 0.95, -4 * 0.95], 1e-7, 'decoupled decay');
});

t.test('adamw errors name the argument', async (t) => {
  const P = Tensor.zeros([8]), G = Tensor.zeros([8]), M = Tensor.zeros([8]), V = Tensor.zeros([8]);
  throwsCode(t, () => ops.adamw(P, G, M, V, { lr: 1e-3, step: 0 }), 'XFT_VALUE', /step/, 'step 0');
  throwsCode(t, () => ops.adamw(P, G, M, V, { lr: 1e-3, step: 1.5 }), 'XFT_VALUE', /step/, 'fractional step');
  throwsCode(t, () => ops.adamw(P, G, M, V, { lr: -1, step: 1 }), 'XFT_VALUE', /lr/, 'negative lr');
  throwsCode(t, () => ops.adamw(P, G, M, V, { lr: NaN, step: 1 }), 'XFT_VALUE', /lr/, 'NaN lr');
  throwsCode(t, () => ops.adamw(P, G, M, V, { lr: 1e-3, step: 1, beta1: 1 }), 'XFT_VALUE', /beta1/, 'beta1 = 1');
  throwsCode(t, () => ops.adamw(P, G, M, V, { lr: 1e-3, step: 1, gradScale: Infinity }), 'XFT_VALUE', /gradScale/, 'infinite gradScale');
  throwsCode(t, () => ops.adamw(P, G, M, V, { lr: '1' as never, step: 1 }), 'XFT_TYPE', /lr/, 'string lr');
  throwsCode(t, () => ops.adamw(P, Tensor.zeros([9]), M, V, { lr: 1e-3, step: 1 }), 'XFT_SHAPE', /grads/, 'grads shape');
  throwsCode(t, () => ops.adamw(P, G, Tensor.zeros([8], { dtype: 'bf16' }), V, { lr: 1e-3, step: 1 }), 'XFT_DTYPE', /\bm\b/, 'bf16 moment');
  throwsCode(t, () => ops.adamw(Tensor.zeros([8], { dtype: 'i32' }), G, M, V, { lr: 1e-3, step: 1 }), 'XFT_DTYPE', /params/, 'i32 params');
  throwsCode(t, () => ops.adamw(P, G, M, V, { lr: 1e-3, step: 1, copyTo: Tensor.zeros([7], { dtype: 'bf16' }) }), 'XFT_SHAPE', /copyTo/, 'copyTo size');
  throwsCode(t, () => ops.adamw(P, G, M, V, { lr: 1e-3, step: 1, copyTo: Tensor.zeros([8], { dtype: 'i32' }) }), 'XFT_DTYPE', /copyTo/, 'i32 copyTo');
  throwsCode(t, () => ops.adamw(P, G, M, V, undefined as never), 'XFT_TYPE', /options/, 'missing options');
});
