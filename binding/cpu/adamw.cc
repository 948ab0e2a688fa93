/*
CPU twin of cuda/adamw.cu: the AdamW update (decoupled weight decay, Loshchilov & Hutter),
as torch.optim.AdamW, on fp32 master parameters. All buffers f32 [n], updated in place:
  gs = g * grad_scale                      (clipping factor and/or 1/accumulation steps)
  m = beta1 m + (1 - beta1) gs,   v = beta2 v + (1 - beta2) gs^2
  mhat = m / (1 - beta1^t),       vhat = v / (1 - beta2^t)          (step t >= 1)
  p = p - lr (mhat / (sqrt(vhat) + eps) + weight_decay p)
p_copy (NULL: none) receives the updated p as f32 or bf16: the compute copy of the weights.
*/
#include <math.h>

#include "xft_cpu.h"

int xft_cpu_adamw(float* p, const float* g, float* m, float* v, size_t n, float lr, float beta1, float beta2,
                  float eps, float weight_decay, int step, float grad_scale, void* p_copy, int copy_dtype) {
  // bias corrections in double on the host, as the CUDA launcher computes them
  const float bc1 = (float)(1.0 - pow((double)beta1, (double)step));
  const float bc2 = (float)(1.0 - pow((double)beta2, (double)step));
  for (size_t i = 0; i < n; i++) {
    float gs = g[i] * grad_scale;
    float mi = beta1 * m[i] + (1.f - beta1) * gs;
    float vi = beta2 * v[i] + (1.f - beta2) * gs * gs;
    m[i] = mi;
    v[i] = vi;
    float pi = p[i];
    pi -= lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + weight_decay * pi);
    p[i] = pi;
    if (p_copy) xft_cpu::store(p_copy, copy_dtype, i, pi);
  }
  return 0;
}
