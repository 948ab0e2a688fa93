// rope / ropeBackward on the CPU: against a float64 reference of the Hugging Face Llama rotation,
// in place, the inverse and adjoint properties of the backward, scaling, and errors.
import t from 'tap';
import { Tensor, ops } from '../lib/index';
import { native } from '../lib/native';
import { randomTensor } from './helpers/ref';
import { close, exact, throwsCode } from './helpers/check';

const TOL = { f32: 1e-5, bf16: 1e-2 };

t.before(() => native.setPoison(true));
t.teardown(() => native.setPoison(false));

/** HF apply_rotary_pos_emb with rotate_half, float64 (frequencies rounded to fp32 as the op does). */
function refRope(x: ArrayLike<number>, rows: number, T: number, H: number, hd: number, theta = 10000, factor = 1, sign = 1): number[] {
  const half = hd / 2, out = new Array(rows * H * hd).fill(0);
  for (let r = 0; r < rows; r++) {
    const pos = (r % T) / factor;
    for (let i = 0; i < half; i++) {
      const a = pos * Math.fround(1 / Math.pow(theta, (2 * i) / hd));
      const c = Math.cos(a), s = sign * Math.sin(a);
      for (let h = 0; h < H; h++) {
        const b = (r * H + h) * hd;
        out[b + i] = x[b + i] * c - x[b + half + i] * s;
        out[b + half + i] = x[b + half + i] * c + x[b + i] * s;
      }
    }
  }
  return out;
}

const cases: { B: number; T: number; H: number; hd: number; theta?: number; factor?: number; rank3?: boolean; what: string }[] = [
  { B: 2, T: 7, H: 3, hd: 16, what: 'B=2 T=7 H=3 hd=16' },
  { B: 1, T: 33, H: 2, hd: 128, theta: 100000, factor: 4, what: 'hd=128, DeepSeek-Coder theta and linear scaling' },
  { B: 3, T: 5, H: 4, hd: 6, rank3: true, what: '[B, T, H*hd], hd=6 (half not a vector width)' },
  { B: 2, T: 3, H: 1, hd: 2, what: 'hd=2' },
  { B: 1, T: 4, H: 9, hd: 8, what: 'more heads than a thread group' },
  { B: 0, T: 4, H: 2, hd: 8, what: 'no rows' },
];

for (const dtype of ['f32', 'bf16'] as const)
  t.test(`forward and backward vs float64: ${dtype}`, async (t) => {
    for (const [ci, c] of cases.entries()) {
      const rows = c.B * c.T, width = c.H * c.hd;
      const shape = c.rank3 ? [c.B, c.T, width] : [rows, width];
      const opts = { seqLen: c.rank3 ? undefined : c.T, headDim: c.hd, theta: c.theta, scalingFactor: c.factor };
      const x = randomTensor(shape, 10 + ci, { dtype });
      const y = ops.rope(x.t, opts);
      t.same(y.shape, shape);
      t.equal(y.dtype, dtype);
      close(t, y.toArray(), refRope(x.values, rows, c.T, c.H, c.hd, c.theta, c.factor), TOL[dtype], `${c.what}: forward`);
      const dy = randomTensor(shape, 20 + ci, { dtype });
      const dx = ops.ropeBackward(dy.t, opts);
      close(t, dx.toArray(), refRope(dy.values, rows, c.T, c.H, c.hd, c.theta, c.factor, -1), TOL[dtype], `${c.what}: backward`);
    }
  });

t.test('position 0 is the identity; positions restart every seqLen rows', async (t) => {
  const x = Tensor.randn([6, 8], { seed: 1 });
  const y = ops.rope(x, { seqLen: 3, headDim: 4 }).toArray(), xv = x.toArray();
  exact(t, y.slice(0, 8), xv.slice(0, 8), 'row 0 unchanged');
  exact(t, y.slice(24, 32), xv.slice(24, 32), 'row 3 (position 0 of sequence 2) unchanged');
  const again = ops.rope(Tensor.from(xv.slice(24, 48), [3, 8]), { seqLen: 3, headDim: 4 }).toArray();
  exact(t, y.slice(24), again, 'sequence 2 rotates like sequence 1');
});

