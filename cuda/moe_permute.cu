/*
The gather/scatter around the grouped expert GEMMs (MegaBlocks / ScatterMoE style), and the
balance loss of the router.

order i32 [T*K] (from routing): pairs t*K + s sorted by expert, so row i of the grouped GEMM input
is token order[i] / K in its slot order[i] % K. position i32 [T*K] is its inverse.
x, dx, out, dout [T, d]; xp, dxp, y, dy [T*K, d]; one dtype (f32 or bf16), fp32 math; g, dg f32 [T, K].
  invert_permutation:  position[order[i]] = i
  permute forward:     xp[i] = x[order[i] / K]                       (the gather; an exact copy)
  permute backward:    dx[t] = sum_s dxp[position[t*K + s]]           (slot order: deterministic)
  unpermute forward:   out[t] = sum_s g[t, s] y[position[t*K + s]]    (the weighted combine)
  unpermute backward:  dy[position[t*K + s]] = g[t, s] dout[t],  dg[t, s] = <dout[t], y[position[t*K + s]]>
Backward passes gather instead of scattering, so no float atomics are needed: unpermute backward
first inverts position (q = inverse, in scratch) and writes dy[i] = g[q[i]] dout[q[i] / K].
Any index values are memory safe and give fully defined outputs (the CPU twin is the same):
- indices outside [0, T*K) read as zero rows and are never written through;
- invert_permutation: position[j] = -1 where no i has order[i] = j, and the largest such i where
  several do (one integer atomicMax per element: deterministic);
- unpermute backward: dy rows no valid position maps to are zero; a row several pairs map to
  takes the pair with the largest index t*K + s (the last one, as the twin's loop).
Layout: one block per output row (permute forward, dy rows) or per token (the others); threads
stride over the d columns; dg is a fixed-order block reduction per slot.

Balance loss (XFT.md): loss = weight (cv2(importance) + cv2(load)), cv2(x) = var(x) / (mean(x)^2 + 1e-10),
var unbiased (N - 1, as torch.var), cv2 = 0 when N == 1. With mu = mean, S = var, D = mu^2 + 1e-10:
  dcv2/dx_i = 2 (x_i - mu) / ((N - 1) D) - 2 S mu / (N D^2)
One block of threads (N is the number of experts), two-pass moments.
*/
#include <cuda_runtime.h>

#include "xft_cuda.h"
#include "xft_math.h"

extern "C" cudaStream_t xft_cuda_stream(void);

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

namespace {

const int kRowThreads = 256;      // threads per row of d columns
const int kBalanceThreads = 256;  // the balance loss block

// CUDA kernels

__device__ __forceinline__ float load_value(const void* p, int dtype, size_t i) {
  return dtype == XFT_BF16 ? xft_bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

__device__ __forceinline__ void store_value(void* p, int dtype, size_t i, float v) {
  if (dtype == XFT_BF16) ((uint16_t*)p)[i] = xft_f32_to_bf16(v);
  else ((float*)p)[i] = v;
}

// sum over the block in a fixed order; every thread gets the result (blockDim.x a multiple of 32)
__device__ float block_sum(float x) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  __syncthreads();  // partial[] may still be read from a previous call
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  x = lane < warps ? partial[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// position filled with -1 first; duplicates keep the largest i
__global__ void invert_permutation_kernel(const int* order, int* position, int n) {
  // size_t: i + the grid's stride must not wrap for n near 2^31
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
    int o = order[i];
    if (o >= 0 && o < n) atomicMax(position + o, (int)i);
  }
}

// xp[i] = x[order[i] / K], copied in units of Unit (16, 4 or 2 bytes): units_per_row units a row
template <typename Unit>
__global__ void permute_forward_kernel(const Unit* x, const int* order, Unit* xp, int n, int K, int units_per_row) {
  const int i = blockIdx.x;
  const int o = order[i];
  Unit* dst = xp + (size_t)i * units_per_row;
  if (o < 0 || o >= n) {
    Unit zero;
    memset(&zero, 0, sizeof(Unit));
    for (int c = threadIdx.x; c < units_per_row; c += blockDim.x) dst[c] = zero;
    return;
  }
  const Unit* src = x + (size_t)(o / K) * units_per_row;
  for (int c = threadIdx.x; c < units_per_row; c += blockDim.x) dst[c] = src[c];
}

// dx[t] = sum_s dxp[position[t*K + s]]  (g == NULL), or out[t] = sum_s g[t, s] y[position[t*K + s]]
__global__ void combine_kernel(const void* rows, const int* position, const float* g, void* out, int dtype, int n,
                               int K, int d) {
  const int t = blockIdx.x;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < K; s++) {
      const int p = position[(size_t)t * K + s];
      if (p < 0 || p >= n) continue;
      const float v = load_value(rows, dtype, (size_t)p * d + c);
      acc += g ? g[(size_t)t * K + s] * v : v;
    }
    store_value(out, dtype, (size_t)t * d + c, acc);
  }
}

