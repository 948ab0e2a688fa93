// attention / attentionBackward on the CPU: against a float64 reference, finite differences,
// GQA and B > 1, bf16, causality, and errors.
import t from 'tap';
import { Tensor, ops } from '../lib/index';
import { randomTensor, rng } from './helpers/ref';
import { close, throwsCode } from './helpers/check';

interface Dims {
  B: number;
  T: number;
  H: number;
  Hkv: number;
  hd: number;
}

/** Causal GQA attention in float64: out [B*T, H*hd], lse [B, H, T] and the gradients for dOut. */
function refAttention(q: ArrayLike<number>, k: ArrayLike<number>, v: ArrayLike<number>, dOut: ArrayLike<number> | null, { B, T, H, Hkv, hd }: Dims) {
  const G = H / Hkv, scale = 1 / Math.sqrt(hd);
  const out = new Float64Array(B * T * H * hd), lse = new Float64Array(B * H * T);
  const dq = new Float64Array(q.length), dk = new Float64Array(k.length), dv = new Float64Array(v.length);
  const qi = (b: number, t: number, h: number, d: number) => ((b * T + t) * H + h) * hd + d;
  const ki = (b: number, t: number, h: number, d: number) => ((b * T + t) * Hkv + h) * hd + d;
  for (let b = 0; b < B; b++)
    for (let h = 0; h < H; h++) {
      const kvh = Math.floor(h / G);
      for (let i = 0; i < T; i++) {
        const s: number[] = [];
        for (let j = 0; j <= i; j++) {
          let dot = 0;
          for (let d = 0; d < hd; d++) dot += q[qi(b, i, h, d)] * k[ki(b, j, kvh, d)];
          s.push(dot * scale);
        }
        const m = Math.max(...s);
        const sum = s.reduce((a, x) => a + Math.exp(x - m), 0);
        const P = s.map((x) => Math.exp(x - m) / sum);
        lse[(b * H + h) * T + i] = m + Math.log(sum);
        for (let d = 0; d < hd; d++) {
          let o = 0;
          for (let j = 0; j <= i; j++) o += P[j] * v[ki(b, j, kvh, d)];
          out[qi(b, i, h, d)] = o;
        }
        if (!dOut) continue;
        let D = 0;
        for (let d = 0; d < hd; d++) D += dOut[qi(b, i, h, d)] * out[qi(b, i, h, d)];
        for (let j = 0; j <= i; j++) {
          let dP = 0;
          for (let d = 0; d < hd; d++) dP += dOut[qi(b, i, h, d)] * v[ki(b, j, kvh, d)];
          const dS = P[j] * (dP - D);
          for (let d = 0; d < hd; d++) {
            dq[qi(b, i, h, d)] += scale * dS * k[ki(b, j, kvh, d)];
            dk[ki(b, j, kvh, d)] += scale * dS * q[qi(b, i, h, d)];
            dv[ki(b, j, kvh, d)] += P[j] * dOut[qi(b, i, h, d)];
          }
        }
      }
    }
  return { out, lse, dq, dk, dv };
}

function inputs(dims: Dims, seed: number, dtype: 'f32' | 'bf16' = 'f32') {
  const { B, T, H, Hkv, hd } = dims;
  const q = randomTensor([B * T, H * hd], seed, { dtype });
  const k = randomTensor([B * T, Hkv * hd], seed + 1, { dtype });
  const v = randomTensor([B * T, Hkv * hd], seed + 2, { dtype });
  const dOut = randomTensor([B * T, H * hd], seed + 3, { dtype });
  return { q, k, v, dOut };
}

const cases: Dims[] = [
  { B: 1, T: 1, H: 1, Hkv: 1, hd: 1 },
  { B: 1, T: 5, H: 2, Hkv: 2, hd: 4 }, // plain multi-head
  { B: 2, T: 7, H: 4, Hkv: 2, hd: 8 }, // GQA, B > 1
  { B: 1, T: 37, H: 3, Hkv: 1, hd: 16 }, // multi-query, T beyond one 32-row tile
  { B: 3, T: 6, H: 6, Hkv: 3, hd: 5 }, // odd head dimension
  { B: 1, T: 3, H: 2, Hkv: 1, hd: 128 }, // the largest head dimension
  { B: 2, T: 0, H: 2, Hkv: 1, hd: 4 }, // no tokens
];

