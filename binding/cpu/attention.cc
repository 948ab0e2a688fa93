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
*/
#include <math.h>

#include <vector>

#include "xft_cpu.h"

namespace {

// the hd values of row `row`, head `head` of a [rows, heads*hd] buffer, widened to fp32
void load_head(float* dst, const void* src, int dtype, size_t row, int heads, int head, int hd) {
  size_t base = (row * heads + head) * (size_t)hd;
  for (int d = 0; d < hd; d++) dst[d] = xft_cpu::load(src, dtype, base + d);
}

float dot(const float* a, const float* b, int n) {
  float s = 0.f;
  for (int i = 0; i < n; i++) s += a[i] * b[i];
  return s;
}

}  // namespace

int xft_cpu_attention_forward(const void* q, const void* k, const void* v, void* out, float* lse,
                              int dtype, int B, int T, int H, int Hkv, int hd) {
  const int G = H / Hkv;
  const float scale = 1.0f / sqrtf((float)hd);
  std::vector<float> K((size_t)T * hd), V((size_t)T * hd), qi(hd), o(hd), s(T);
  for (int b = 0; b < B; b++)
    for (int kvh = 0; kvh < Hkv; kvh++) {
      for (int t = 0; t < T; t++) {
        load_head(&K[(size_t)t * hd], k, dtype, (size_t)b * T + t, Hkv, kvh, hd);
        load_head(&V[(size_t)t * hd], v, dtype, (size_t)b * T + t, Hkv, kvh, hd);
      }
      for (int h = kvh * G; h < (kvh + 1) * G; h++)
        for (int i = 0; i < T; i++) {
          load_head(qi.data(), q, dtype, (size_t)b * T + i, H, h, hd);
          float m = -INFINITY;
          for (int j = 0; j <= i; j++) m = fmaxf(m, s[j] = scale * dot(qi.data(), &K[(size_t)j * hd], hd));
          float sum = 0.f;
          for (int j = 0; j <= i; j++) sum += (s[j] = expf(s[j] - m));
          for (int d = 0; d < hd; d++) o[d] = 0.f;
          for (int j = 0; j <= i; j++)
            for (int d = 0; d < hd; d++) o[d] += s[j] * V[(size_t)j * hd + d];
          size_t base = (((size_t)b * T + i) * H + h) * hd;
          for (int d = 0; d < hd; d++) xft_cpu::store(out, dtype, base + d, o[d] / sum);
          lse[((size_t)b * H + h) * T + i] = m + logf(sum);
        }
    }
  return 0;
}

int xft_cpu_attention_backward(const void* q, const void* k, const void* v, const void* out, const float* lse,
                               const void* dout, void* dq, void* dk, void* dv,
                               int dtype, int B, int T, int H, int Hkv, int hd) {
  const int G = H / Hkv;
  const float scale = 1.0f / sqrtf((float)hd);
  std::vector<float> K((size_t)T * hd), V((size_t)T * hd), dK((size_t)T * hd), dV((size_t)T * hd);
  std::vector<float> qi(hd), oi(hd), doi(hd), dqi(hd);
  for (int b = 0; b < B; b++)
    for (int kvh = 0; kvh < Hkv; kvh++) {
      for (int t = 0; t < T; t++) {
        load_head(&K[(size_t)t * hd], k, dtype, (size_t)b * T + t, Hkv, kvh, hd);
        load_head(&V[(size_t)t * hd], v, dtype, (size_t)b * T + t, Hkv, kvh, hd);
      }
      for (size_t e = 0; e < dK.size(); e++) dK[e] = dV[e] = 0.f;
      for (int h = kvh * G; h < (kvh + 1) * G; h++)
        for (int i = 0; i < T; i++) {
          size_t row = (size_t)b * T + i;
          load_head(qi.data(), q, dtype, row, H, h, hd);
          load_head(oi.data(), out, dtype, row, H, h, hd);
          load_head(doi.data(), dout, dtype, row, H, h, hd);
          const float L = lse[((size_t)b * H + h) * T + i];
          const float D = dot(doi.data(), oi.data(), hd);
          for (int d = 0; d < hd; d++) dqi[d] = 0.f;
          for (int j = 0; j <= i; j++) {
            const float* kj = &K[(size_t)j * hd];
            float P = expf(scale * dot(qi.data(), kj, hd) - L);
            float dS = P * (dot(doi.data(), &V[(size_t)j * hd], hd) - D);
            for (int d = 0; d < hd; d++) {
              dqi[d] += dS * kj[d];
              dK[(size_t)j * hd + d] += dS * qi[d];
              dV[(size_t)j * hd + d] += P * doi[d];
            }
          }
          size_t base = (row * H + h) * hd;
          for (int d = 0; d < hd; d++) xft_cpu::store(dq, dtype, base + d, scale * dqi[d]);
        }
      for (int t = 0; t < T; t++) {
        size_t base = (((size_t)b * T + t) * Hkv + kvh) * hd;
        for (int d = 0; d < hd; d++) {
          xft_cpu::store(dk, dtype, base + d, scale * dK[(size_t)t * hd + d]);
          xft_cpu::store(dv, dtype, base + d, dV[(size_t)t * hd + d]);
        }
      }
    }
  return 0;
}