// dg[t, s] = <dout[t], y[position[t*K + s]]>, one block per token
__global__ void unpermute_dg_kernel(const void* dout, const void* y, const int* position, float* dg, int dtype, int n,
                                    int K, int d) {
  const int t = blockIdx.x;
  for (int s = 0; s < K; s++) {
    const int p = position[(size_t)t * K + s];  // block-uniform
    const bool valid = p >= 0 && p < n;
    float acc = 0.f;
    if (valid)
      for (int c = threadIdx.x; c < d; c += blockDim.x)
        acc += load_value(dout, dtype, (size_t)t * d + c) * load_value(y, dtype, (size_t)p * d + c);
    acc = block_sum(acc);
    if (threadIdx.x == 0) dg[(size_t)t * K + s] = acc;
  }
}

// dy[i] = g[q] dout[q / K] with q = inverse[i] the pair mapped to row i, zero when none; one block per row
__global__ void unpermute_dy_kernel(const void* dout, const int* inverse, const float* g, void* dy, int dtype, int K,
                                    int d) {
  const int i = blockIdx.x;
  const int q = inverse[i];  // block-uniform; -1 or a valid pair (inverse was built from in-range entries)
  const float w = q >= 0 ? g[q] : 0.f;
  for (int c = threadIdx.x; c < d; c += blockDim.x)
    store_value(dy, dtype, (size_t)i * d + c, q >= 0 ? w * load_value(dout, dtype, (size_t)(q / K) * d + c) : 0.f);
}

struct Moments {
  float mean, var, denom;  // mean, unbiased variance, mean^2 + 1e-10
};

__device__ Moments block_moments(const float* x, int N) {
  float s = 0.f;
  for (int i = threadIdx.x; i < N; i += blockDim.x) s += x[i];
  const float mean = block_sum(s) / (float)N;
  float ss = 0.f;
  for (int i = threadIdx.x; i < N; i += blockDim.x) ss += (x[i] - mean) * (x[i] - mean);
  ss = block_sum(ss);
  return {mean, N > 1 ? ss / (float)(N - 1) : 0.f, mean * mean + 1e-10f};
}

__global__ void balance_loss_forward_kernel(const float* importance, const float* load, int N, float weight, float* loss) {
  Moments a = block_moments(importance, N);
  Moments b = block_moments(load, N);
  if (threadIdx.x == 0) loss[0] = weight * (a.var / a.denom + b.var / b.denom);
}

__device__ void cv2_backward(const float* x, int N, float scale, float* dx) {
  Moments m = block_moments(x, N);  // every thread takes part (block_sum has barriers)
  if (N < 2) {
    for (int i = threadIdx.x; i < N; i += blockDim.x) dx[i] = 0.f;
    return;
  }
  const float a = 2.f / ((float)(N - 1) * m.denom), b = 2.f * m.var * m.mean / ((float)N * m.denom * m.denom);
  for (int i = threadIdx.x; i < N; i += blockDim.x) dx[i] = scale * (a * (x[i] - m.mean) - b);
}

__global__ void balance_loss_backward_kernel(const float* importance, const float* load, int N, float weight, float dloss,
                                             float* dimportance, float* dload) {
  cv2_backward(importance, N, weight * dloss, dimportance);
  cv2_backward(load, N, weight * dloss, dload);
}

bool aligned(const void* p, size_t a) { return ((uintptr_t)p % a) == 0; }

int row_block(int d) {
  int b = CEIL_DIV(d, 32) * 32;
  return b < kRowThreads ? b : kRowThreads;
}

}  // namespace

