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
The element update is xft_adamw_element (cuda/optim.h), the kernels' own.
*/
#include <math.h>

#include "xft_cpu.h"
#include "../../cuda/optim.h"
#include "../../cuda/step.h"

int xft_cpu_adamw(void* p, int p_dtype, const void* g, int g_dtype, float* m, float* v, size_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int step, float grad_scale, void* p_copy, int copy_dtype,
                  int stochastic, uint64_t sr_stream) {
  // bias corrections in double on the host, as the CUDA launcher computes them
  const float bc1 = xft_adamw_bias_correction(beta1, step), bc2 = xft_adamw_bias_correction(beta2, step);
  xft_cpu::parallel_for(n, 12.0 * (double)n, [&](size_t a, size_t b) {
    for (size_t i = a; i < b; i++) {
      const float gs = xft_load_value(g, g_dtype, i) * grad_scale;
      xft_adamw_element(p, p_dtype, m, v, i, gs, lr, beta1, beta2, eps, weight_decay, bc1, bc2, p_copy, copy_dtype, stochastic,
                        sr_stream);
    }
  });
  return 0;
}

// the multi-tensor step (cuda/adamw.cu xft_cuda_adamw_multi): each tensor as xft_cpu_adamw, the
// stochastic-rounding stream from (seed, step, index); a set skip flag in the control block writes nothing
int xft_cpu_adamw_multi(const xft_adamw_tensor* tensors, int count, const xft_adamw_options* o) {
  if (xft_control_skip(o->control)) return 0;
  const float grad_scale = xft_control_scale(o->control, o->grad_scale);
  for (int k = 0; k < count; k++) {
    const xft_adamw_tensor& t = tensors[k];
    const uint64_t sr_stream = xft_sr_stream(o->seed, (uint64_t)o->step, (uint64_t)t.index);
    xft_cpu::parallel_for((size_t)t.n, 12.0 * (double)t.n, [&](size_t a, size_t b) {
      for (size_t i = a; i < b; i++) {
        const float gs = xft_load_value(t.g, t.g_dtype, i) * grad_scale;
        xft_adamw_element(t.p, t.p_dtype, t.m, t.v, i, gs, o->lr, o->beta1, o->beta2, o->eps, o->weight_decay, o->bc1, o->bc2,
                          t.p_copy, t.copy_dtype, o->stochastic, sr_stream);
      }
    });
  }
  return 0;
}
