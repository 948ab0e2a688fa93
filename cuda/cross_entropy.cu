/*
Softmax cross-entropy over the vocabulary, with a loss mask, and its fused backward (llm.c style).

logits z [R, V] (f32 or bf16), targets i32 [R]; a target outside [0, V) (negative: not a response
token) ignores the row. fp32 math. In PyTorch terms:
  losses[r] = logsumexp(z[r]) - z[r, targets[r]]        (0 where ignored), f32 [R]
  predictions[r] = argmax(z[r])                         (lowest index on ties; every row), i32 [R]
Backward, dloss f32 [R] = dL/dlosses, dlogits [R, V] in the logits dtype (overwrite):
  dlogits[r] = (softmax(z[r]) - onehot(targets[r])) * dloss[r]   (zero rows where ignored)
dlogits may alias logits: every element is read and then written by the same thread.

Layout: one block per row. Each thread keeps an online (max, sum of exp) pair and an argmax over
its strided columns; a block reduction in a fixed order combines them (deterministic).
*/
#include <cuda_runtime.h>

#include "xft_cuda.h"
#include "xft_math.h"

extern "C" cudaStream_t xft_cuda_stream(void);

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

namespace {

const int kCrossEntropyThreads = 512;  // one row per block; V is typically 32k

// CUDA kernels

__device__ __forceinline__ float load_logit(const void* p, int dtype, size_t i) {
  return dtype == XFT_BF16 ? xft_bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

// online softmax statistics: m = max, s = sum exp(z - m)
struct MaxSum {
  float m, s;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ void push(MaxSum& a, float z) {
  if (z > a.m) {
    a.s = a.s * expf(a.m - z) + 1.f;
    a.m = z;
  } else if (a.m != -INFINITY) {
    a.s += expf(z - a.m);
  }
}

// (value, index) argmax: larger value wins, then the lower index
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

// Reduces (stats, argmax) over the block; every thread gets the result.
__device__ void block_reduce(MaxSum& st, float& bv, int& bi, bool with_argmax) {
  __shared__ float sm[32], ss[32], sv[32];
  __shared__ int si[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum other = {__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s, o)};
    st = combine(st, other);
    if (with_argmax) {
      float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (better(ov, oi, bv, bi)) bv = ov, bi = oi;
    }
  }
  if (lane == 0) sm[warp] = st.m, ss[warp] = st.s, sv[warp] = bv, si[warp] = bi;
  __syncthreads();
  if (warp == 0) {
    st = lane < warps ? MaxSum{sm[lane], ss[lane]} : MaxSum{-INFINITY, 0.f};
    bv = lane < warps ? sv[lane] : -INFINITY;
    bi = lane < warps ? si[lane] : INT32_MAX;
    for (int o = 16; o > 0; o >>= 1) {
      MaxSum other = {__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s, o)};
      st = combine(st, other);
      float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (better(ov, oi, bv, bi)) bv = ov, bi = oi;
    }
    if (lane == 0) sm[0] = st.m, ss[0] = st.s, sv[0] = bv, si[0] = bi;
  }
  __syncthreads();
  st = {sm[0], ss[0]};
  bv = sv[0];
  bi = si[0];
}

__global__ void __launch_bounds__(kCrossEntropyThreads)
cross_entropy_forward_kernel(const void* logits, int dtype, const int* targets, int V, float* losses, int* predictions) {
  const int r = blockIdx.x;
  const size_t base = (size_t)r * V;
  MaxSum st = {-INFINITY, 0.f};
  float bv = -INFINITY;
  int bi = INT32_MAX;
  for (int j = threadIdx.x; j < V; j += blockDim.x) {
    float z = load_logit(logits, dtype, base + j);
    push(st, z);
    if (better(z, j, bv, bi)) bv = z, bi = j;
  }
  block_reduce(st, bv, bi, true);
  if (threadIdx.x == 0) {
    const int target = targets[r];
    predictions[r] = bi == INT32_MAX ? 0 : bi;
    losses[r] = target < 0 || target >= V ? 0.f : logf(st.s) + st.m - load_logit(logits, dtype, base + target);
  }
}

__global__ void __launch_bounds__(kCrossEntropyThreads)
cross_entropy_backward_kernel(const void* logits, int dtype, const int* targets, const float* dloss, int V, void* dlogits) {
  const int r = blockIdx.x;
  const size_t base = (size_t)r * V;
  const int target = targets[r];
  if (target < 0 || target >= V) {  // block-uniform
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
      if (dtype == XFT_BF16) ((uint16_t*)dlogits)[base + j] = 0;
      else ((float*)dlogits)[base + j] = 0.f;
    }
    return;
  }
  MaxSum st = {-INFINITY, 0.f};
  for (int j = threadIdx.x; j < V; j += blockDim.x) push(st, load_logit(logits, dtype, base + j));
  float bv = -INFINITY;
  int bi = INT32_MAX;
  block_reduce(st, bv, bi, false);
  const float inv = 1.0f / st.s, dl = dloss[r];
  for (int j = threadIdx.x; j < V; j += blockDim.x) {
    float p = expf(load_logit(logits, dtype, base + j) - st.m) * inv;
    float d = (p - (j == target ? 1.f : 0.f)) * dl;
    if (dtype == XFT_BF16) ((uint16_t*)dlogits)[base + j] = xft_f32_to_bf16(d);
    else ((float*)dlogits)[base + j] = d;
  }
}

}  // namespace

// kernel launchers

static int ce_block(int V) {
  int b = CEIL_DIV(V, 32) * 32;
  return b < kCrossEntropyThreads ? b : kCrossEntropyThreads;
}

extern "C" int xft_cuda_cross_entropy_forward(const void* logits, int dtype, const int* targets, int R, int V,
                                              float* losses, int* predictions) {
  if (R <= 0) return 0;
  cross_entropy_forward_kernel<<<R, ce_block(V), 0, xft_cuda_stream()>>>(logits, dtype, targets, V, losses, predictions);
  return cudaGetLastError();
}

extern "C" int xft_cuda_cross_entropy_backward(const void* logits, int dtype, const int* targets, const float* dloss,
                                               int R, int V, void* dlogits) {
  if (R <= 0) return 0;
  cross_entropy_backward_kernel<<<R, ce_block(V), 0, xft_cuda_stream()>>>(logits, dtype, targets, dloss, V, dlogits);
  return cudaGetLastError();
}
