/*
CPU twin of cuda/rmsnorm.cu: RMSNorm of Llama (HF LlamaRMSNorm, computed in fp32 throughout).
  forward:  rstd[r] = 1 / sqrt(mean_i x[r,i]^2 + eps),   y[r,i] = x[r,i] * rstd[r] * w[i]
            x, y [R, d] (dtype), w [d] (w_dtype), rstd f32 [R]
  backward: with a = mean_i(w[i] dy[r,i] x[r,i]) (the per-row dot over d),
            dx[r,i] = rstd[r] * (w[i] dy[r,i] - x[r,i] rstd[r]^2 a)              (overwrite)
            dw[i] (+)= sum_r dy[r,i] x[r,i] rstd[r]                               (accumulate flag)
Row sums and the dw column sums accumulate in fp64 here (the oracle); the GPU uses fp32 trees.
Rows run on threads, each row's sums in 8 interleaved fp64 partial sums (vectorized); dw runs on
threads over column blocks, each column summed over the rows in order, so no result depends on
the thread count.
*/
#include <math.h>

#include <vector>

#include "vec.h"
#include "xft_cpu.h"

namespace {

const int kLanes = 8;

// sum_i a[i] * b[i] * c[i] (c = nullptr: 1) in fp64, 8 interleaved partial sums
template <class T, class W>
XFT_INLINE double dot3(const T* __restrict a, const T* __restrict b, const W* __restrict c, int d) {
  double lane[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int l = 0; l < kLanes; l++) {
      const double w = c ? (double)xft_cpu::ld(c, (size_t)i + l) : 1.0;
      lane[l] += w * xft_cpu::ld(a, (size_t)i + l) * xft_cpu::ld(b, (size_t)i + l);
    }
  double s = 0.0;
  for (int l = 0; l < kLanes; l++) s += lane[l];
  for (; i < d; i++) s += (c ? (double)xft_cpu::ld(c, (size_t)i) : 1.0) * xft_cpu::ld(a, (size_t)i) * xft_cpu::ld(b, (size_t)i);
  return s;
}

template <class T, class W>
XFT_INLINE void forward_rows(const T* x, const W* w, T* y, float* rstd, int d, float eps, size_t r0, size_t r1) {
  for (size_t r = r0; r < r1; r++) {
    const T* __restrict xr = x + r * d;
    T* __restrict yr = y + r * d;
    const double ss = dot3<T, float>(xr, xr, nullptr, d);
    const float rs = 1.0f / sqrtf((float)(ss / d) + eps);
    rstd[r] = rs;
    for (int i = 0; i < d; i++) xft_cpu::st(yr, (size_t)i, xft_cpu::ld(xr, (size_t)i) * rs * xft_cpu::ld(w, (size_t)i));
  }
}

template <class T, class W>
XFT_INLINE void backward_rows(const T* x, const W* w, const float* rstd, const T* dy, T* dx, int d, size_t r0, size_t r1) {
  for (size_t r = r0; r < r1; r++) {
    const T* __restrict xr = x + r * d;
    const T* __restrict dyr = dy + r * d;
    T* __restrict dxr = dx + r * d;
    const double dot = dot3<T, W>(dyr, xr, w, d);
    const float rs = rstd[r];
    const float coef = (float)(dot / d) * rs * rs;
    for (int i = 0; i < d; i++)
      xft_cpu::st(dxr, (size_t)i, rs * (xft_cpu::ld(w, (size_t)i) * xft_cpu::ld(dyr, (size_t)i) - xft_cpu::ld(xr, (size_t)i) * coef));
  }
}

// dwsum[c] = sum over rows (in order) of dy[r,c] x[r,c] rstd[r], for c in [c0, c1)
template <class T>
XFT_INLINE void dw_columns(const T* x, const T* dy, const float* rstd, double* dwsum, int R, int d, size_t c0, size_t c1) {
  for (size_t c = c0; c < c1; c++) dwsum[c] = 0.0;
  for (int r = 0; r < R; r++) {
    const T* __restrict xr = x + (size_t)r * d;
    const T* __restrict dyr = dy + (size_t)r * d;
    double* __restrict acc = dwsum;
    const float rs = rstd[r];
    for (size_t c = c0; c < c1; c++) acc[c] += (double)(xft_cpu::ld(dyr, c) * xft_cpu::ld(xr, c) * rs);
  }
}

typedef uint16_t H;

XFT_VEC void forward_range(const void* x, const void* w, void* y, float* rstd, int bf, int wbf, int d, float eps, size_t a,
                           size_t b) {
  if (bf && wbf) forward_rows<H, H>((const H*)x, (const H*)w, (H*)y, rstd, d, eps, a, b);
  else if (bf) forward_rows<H, float>((const H*)x, (const float*)w, (H*)y, rstd, d, eps, a, b);
  else if (wbf) forward_rows<float, H>((const float*)x, (const H*)w, (float*)y, rstd, d, eps, a, b);
  else forward_rows<float, float>((const float*)x, (const float*)w, (float*)y, rstd, d, eps, a, b);
}

XFT_VEC void backward_range(const void* x, const void* w, const float* rstd, const void* dy, void* dx, int bf, int wbf, int d,
                            size_t a, size_t b) {
  if (bf && wbf) backward_rows<H, H>((const H*)x, (const H*)w, rstd, (const H*)dy, (H*)dx, d, a, b);
  else if (bf) backward_rows<H, float>((const H*)x, (const float*)w, rstd, (const H*)dy, (H*)dx, d, a, b);
  else if (wbf) backward_rows<float, H>((const float*)x, (const H*)w, rstd, (const float*)dy, (float*)dx, d, a, b);
  else backward_rows<float, float>((const float*)x, (const float*)w, rstd, (const float*)dy, (float*)dx, d, a, b);
}

XFT_VEC void dw_range(const void* x, const void* dy, const float* rstd, double* dwsum, int bf, int R, int d, size_t a, size_t b) {
  if (bf) dw_columns<H>((const H*)x, (const H*)dy, rstd, dwsum, R, d, a, b);
  else dw_columns<float>((const float*)x, (const float*)dy, rstd, dwsum, R, d, a, b);
}

}  // namespace

