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

#include "vec.h"
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
  xft_cpu::parallel_for((size_t)n, 2.0 * (double)n * d, [&](size_t a, size_t b) {
    for (size_t i = a; i < b; i++) {
      int o = order[i];
      char* dst = (char*)xp + i * row;
      if (o >= 0 && o < n) memcpy(dst, (const char*)x + (size_t)(o / K) * row, row);
      else memset(dst, 0, row);
    }
  });
  return 0;
}

// Rows of tokens run on threads; within a row the sums over slots run in slot order as before and
// the loops over d vectorize (the same bits as the plain loops).
namespace {

typedef uint16_t H;

template <class T>
XFT_INLINE void permute_backward_rows(const T* dxp, const int* position, T* dx, int n, int K, int d, float* acc, size_t t0,
                                      size_t t1) {
  for (size_t t = t0; t < t1; t++) {
    for (int c = 0; c < d; c++) acc[c] = 0.f;
    for (int s = 0; s < K; s++) {
      int p = position[t * K + s];
      if (p < 0 || p >= n) continue;
      const T* __restrict src = dxp + (size_t)p * d;
      float* __restrict a = acc;
      for (int c = 0; c < d; c++) a[c] += xft_cpu::ld(src, (size_t)c);
    }
    T* __restrict dst = dx + t * d;
    for (int c = 0; c < d; c++) xft_cpu::st(dst, (size_t)c, acc[c]);
  }
}

template <class T>
XFT_INLINE void unpermute_forward_rows(const T* y, const int* position, const float* g, T* out, int n, int K, int d, float* acc,
                                       size_t t0, size_t t1) {
  for (size_t t = t0; t < t1; t++) {
    for (int c = 0; c < d; c++) acc[c] = 0.f;
    for (int s = 0; s < K; s++) {
      int p = position[t * K + s];
      if (p < 0 || p >= n) continue;
      const float w = g[t * K + s];
      const T* __restrict src = y + (size_t)p * d;
      float* __restrict a = acc;
      for (int c = 0; c < d; c++) a[c] += w * xft_cpu::ld(src, (size_t)c);
    }
    T* __restrict dst = out + t * d;
    for (int c = 0; c < d; c++) xft_cpu::st(dst, (size_t)c, acc[c]);
  }
}

template <class T>
XFT_INLINE void unpermute_dg_rows(const T* dout, const T* y, const int* position, float* dg, int n, int K, int d, size_t t0,
                                  size_t t1) {
  for (size_t t = t0; t < t1; t++) {
    const T* go = dout + t * d;
    for (int s = 0; s < K; s++) {
      int p = position[t * K + s];
      float acc = 0.f;
      if (p >= 0 && p < n) {
        const T* yp = y + (size_t)p * d;
        for (int c = 0; c < d; c++) acc += xft_cpu::ld(go, (size_t)c) * xft_cpu::ld(yp, (size_t)c);
      }
      dg[t * K + s] = acc;
    }
  }
}

template <class T>
XFT_INLINE void unpermute_dy_rows(const T* dout, const int* inverse, const float* g, T* dy, int K, int d, size_t i0, size_t i1) {
  for (size_t i = i0; i < i1; i++) {
    const int q = inverse[i];
    T* __restrict dst = dy + i * d;
    if (q < 0) {
      for (int c = 0; c < d; c++) xft_cpu::st(dst, (size_t)c, 0.f);
      continue;
    }
    const float w = g[q];
    const T* __restrict src = dout + (size_t)(q / K) * d;
    for (int c = 0; c < d; c++) xft_cpu::st(dst, (size_t)c, w * xft_cpu::ld(src, (size_t)c));
  }
}

XFT_VEC void permute_backward_range(const void* dxp, const int* position, void* dx, int bf, int n, int K, int d, float* acc,
                                    size_t a, size_t b) {
  if (bf) permute_backward_rows<H>((const H*)dxp, position, (H*)dx, n, K, d, acc, a, b);
  else permute_backward_rows<float>((const float*)dxp, position, (float*)dx, n, K, d, acc, a, b);
}

XFT_VEC void unpermute_forward_range(const void* y, const int* position, const float* g, void* out, int bf, int n, int K, int d,
                                     float* acc, size_t a, size_t b) {
  if (bf) unpermute_forward_rows<H>((const H*)y, position, g, (H*)out, n, K, d, acc, a, b);
  else unpermute_forward_rows<float>((const float*)y, position, g, (float*)out, n, K, d, acc, a, b);
}

XFT_VEC void unpermute_backward_range(const void* dout, const void* y, const int* position, const int* inverse, const float* g,
                                      void* dy, float* dg, int bf, int n, int K, int d, size_t a, size_t b) {
  // tokens [a, b) give dg; pair rows [a K, b K) give dy
  if (bf) {
    unpermute_dg_rows<H>((const H*)dout, (const H*)y, position, dg, n, K, d, a, b);
    unpermute_dy_rows<H>((const H*)dout, inverse, g, (H*)dy, K, d, a * K, b * K);
  } else {
    unpermute_dg_rows<float>((const float*)dout, (const float*)y, position, dg, n, K, d, a, b);
    unpermute_dy_rows<float>((const float*)dout, inverse, g, (float*)dy, K, d, a * K, b * K);
  }
}

}  // namespace

int xft_cpu_permute_backward(const void* dxp, const int* position, void* dx, int dtype, int T, int K, int d) {
  const int n = T * K;
  xft_cpu::parallel_for((size_t)T, 2.0 * (double)n * d, [&](size_t a, size_t b) {
    std::vector<float> acc(d);
    permute_backward_range(dxp, position, dx, dtype == XFT_BF16, n, K, d, acc.data(), a, b);
  });
  return 0;
}

int xft_cpu_unpermute_forward(const void* y, const int* position, const float* g, void* out, int dtype,
                              int T, int K, int d) {
  const int n = T * K;
  xft_cpu::parallel_for((size_t)T, 3.0 * (double)n * d, [&](size_t a, size_t b) {
    std::vector<float> acc(d);
    unpermute_forward_range(y, position, g, out, dtype == XFT_BF16, n, K, d, acc.data(), a, b);
  });
  return 0;
}

int xft_cpu_unpermute_backward(const void* dout, const void* y, const int* position, const float* g,
                               void* dy, float* dg, int dtype, int T, int K, int d) {
  const int n = T * K;
  std::vector<int> inverse(n);
  xft_cpu_invert_permutation(position, inverse.data(), n);
  // dy rows of the pairs of tokens [a, b) are rows [a K, b K) of the grouped layout only through
  // `inverse`; every pair row i is written exactly once as i runs over [0, n)
  xft_cpu::parallel_for((size_t)T, 5.0 * (double)n * d, [&](size_t a, size_t b) {
    unpermute_backward_range(dout, y, position, inverse.data(), g, dy, dg, dtype == XFT_BF16, n, K, d, a, b);
  });
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
