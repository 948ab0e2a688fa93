/*
CPU twin of cuda/grouped_gemm.cu: one GEMM per expert over a contiguous group of rows.
  x [M, k] (rows grouped by expert), w [E, n, k] (nn.Linear layout), offsets [E + 1]
  forward:  y[r]  = w[e] @ x[r]                  for r in [o_e, o_{e+1})     y  [M, n]
  backward: dx[r] = w[e]^T @ dy[r]                                            dx [M, k]
            dw[e] (+)= sum_r dy[r] outer x[r]                                 dw [E, n, k]
bf16 operands are widened to fp32, accumulated in fp32, and results rounded once to bf16
(with accumulate, dw = round(dw + sum)). Any offsets (lib/ops.ts checks them unless validate is
false) are memory safe and give fully defined outputs, as the CUDA kernels: each is clamped to
[0, M] and raised to the running maximum, o'_e = max(o'_{e-1}, clamp(o_e)); group e is rows
o'_e .. o'_{e+1}; rows outside [o'_0, o'_E) of y and dx are zero.
*/
#include <string.h>

#include <algorithm>
#include <vector>

#include "xft_cpu.h"

namespace {

// o'_0 .. o'_E: the offsets clamped to [0, M] and made non-decreasing (the groups as the kernels see them)
std::vector<int> effective_offsets(const int* offsets, int E, int M) {
  std::vector<int> o(E + 1);
  for (int e = 0; e <= E; e++) {
    o[e] = std::min(std::max(offsets[e], 0), M);
    if (e > 0) o[e] = std::max(o[e], o[e - 1]);
  }
  return o;
}

// zero rows [0, o'_0) and [o'_E, M) of out [M, cols]
void zero_uncovered_rows(void* out, const std::vector<int>& o, int M, int cols, size_t es) {
  const size_t row = (size_t)cols * es;
  memset(out, 0, (size_t)o.front() * row);
  memset((char*)out + (size_t)o.back() * row, 0, (size_t)(M - o.back()) * row);
}

// y[r, j] = dot(a[r, :], b[j, :]) for r < rows, j < cols, all fp32, k contiguous in both
void gemm_nt(const float* a, const float* b, float* y, int rows, int cols, int k) {
  const int R = 4;
  int r = 0;
  for (; r + R <= rows; r += R) {
    const float* a0 = a + (size_t)r * k;
    for (int j = 0; j < cols; j++) {
      const float* bj = b + (size_t)j * k;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      for (int i = 0; i < k; i++) {
        float bv = bj[i];
        s0 += a0[i] * bv;
        s1 += a0[k + i] * bv;
        s2 += a0[2 * (size_t)k + i] * bv;
        s3 += a0[3 * (size_t)k + i] * bv;
      }
      y[(size_t)r * cols + j] = s0;
      y[(size_t)(r + 1) * cols + j] = s1;
      y[(size_t)(r + 2) * cols + j] = s2;
      y[(size_t)(r + 3) * cols + j] = s3;
    }
  }
  for (; r < rows; r++) {
    const float* ar = a + (size_t)r * k;
    for (int j = 0; j < cols; j++) {
      const float* bj = b + (size_t)j * k;
      float s = 0.f;
      for (int i = 0; i < k; i++) s += ar[i] * bj[i];
      y[(size_t)r * cols + j] = s;
    }
  }
}

size_t elem_size(int dtype) { return dtype == XFT_BF16 ? 2 : 4; }

void from_f32(void* dst, int dtype, const float* src, size_t n) {
  for (size_t i = 0; i < n; i++) xft_cpu::store(dst, dtype, i, src[i]);
}

}  // namespace

int xft_cpu_grouped_gemm_forward(const void* x, const void* w, const int* offsets, void* y,
                                 int dtype, int M, int n, int k, int E) {
  const size_t es = elem_size(dtype);
  std::vector<float> xe, we((size_t)n * k), ye;
  const std::vector<int> o = effective_offsets(offsets, E, M);
  zero_uncovered_rows(y, o, M, n, es);
  for (int e = 0; e < E; e++) {
    int r0 = o[e], r1 = o[e + 1];
    int rows = r1 - r0;
    if (rows == 0) continue;
    xe.resize((size_t)rows * k);
    ye.resize((size_t)rows * n);
    xft_cpu::to_f32(xe.data(), (const char*)x + (size_t)r0 * k * es, dtype, (size_t)rows * k);
    xft_cpu::to_f32(we.data(), (const char*)w + (size_t)e * n * k * es, dtype, (size_t)n * k);
    xft_cpu::parallel_for((size_t)rows, 2.0 * rows * n * k, [&](size_t ra, size_t rb) {
      gemm_nt(xe.data() + ra * k, we.data(), ye.data() + ra * n, (int)(rb - ra), n, k);
    });
    from_f32((char*)y + (size_t)r0 * n * es, dtype, ye.data(), (size_t)rows * n);
  }
  return 0;
}

int xft_cpu_grouped_gemm_backward(const void* x, const void* w, const int* offsets, const void* dy,
                                  void* dx, void* dw, int dtype, int dw_dtype, int M, int n, int k, int E,
                                  int accumulate) {
  const size_t es = elem_size(dtype);
  std::vector<float> xe, dye, we((size_t)n * k), dwe((size_t)n * k);
  const std::vector<int> o = effective_offsets(offsets, E, M);
  if (dx) zero_uncovered_rows(dx, o, M, k, es);
  for (int e = 0; e < E; e++) {
    int r0 = o[e], r1 = o[e + 1];
    int rows = r1 - r0;
    dye.resize((size_t)rows * n);
    xe.resize((size_t)rows * k);
    xft_cpu::to_f32(dye.data(), (const char*)dy + (size_t)r0 * n * es, dtype, (size_t)rows * n);
    if (dx && rows > 0) {
      xft_cpu::to_f32(we.data(), (const char*)w + (size_t)e * n * k * es, dtype, (size_t)n * k);
      xft_cpu::parallel_for((size_t)rows, 2.0 * rows * n * k, [&](size_t ra, size_t rb) {
        std::vector<float> acc(k);
        for (size_t r = ra; r < rb; r++) {
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int j = 0; j < n; j++) {
            float g = dye[r * n + j];
            const float* wj = we.data() + (size_t)j * k;
            for (int i = 0; i < k; i++) acc[i] += g * wj[i];
          }
          from_f32((char*)dx + (size_t)(r0 + r) * k * es, dtype, acc.data(), k);
        }
      });
    }
    if (dw) {
      xft_cpu::to_f32(xe.data(), (const char*)x + (size_t)r0 * k * es, dtype, (size_t)rows * k);
      std::fill(dwe.begin(), dwe.end(), 0.f);
      // split over the n output rows of dw: each keeps the row order of the sum
      xft_cpu::parallel_for((size_t)n, 2.0 * rows * n * k, [&](size_t ja, size_t jb) {
        for (int r = 0; r < rows; r++) {
          const float* xr = xe.data() + (size_t)r * k;
          for (size_t j = ja; j < jb; j++) {
            float g = dye[(size_t)r * n + j];
            float* dwj = dwe.data() + j * k;
            for (int i = 0; i < k; i++) dwj[i] += g * xr[i];
          }
        }
      });
      char* out = (char*)dw + (size_t)e * n * k * elem_size(dw_dtype);
      if (accumulate)
        for (size_t i = 0; i < (size_t)n * k; i++) dwe[i] += xft_cpu::load(out, dw_dtype, i);
      from_f32(out, dw_dtype, dwe.data(), (size_t)n * k);
    }
  }
  return 0;
}
