/*
CPU twin of cuda/rmsnorm.cu: RMSNorm of Llama (HF LlamaRMSNorm, computed in fp32 throughout).
  forward:  rstd[r] = 1 / sqrt(mean_i x[r,i]^2 + eps),   y[r,i] = x[r,i] * rstd[r] * w[i]
            x, y [R, d] (dtype), w [d] (w_dtype), rstd f32 [R]
  backward: with a = mean_i(w[i] dy[r,i] x[r,i]) (the per-row dot over d),
            dx[r,i] = rstd[r] * (w[i] dy[r,i] - x[r,i] rstd[r]^2 a)              (overwrite)
            dw[i] (+)= sum_r dy[r,i] x[r,i] rstd[r]                               (accumulate flag)
Row sums and the dw column sums accumulate in fp64 here (the oracle); the GPU uses fp32 trees.
*/
#include <math.h>

#include <vector>

#include "xft_cpu.h"

int xft_cpu_rmsnorm_forward(const void* x, const void* w, void* y, float* rstd, int dtype, int w_dtype, int R,
                            int d, float eps) {
  std::vector<float> xr(d), wf(d);
  xft_cpu::to_f32(wf.data(), w, w_dtype, d);
  for (int r = 0; r < R; r++) {
    xft_cpu::to_f32(xr.data(), (const char*)x + (size_t)r * d * (dtype == XFT_BF16 ? 2 : 4), dtype, d);
    double ss = 0.0;
    for (int i = 0; i < d; i++) ss += (double)xr[i] * xr[i];
    float rs = 1.0f / sqrtf((float)(ss / d) + eps);
    rstd[r] = rs;
    for (int i = 0; i < d; i++) xft_cpu::store(y, dtype, (size_t)r * d + i, xr[i] * rs * wf[i]);
  }
  return 0;
}

int xft_cpu_rmsnorm_backward(const void* x, const void* w, const float* rstd, const void* dy, void* dx, float* dw,
                             int dtype, int w_dtype, int R, int d, int accumulate) {
  std::vector<float> xr(d), dyr(d), wf(d);
  std::vector<double> dwsum(dw ? d : 0, 0.0);
  xft_cpu::to_f32(wf.data(), w, w_dtype, d);
  const size_t row_bytes = (size_t)d * (dtype == XFT_BF16 ? 2 : 4);
  for (int r = 0; r < R; r++) {
    xft_cpu::to_f32(xr.data(), (const char*)x + r * row_bytes, dtype, d);
    xft_cpu::to_f32(dyr.data(), (const char*)dy + r * row_bytes, dtype, d);
    double dot = 0.0;
    for (int i = 0; i < d; i++) dot += (double)wf[i] * dyr[i] * xr[i];
    const float rs = rstd[r];
    const float coef = (float)(dot / d) * rs * rs;
    if (dw)
      for (int i = 0; i < d; i++) dwsum[i] += (double)(dyr[i] * xr[i] * rs);
    for (int i = 0; i < d; i++) xft_cpu::store(dx, dtype, (size_t)r * d + i, rs * (wf[i] * dyr[i] - xr[i] * coef));
  }
  if (dw)
    for (int i = 0; i < d; i++) dw[i] = accumulate ? dw[i] + (float)dwsum[i] : (float)dwsum[i];
  return 0;
}
