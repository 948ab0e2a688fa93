/*
Small elementwise ops of a training step, and the sum of squares for the global gradient norm.
Flat arrays of n elements, f32 or bf16, fp32 arithmetic; outputs may alias inputs of the same dtype.
  add:          y = a + b
  axpby:        y = alpha * x + beta * y     x and y may differ in dtype (accumulating bf16 gradients
                                             into f32 buffers, scaling); beta == 0 does not read y
  tanh:         y = tanh(x);   backward dx = dy * (1 - y^2)            (the router MLP)
  router noise: noisy = clean + n_i * (softplus(z) + eps),   n_i = xft_normal(seed, i) (xft_math.h),
                softplus(z) = z > 20 ? z : log1p(exp(z)) (torch's threshold);
                backward dclean = dnoisy, dz = dnoisy * n_i * sigmoid(z)
  sum_squares:  out[0] = sum over a list of tensors of sum_i x_i^2, deterministic: a fixed grid of
                kSumBlocks blocks per launch (up to kSumChunk tensors each) accumulates fp64 per thread,
                reduces each block in a fixed tree into its partial, and one block adds the partials
                in order; out is f32 [1] on the device.
Layout: a grid-stride loop over 16-byte vectors when every pointer allows, the tail one by one.
*/
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "xft_cuda.h"
#include "xft_math.h"
#include "xft_reduce.cuh"
#include "xft_vec.cuh"

extern "C" cudaStream_t xft_cuda_stream(void);


namespace {


__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }
__device__ __forceinline__ float softplus(float z) { return z > 20.f ? z : log1pf(expf(z)); }

// ---- the elementwise ops: functors applied to elements [i, i + W) ----

template <typename T> struct AddOp {
  const T* a; const T* b; T* y;
  template <int W> __device__ __forceinline__ void apply(size_t i) const {
    float av[W], bv[W];
    load_f32<T, W>(a + i, av);
    load_f32<T, W>(b + i, bv);
#pragma unroll
    for (int k = 0; k < W; k++) av[k] += bv[k];
    store_f32<T, W>(y + i, av);
  }
};

template <typename TX, typename TY> struct AxpbyOp {
  const TX* x; TY* y; float alpha, beta;
  template <int W> __device__ __forceinline__ void apply(size_t i) const {
    float xv[W], yv[W];
    load_f32<TX, W>(x + i, xv);
    if (beta != 0.f) {
      load_f32<TY, W>(y + i, yv);
#pragma unroll
      for (int k = 0; k < W; k++) xv[k] = alpha * xv[k] + beta * yv[k];
    } else {
#pragma unroll
      for (int k = 0; k < W; k++) xv[k] = alpha * xv[k];
    }
    store_f32<TY, W>(y + i, xv);
  }
};

template <typename T> struct TanhOp {
  const T* x; T* y;
  template <int W> __device__ __forceinline__ void apply(size_t i) const {
    float v[W];
    load_f32<T, W>(x + i, v);
#pragma unroll
    for (int k = 0; k < W; k++) v[k] = tanhf(v[k]);
    store_f32<T, W>(y + i, v);
  }
};

template <typename T> struct TanhBackwardOp {
  const T* y; const T* dy; T* dx;
  template <int W> __device__ __forceinline__ void apply(size_t i) const {
    float yv[W], g[W];
    load_f32<T, W>(y + i, yv);
    load_f32<T, W>(dy + i, g);
#pragma unroll
    for (int k = 0; k < W; k++) g[k] = g[k] * (1.0f - yv[k] * yv[k]);
    store_f32<T, W>(dx + i, g);
  }
};

template <typename T> struct RouterNoiseOp {
  const T* clean; const T* z; T* noisy; uint64_t seed; float eps;
  template <int W> __device__ __forceinline__ void apply(size_t i) const {
    float c[W], zv[W];
    load_f32<T, W>(clean + i, c);
    load_f32<T, W>(z + i, zv);
#pragma unroll
    for (int k = 0; k < W; k++) c[k] = c[k] + xft_normal(seed, i + k) * (softplus(zv[k]) + eps);
    store_f32<T, W>(noisy + i, c);
  }
};

template <typename T> struct RouterNoiseBackwardOp {
  const T* z; const T* dnoisy; T* dclean; T* dz; uint64_t seed;
  template <int W> __device__ __forceinline__ void apply(size_t i) const {
    float g[W], zv[W], o[W];
    load_f32<T, W>(dnoisy + i, g);
    load_f32<T, W>(z + i, zv);
#pragma unroll
    for (int k = 0; k < W; k++) o[k] = g[k] * xft_normal(seed, i + k) * sigmoid(zv[k]);
    if (dclean) store_f32<T, W>(dclean + i, g);
    store_f32<T, W>(dz + i, o);
  }
};