int xft_cpu_rmsnorm_forward(const void* x, const void* w, void* y, float* rstd, int dtype, int w_dtype, int R,
                            int d, float eps) {
  const int bf = dtype == XFT_BF16, wbf = w_dtype == XFT_BF16;
  xft_cpu::parallel_for((size_t)R, 6.0 * (double)R * d,
                        [&](size_t a, size_t b) { forward_range(x, w, y, rstd, bf, wbf, d, eps, a, b); });
  return 0;
}

int xft_cpu_rmsnorm_backward(const void* x, const void* w, const float* rstd, const void* dy, void* dx, float* dw,
                             int dtype, int w_dtype, int R, int d, int accumulate) {
  const int bf = dtype == XFT_BF16, wbf = w_dtype == XFT_BF16;
  // dw first: dx may be dy itself
  if (dw) {
    std::vector<double> dwsum(d);
    // blocks of 64 columns keep the fp64 accumulators in cache
    const size_t kCols = 64, blocks = ((size_t)d + kCols - 1) / kCols;
    xft_cpu::parallel_for(blocks, 4.0 * (double)R * d, [&](size_t a, size_t b) {
      dw_range(x, dy, rstd, dwsum.data(), bf, R, d, a * kCols, b * kCols < (size_t)d ? b * kCols : (size_t)d);
    });
    for (int i = 0; i < d; i++) dw[i] = accumulate ? dw[i] + (float)dwsum[i] : (float)dwsum[i];
  }
  xft_cpu::parallel_for((size_t)R, 8.0 * (double)R * d,
                        [&](size_t a, size_t b) { backward_range(x, w, rstd, dy, dx, bf, wbf, d, a, b); });
  return 0;
}
