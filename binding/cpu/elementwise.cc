/*
CPU twin of cuda/elementwise.cu: small elementwise ops and the sum of squares.
  add:          y = a + b
  axpby:        y = alpha * x + beta * y   (x and y may differ in dtype; beta == 0 does not read y)
  tanh:         y = tanh(x);  dx = dy * (1 - y^2)
  router noise: noisy = clean + n_i * (softplus(z) + eps),  n_i = xft_normal(seed, i)
                softplus(z) = z > 20 ? z : log1p(exp(z))   (torch's threshold)
                dclean = dnoisy,  dz = dnoisy * n_i * sigmoid(z)
  sum_squares:  out[0] = sum over the tensors of sum_i x_i^2 (fp64 accumulation, rounded to fp32)
Flat arrays of n elements; outputs may alias inputs of the same dtype.
*/
#include <math.h>

#include "xft_cpu.h"

int xft_cpu_add(const void* a, const void* b, void* y, int dtype, size_t n) {
  for (size_t i = 0; i < n; i++) xft_cpu::store(y, dtype, i, xft_cpu::load(a, dtype, i) + xft_cpu::load(b, dtype, i));
  return 0;
}

int xft_cpu_axpby(const void* x, int x_dtype, void* y, int y_dtype, size_t n, float alpha, float beta) {
  for (size_t i = 0; i < n; i++) {
    float v = alpha * xft_cpu::load(x, x_dtype, i);
    if (beta != 0.f) v += beta * xft_cpu::load(y, y_dtype, i);
    xft_cpu::store(y, y_dtype, i, v);
  }
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