// CUDA kernels

template <int W, typename Op>
__global__ void map_kernel(const Op op, size_t n) {
  const size_t start = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  const size_t nv = n / W;
  for (size_t v = start; v < nv; v += stride) op.template apply<W>(v * W);
  for (size_t i = nv * W + start; i < n; i += stride) op.template apply<1>(i);
}

const int kSumChunk = 64;    // tensors per sum_squares launch (kernel parameter of ~1.3 KiB)
const int kSumBlocks = 512;  // blocks per sum_squares launch: fixed, so the sum does not depend on the GPU
const int kSumThreads = 256;

struct SumChunk {
  const void* ptr[kSumChunk];
  size_t numel[kSumChunk];
  int dtype[kSumChunk];
  int count;
};

template <typename T, int W>
__device__ __forceinline__ double sum_squares_of(const T* p, size_t n, size_t start, size_t stride) {
  double acc = 0.0;
  const size_t nv = n / W;
  for (size_t v = start; v < nv; v += stride) {
    float f[W];
    load_f32<T, W>(p + v * W, f);
#pragma unroll
    for (int k = 0; k < W; k++) acc += (double)f[k] * f[k];
  }
  for (size_t i = nv * W + start; i < n; i += stride) {
    const double f = to_f32(p[i]);
    acc += f * f;
  }
  return acc;
}

__global__ void __launch_bounds__(kSumThreads) sum_squares_kernel(const SumChunk chunk, double* __restrict__ partial) {
  const size_t start = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  double acc = 0.0;
  for (int t = 0; t < chunk.count; t++) {
    const void* p = chunk.ptr[t];
    const bool vec = ((uintptr_t)p % 16) == 0;
    if (chunk.dtype[t] == XFT_BF16)
      acc += vec ? sum_squares_of<uint16_t, 8>((const uint16_t*)p, chunk.numel[t], start, stride)
                 : sum_squares_of<uint16_t, 1>((const uint16_t*)p, chunk.numel[t], start, stride);
    else
      acc += vec ? sum_squares_of<float, 4>((const float*)p, chunk.numel[t], start, stride)
                 : sum_squares_of<float, 1>((const float*)p, chunk.numel[t], start, stride);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void __launch_bounds__(kSumThreads) sum_partials_kernel(const double* __restrict__ partial, int n,
                                                                    float* __restrict__ out) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[0] = (float)acc;
}

// kernel launchers

const int kBlock = 256;
unsigned grid_for(size_t items) {
  size_t g = CEIL_DIV(items, (size_t)kBlock);
  return (unsigned)(g < 1 ? 1 : g > 65535 * 8 ? 65535 * 8 : g);
}

// W-wide vectors when `vec`, else one element at a time
template <int W, typename Op>
int launch_map(const Op& op, size_t n, bool vec) {
  if (n == 0) return 0;
  cudaStream_t stream = xft_cuda_stream();
  if (vec) map_kernel<W><<<grid_for(n / W), kBlock, 0, stream>>>(op, n);
  else map_kernel<1><<<grid_for(n), kBlock, 0, stream>>>(op, n);
  return cudaGetLastError();
}

template <typename T>
int add(const void* a, const void* b, void* y, size_t n) {
  AddOp<T> op{(const T*)a, (const T*)b, (T*)y};
  return launch_map<16 / sizeof(T)>(op, n, aligned(a, 16) && aligned(b, 16) && aligned(y, 16));
}

template <typename TX, typename TY>
int axpby(const void* x, void* y, size_t n, float alpha, float beta) {
  constexpr int W = 16 / (sizeof(TX) > sizeof(TY) ? sizeof(TX) : sizeof(TY));
  AxpbyOp<TX, TY> op{(const TX*)x, (TY*)y, alpha, beta};
  return launch_map<W>(op, n, aligned(x, sizeof(TX) * W) && aligned(y, sizeof(TY) * W));
}

template <typename T>
int tanh_forward(const void* x, void* y, size_t n) {
  TanhOp<T> op{(const T*)x, (T*)y};
  return launch_map<16 / sizeof(T)>(op, n, aligned(x, 16) && aligned(y, 16));
}

template <typename T>
int tanh_backward(const void* y, const void* dy, void* dx, size_t n) {
  TanhBackwardOp<T> op{(const T*)y, (const T*)dy, (T*)dx};
  return launch_map<16 / sizeof(T)>(op, n, aligned(y, 16) && aligned(dy, 16) && aligned(dx, 16));
}

template <typename T>
int router_noise_forward(const void* clean, const void* z, void* noisy, size_t n, uint64_t seed, float eps) {
  RouterNoiseOp<T> op{(const T*)clean, (const T*)z, (T*)noisy, seed, eps};
  return launch_map<16 / sizeof(T)>(op, n, aligned(clean, 16) && aligned(z, 16) && aligned(noisy, 16));
}

template <typename T>
int router_noise_backward(const void* z, const void* dnoisy, void* dclean, void* dz, size_t n, uint64_t seed) {
  RouterNoiseBackwardOp<T> op{(const T*)z, (const T*)dnoisy, (T*)dclean, (T*)dz, seed};
  return launch_map<16 / sizeof(T)>(op, n, aligned(z, 16) && aligned(dnoisy, 16) && aligned(dclean, 16) && aligned(dz, 16));
}

}  // namespace