for (const dtype of ['f32', 'bf16'] as const)
  t.test(`forward and backward vs float64: ${dtype}`, async (t) => {
    const tol = dtype === 'f32' ? 1e-5 : 1e-2;
    for (const dims of cases) {
      const what = `B=${dims.B} T=${dims.T} H=${dims.H} Hkv=${dims.Hkv} hd=${dims.hd}`;
      const x = inputs(dims, 100 + dims.T * 7 + dims.hd, dtype);
      const opts = { batch: dims.B, heads: dims.H, kvHeads: dims.Hkv };
      const { out, lse } = ops.attention(x.q.t, x.k.t, x.v.t, opts);
      t.same(out.shape, [dims.B * dims.T, dims.H * dims.hd], `${what}: out shape`);
      t.same(lse.shape, [dims.B, dims.H, dims.T], `${what}: lse shape`);
      const ref = refAttention(x.q.values, x.k.values, x.v.values, x.dOut.values, dims);
      close(t, out.toArray(), ref.out, tol, `${what}: out`);
      close(t, lse.toArray(), ref.lse, 1e-5, `${what}: lse`);
      const g = ops.attentionBackward(x.q.t, x.k.t, x.v.t, out, lse, x.dOut.t, opts);
      close(t, g.dq.toArray(), ref.dq, tol, `${what}: dq`);
      close(t, g.dk.toArray(), ref.dk, tol, `${what}: dk`);
      close(t, g.dv.toArray(), ref.dv, tol, `${what}: dv`);
      for (const v of [x.q.t, x.k.t, x.v.t, x.dOut.t, out, lse, g.dq, g.dk, g.dv]) v.dispose();
    }
  });

t.test('the first query attends only to itself; later keys do not change earlier outputs', async (t) => {
  const dims = { B: 2, T: 9, H: 4, Hkv: 2, hd: 6 };
  const x = inputs(dims, 7);
  const opts = { batch: 2, heads: 4, kvHeads: 2 };
  const a = ops.attention(x.q.t, x.k.t, x.v.t, opts).out.toArray();
  // row 0 of each sequence: out = v of its kv head
  for (const b of [0, 1])
    for (let h = 0; h < 4; h++) {
      const row = Array.from(a.slice((b * 9 * 4 + h) * 6, (b * 9 * 4 + h) * 6 + 6));
      const kvh = Math.floor(h / 2);
      close(t, row, x.v.values.slice((b * 9 * 2 + kvh) * 6, (b * 9 * 2 + kvh) * 6 + 6), 1e-6, `b=${b} h=${h}: out_0 = v_0`);
    }
  // perturb the last token's k and v: every other row stays bit-identical
  const k2 = [...x.k.values], v2 = [...x.v.values];
  for (let d = 0; d < 12; d++) {
    k2[(8 * 2) * 6 + d] += 1;
    v2[(8 * 2) * 6 + d] -= 1;
  }
  const b2 = ops.attention(x.q.t, Tensor.from(k2, [18, 12]), Tensor.from(v2, [18, 12]), opts).out.toArray();
  let same = true;
  for (let r = 0; r < 18; r++) if (r !== 8) for (let c = 0; c < 24; c++) if (a[r * 24 + c] !== b2[r * 24 + c]) same = false;
  t.ok(same, 'rows before the perturbed token (and the other sequence) are unchanged');
});

t.test('backward vs finite differences through the CPU op (GQA, B = 2)', async (t) => {
  const opts = { batch: 2, heads: 4, kvHeads: 2 };
  const R = rng(42);
  const q = Array.from(R.array(8 * 12)), k = Array.from(R.array(8 * 6)), v = Array.from(R.array(8 * 6));
  const dOut = Array.from(R.array(8 * 12));
  const loss = (qq: number[], kk: number[], vv: number[]) => {
    const out = ops.attention(Tensor.from(qq, [8, 12]), Tensor.from(kk, [8, 6]), Tensor.from(vv, [8, 6]), opts).out.toArray();
    let L = 0;
    for (let i = 0; i < out.length; i++) L += out[i] * dOut[i];
    return L;
  };
  const tq = Tensor.from(q, [8, 12]), tk = Tensor.from(k, [8, 6]), tv = Tensor.from(v, [8, 6]);
  const f = ops.attention(tq, tk, tv, opts);
  const g = ops.attentionBackward(tq, tk, tv, f.out, f.lse, Tensor.from(dOut, [8, 12]), opts);
  const h = 1e-2;
  const fd = (which: 0 | 1 | 2) => {
    const base = [q, k, v][which];
    return base.map((_, i) => {
      const plus = [q, k, v].map((a) => [...a]), minus = [q, k, v].map((a) => [...a]);
      plus[which][i] += h;
      minus[which][i] -= h;
      return (loss(plus[0], plus[1], plus[2]) - loss(minus[0], minus[1], minus[2])) / (2 * h);
    });
  };
  close(t, g.dq.toArray(), fd(0), 2e-3, 'dq');
  close(t, g.dk.toArray(), fd(1), 2e-3, 'dk');
  close(t, g.dv.toArray(), fd(2), 2e-3, 'dv');
});

