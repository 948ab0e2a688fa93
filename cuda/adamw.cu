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

Multi-tensor (xft_cuda_adamw_multi): every parameter of a run in one launch. A device table of
tensors (cuda/optim.h) with each tensor's first block; a block finds its tensor by binary search and
updates kAdamChunk elements of it. The stochastic-rounding stream is derived on the device from
(seed, step, tensor index), so the table does not change from step to step: it is uploaded once and
kept (cuda/xft_table.cuh). With a control block (cuda/step.h) the gradient scale is
multiplied by its factor and a set skip flag leaves every tensor untouched (a non-finite step).
*/
#include <cuda_runtime.h>
#include <math.h>

#include "xft_cuda.h"
#include "xft_math.h"
#include "optim.h"
#include "step.h"
#include "xft_table.cuh"

#include <string.h>
#include <vector>

extern "C" cudaStream_t xft_cuda_stream(void);

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

namespace {

const int kAdamThreads = 256;
const int64_t kAdamChunk = kAdamThreads * 8;  // elements per block of the multi-tensor launch

// CUDA kernels

__global__ void adamw_kernel(void* p, int p_dtype, const void* g, int g_dtype, float* m, float* v, size_t n, float lr,
                             float beta1, float beta2, float eps, float weight_decay, float bc1, float bc2,
                             float grad_scale, void* p_copy, int copy_dtype, int stochastic, uint64_t sr_stream) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float gs = xft_load_value(g, g_dtype, i) * grad_scale;
    xft_adamw_element(p, p_dtype, m, v, i, gs, lr, beta1, beta2, eps, weight_decay, bc1, bc2, p_copy, copy_dtype, stochastic,
                      sr_stream);
  }
}

struct AdamTable {
  const xft_adamw_tensor* t;  // [count]
  const int64_t* first;       // first block of each tensor
  int count;
};

__global__ void __launch_bounds__(kAdamThreads) adamw_multi_kernel(AdamTable table, xft_adamw_options options) {
  if (xft_control_skip(options.control)) return;  // a non-finite step: nothing is written
  const xft_adamw_options o = xft_adamw_resolve(options);
  const float grad_scale = xft_control_scale(o.control, o.grad_scale);
  int lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.first[mid] <= (int64_t)blockIdx.x) lo = mid;
    else hi = mid - 1;
  }
  const xft_adamw_tensor t = table.t[lo];
  const uint64_t sr_stream = xft_sr_stream(o.seed, (uint64_t)o.step, (uint64_t)t.index);
  const int64_t begin = ((int64_t)blockIdx.x - table.first[lo]) * kAdamChunk;
  const int64_t end = begin + kAdamChunk < t.n ? begin + kAdamChunk : t.n;
  for (int64_t i = begin + threadIdx.x; i < end; i += kAdamThreads) {
    const float gs = xft_load_value(t.g, t.g_dtype, (size_t)i) * grad_scale;
    xft_adamw_element(t.p, t.p_dtype, t.m, t.v, (size_t)i, gs, o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.bc1, o.bc2,
                      t.p_copy, t.copy_dtype, o.stochastic, sr_stream);
  }
}

std::vector<DeviceTable> g_tables;  // the multi-tensor tables on the device (cuda/xft_table.cuh)

}  // namespace

// kernel launchers

extern "C" int xft_cuda_adamw(void* p, int p_dtype, const void* g, int g_dtype, float* m, float* v, size_t n, float lr,
                              float beta1, float beta2, float eps, float weight_decay, int step, float grad_scale,
                              void* p_copy, int copy_dtype, int stochastic, uint64_t sr_stream) {
  if (n == 0) return 0;
  const float bc1 = xft_adamw_bias_correction(beta1, step), bc2 = xft_adamw_bias_correction(beta2, step);
  size_t blocks = CEIL_DIV(n, (size_t)kAdamThreads);
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  adamw_kernel<<<(unsigned)blocks, kAdamThreads, 0, xft_cuda_stream()>>>(p, p_dtype, g, g_dtype, m, v, n, lr, beta1, beta2,
                                                                          eps, weight_decay, bc1, bc2, grad_scale, p_copy,
                                                                          copy_dtype, stochastic, sr_stream);
  return cudaGetLastError();
}

extern "C" int xft_cuda_adamw_multi(const xft_adamw_tensor* tensors, int count, const xft_adamw_options* o) {
  std::vector<xft_adamw_tensor> live;
  std::vector<int64_t> first;
  int64_t blocks = 0;
  for (int k = 0; k < count; k++) {
    if (tensors[k].n == 0) continue;
    live.push_back(tensors[k]);
    first.push_back(blocks);
    blocks += CEIL_DIV(tensors[k].n, kAdamChunk);
  }
  if (live.empty()) return 0;
  if (blocks > 2147483647) return cudaErrorInvalidValue;
  const size_t tbytes = live.size() * sizeof(xft_adamw_tensor), fbytes = first.size() * sizeof(int64_t);
  std::vector<unsigned char> host(tbytes + fbytes);
  memcpy(host.data(), live.data(), tbytes);
  memcpy(host.data() + tbytes, first.data(), fbytes);
  int err = 0;
  const unsigned char* dev = (const unsigned char*)xft_device_table(g_tables, host.data(), host.size(), &err);
  if (!dev) return err;
  AdamTable table;
  table.t = (const xft_adamw_tensor*)dev;
  table.first = (const int64_t*)(dev + tbytes);
  table.count = (int)live.size();
  adamw_multi_kernel<<<(unsigned)blocks, kAdamThreads, 0, xft_cuda_stream()>>>(table, *o);
  return cudaGetLastError();
}
