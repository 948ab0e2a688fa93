/*
RMSNorm of Llama (HF LlamaRMSNorm), fp32 arithmetic on f32 or bf16 values.
  forward:  rstd[r] = 1 / sqrt(mean_i x[r,i]^2 + eps),   y[r,i] = x[r,i] * rstd[r] * w[i]
            x, y [R, d] (dtype), w [d] (w_dtype, f32 or bf16), rstd f32 [R] (saved for the backward)
  backward: with a = mean_i(w[i] dy[r,i] x[r,i]),
            dx[r,i] = rstd[r] * (w[i] dy[r,i] - x[r,i] rstd[r]^2 a)        (overwrite; may alias dy)
            dw[i] (+)= sum_r dy[r,i] x[r,i] rstd[r]                         (accumulate flag; optional)
            Deterministic: each block owns a fixed range of rows (a function of R only) and writes its
            dw partial sums to scratch [blocks, d]; a second kernel adds the partials in block order.
Kernels: forward, one warp per row, 16-byte vectors, the row re-read from L1 for the output.
Backward, one block per row range; a thread keeps its kCols columns of w, x, dy and of the dw
partial in registers, so each row is read once (hence d <= 512 * kCols = 8192).
*/
#include <cuda_runtime.h>
#include <stdint.h>

#include "xft_cuda.h"
#include "xft_math.h"
#include "xft_vec.cuh"

extern "C" cudaStream_t xft_cuda_stream(void);


namespace {

const int kCols = 16;                       // columns per thread in the backward
const int kBackwardThreads = 512;           // at most, so that 128 registers hold a thread's columns
const int kMaxD = kBackwardThreads * kCols; // 8192, mirrored in binding/layer_ops.cc and lib/ops_layers.ts
const int kBackwardBlocks = 1024; // row ranges of the backward (at least kMinRowsPerBlock rows each)
const int kMinRowsPerBlock = 8;
const int kForwardWarps = 8;      // rows per forward block


__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// the sum of v over the block, in every thread (fixed order; red: 32 floats of shared memory)
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // red may still be read by the previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? red[lane] : 0.f);
}

// CUDA kernels

template <typename T, typename TW, int W>
__global__ void rmsnorm_forward_kernel(const T* x, const TW* __restrict__ w, T* y, float* __restrict__ rstd, int R,
                                       int d, float eps) {
  const int lane = threadIdx.x % 32;
  const int r = blockIdx.x * kForwardWarps + threadIdx.x / 32;
  if (r >= R) return;
  const T* xr = x + (size_t)r * d;
  float ss = 0.f;
  for (int c = lane * W; c < d; c += 32 * W) {
    float f[W];
    load_f32<T, W>(xr + c, f);
#pragma unroll
    for (int k = 0; k < W; k++) ss += f[k] * f[k];
  }
  ss = warp_sum(ss);
  const float rs = 1.0f / sqrtf(ss / (float)d + eps);
  if (lane == 0) rstd[r] = rs;
  T* yr = y + (size_t)r * d;
  for (int c = lane * W; c < d; c += 32 * W) {
    float f[W], g[W];
    load_f32<T, W>(xr + c, f);
    load_f32<TW, W>(w + c, g);
#pragma unroll
    for (int k = 0; k < W; k++) f[k] = f[k] * rs * g[k];
    store_f32<T, W>(yr + c, f);
  }
}

