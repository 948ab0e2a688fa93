/*
CPU twin of cuda/router_linear.cu: the small-N linear layers of the MoE router (N <= 32 outputs).
  x [T, d], w [N, d] (nn.Linear layout), dy [T, N]
  forward:  y[t, n]  = sum_i x[t, i] w[n, i]                       y  [T, N]
  backward: dx[t, i] = sum_n dy[t, n] w[n, i]                      dx [T, d]  (overwrite)
            dw[n, i] (+)= sum_t dy[t, n] x[t, i]                   dw [N, d]  (accumulate)
bf16 operands are widened to fp32, accumulated in fp32, and results rounded once to bf16; dw may be
f32 with bf16 inputs (with accumulate, dw = round(old + sum)). The sums run in the order of the
grouped GEMM's CPU twin with one group (i for y, n for dx, t for dw), so on the CPU a router linear
gives the bits xft_cpu_grouped_gemm_* gives; the CUDA kernels sum in other fixed orders (warp
butterfly, token slices) and agree to rounding.
*/
#include <algorithm>
#include <vector>

#include "xft_cpu.h"

int xft_cpu_router_linear_forward(const void* x, const void* w, void* y, int dtype, int T, int N, int d) {
  if (T == 0) return 0;
  std::vector<float> wf((size_t)N * d);
  xft_cpu::to_f32(wf.data(), w, dtype, wf.size());
  xft_cpu::parallel_for((size_t)T, 2.0 * T * N * d, [&](size_t ta, size_t tb) {
    std::vector<float> xr(d);
    for (size_t t = ta; t < tb; t++) {
      for (int i = 0; i < d; i++) xr[i] = xft_cpu::load(x, dtype, t * d + i);
      for (int n = 0; n < N; n++) {
        const float* wn = wf.data() + (size_t)n * d;
        float s = 0.f;
        for (int i = 0; i < d; i++) s += xr[i] * wn[i];
        xft_cpu::store(y, dtype, t * N + n, s);
      }
    }
  });
  return 0;
}

int xft_cpu_router_linear_backward(const void* x, const void* w, const void* dy, void* dx, void* dw, int dtype,
                                   int dw_dtype, int T, int N, int d, int accumulate) {
  std::vector<float> dyf((size_t)T * N);
  xft_cpu::to_f32(dyf.data(), dy, dtype, dyf.size());
  if (dx && T > 0) {
    std::vector<float> wf((size_t)N * d);
    xft_cpu::to_f32(wf.data(), w, dtype, wf.size());
    xft_cpu::parallel_for((size_t)T, 2.0 * T * N * d, [&](size_t ta, size_t tb) {
      std::vector<float> acc(d);
      for (size_t t = ta; t < tb; t++) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int n = 0; n < N; n++) {
          const float g = dyf[t * N + n];
          const float* wn = wf.data() + (size_t)n * d;
          for (int i = 0; i < d; i++) acc[i] += g * wn[i];
        }
        for (int i = 0; i < d; i++) xft_cpu::store(dx, dtype, t * d + i, acc[i]);
      }
    });
  }
  if (dw) {
    std::vector<float> xf((size_t)T * d), dwf((size_t)N * d, 0.f);
    xft_cpu::to_f32(xf.data(), x, dtype, xf.size());
    // split over the N output rows: each keeps the token order of its sum
    xft_cpu::parallel_for((size_t)N, 2.0 * T * N * d, [&](size_t na, size_t nb) {
      for (int t = 0; t < T; t++) {
        const float* xt = xf.data() + (size_t)t * d;
        for (size_t n = na; n < nb; n++) {
          const float g = dyf[(size_t)t * N + n];
          float* dwn = dwf.data() + n * d;
          for (int i = 0; i < d; i++) dwn[i] += g * xt[i];
        }
      }
    });
    for (size_t j = 0; j < dwf.size(); j++) {
      const float s = accumulate ? dwf[j] + xft_cpu::load(dw, dw_dtype, j) : dwf[j];
      xft_cpu::store(dw, dw_dtype, j, s);
    }
  }
  return 0;
}
