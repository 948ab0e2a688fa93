/*
CPU twin of cuda/attention.cu: causal multi-head self-attention with grouped-query heads.

Layout: q, out [B*T, H*hd]; k, v [B*T, Hkv*hd]; row b*T + t, head h in columns h*hd .. h*hd + hd.
Query head h reads kv head h / G, G = H / Hkv. lse f32 [B, H, T]. fp32 math throughout.
Forward, per (b, h, query i), in PyTorch terms:
  s_j = scale * q_i . k_j for j <= i (scale = 1/sqrt(hd)),  lse_i = logsumexp_j s_j,
  P_ij = exp(s_j - lse_i),  out_i = sum_j P_ij v_j
Backward, with D_i = dout_i . out_i (= sum_j P_ij dout_i . v_j):
  dP_ij = dout_i . v_j,  dS_ij = P_ij (dP_ij - D_i)
  dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_{h in group, i >= j} dS_ij q_i,
  dv_j = sum_{h in group, i >= j} P_ij dout_i
P is recomputed from the saved lse, as the CUDA kernels do. Gradients overwrite.

Threads take (b, h) pairs (forward) or (b, kv head) pairs (backward: dk, dv sum over the group's
heads, in head order). K and V of a head are widened once into f32 panels, K also transposed, so
that the scores of query i against keys 0..i are a loop over keys the compiler vectorizes; each
score still sums q . k over d in order from 0, and out, dq, dk, dv sum over keys in order as the
plain loops did. Causal: query i touches keys 0..i only. exp is binding/cpu/vec.h's fast exp
(libm's expf with XFT_CPU_REFERENCE=1, which then gives the plain loops' bits).
*/
#include <math.h>

#include <vector>

#include "vec.h"
#include "xft_cpu.h"

