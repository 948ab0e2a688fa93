/*
UpIT's routing-vector loss (UPIT.md 3b) on one layer's probe logits, fused with its gradient.

h [N] (f32 or bf16) = x r^T, the router linear (router_linear.cu) of the layer's FFN input x [N, d] with
the routing vector r [1, d]; targets i32 [N]: token t counts where targets[t] >= 0 (response tokens).
In PyTorch terms, with m = (targets >= 0).float():
  stats[0] += (m * F.softplus(-h)).sum()     the binary cross-entropy of sigmoid(h) against label 1
  stats[1] += (m * torch.sigmoid(h)).sum()
  stats[2] += m.sum()
  dh = m * -torch.sigmoid(-h) * scale        d(scale * stats[0]) / dh; overwrite, h's dtype; NULL: skipped
stats f32 [3] on the device accumulates (+=): across the layers and micro-batches of a step, read once.
dr = dh^T x follows from router_linear_backward (stop-gradient into x: no dx).
softplus(z) = max(z, 0) + log1p(exp(-|z|)) and sigmoid(z) = 1 / (1 + exp(-z)), both stable for any z.

Layout: one block of kThreads; thread i takes tokens i, i + kThreads, ... and keeps fp64 partials;
block_sum (xft_reduce.cuh) combines them in a fixed order: the same bits on every run.
*/
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "xft_cuda.h"
#include "xft_math.h"
#include "xft_reduce.cuh"

extern "C" cudaStream_t xft_cuda_stream(void);

namespace {

const int kThreads = 512;

// CUDA kernels

__device__ __forceinline__ float probe_softplus(float z) { return fmaxf(z, 0.f) + log1pf(expf(-fabsf(z))); }
__device__ __forceinline__ float probe_sigmoid(float z) { return 1.f / (1.f + expf(-z)); }

__global__ void routing_probe_kernel(const void* h, int dtype, const int* targets, int N, float scale, float* stats,
                                     void* dh) {
  double loss = 0.0, sig = 0.0, count = 0.0;
  for (int t = threadIdx.x; t < N; t += blockDim.x) {
    const float z = dtype == XFT_BF16 ? xft_bf16_to_f32(((const uint16_t*)h)[t]) : ((const float*)h)[t];
    const bool counted = targets[t] >= 0;
    float g = 0.f;
    if (counted) {
      loss += (double)probe_softplus(-z);
      sig += (double)probe_sigmoid(z);
      count += 1.0;
      g = -probe_sigmoid(-z) * scale;
    }
    if (dh) {
      if (dtype == XFT_BF16) ((uint16_t*)dh)[t] = xft_f32_to_bf16(g);
      else ((float*)dh)[t] = g;
    }
  }
  loss = block_sum(loss);
  __syncthreads();  // block_sum's shared partials are reused by the next reduction
  sig = block_sum(sig);
  __syncthreads();
  count = block_sum(count);
  if (threadIdx.x == 0) {
    stats[0] += (float)loss;
    stats[1] += (float)sig;
    stats[2] += (float)count;
  }
}

}  // namespace

// kernel launchers

extern "C" int xft_cuda_routing_probe(const void* h, const int* targets, void* dh, float* stats, int dtype, int N,
                                      float scale) {
  if (N < 0) return cudaErrorInvalidValue;
  cudaStream_t stream = xft_cuda_stream();
  routing_probe_kernel<<<1, kThreads, 0, stream>>>(h, dtype, targets, N, scale, stats, dh);
  return cudaGetLastError();
}