// kernel launchers

extern "C" int xft_cuda_invert_permutation(const int* order, int* position, int n) {
  if (n <= 0) return 0;
  cudaError_t err = cudaMemsetAsync(position, 0xFF, (size_t)n * sizeof(int), xft_cuda_stream());  // -1: unmapped
  if (err != cudaSuccess) return err;
  const int block = 256;
  int blocks = CEIL_DIV(n, block);
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  invert_permutation_kernel<<<blocks, block, 0, xft_cuda_stream()>>>(order, position, n);
  return cudaGetLastError();
}

extern "C" int xft_cuda_permute_forward(const void* x, const int* order, void* xp, int dtype, int T, int K, int d) {
  const int n = T * K;
  if (n <= 0) return 0;
  const size_t row_bytes = (size_t)d * (dtype == XFT_BF16 ? 2 : 4);
  cudaStream_t stream = xft_cuda_stream();
  if (row_bytes % 16 == 0 && aligned(x, 16) && aligned(xp, 16)) {
    int units = (int)(row_bytes / 16);
    permute_forward_kernel<uint4><<<n, row_block(units), 0, stream>>>((const uint4*)x, order, (uint4*)xp, n, K, units);
  } else if (row_bytes % 4 == 0) {
    int units = (int)(row_bytes / 4);
    permute_forward_kernel<uint32_t><<<n, row_block(units), 0, stream>>>((const uint32_t*)x, order, (uint32_t*)xp, n, K, units);
  } else {
    int units = (int)(row_bytes / 2);
    permute_forward_kernel<uint16_t><<<n, row_block(units), 0, stream>>>((const uint16_t*)x, order, (uint16_t*)xp, n, K, units);
  }
  return cudaGetLastError();
}

extern "C" int xft_cuda_permute_backward(const void* dxp, const int* position, void* dx, int dtype, int T, int K, int d) {
  if (T <= 0) return 0;
  combine_kernel<<<T, row_block(d), 0, xft_cuda_stream()>>>(dxp, position, nullptr, dx, dtype, T * K, K, d);
  return cudaGetLastError();
}

extern "C" int xft_cuda_unpermute_forward(const void* y, const int* position, const float* g, void* out, int dtype,
                                          int T, int K, int d) {
  if (T <= 0) return 0;
  combine_kernel<<<T, row_block(d), 0, xft_cuda_stream()>>>(y, position, g, out, dtype, T * K, K, d);
  return cudaGetLastError();
}

extern "C" int xft_cuda_unpermute_backward(const void* dout, const void* y, const int* position, const float* g,
                                           void* dy, float* dg, int dtype, int T, int K, int d) {
  if (T <= 0) return 0;
  const int n = T * K;
  cudaStream_t stream = xft_cuda_stream();
  int* inverse = nullptr;
  cudaError_t err = cudaMallocAsync((void**)&inverse, (size_t)n * sizeof(int), stream);
  if (err != cudaSuccess) return err;
  err = (cudaError_t)xft_cuda_invert_permutation(position, inverse, n);
  if (err == cudaSuccess) {
    unpermute_dg_kernel<<<T, row_block(d), 0, stream>>>(dout, y, position, dg, dtype, n, K, d);
    unpermute_dy_kernel<<<n, row_block(d), 0, stream>>>(dout, inverse, g, dy, dtype, K, d);
    err = cudaGetLastError();
  }
  cudaError_t ferr = cudaFreeAsync(inverse, stream);
  return err != cudaSuccess ? err : ferr;
}

extern "C" int xft_cuda_balance_loss_forward(const float* importance, const float* load, int N, float weight, float* loss) {
  if (N <= 0) return 0;
  balance_loss_forward_kernel<<<1, kBalanceThreads, 0, xft_cuda_stream()>>>(importance, load, N, weight, loss);
  return cudaGetLastError();
}

extern "C" int xft_cuda_balance_loss_backward(const float* importance, const float* load, int N, float weight, float dloss,
                                              float* dimportance, float* dload) {
  if (N <= 0) return 0;
  balance_loss_backward_kernel<<<1, kBalanceThreads, 0, xft_cuda_stream()>>>(importance, load, N, weight, dloss,
                                                                             dimportance, dload);
  return cudaGetLastError();
}
