/*
Tensor fills and casts. Random fills are counter based (xft_math.h): element i of a fill with
seed s is f(s, i), so the result does not depend on the launch shape and matches the CPU twin
(binding/cpu/fill.cc) bit for bit for uniform values. That promise needs the same rounding as the
CPU's separate multiply and add: the fills use __fmul_rn/__fadd_rn, which nvcc never contracts into
an FMA (its default, -fmad=true, would fuse a + (b - a) * u; an FMA's single rounding can move the
last bit, and floor() of an i32 fill to another integer). cuda/dev/emu/check.sh contract tests it.
  fill_random kind 0: out[i] = a + (b - a) * u(s, i)      u uniform in [0, 1)
              kind 1: out[i] = a + b * n(s, i)            n standard normal (Box-Muller)
              i32 outputs take floor(value)
  fill_value:  out[i] = value
  cast:        out[i] = convert(in[i]) between f32, bf16 (round to nearest even) and i32 (truncate)
Layout: flat arrays of n elements; a grid-stride loop, one element per thread per step.
*/
#include <cuda_runtime.h>

#include "xft_cuda.h"
#include "xft_math.h"

extern "C" cudaStream_t xft_cuda_stream(void);

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

// CUDA kernels

__device__ __forceinline__ void store_value(void* out, int dtype, size_t i, float v) {
  if (dtype == XFT_BF16) ((uint16_t*)out)[i] = xft_f32_to_bf16(v);
  else if (dtype == XFT_I32) ((int32_t*)out)[i] = xft_f32_to_i32(v);
  else ((float*)out)[i] = v;
}

__global__ void fill_random_kernel(void* out, int dtype, size_t n, int kind, uint64_t seed, float a, float b) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float v = kind == 0 ? __fadd_rn(a, __fmul_rn(b - a, xft_uniform01(seed, i)))
                              : __fadd_rn(a, __fmul_rn(b, xft_normal(seed, i)));
    store_value(out, dtype, i, dtype == XFT_I32 ? floorf(v) : v);
  }
}

__global__ void fill_value_kernel(void* out, int dtype, size_t n, float fvalue, int32_t ivalue) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    if (dtype == XFT_I32) ((int32_t*)out)[i] = ivalue;
    else store_value(out, dtype, i, fvalue);
  }
}

__global__ void cast_kernel(void* out, int out_dtype, const void* in, int in_dtype, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    if (in_dtype == XFT_I32) {
      int32_t v = ((const int32_t*)in)[i];
      if (out_dtype == XFT_I32) ((int32_t*)out)[i] = v;
      else store_value(out, out_dtype, i, (float)v);
    } else {
      float v = in_dtype == XFT_BF16 ? xft_bf16_to_f32(((const uint16_t*)in)[i]) : ((const float*)in)[i];
      store_value(out, out_dtype, i, v);
    }
  }
}

// kernel launchers

static unsigned grid_for(size_t n, int block) {
  size_t g = CEIL_DIV(n, (size_t)block);
  return (unsigned)(g < 65535 * 8 ? (g ? g : 1) : 65535 * 8);
}

extern "C" int xft_cuda_fill_random(void* out, int dtype, size_t n, int kind, uint64_t seed, float a, float b) {
  if (n == 0) return 0;
  const int block = 256;
  fill_random_kernel<<<grid_for(n, block), block, 0, xft_cuda_stream()>>>(out, dtype, n, kind, seed, a, b);
  return cudaGetLastError();
}

extern "C" int xft_cuda_fill_value(void* out, int dtype, size_t n, double value) {
  if (n == 0) return 0;
  const int block = 256;
  int32_t ivalue = !(value == value) ? 0 : value >= 2147483647.0 ? 2147483647
                 : value <= -2147483648.0 ? (-2147483647 - 1) : (int32_t)value;
  fill_value_kernel<<<grid_for(n, block), block, 0, xft_cuda_stream()>>>(out, dtype, n, (float)value, ivalue);
  return cudaGetLastError();
}

extern "C" int xft_cuda_cast(void* out, int out_dtype, const void* in, int in_dtype, size_t n) {
  if (n == 0) return 0;
  const int block = 256;
  cast_kernel<<<grid_for(n, block), block, 0, xft_cuda_stream()>>>(out, out_dtype, in, in_dtype, n);
  return cudaGetLastError();
}
