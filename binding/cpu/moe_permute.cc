/*
CPU twin of cuda/moe_permute.cu: the gather/scatter around the grouped expert GEMMs, and the
balance loss of the router.

order i32 [T*K] (from routing): pairs t*K + s sorted by expert, so row i of the grouped GEMM input
is token order[i] / K in its slot order[i] % K. position i32 [T*K] is its inverse.
x, dx, out, dout [T, d]; xp, dxp, y, dy [T*K, d]; one dtype (f32 or bf16), fp32 math; g, dg f32 [T, K].
  invert_permutation:  position[order[i]] = i
  permute forward:     xp[i] = x[order[i] / K]                       (the gather)
  permute backward:    dx[t] = sum_s dxp[position[t*K + s]]           (slot order: deterministic)
  unpermute forward:   out[t] = sum_s g[t, s] y[position[t*K + s]]    (the weighted combine)
  unpermute backward:  dy[position[t*K + s]] = g[t, s] dout[t],  dg[t, s] = <dout[t], y[position[t*K + s]]>
Any index values give fully defined outputs (the CUDA kernels do the same; the TS wrappers check
that order/position are permutations unless validate is false):
- indices outside [0, T*K) read as zero rows and are never written through;
- invert_permutation: position[j] = -1 where no i has order[i] = j, the largest such i where several do;
- unpermute backward: dy[i] = g[q] dout[q / K] with q the largest pair index t*K + s whose position
  is i (the inverse of position), zero rows where there is none.

Balance loss (XFT.md): loss = weight (cv2(importance) + cv2(load)), cv2(x) = var(x) / (mean(x)^2 + 1e-10),
var unbiased (N - 1, as torch.var), cv2 = 0 when N == 1. With mu = mean, S = var, D = mu^2 + 1e-10:
  dcv2/dx_i = 2 (x_i - mu) / ((N - 1) D) - 2 S mu / (N D^2)
*/
#include <math.h>
#include <string.h>

#include <vector>

#include "xft_cpu.h"

int xft_cpu_invert_permutation(const int* order, int* position, int n) {
  for (int i = 0; i < n; i++) position[i] = -1;
  for (int i = 0; i < n; i++) {
    int o = order[i];
    if (o >= 0 && o < n) position[o] = i;
  }
  return 0;
}

int xft_cpu_permute_forward(const void* x, const int* order, void* xp, int dtype, int T, int K, int d) {
  const int n = T * K;
  const size_t es = dtype == XFT_BF16 ? 2 : 4, row = (size_t)d * es;
  for (int i = 0; i < n; i++) {
    int o = order[i];
    char* dst = (char*)xp + (size_t)i * row;
    if (o >= 0 && o < n) memcpy(dst, (const char*)x + (size_t)(o / K) * row, row);
    else memset(dst, 0, row);
  }
  return 0;
}

int xft_cpu_permute_backward(const void* dxp, const int* position, void* dx, int dtype, int T, int K, int d) {
  const int n = T * K;
  std::vector<float> acc(d);
  for (int t = 0; t < T; t++) {
    for (int c = 0; c < d; c++) acc[c] = 0.f;
    for (int s = 0; s < K; s++) {
      int p = position[(size_t)t * K + s];
      if (p < 0 || p >= n) continue;
      for (int c = 0; c < d; c++) acc[c] += xft_cpu::load(dxp, dtype, (size_t)p * d + c);
    }
    for (int c = 0; c < d; c++) xft_cpu::store(dx, dtype, (size_t)t * d + c, acc[c]);
  }
  return 0;
}

int xft_cpu_unpermute_forward(const void* y, const int* position, const float* g, void* out, int dtype,
                              int T, int K, int d) {
  const int n = T * K;
  std::vector<float> acc(d);
  for (int t = 0; t < T; t++) {
    for (int c = 0; c < d; c++) acc[c] = 0.f;
    for (int s = 0; s < K; s++) {
      int p = position[(size_t)t * K + s];
      if (p < 0 || p >= n) continue;
      float w = g[(size_t)t * K + s];
      for (int c = 0; c < d; c++) acc[c] += w * xft_cpu::load(y, dtype, (size_t)p * d + c);
    }
    for (int c = 0; c < d; c++) xft_cpu::store(out, dtype, (size_t)t * d + c, acc[c]);
  }
  return 0;
}

int xft_cpu_unpermute_backward(const void* dout, const void* y, const int* position, const float* g,
                               void* dy, float* dg, int dtype, int T, int K, int d) {
  const int n = T * K;
  std::vector<float> go(d);
  for (int t = 0; t < T; t++) {
    xft_cpu::to_f32(go.data(), (const char*)dout + (size_t)t * d * (dtype == XFT_BF16 ? 2 : 4), dtype, d);
    for (int s = 0; s < K; s++) {
      int p = position[(size_t)t * K + s];
      float acc = 0.f;
      if (p >= 0 && p < n)
        for (int c = 0; c < d; c++) acc += go[c] * xft_cpu::load(y, dtype, (size_t)p * d + c);
      dg[(size_t)t * K + s] = acc;
    }
  }
  std::vector<int> inverse(n);
  xft_cpu_invert_permutation(position, inverse.data(), n);
  for (int i = 0; i < n; i++) {
    const int q = inverse[i];
    const float w = q >= 0 ? g[q] : 0.f;
    for (int c = 0; c < d; c++)
      xft_cpu::store(dy, dtype, (size_t)i * d + c, q >= 0 ? w * xft_cpu::load(dout, dtype, (size_t)(q / K) * d + c) : 0.f);
  }
  return 0;
}

namespace {

struct Moments {
  float mean, var, denom;  // mean, unbiased variance, mean^2 + 1e-10
};

Moments moments(const float* x, int N) {
  float sum = 0.f;
  for (int i = 0; i < N; i++) sum += x[i];
  const float mean = sum / (float)N;
  float ss = 0.f;
  for (int i = 0; i < N; i++) ss += (x[i] - mean) * (x[i] - mean);
  return {mean, N > 1 ? ss / (float)(N - 1) : 0.f, mean * mean + 1e-10f};
}

void cv2_backward(const float* x, int N, float scale, float* dx) {
  if (N < 2) {
    for (int i = 0; i < N; i++) dx[i] = 0.f;
    return;
  }
  Moments m = moments(x, N);
  const float a = 2.f / ((float)(N - 1) * m.denom), b = 2.f * m.var * m.mean / ((float)N * m.denom * m.denom);
  for (int i = 0; i < N; i++) dx[i] = scale * (a * (x[i] - m.mean) - b);
}

}  // namespace

int xft_cpu_balance_loss_forward(const float* importance, const float* load, int N, float weight, float* loss) {
  Moments a = moments(importance, N), b = moments(load, N);
  loss[0] = weight * (a.var / a.denom + b.var / b.denom);
  return 0;
}

int xft_cpu_balance_loss_backward(const float* importance, const float* load, int N, float weight, float dloss,
                                  float* dimportance, float* dload) {
  cv2_backward(importance, N, weight * dloss, dimportance);
  cv2_backward(load, N, weight * dloss, dload);
  return 0;
}