// Block b handles rows [b * rows_per_block, min(R, (b + 1) * rows_per_block)). Thread t owns the
// columns (j * blockDim.x + t) * W + k, j < kCols / W, k < W.
template <typename T, typename TW, int W>
__global__ void __launch_bounds__(kBackwardThreads) rmsnorm_backward_kernel(const T* x, const TW* __restrict__ w,
    const float* __restrict__ rstd, const T* dy, T* dx, float* __restrict__ dw_partial, int R, int d,
    int rows_per_block) {
  constexpr int J = kCols / W;
  __shared__ float red[32];
  float wv[J][W], dwv[J][W];
#pragma unroll
  for (int j = 0; j < J; j++) {
    const int c = (j * blockDim.x + threadIdx.x) * W;
#pragma unroll
    for (int k = 0; k < W; k++) wv[j][k] = dwv[j][k] = 0.f;
    if (c < d && W > 1) load_f32<TW, W>(w + c, wv[j]);
  }
  const int r0 = blockIdx.x * rows_per_block;
  const int r1 = min(R, r0 + rows_per_block);
  for (int r = r0; r < r1; r++) {
    const T* xr = x + (size_t)r * d;
    const T* dyr = dy + (size_t)r * d;
    float xv[J][W], gv[J][W];
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < J; j++) {
      const int c = (j * blockDim.x + threadIdx.x) * W;
#pragma unroll
      for (int k = 0; k < W; k++) xv[j][k] = gv[j][k] = 0.f;
      if (c < d) {
        load_f32<T, W>(xr + c, xv[j]);
        load_f32<T, W>(dyr + c, gv[j]);
        if (W == 1) load_f32<TW, W>(w + c, wv[j]);  // re-read (L1) rather than spill in the scalar path
      }
#pragma unroll
      for (int k = 0; k < W; k++) dot += wv[j][k] * gv[j][k] * xv[j][k];
    }
    dot = block_sum(dot, red);
    const float rs = rstd[r];
    const float coef = dot / (float)d * rs * rs;
    T* dxr = dx + (size_t)r * d;
#pragma unroll
    for (int j = 0; j < J; j++) {
      const int c = (j * blockDim.x + threadIdx.x) * W;
      if (c < d) {
        float o[W];
#pragma unroll
        for (int k = 0; k < W; k++) {
          o[k] = rs * (wv[j][k] * gv[j][k] - xv[j][k] * coef);
          dwv[j][k] += gv[j][k] * xv[j][k] * rs;
        }
        store_f32<T, W>(dxr + c, o);
      }
    }
  }
  if (dw_partial) {
#pragma unroll
    for (int j = 0; j < J; j++) {
      const int c = (j * blockDim.x + threadIdx.x) * W;
      if (c < d)
#pragma unroll
        for (int k = 0; k < W; k++) dw_partial[(size_t)blockIdx.x * d + c + k] = dwv[j][k];
    }
  }
}

// dw[c] (+)= sum over b < blocks of partial[b, c], in b order per (threadIdx.y residue), then the
// kReduceRows residues in order: a fixed tree. Block (32, kReduceRows), one column per threadIdx.x.
const int kReduceRows = 8;
__global__ void rmsnorm_dw_reduce_kernel(const float* __restrict__ partial, float* __restrict__ dw, int blocks, int d,
                                         int accumulate) {
  __shared__ float part[kReduceRows][32];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (c < d)
    for (int b = threadIdx.y; b < blocks; b += kReduceRows) s += partial[(size_t)b * d + c];
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < d) {
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < kReduceRows; i++) total += part[i][threadIdx.x];
    dw[c] = accumulate ? dw[c] + total : total;
  }
}

// kernel launchers

template <typename T, typename TW>
int rmsnorm_forward(const T* x, const TW* w, T* y, float* rstd, int R, int d, float eps) {
  constexpr int W = 16 / sizeof(T);
  const int grid = CEIL_DIV(R, kForwardWarps), block = 32 * kForwardWarps;
  cudaStream_t stream = xft_cuda_stream();
  if (d % W == 0 && aligned(x, 16) && aligned(y, 16) && aligned(w, sizeof(TW) * W))
    rmsnorm_forward_kernel<T, TW, W><<<grid, block, 0, stream>>>(x, w, y, rstd, R, d, eps);
  else
    rmsnorm_forward_kernel<T, TW, 1><<<grid, block, 0, stream>>>(x, w, y, rstd, R, d, eps);
  return cudaGetLastError();
}

