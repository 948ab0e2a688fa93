// CPU twin of cuda/load_estimate.cu (the noisy top-k load estimate; the math is stated there and
// shared through cuda/load_estimate.h). load sums tokens in order per expert (in double).
#include <math.h>

#include "../../cuda/load_estimate.h"
#include "xft_cpu.h"

int xft_cpu_load_estimate_forward(const void* clean, const void* z, const void* noisy, int dtype, int T, int N, int k,
                                  float eps, float* prob, float* load) {
  for (int t = 0; t < T; t++) {
    const size_t base = (size_t)t * N;
    xft_load_estimate_token(XftLoadRow{clean, dtype, base}, XftLoadRow{z, dtype, base}, XftLoadRow{noisy, dtype, base}, N, k, eps, prob + base);
  }
  for (int i = 0; i < N; i++) {
    double s = 0.0;
    for (int t = 0; t < T; t++) s += prob[(size_t)t * N + i];
    load[i] = (float)s;
  }
  return 0;
}

int xft_cpu_load_estimate_backward(const void* clean, const void* z, const void* noisy, const float* dload, int dtype,
                                   int T, int N, int k, float eps, uint64_t seed, void* dclean, void* dz) {
  for (int t = 0; t < T; t++) {
    const size_t base = (size_t)t * N;
    XftLoadRow c{clean, dtype, base}, zr{z, dtype, base}, v{noisy, dtype, base};
    const XftLoadTokenGrad g = xft_load_token_grad(c, zr, v, dload, N, k, eps);
    for (int i = 0; i < N; i++) {
      float dcl, dc;
      xft_load_expert_grad(c, zr, v, dload, i, eps, seed, base, g, &dcl, &dc);
      xft_cpu::store(dclean, dtype, base + i, dcl);
      xft_cpu::store(dz, dtype, base + i, dc / (1.f + expf(-zr[i])));
    }
  }
  return 0;
}
