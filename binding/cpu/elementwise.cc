/*
CPU twin of cuda/elementwise.cu: small elementwise ops and the sum of squares.
  add:          y = a + b
  axpby:        y = alpha * x + beta * y   (x and y may differ in dtype; beta == 0 does not read y)
  tanh:         y = tanh(x);  dx = dy * (1 - y^2)
  router noise: noisy = clean + n_i * (softplus(z) + eps),  n_i = xft_normal(seed, i)
                softplus(z) = z > 20 ? z : log1p(exp(z))   (torch's threshold)
                dclean = dnoisy,  dz = dnoisy * n_i * sigmoid(z)
  sum_squares:  out[0] = sum over the tensors of sum_i x_i^2 (fp64 accumulation, rounded to fp32)
Flat arrays of n elements; outputs may alias inputs of the same dtype (the same buffer, never a shifted overlap).
add and axpby are vectorized (the same operations per element: the same bits) and split over threads.
*/
#include <math.h>

#include "vec.h"
#include "xft_cpu.h"

namespace {

template <class T>
XFT_INLINE void add_body(const T* __restrict a, const T* __restrict b, T* __restrict y, size_t i0, size_t i1) {
  for (size_t i = i0; i < i1; i++) xft_cpu::st(y, i, xft_cpu::ld(a, i) + xft_cpu::ld(b, i));
}

template <class TX, class TY>
XFT_INLINE void axpby_body(const TX* __restrict x, TY* __restrict y, float alpha, float beta, size_t i0, size_t i1) {
  if (beta != 0.f)
    for (size_t i = i0; i < i1; i++) xft_cpu::st(y, i, alpha * xft_cpu::ld(x, i) + beta * xft_cpu::ld(y, i));
  else
    for (size_t i = i0; i < i1; i++) xft_cpu::st(y, i, alpha * xft_cpu::ld(x, i));
}

typedef uint16_t H;

XFT_VEC void add_range(const void* a, const void* b, void* y, int bf, size_t i0, size_t i1) {
  if (bf) add_body<H>((const H*)a, (const H*)b, (H*)y, i0, i1);
  else add_body<float>((const float*)a, (const float*)b, (float*)y, i0, i1);
}

XFT_VEC void axpby_range(const void* x, int xbf, void* y, int ybf, float alpha, float beta, size_t i0, size_t i1) {
  if (xbf && ybf) axpby_body<H, H>((const H*)x, (H*)y, alpha, beta, i0, i1);
  else if (xbf) axpby_body<H, float>((const H*)x, (float*)y, alpha, beta, i0, i1);
  else if (ybf) axpby_body<float, H>((const float*)x, (H*)y, alpha, beta, i0, i1);
  else axpby_body<float, float>((const float*)x, (float*)y, alpha, beta, i0, i1);
}

}  // namespace

int xft_cpu_add(const void* a, const void* b, void* y, int dtype, size_t n) {
  xft_cpu::parallel_for(n, 2.0 * (double)n, [&](size_t i0, size_t i1) { add_range(a, b, y, dtype == XFT_BF16, i0, i1); });
  return 0;
}

int xft_cpu_axpby(const void* x, int x_dtype, void* y, int y_dtype, size_t n, float alpha, float beta) {
  xft_cpu::parallel_for(n, 3.0 * (double)n, [&](size_t i0, size_t i1) {
    axpby_range(x, x_dtype == XFT_BF16, y, y_dtype == XFT_BF16, alpha, beta, i0, i1);
  });
  return 0;
}

int xft_cpu_tanh_forward(const void* x, void* y, int dtype, size_t n) {
  for (size_t i = 0; i < n; i++) xft_cpu::store(y, dtype, i, tanhf(xft_cpu::load(x, dtype, i)));
  return 0;
}

int xft_cpu_tanh_backward(const void* y, const void* dy, void* dx, int dtype, size_t n) {
  for (size_t i = 0; i < n; i++) {
    const float yv = xft_cpu::load(y, dtype, i);
    xft_cpu::store(dx, dtype, i, xft_cpu::load(dy, dtype, i) * (1.0f - yv * yv));
  }
  return 0;
}

namespace {
inline float softplus(float z) { return z > 20.f ? z : log1pf(expf(z)); }
}  // namespace

int xft_cpu_router_noise_forward(const void* clean, const void* z, void* noisy, int dtype, size_t n,
                                 uint64_t seed, float eps) {
  for (size_t i = 0; i < n; i++) {
    const float std = softplus(xft_cpu::load(z, dtype, i)) + eps;
    xft_cpu::store(noisy, dtype, i, xft_cpu::load(clean, dtype, i) + xft_normal(seed, i) * std);
  }
  return 0;
}

int xft_cpu_router_noise_backward(const void* z, const void* dnoisy, void* dclean, void* dz, int dtype, size_t n,
                                  uint64_t seed) {
  for (size_t i = 0; i < n; i++) {
    const float g = xft_cpu::load(dnoisy, dtype, i), zv = xft_cpu::load(z, dtype, i);
    const float sig = 1.0f / (1.0f + expf(-zv));
    if (dclean) xft_cpu::store(dclean, dtype, i, g);
    xft_cpu::store(dz, dtype, i, g * xft_normal(seed, i) * sig);
  }
  return 0;
}

int xft_cpu_sum_squares(const void* const* tensors, const size_t* numel, const int* dtypes, int count, float* out) {
  double acc = 0.0;
  for (int t = 0; t < count; t++)
    for (size_t i = 0; i < numel[t]; i++) {
      const double v = xft_cpu::load(tensors[t], dtypes[t], i);
      acc += v * v;
    }
  out[0] = (float)acc;
  return 0;
}