t.test('in place equals out of place', async (t) => {
  for (const dtype of ['f32', 'bf16'] as const) {
    const x = Tensor.randn([10, 24], { seed: 2, dtype });
    const y = ops.rope(x, { seqLen: 5, headDim: 8 });
    const z = x.clone();
    t.equal(ops.rope(z, { seqLen: 5, headDim: 8, out: z }), z, 'returns out');
    exact(t, z.toArray(), y.toArray(), `${dtype}: forward in place`);
    const dz = y.clone();
    ops.ropeBackward(dz, { seqLen: 5, headDim: 8, out: dz });
    exact(t, dz.toArray(), ops.ropeBackward(y, { seqLen: 5, headDim: 8 }).toArray(), `${dtype}: backward in place`);
  }
});

t.test('the backward is the inverse and the adjoint of the forward', async (t) => {
  const opts = { seqLen: 16, headDim: 32, theta: 500000 };
  const x = Tensor.randn([32, 64], { seed: 3 }), dy = Tensor.randn([32, 64], { seed: 4 });
  close(t, ops.ropeBackward(ops.rope(x, opts), opts).toArray(), x.toArray(), 1e-6, 'R^T R x = x');
  const dot = (a: ArrayLike<number>, b: ArrayLike<number>) => Array.from(a).reduce((s, v, i) => s + v * b[i], 0);
  const lhs = dot(ops.rope(x, opts).toArray(), dy.toArray()), rhs = dot(x.toArray(), ops.ropeBackward(dy, opts).toArray());
  t.ok(Math.abs(lhs - rhs) <= 1e-5 * Math.abs(lhs), `<R x, dy> = <x, R^T dy> (${lhs} vs ${rhs})`);
});

t.test('rope errors name the argument', async (t) => {
  const x = Tensor.randn([8, 16]);
  throwsCode(t, () => ops.rope(x, { seqLen: 4, headDim: 5 }), 'XFT_VALUE', /headDim/, 'odd headDim');
  throwsCode(t, () => ops.rope(x, { seqLen: 4, headDim: 1024 }), 'XFT_VALUE', /512\] for headDim/, 'headDim too large');
  throwsCode(t, () => ops.rope(x, { seqLen: 4, headDim: 6 }), 'XFT_SHAPE', /heads \* headDim/, 'width not a multiple of headDim');
  throwsCode(t, () => ops.rope(x, { seqLen: 3, headDim: 8 }), 'XFT_SHAPE', /8 rows.*seqLen = 3/, 'rows not a multiple of seqLen');
  throwsCode(t, () => ops.rope(x, { headDim: 8 }), 'XFT_TYPE', /seqLen/, 'missing seqLen for 2-D x');
  throwsCode(t, () => ops.rope(Tensor.randn([2, 4, 16]), { seqLen: 3, headDim: 8 }), 'XFT_VALUE', /dimension 1 of x.*seqLen/, 'seqLen disagrees with x');
  throwsCode(t, () => ops.rope(Tensor.randn([16]), { seqLen: 1, headDim: 8 }), 'XFT_SHAPE', /x.*\[B\*T, H\*hd\]/, 'rank 1');
  throwsCode(t, () => ops.rope(x, { seqLen: 4, headDim: 8, theta: 0 }), 'XFT_VALUE', /theta/, 'theta 0');
  throwsCode(t, () => ops.rope(x, { seqLen: 4, headDim: 8, scalingFactor: -2 }), 'XFT_VALUE', /scalingFactor/, 'negative scaling');
  throwsCode(t, () => ops.rope(x, { seqLen: 4, headDim: 8, out: Tensor.randn([8, 8]) }), 'XFT_SHAPE', /options.out.*\[8, 16\]/, 'out shape');
  throwsCode(t, () => ops.rope(x, { seqLen: 4, headDim: 8, out: Tensor.randn([8, 16], { dtype: 'bf16' }) }), 'XFT_DTYPE', /options.out.*f32/, 'out dtype');
  throwsCode(t, () => ops.ropeBackward(Tensor.zeros([8, 16], { dtype: 'i32' }), { seqLen: 4, headDim: 8 }), 'XFT_DTYPE', /dOut.*f32 or bf16/, 'i32 dOut');
  throwsCode(t, () => ops.rope(x, undefined as never), 'XFT_TYPE', /options/, 'no options');
});