namespace {

// the hd values of row `row`, head `head` of a [rows, heads*hd] buffer, widened to fp32
void load_head(float* dst, const void* src, int dtype, size_t row, int heads, int head, int hd) {
  size_t base = (row * heads + head) * (size_t)hd;
  if (dtype == XFT_F32) {
    const float* s = (const float*)src + base;
    for (int d = 0; d < hd; d++) dst[d] = s[d];
  } else {
    const uint16_t* s = (const uint16_t*)src + base;
    for (int d = 0; d < hd; d++) dst[d] = xft_cpu::ld(s, (size_t)d);
  }
}

struct Shape {
  int dtype, B, T, H, Hkv, hd;
  float scale;
};

// K of (b, kv head) as Kt [hd, T] (transposed) and, when wanted, V as [T, hd] and Vt [hd, T]
void load_kv(const Shape& S, const void* k, const void* v, int b, int kvh, float* Kt, float* V, float* Vt, float* row) {
  const int T = S.T, hd = S.hd;
  for (int t = 0; t < T; t++) {
    load_head(row, k, S.dtype, (size_t)b * T + t, S.Hkv, kvh, hd);
    for (int d = 0; d < hd; d++) Kt[(size_t)d * T + t] = row[d];
    load_head(&V[(size_t)t * hd], v, S.dtype, (size_t)b * T + t, S.Hkv, kvh, hd);
    if (Vt)
      for (int d = 0; d < hd; d++) Vt[(size_t)d * T + t] = V[(size_t)t * hd + d];
  }
}

// s[j] = sum_d a[d] Mt[d, j] for j in [0, n), d in order from 0 (bitwise the plain dot product);
// keys in blocks of kKeyBlock whose sums stay in registers over d
const int kKeyBlock = 16;
XFT_INLINE void scores(const float* __restrict a, const float* __restrict Mt, int T, int hd, int n, float* __restrict s) {
  int j = 0;
  for (; j + kKeyBlock <= n; j += kKeyBlock) {
    float acc[kKeyBlock];
    for (int x = 0; x < kKeyBlock; x++) acc[x] = 0.f;
    for (int d = 0; d < hd; d++) {
      const float ad = a[d];
      const float* __restrict m = Mt + (size_t)d * T + j;
      for (int x = 0; x < kKeyBlock; x++) acc[x] += ad * m[x];
    }
    for (int x = 0; x < kKeyBlock; x++) s[j + x] = acc[x];
  }
  for (int x = j; x < n; x++) s[x] = 0.f;
  for (int d = 0; d < hd; d++) {
    const float ad = a[d];
    const float* __restrict m = Mt + (size_t)d * T;
    for (int x = j; x < n; x++) s[x] += ad * m[x];
  }
}

const int kQueryBlock = 4;

// kHd: the head dimension as a constant (the loops over d unroll), 0: S.hd. Queries go in blocks of
// kQueryBlock: a row of V is loaded once for the block's queries; each output element still sums
// over keys in order. qi, o hold kQueryBlock * hd values, s kQueryBlock * T.
template <bool kFast, int kHd>
XFT_INLINE void forward_head(const Shape& S, const void* q, void* out, float* lse, int b, int h, const float* Kt,
                             const float* V, float* qi, float* o, float* s) {
  const int T = S.T, hd = kHd ? kHd : S.hd, H = S.H;
  float sums[kQueryBlock];
  for (int i0 = 0; i0 < T; i0 += kQueryBlock) {
    const int mq = T - i0 < kQueryBlock ? T - i0 : kQueryBlock;
    for (int x = 0; x < mq; x++) {
      const int i = i0 + x, n = i + 1;
      float* sx = s + (size_t)x * T;
      load_head(qi, q, S.dtype, (size_t)b * T + i, H, h, hd);
      scores(qi, Kt, T, hd, n, sx);
      float m = -INFINITY;
      for (int j = 0; j < n; j++) m = fmaxf(m, sx[j] = S.scale * sx[j]);
      for (int j = 0; j < n; j++) sx[j] = kFast ? xft_cpu::fast_exp(sx[j] - m) : expf(sx[j] - m);
      float sum = 0.f;
      for (int j = 0; j < n; j++) sum += sx[j];
      sums[x] = sum;
      lse[((size_t)b * H + h) * T + i] = m + logf(sum);
      for (int d = 0; d < hd; d++) o[x * hd + d] = 0.f;
    }
    for (int j = 0; j < i0 + mq; j++) {
      const float* __restrict vj = V + (size_t)j * hd;
      const int first = j <= i0 ? 0 : j - i0;
      if (first == 0 && mq == kQueryBlock) {
        float p[kQueryBlock];
        for (int x = 0; x < kQueryBlock; x++) p[x] = s[(size_t)x * T + j];
        float* __restrict od = o;
        for (int d = 0; d < hd; d++) {
          const float v = vj[d];
          for (int x = 0; x < kQueryBlock; x++) od[x * hd + d] += p[x] * v;
        }
      } else {
        for (int x = first; x < mq; x++) {
          const float p = s[(size_t)x * T + j];
          float* __restrict od = o + x * hd;
          for (int d = 0; d < hd; d++) od[d] += p * vj[d];
        }
      }
    }
    for (int x = 0; x < mq; x++) {
      size_t base = (((size_t)b * T + i0 + x) * H + h) * hd;
      for (int d = 0; d < hd; d++) xft_cpu::store(out, S.dtype, base + d, o[x * hd + d] / sums[x]);
    }
  }
}

XFT_VEC void forward_head_fast(const Shape& S, const void* q, void* out, float* lse, int b, int h, const float* Kt,
                               const float* V, float* qi, float* o, float* s) {
  switch (S.hd) {
    case 16: return forward_head<true, 16>(S, q, out, lse, b, h, Kt, V, qi, o, s);
    case 32: return forward_head<true, 32>(S, q, out, lse, b, h, Kt, V, qi, o, s);
    case 64: return forward_head<true, 64>(S, q, out, lse, b, h, Kt, V, qi, o, s);
    case 128: return forward_head<true, 128>(S, q, out, lse, b, h, Kt, V, qi, o, s);
    default: return forward_head<true, 0>(S, q, out, lse, b, h, Kt, V, qi, o, s);
  }
}

struct Grads {
  const void *q, *out, *dout;
  const float* lse;
  void* dq;
};

// one query head h of kv head group (b, kvh): adds into dK, dV [T, hd]; writes dq.
// Queries go in blocks of kQueryBlock: a key row j of K, dK, dV is loaded once for the block's
// queries, and each dK[j], dV[j] element still receives the queries' terms in query order (the
// bits of one query at a time). qi, oi, doi, dqi hold kQueryBlock * hd values, P and dS kQueryBlock * T.

template <int kHd>
XFT_INLINE void key_update(int hd_rt, int m, const float* __restrict kj, float* __restrict dkj, float* __restrict dvj,
                           const float* __restrict ds, const float* __restrict p, const float* __restrict q,
                           const float* __restrict dout, float* __restrict dq) {
  const int hd = kHd ? kHd : hd_rt;
  if (m == kQueryBlock) {
    for (int d = 0; d < hd; d++) {
      const float k = kj[d];
      float dk = dkj[d], dv = dvj[d];
      for (int x = 0; x < kQueryBlock; x++) {
        dq[x * hd + d] += ds[x] * k;
        dk += ds[x] * q[x * hd + d];
        dv += p[x] * dout[x * hd + d];
      }
      dkj[d] = dk;
      dvj[d] = dv;
    }
    return;
  }
  for (int x = 0; x < m; x++)
    for (int d = 0; d < hd; d++) {
      dq[x * hd + d] += ds[x] * kj[d];
      dkj[d] += ds[x] * q[x * hd + d];
      dvj[d] += p[x] * dout[x * hd + d];
    }
}

template <bool kFast, int kHd>
XFT_INLINE void backward_head(const Shape& S, const Grads& G, int b, int h, const float* Kt, const float* K, const float* Vt,
                              float* dK, float* dV, float* qi, float* oi, float* doi, float* dqi, float* P, float* dS) {
  const int T = S.T, hd = kHd ? kHd : S.hd, H = S.H;
  for (int i0 = 0; i0 < T; i0 += kQueryBlock) {
    const int m = T - i0 < kQueryBlock ? T - i0 : kQueryBlock;
    for (int x = 0; x < m; x++) {
      const int i = i0 + x;
      const size_t row = (size_t)b * T + i;
      float* q = qi + x * hd;
      float* o = oi + x * hd;
      float* dout = doi + x * hd;
      float* Px = P + (size_t)x * T;
      float* dSx = dS + (size_t)x * T;
      load_head(q, G.q, S.dtype, row, H, h, hd);
      load_head(o, G.out, S.dtype, row, H, h, hd);
      load_head(dout, G.dout, S.dtype, row, H, h, hd);
      const float L = G.lse[((size_t)b * H + h) * T + i];
      float D = 0.f;
      for (int d = 0; d < hd; d++) D += dout[d] * o[d];
      const int n = i + 1;
      scores(q, Kt, T, hd, n, Px);
      for (int j = 0; j < n; j++) Px[j] = kFast ? xft_cpu::fast_exp(S.scale * Px[j] - L) : expf(S.scale * Px[j] - L);
      scores(dout, Vt, T, hd, n, dSx);
      for (int j = 0; j < n; j++) dSx[j] = Px[j] * (dSx[j] - D);
      for (int d = 0; d < hd; d++) dqi[x * hd + d] = 0.f;
    }
    // keys every query of the block sees, then the block's causal tail (key j: queries i >= j)
    float ds[kQueryBlock], p[kQueryBlock];
    for (int j = 0; j < i0 + m; j++) {
      const int first = j <= i0 ? 0 : j - i0;  // the first query of the block that sees key j
      const int cnt = m - first;
      for (int x = 0; x < cnt; x++) ds[x] = dS[(size_t)(first + x) * T + j], p[x] = P[(size_t)(first + x) * T + j];
      key_update<kHd>(hd, cnt, K + (size_t)j * hd, dK + (size_t)j * hd, dV + (size_t)j * hd, ds, p, qi + first * hd,
                      doi + first * hd, dqi + first * hd);
    }
    for (int x = 0; x < m; x++) {
      const size_t base = (((size_t)b * T + i0 + x) * H + h) * hd;
      for (int d = 0; d < hd; d++) xft_cpu::store(G.dq, S.dtype, base + d, S.scale * dqi[x * hd + d]);
    }
  }
}

XFT_VEC void backward_head_fast(const Shape& S, const Grads& G, int b, int h, const float* Kt, const float* K, const float* Vt,
                                float* dK, float* dV, float* qi, float* oi, float* doi, float* dqi, float* P, float* dS) {
  switch (S.hd) {
    case 16: return backward_head<true, 16>(S, G, b, h, Kt, K, Vt, dK, dV, qi, oi, doi, dqi, P, dS);
    case 32: return backward_head<true, 32>(S, G, b, h, Kt, K, Vt, dK, dV, qi, oi, doi, dqi, P, dS);
    case 64: return backward_head<true, 64>(S, G, b, h, Kt, K, Vt, dK, dV, qi, oi, doi, dqi, P, dS);
    case 128: return backward_head<true, 128>(S, G, b, h, Kt, K, Vt, dK, dV, qi, oi, doi, dqi, P, dS);
    default: return backward_head<true, 0>(S, G, b, h, Kt, K, Vt, dK, dV, qi, oi, doi, dqi, P, dS);
  }
}

}  // namespace

