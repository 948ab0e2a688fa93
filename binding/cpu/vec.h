/*
Vector helpers of the CPU kernels (the binding/cpu files other than the GEMMs): run-time dispatch, a
fast exp, and typed loads/stores the compiler vectorizes.

XFT_VEC on a function compiles it twice on x86-64 (AVX2 and the baseline SSE2) and picks the clone
when the addon loads (GCC/clang target_clones, an ifunc): the binary runs on any x86-64 and uses
AVX2 where it exists. Elsewhere (arm64: NEON is baseline) it is empty and -O3 vectorizes for the
target. The build keeps -ffp-contract=off, so no clone fuses a * b + c: a vectorized elementwise
loop gives exactly the bits of the scalar one. Put XFT_VEC on plain (non-template) functions whose
hot loops are inline in them; a lambda or a call that is not inlined runs the baseline code.

xft_cpu::fast_exp is Cephes' expf (range reduction by ln 2 in two parts, a degree-6 polynomial,
scale by 2^n as two exact power-of-two multiplies so that the result under- and overflows the way
expf does): within 2 ulp of the correctly rounded exp over the whole fp32 range (test/18 checks it
against expf), NaN in NaN out, exp(-inf) = 0, exp(+inf) = inf. It is branch-free, so loops over it
vectorize; libm's expf does not.

XFT_CPU_REFERENCE=1 (read at each call, shared with the GEMMs) selects libm's expf instead, the
plain reference of the oracle.
*/
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../cuda/xft_math.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && !defined(XFT_NO_CLONES)
#define XFT_VEC __attribute__((target_clones("avx2", "default")))
#else
#define XFT_VEC
#endif
#define XFT_INLINE inline __attribute__((always_inline))

namespace xft_cpu {

// XFT_CPU_REFERENCE=1: the plain reference paths (libm exp); read at each call
inline bool reference_mode() {
  const char* v = getenv("XFT_CPU_REFERENCE");
  return v && v[0] == '1' && v[1] == 0;
}

XFT_INLINE float bits_to_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
XFT_INLINE uint32_t f32_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

XFT_INLINE float fast_exp(float x) {
  // clamp so that n stays in [-150, 129] (the result is 0 or inf there anyway); NaN passes through
  x = x < -104.0f ? -104.0f : x;
  x = x > 89.0f ? 89.0f : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (no rounding instruction needed)
  const float magic = 12582912.0f;
  const float t = x * 1.44269504088896341f + magic;
  const int32_t n = (int32_t)f32_to_bits(t) - (int32_t)f32_to_bits(magic);
  const float fn = t - magic;
  // r = x - n ln 2, with ln 2 = C1 + C2 and C1 exact in 9 bits: n * C1 is exact
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  // 2^n as 2^h * 2^(n-h), both halves within the normal range
  const int32_t h = n >> 1;
  const float s1 = bits_to_f32((uint32_t)(h + 127) << 23), s2 = bits_to_f32((uint32_t)(n - h + 127) << 23);
  return y * s1 * s2;
}

// element i of a f32 or bf16 array (the element type as a template parameter: no dtype branch in loops)
XFT_INLINE float ld(const float* p, size_t i) { return p[i]; }
XFT_INLINE float ld(const uint16_t* p, size_t i) { return bits_to_f32((uint32_t)p[i] << 16); }
XFT_INLINE void st(float* p, size_t i, float v) { p[i] = v; }
// round to nearest even, NaN kept quiet (as xft_f32_to_bf16)
XFT_INLINE void st(uint16_t* p, size_t i, float v) { p[i] = xft_f32_to_bf16(v); }

}  // namespace xft_cpu