extern "C" int xft_cuda_add(const void* a, const void* b, void* y, int dtype, size_t n) {
  return dtype == XFT_BF16 ? add<uint16_t>(a, b, y, n) : add<float>(a, b, y, n);
}

extern "C" int xft_cuda_axpby(const void* x, int x_dtype, void* y, int y_dtype, size_t n, float alpha, float beta) {
  if (x_dtype == XFT_BF16)
    return y_dtype == XFT_BF16 ? axpby<uint16_t, uint16_t>(x, y, n, alpha, beta) : axpby<uint16_t, float>(x, y, n, alpha, beta);
  return y_dtype == XFT_BF16 ? axpby<float, uint16_t>(x, y, n, alpha, beta) : axpby<float, float>(x, y, n, alpha, beta);
}

extern "C" int xft_cuda_tanh_forward(const void* x, void* y, int dtype, size_t n) {
  return dtype == XFT_BF16 ? tanh_forward<uint16_t>(x, y, n) : tanh_forward<float>(x, y, n);
}

extern "C" int xft_cuda_tanh_backward(const void* y, const void* dy, void* dx, int dtype, size_t n) {
  return dtype == XFT_BF16 ? tanh_backward<uint16_t>(y, dy, dx, n) : tanh_backward<float>(y, dy, dx, n);
}

extern "C" int xft_cuda_router_noise_forward(const void* clean, const void* z, void* noisy, int dtype, size_t n,
                                             uint64_t seed, float eps) {
  return dtype == XFT_BF16 ? router_noise_forward<uint16_t>(clean, z, noisy, n, seed, eps)
                           : router_noise_forward<float>(clean, z, noisy, n, seed, eps);
}

extern "C" int xft_cuda_router_noise_backward(const void* z, const void* dnoisy, void* dclean, void* dz, int dtype,
                                              size_t n, uint64_t seed) {
  return dtype == XFT_BF16 ? router_noise_backward<uint16_t>(z, dnoisy, dclean, dz, n, seed)
                           : router_noise_backward<float>(z, dnoisy, dclean, dz, n, seed);
}

extern "C" int xft_cuda_sum_squares(const void* const* tensors, const size_t* numel, const int* dtypes, int count,
                                    float* out) {
  cudaStream_t stream = xft_cuda_stream();
  const int launches = count > 0 ? CEIL_DIV(count, kSumChunk) : 1;
  double* partial = nullptr;
  cudaError_t e = cudaMallocAsync((void**)&partial, (size_t)launches * kSumBlocks * sizeof(double), stream);
  if (e != cudaSuccess) return e;
  for (int l = 0; l < launches && e == cudaSuccess; l++) {
    SumChunk chunk;
    chunk.count = 0;
    for (int t = l * kSumChunk; t < count && t < (l + 1) * kSumChunk; t++, chunk.count++) {
      chunk.ptr[chunk.count] = tensors[t];
      chunk.numel[chunk.count] = numel[t];
      chunk.dtype[chunk.count] = dtypes[t];
    }
    sum_squares_kernel<<<kSumBlocks, kSumThreads, 0, stream>>>(chunk, partial + (size_t)l * kSumBlocks);
    e = cudaGetLastError();
  }
  if (e == cudaSuccess) {
    sum_partials_kernel<<<1, kSumThreads, 0, stream>>>(partial, launches * kSumBlocks, out);
    e = cudaGetLastError();
  }
  cudaError_t f = cudaFreeAsync(partial, stream);
  return e != cudaSuccess ? e : f;
}