int xft_cpu_attention_forward(const void* q, const void* k, const void* v, void* out, float* lse,
                              int dtype, int B, int T, int H, int Hkv, int hd) {
  const Shape S{dtype, B, T, H, Hkv, hd, 1.0f / sqrtf((float)hd)};
  const int G = H / Hkv;
  const bool ref = xft_cpu::reference_mode();
  const double work = 2.0 * (double)B * H * T * T * hd;  // causal: half of 4 T^2 hd per head
  xft_cpu::parallel_for((size_t)B * H, work, [&](size_t a, size_t e) {
    std::vector<float> Kt((size_t)T * hd), V((size_t)T * hd), qi(hd), o(kQueryBlock * hd), s((size_t)kQueryBlock * T), row(hd);
    int loaded = -1;  // the (b, kv head) in Kt, V
    for (size_t task = a; task < e; task++) {
      const int b = (int)(task / H), h = (int)(task % H), kv = b * Hkv + h / G;
      if (kv != loaded) load_kv(S, k, v, b, h / G, Kt.data(), V.data(), nullptr, row.data()), loaded = kv;
      if (ref) forward_head<false, 0>(S, q, out, lse, b, h, Kt.data(), V.data(), qi.data(), o.data(), s.data());
      else forward_head_fast(S, q, out, lse, b, h, Kt.data(), V.data(), qi.data(), o.data(), s.data());
    }
  });
  return 0;
}

