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
  float dc[XFT_LOAD_MAX_EXPERTS], dcl[XFT_LOAD_MAX_EXPERTS];
  for (int t = 0; t < T; t++) {
    const size_t base = (size_t)t * N;
    XftLoadRow zr{z, dtype, base};
    xft_load_estimate_token_backward(XftLoadRow{clean, dtype, base}, zr, XftLoadRow{noisy, dtype, base}, dload, N, k, eps, seed, base, dcl, dc);
    for (int i = 0; i < N; i++) {
      xft_cpu::store(dclean, dtype, base + i, dcl[i]);
      xft_cpu::store(dz, dtype, base + i, dc[i] / (1.f + expf(-zr[i])));
    }
  }
  return 0;
}
