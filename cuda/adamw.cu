/*
AdamW (decoupled weight decay, Loshchilov & Hutter), as torch.optim.AdamW, fp32 math in registers.
m, v f32 [n], updated in place; p f32 (a master copy, or the weights of an f32 run) or bf16 (the
weights themselves, no master: written back rounded to nearest even, or stochastically, see
cuda/optim.h); g f32 or bf16. One thread per element (grid-stride):
  gs = g * grad_scale                      (clipping factor and/or 1/accumulation steps)
  m = beta1 m + (1 - beta1) gs,   v = beta2 v + (1 - beta2) gs^2
  mhat = m / (1 - beta1^t),       vhat = v / (1 - beta2^t)          (step t >= 1)
  p = p - lr (mhat / (sqrt(vhat) + eps) + weight_decay p)
p_copy (NULL: none) receives the updated p as f32 or bf16 (round to nearest even): the compute copy
of the weights that the forward pass reads. The bias corrections are computed once on the host.
*/
#include <cuda_runtime.h>
#include <math.h>

#include "xft_cuda.h"
#include "xft_math.h"
#include "optim.h"

extern "C" cudaStream_t xft_cuda_stream(void);

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

namespace {

const int kAdamThreads = 256;

// CUDA kernels

__global__ void adamw_kernel(void* p, int p_dtype, const void* g, int g_dtype, float* m, float* v, size_t n, float lr,
                             float beta1, float beta2, float eps, float weight_decay, float bc1, float bc2,
                             float grad_scale, void* p_copy, int copy_dtype, int stochastic, uint64_t sr_stream) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float gs = xft_load_value(g, g_dtype, i) * grad_scale;
    float mi = beta1 * m[i] + (1.f - beta1) * gs;
    float vi = beta2 * v[i] + (1.f - beta2) * gs * gs;
    m[i] = mi;
    v[i] = vi;
    float pi = xft_load_value(p, p_dtype, i);
    pi -= lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + weight_decay * pi);
    xft_store_param(p, p_dtype, i, pi, stochastic, sr_stream);
    if (p_copy) xft_store_value(p_copy, copy_dtype, i, pi);
  }
}

}  // namespace

// kernel launchers

extern "C" int xft_cuda_adamw(void* p, int p_dtype, const void* g, int g_dtype, float* m, float* v, size_t n, float lr,
                              float beta1, float beta2, float eps, float weight_decay, int step, float grad_scale,
                              void* p_copy, int copy_dtype, int stochastic, uint64_t sr_stream) {
  if (n == 0) return 0;
  const float bc1 = (float)(1.0 - pow((double)beta1, (double)step));
  const float bc2 = (float)(1.0 - pow((double)beta2, (double)step));
  size_t blocks = CEIL_DIV(n, (size_t)kAdamThreads);
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  adamw_kernel<<<(unsigned)blocks, kAdamThreads, 0, xft_cuda_stream()>>>(p, p_dtype, g, g_dtype, m, v, n, lr, beta1, beta2,
                                                                          eps, weight_decay, bc1, bc2, grad_scale, p_copy,
                                                                          copy_dtype, stochastic, sr_stream);
  return cudaGetLastError();
}