t.test('bf16 follows f32', async (t) => {
  const dims = { B: 2, T: 20, H: 4, Hkv: 1, hd: 32 };
  const opts = { batch: 2, heads: 4, kvHeads: 1 };
  const x = inputs(dims, 11, 'bf16');
  const res = (['f32', 'bf16'] as const).map((dtype) => {
    const [q, k, v, d] = [x.q, x.k, x.v, x.dOut].map((a) => Tensor.from(a.values, a.t.shape, { dtype }));
    const f = ops.attention(q, k, v, opts);
    const g = ops.attentionBackward(q, k, v, f.out, f.lse, d, opts);
    return [f.out, g.dq, g.dk, g.dv].map((a) => a.toArray());
  });
  ['out', 'dq', 'dk', 'dv'].forEach((name, i) => close(t, res[1][i], res[0][i], 2e-2, `bf16 ${name}`));
});

t.test('attention errors name the argument', async (t) => {
  const q = Tensor.randn([8, 12]), k = Tensor.randn([8, 6]), v = Tensor.randn([8, 6]);
  const opts = { batch: 2, heads: 4, kvHeads: 2 };
  throwsCode(t, () => ops.attention(q, k, v, { batch: 3, heads: 4, kvHeads: 2 }), 'XFT_SHAPE', /8 rows.*batch = 3/, 'rows not a multiple of batch');
  throwsCode(t, () => ops.attention(q, k, v, { batch: 2, heads: 5, kvHeads: 1 }), 'XFT_SHAPE', /12 columns.*heads = 5/, 'columns not a multiple of heads');
  throwsCode(t, () => ops.attention(q, k, v, { batch: 2, heads: 4, kvHeads: 3 }), 'XFT_VALUE', /kvHeads/, 'heads not a multiple of kvHeads');
  throwsCode(t, () => ops.attention(q, k, v, { batch: 0, heads: 4 }), 'XFT_VALUE', /batch/, 'batch 0');
  throwsCode(t, () => ops.attention(q, k, v, undefined as never), 'XFT_TYPE', /options/, 'missing options');
  throwsCode(t, () => ops.attention(q, Tensor.randn([8, 12]), v, opts), 'XFT_SHAPE', /k of shape \[B\*T, Hkv\*hd\] = \[8, 6\]/, 'k shape');
  throwsCode(t, () => ops.attention(q, k, Tensor.randn([8, 6], { dtype: 'bf16' }), opts), 'XFT_DTYPE', /v to be a f32/, 'v dtype differs');
  throwsCode(t, () => ops.attention(Tensor.zeros([8, 12], { dtype: 'i32' }), k, v, opts), 'XFT_DTYPE', /q to be a f32 or bf16/, 'i32 q');
  throwsCode(t, () => ops.attention(Tensor.randn([2, 258]), Tensor.randn([2, 129]), Tensor.randn([2, 129]), { batch: 1, heads: 2, kvHeads: 1 }),
    'XFT_SHAPE', /hd = .*129 exceeds 128/, 'head dimension 129');
  const f = ops.attention(q, k, v, opts);
  throwsCode(t, () => ops.attentionBackward(q, k, v, f.out, Tensor.randn([2, 4, 5]), Tensor.randn([8, 12]), opts), 'XFT_SHAPE', /lse/, 'lse shape');
  throwsCode(t, () => ops.attentionBackward(q, k, v, f.out, f.lse, Tensor.randn([8, 6]), opts), 'XFT_SHAPE', /dOut/, 'dOut shape');
  throwsCode(t, () => ops.attentionBackward(q, k, v, Tensor.randn([8, 12], { dtype: 'bf16' }), f.lse, Tensor.randn([8, 12]), opts), 'XFT_DTYPE', /out/, 'out dtype');
  const gone = Tensor.randn([8, 6]);
  gone.dispose();
  throwsCode(t, () => ops.attention(q, gone, v, opts), 'XFT_DISPOSED', /k/, 'disposed k');
});
