/*
SwiGLU activation of the Llama FFN (HF LlamaMLP: act_fn(gate_proj(x)) * up_proj(x), act_fn = silu),
elementwise over n values of one dtype (f32 or bf16), fp32 arithmetic.
  forward:  h = silu(g) * u,        silu(g) = g * s,  s = sigmoid(g) = 1 / (1 + exp(-g))
  backward: dg = dh * u * s * (1 + g * (1 - s)),      du = dh * silu(g)
Outputs may alias inputs (each element is read before it is written, by the same thread).
Layout: flat arrays; a grid-stride loop over 16-byte vectors (8 bf16 or 4 f32) when every
pointer is 16-byte aligned, the last n % W elements one by one.
*/
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "xft_cuda.h"
#include "xft_math.h"
#include "xft_vec.cuh"

extern "C" cudaStream_t xft_cuda_stream(void);


namespace {


__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

// CUDA kernels

// elements [i, i + W) with W = 1 (scalar) or the vector width
template <typename T, int W>
__device__ __forceinline__ void swiglu_forward_at(const T* g, const T* u, T* h, size_t i) {
  float gv[W], uv[W];
  load_f32<T, W>(g + i, gv);
  load_f32<T, W>(u + i, uv);
#pragma unroll
  for (int k = 0; k < W; k++) gv[k] = gv[k] * sigmoid(gv[k]) * uv[k];
  store_f32<T, W>(h + i, gv);
}

template <typename T, int W>
__device__ __forceinline__ void swiglu_backward_at(const T* g, const T* u, const T* dh, T* dg, T* du, size_t i) {
  float gv[W], uv[W], dhv[W], dgv[W], duv[W];
  load_f32<T, W>(g + i, gv);
  load_f32<T, W>(u + i, uv);
  load_f32<T, W>(dh + i, dhv);
#pragma unroll
  for (int k = 0; k < W; k++) {
    const float s = sigmoid(gv[k]);
    dgv[k] = dhv[k] * uv[k] * s * (1.0f + gv[k] * (1.0f - s));
    duv[k] = dhv[k] * gv[k] * s;
  }
  store_f32<T, W>(dg + i, dgv);
  store_f32<T, W>(du + i, duv);
}

template <typename T, int W>
__global__ void swiglu_forward_kernel(const T* g, const T* u, T* h, size_t n) {
  const size_t start = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  const size_t nv = n / W;
  for (size_t v = start; v < nv; v += stride) swiglu_forward_at<T, W>(g, u, h, v * W);
  for (size_t i = nv * W + start; i < n; i += stride) swiglu_forward_at<T, 1>(g, u, h, i);
}

template <typename T, int W>
__global__ void swiglu_backward_kernel(const T* g, const T* u, const T* dh, T* dg, T* du, size_t n) {
  const size_t start = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  const size_t nv = n / W;
  for (size_t v = start; v < nv; v += stride) swiglu_backward_at<T, W>(g, u, dh, dg, du, v * W);
  for (size_t i = nv * W + start; i < n; i += stride) swiglu_backward_at<T, 1>(g, u, dh, dg, du, i);
}

// kernel launchers

const int kBlock = 256;
unsigned grid_for(size_t items) {
  size_t g = CEIL_DIV(items, (size_t)kBlock);
  return (unsigned)(g < 1 ? 1 : g > 65535 * 8 ? 65535 * 8 : g);
}

template <typename T>
int swiglu_forward(const T* g, const T* u, T* h, size_t n) {
  constexpr int W = 16 / sizeof(T);
  cudaStream_t stream = xft_cuda_stream();
  if (aligned(g, 16) && aligned(u, 16) && aligned(h, 16))
    swiglu_forward_kernel<T, W><<<grid_for(n / W), kBlock, 0, stream>>>(g, u, h, n);
  else
    swiglu_forward_kernel<T, 1><<<grid_for(n), kBlock, 0, stream>>>(g, u, h, n);
  return cudaGetLastError();
}

template <typename T>
int swiglu_backward(const T* g, const T* u, const T* dh, T* dg, T* du, size_t n) {
  constexpr int W = 16 / sizeof(T);
  cudaStream_t stream = xft_cuda_stream();
  if (aligned(g, 16) && aligned(u, 16) && aligned(dh, 16) && aligned(dg, 16) && aligned(du, 16))
    swiglu_backward_kernel<T, W><<<grid_for(n / W), kBlock, 0, stream>>>(g, u, dh, dg, du, n);
  else
    swiglu_backward_kernel<T, 1><<<grid_for(n), kBlock, 0, stream>>>(g, u, dh, dg, du, n);
  return cudaGetLastError();
}

}  // namespace

extern "C" int xft_cuda_swiglu_forward(const void* g, const void* u, void* h, int dtype, size_t n) {
  if (n == 0) return 0;
  if (dtype == XFT_BF16) return swiglu_forward((const uint16_t*)g, (const uint16_t*)u, (uint16_t*)h, n);
  return swiglu_forward((const float*)g, (const float*)u, (float*)h, n);
}

extern "C" int xft_cuda_swiglu_backward(const void* g, const void* u, const void* dh, void* dg, void* du, int dtype,
                                        size_t n) {
  if (n == 0) return 0;
  if (dtype == XFT_BF16)
    return swiglu_backward((const uint16_t*)g, (const uint16_t*)u, (const uint16_t*)dh, (uint16_t*)dg, (uint16_t*)du, n);
  return swiglu_backward((const float*)g, (const float*)u, (const float*)dh, (float*)dg, (float*)du, n);
}
