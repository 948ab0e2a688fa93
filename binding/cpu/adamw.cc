/*
CPU twin of cuda/adamw.cu: the AdamW update (decoupled weight decay, Loshchilov & Hutter),
as torch.optim.AdamW, fp32 math. m, v f32 [n], updated in place; p f32 (a master copy, or the
weights of an f32 run) or bf16 (the weights themselves, no master: written back rounded to nearest
even, or stochastically from sr_stream, see cuda/optim.h); g f32 or bf16:
  gs = g * grad_scale                      (clipping factor and/or 1/accumulation steps)
  m = beta1 m + (1 - beta1) gs,   v = beta2 v + (1 - beta2) gs^2
  mhat = m / (1 - beta1^t),       vhat = v / (1 - beta2^t)          (step t >= 1)
  p = p - lr (mhat / (sqrt(vhat) + eps) + weight_decay p)
p_copy (NULL: none) receives the updated p as f32 or bf16 (nearest even): the compute copy.
*/
#include <math.h>

#include "xft_cpu.h"
#include "../../cuda/optim.h"

int xft_cpu_adamw(void* p, int p_dtype, const void* g, int g_dtype, float* m, float* v, size_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int step, float grad_scale, void* p_copy, int copy_dtype,
                  int stochastic, uint64_t sr_stream) {
  // bias corrections in double on the host, as the CUDA launcher computes them
  const float bc1 = (float)(1.0 - pow((double)beta1, (double)step));
  const float bc2 = (float)(1.0 - pow((double)beta2, (double)step));
  xft_cpu::parallel_for(n, 12.0 * (double)n, [&](size_t a, size_t b) {
    for (size_t i = a; i < b; i++) {
      float gs = xft_load_value(g, g_dtype, i) * grad_scale;
      float mi = beta1 * m[i] + (1.f - beta1) * gs;
      float vi = beta2 * v[i] + (1.f - beta2) * gs * gs;
      m[i] = mi;
      v[i] = vi;
      float pi = xft_load_value(p, p_dtype, i);
      pi -= lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + weight_decay * pi);
      xft_store_param(p, p_dtype, i, pi, stochastic, sr_stream);
      if (p_copy) xft_cpu::store(p_copy, copy_dtype, i, pi);
    }
  });
  return 0;
}