template <typename T, typename TW>
int rmsnorm_backward(const T* x, const TW* w, const float* rstd, const T* dy, T* dx, float* dw, int R, int d,
                     int accumulate) {
  constexpr int W = 16 / sizeof(T);
  cudaStream_t stream = xft_cuda_stream();
  cudaError_t e;
  if (R == 0) {
    if (dw && !accumulate) return cudaMemsetAsync(dw, 0, (size_t)d * sizeof(float), stream);
    return 0;
  }
  int rows_per_block = CEIL_DIV(R, kBackwardBlocks);
  if (rows_per_block < kMinRowsPerBlock) rows_per_block = kMinRowsPerBlock;
  const int blocks = CEIL_DIV(R, rows_per_block);
  const bool vec = d % W == 0 && aligned(x, 16) && aligned(dy, 16) && aligned(dx, 16) && aligned(w, sizeof(TW) * W);
  // kCols columns per thread: thread t covers the kCols / W vectors j * block + t
  int block = CEIL_DIV(CEIL_DIV(d, kCols), 32) * 32;
  if (block > kBackwardThreads) return cudaErrorInvalidValue;  // d > kMaxD: rejected by the binding
  float* partial = nullptr;
  if (dw && (e = cudaMallocAsync((void**)&partial, (size_t)blocks * d * sizeof(float), stream)) != cudaSuccess)
    return e;
  if (vec)
    rmsnorm_backward_kernel<T, TW, W><<<blocks, block, 0, stream>>>(x, w, rstd, dy, dx, partial, R, d, rows_per_block);
  else
    rmsnorm_backward_kernel<T, TW, 1><<<blocks, block, 0, stream>>>(x, w, rstd, dy, dx, partial, R, d, rows_per_block);
  e = cudaGetLastError();
  if (dw) {
    if (e == cudaSuccess) {
      rmsnorm_dw_reduce_kernel<<<CEIL_DIV(d, 32), dim3(32, kReduceRows), 0, stream>>>(partial, dw, blocks, d, accumulate);
      e = cudaGetLastError();
    }
    cudaError_t f = cudaFreeAsync(partial, stream);
    if (e == cudaSuccess) e = f;
  }
  return e;
}

template <typename T>
int rmsnorm_forward_w(const void* x, const void* w, void* y, float* rstd, int w_dtype, int R, int d, float eps) {
  if (w_dtype == XFT_BF16) return rmsnorm_forward((const T*)x, (const uint16_t*)w, (T*)y, rstd, R, d, eps);
  return rmsnorm_forward((const T*)x, (const float*)w, (T*)y, rstd, R, d, eps);
}

template <typename T>
int rmsnorm_backward_w(const void* x, const void* w, const float* rstd, const void* dy, void* dx, float* dw,
                       int w_dtype, int R, int d, int accumulate) {
  if (w_dtype == XFT_BF16)
    return rmsnorm_backward((const T*)x, (const uint16_t*)w, rstd, (const T*)dy, (T*)dx, dw, R, d, accumulate);
  return rmsnorm_backward((const T*)x, (const float*)w, rstd, (const T*)dy, (T*)dx, dw, R, d, accumulate);
}

}  // namespace

extern "C" int xft_cuda_rmsnorm_forward(const void* x, const void* w, void* y, float* rstd, int dtype, int w_dtype,
                                        int R, int d, float eps) {
  if (R == 0) return 0;
  if (d < 1 || d > kMaxD) return cudaErrorInvalidValue;
  if (dtype == XFT_BF16) return rmsnorm_forward_w<uint16_t>(x, w, y, rstd, w_dtype, R, d, eps);
  return rmsnorm_forward_w<float>(x, w, y, rstd, w_dtype, R, d, eps);
}

extern "C" int xft_cuda_rmsnorm_backward(const void* x, const void* w, const float* rstd, const void* dy, void* dx,
                                         float* dw, int dtype, int w_dtype, int R, int d, int accumulate) {
  if (d < 1 || d > kMaxD) return cudaErrorInvalidValue;
  if (dtype == XFT_BF16) return rmsnorm_backward_w<uint16_t>(x, w, rstd, dy, dx, dw, w_dtype, R, d, accumulate);
  return rmsnorm_backward_w<float>(x, w, rstd, dy, dx, dw, w_dtype, R, d, accumulate);
}
