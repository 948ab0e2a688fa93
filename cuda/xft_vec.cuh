/*
Vector access shared by the memory-bound kernels: W consecutive elements of a f32 or bf16
(uint16_t bits) array moved as one aligned load or store, widened to / rounded from fp32
(round to nearest even, xft_math.h). Callers check alignment with `aligned` and fall back to
scalar access for tails.
*/
#pragma once
#include <stdint.h>

#include "xft_math.h"

#ifndef CEIL_DIV
#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))
#endif

namespace {

template <typename T, int W> struct alignas(sizeof(T) * W) Vec { T v[W]; };
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(uint16_t v) { return xft_bf16_to_f32(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ uint16_t from_f32<uint16_t>(float v) { return xft_f32_to_bf16(v); }
template <typename T, int W> __device__ __forceinline__ void load_f32(const T* p, float* f) {
  Vec<T, W> v = *reinterpret_cast<const Vec<T, W>*>(p);
#pragma unroll
  for (int k = 0; k < W; k++) f[k] = to_f32(v.v[k]);
}
template <typename T, int W> __device__ __forceinline__ void store_f32(T* p, const float* f) {
  Vec<T, W> v;
#pragma unroll
  for (int k = 0; k < W; k++) v.v[k] = from_f32<T>(f[k]);
  *reinterpret_cast<Vec<T, W>*>(p) = v;
}
inline bool aligned(const void* p, size_t bytes) { return ((uintptr_t)p % bytes) == 0; }

}  // namespace
