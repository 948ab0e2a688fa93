/*
Scalar helpers shared by the CPU backend (g++) and the CUDA kernels (nvcc), so both sides
compute bit-identical conversions and random streams.

bf16: the top 16 bits of an IEEE fp32. Conversion from fp32 rounds to nearest, ties to even;
NaN stays NaN (quiet), infinities stay infinities.

Random numbers are counter based: element i of a tensor filled with seed s is a pure function
of (s, i), so a fill is reproducible, order independent and identical on CPU and GPU for
uniform values (normal values go through logf/cosf and may differ by an ulp).
*/
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__CUDACC__)
#define XFT_HD __host__ __device__ __forceinline__
#else
#define XFT_HD inline
#endif

enum xft_dtype { XFT_F32 = 0, XFT_BF16 = 1, XFT_I32 = 2 };

// The embedding backward sums the rows of one token id in chunks of this many (in token order, each
// from zero), then the chunk sums in order: the CUDA kernel gives each chunk its own block, so a
// frequent id (padding, "the") does not leave one block to sum thousands of rows; the CPU twin adds
// in the same order.
#define XFT_EMBEDDING_CHUNK 256

XFT_HD uint32_t xft_f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

XFT_HD float xft_bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

// fp32 -> bf16 bits, round to nearest even
XFT_HD uint16_t xft_f32_to_bf16(float f) {
  uint32_t u = xft_f32_bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return (uint16_t)((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

XFT_HD float xft_bf16_to_f32(uint16_t h) { return xft_bits_f32((uint32_t)h << 16); }

// value i of a f32 or bf16 buffer as fp32, and fp32 v stored into one (bf16: nearest even)
XFT_HD float xft_load_value(const void* p, int dtype, size_t i) {
  return dtype == XFT_BF16 ? xft_bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}
XFT_HD void xft_store_value(void* p, int dtype, size_t i, float v) {
  if (dtype == XFT_BF16) ((uint16_t*)p)[i] = xft_f32_to_bf16(v);
  else ((float*)p)[i] = v;
}

// fp32 rounded through bf16 and back
XFT_HD float xft_round_bf16(float f) { return xft_bf16_to_f32(xft_f32_to_bf16(f)); }

// 64-bit mix (splitmix64 finalizer) of (seed, index): a counter-based generator
XFT_HD uint64_t xft_hash64(uint64_t seed, uint64_t index) {
  uint64_t z = seed * 0x9e3779b97f4a7c15ull + index * 0xd1b54a32d192ed03ull + 0x632be59bd9b4e019ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// uniform in [0, 1) with 24 random bits
XFT_HD float xft_uniform01(uint64_t seed, uint64_t index) {
  return (float)(xft_hash64(seed, index) >> 40) * (1.0f / 16777216.0f);
}

// standard normal by Box-Muller from one 64-bit hash (two 24-bit uniforms, u1 in (0, 1])
XFT_HD float xft_normal(uint64_t seed, uint64_t index) {
  uint64_t h = xft_hash64(seed, index);
  float u1 = ((float)(h >> 40) + 1.0f) * (1.0f / 16777216.0f);
  float u2 = (float)((h >> 16) & 0xffffffu) * (1.0f / 16777216.0f);
  return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
}

// fp32 -> i32 truncating toward zero, saturating; NaN -> 0 (the same on CPU and GPU)
XFT_HD int32_t xft_f32_to_i32(float v) {
  if (!(v == v)) return 0;
  if (v >= 2147483520.0f) return 2147483647;
  if (v <= -2147483648.0f) return (-2147483647 - 1);
  return (int32_t)v;
}