int xft_cpu_attention_backward(const void* q, const void* k, const void* v, const void* out, const float* lse,
                               const void* dout, void* dq, void* dk, void* dv,
                               int dtype, int B, int T, int H, int Hkv, int hd) {
  const Shape S{dtype, B, T, H, Hkv, hd, 1.0f / sqrtf((float)hd)};
  const int G = H / Hkv;
  const bool ref = xft_cpu::reference_mode();
  const Grads grads{q, out, dout, lse, dq};
  const double work = 5.0 * (double)B * H * T * T * hd;
  xft_cpu::parallel_for((size_t)B * Hkv, work, [&](size_t a, size_t e) {
    const size_t n = (size_t)T * hd;
    std::vector<float> Kt(n), K(n), V(n), Vt(n), dK(n), dV(n), row(hd);
    std::vector<float> qi(kQueryBlock * hd), oi(kQueryBlock * hd), doi(kQueryBlock * hd), dqi(kQueryBlock * hd);
    std::vector<float> P((size_t)kQueryBlock * T), dS((size_t)kQueryBlock * T);
    for (size_t task = a; task < e; task++) {
      const int b = (int)(task / Hkv), kvh = (int)(task % Hkv);
      load_kv(S, k, v, b, kvh, Kt.data(), V.data(), Vt.data(), row.data());
      for (int t = 0; t < T; t++)
        for (int d = 0; d < hd; d++) K[(size_t)t * hd + d] = Kt[(size_t)d * T + t];
      for (size_t x = 0; x < n; x++) dK[x] = dV[x] = 0.f;
      for (int h = kvh * G; h < (kvh + 1) * G; h++) {
        if (ref)
          backward_head<false, 0>(S, grads, b, h, Kt.data(), K.data(), Vt.data(), dK.data(), dV.data(), qi.data(), oi.data(),
                               doi.data(), dqi.data(), P.data(), dS.data());
        else
          backward_head_fast(S, grads, b, h, Kt.data(), K.data(), Vt.data(), dK.data(), dV.data(), qi.data(), oi.data(),
                             doi.data(), dqi.data(), P.data(), dS.data());
      }
      for (int t = 0; t < T; t++) {
        size_t base = (((size_t)b * T + t) * Hkv + kvh) * hd;
        for (int d = 0; d < hd; d++) {
          xft_cpu::store(dk, dtype, base + d, S.scale * dK[(size_t)t * hd + d]);
          xft_cpu::store(dv, dtype, base + d, dV[(size_t)t * hd + d]);
        }
      }
    }
  });
  return 0;
}
