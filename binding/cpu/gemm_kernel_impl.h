/*
Packing and the loop over register tiles, shared by the instruction-set files (gemm_avx512.cc,
gemm_avx2.cc, gemm_portable.cc): each includes this once, after defining its micro-kernel, and
compiles it with its own flags. Everything here has internal linkage (an anonymous namespace), so
no copy built for one instruction set can stand in for another at link time. See gemm_kernels.h.
*/
#pragma once
#include <stdint.h>
#include <string.h>

#include "gemm_kernels.h"
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

constexpr int kGemmBf16 = 1;  // XFT_BF16 (grouped_gemm.cc checks that they agree)

inline float gemm_widen_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

#if defined(__AVX__)
// 8 p of 8 rows (row i at s + i * rs) into d: element (i, p) at p * R + i (an 8 x 8 transpose in registers)
inline void gemm_transpose_8x8(const float* s, size_t rs, float* d, int R) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(s + i * rs);
  for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));      // p 0 and 4 of rows i .. i+3
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));  // p 1 and 5
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));  // p 2 and 6
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));  // p 3 and 7
  }
  for (int q = 0; q < 4; q++) {
    _mm256_storeu_ps(d + (size_t)q * R, _mm256_permute2f128_ps(u[q], u[q + 4], 0x20));
    _mm256_storeu_ps(d + (size_t)(q + 4) * R, _mm256_permute2f128_ps(u[q], u[q + 4], 0x31));
  }
}

// the same for 4 rows
inline void gemm_transpose_4x8(const float* s, size_t rs, float* d, int R) {
  const __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + rs), r2 = _mm256_loadu_ps(s + 2 * rs),
               r3 = _mm256_loadu_ps(s + 3 * rs);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
               t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 u[4] = {_mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)),
                       _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2))};
  for (int q = 0; q < 4; q++) {
    _mm_storeu_ps(d + (size_t)q * R, _mm256_castps256_ps128(u[q]));
    _mm_storeu_ps(d + (size_t)(q + 4) * R, _mm256_extractf128_ps(u[q], 1));
  }
}
#endif

// a full panel of R f32 rows along p (cs == 1) with in-register transposes: element (i, p) at p * R + i
template <int R>
bool gemm_pack_rows_f32(float* d, const float* s, size_t rs, int kc) {
#if defined(__AVX__)
  int p = 0;
  for (; p + 8 <= kc; p += 8) {
    int i = 0;
    for (; i + 8 <= R; i += 8) gemm_transpose_8x8(s + (size_t)i * rs + p, rs, d + (size_t)p * R + i, R);
    for (; i + 4 <= R; i += 4) gemm_transpose_4x8(s + (size_t)i * rs + p, rs, d + (size_t)p * R + i, R);
    for (; i < R; i++)
      for (int q = 0; q < 8; q++) d[(size_t)(p + q) * R + i] = s[(size_t)i * rs + p + q];
  }
  for (; p < kc; p++)
    for (int i = 0; i < R; i++) d[(size_t)p * R + i] = s[(size_t)i * rs + p];
  return true;
#else
  (void)d, (void)s, (void)rs, (void)kc;
  return false;
#endif
}

// panels of R rows by kc, element (i, p) at p * R + i; rows past m are zero
template <int R, typename T, typename Load>
void gemm_pack_typed(float* dst, const T* src, size_t rs, size_t cs, size_t i0, int m, size_t p0, int kc, Load load) {
  for (int b = 0; b < m; b += R) {
    const int rows = m - b < R ? m - b : R;
    float* d = dst + (size_t)b * kc;
    const T* s = src + (i0 + b) * rs + p0 * cs;
    if (rs == 1) {  // the R rows of one p are contiguous
      for (int p = 0; p < kc; p++) {
        const T* sp = s + (size_t)p * cs;
        float* dp = d + (size_t)p * R;
        if (rows == R) {
          for (int i = 0; i < R; i++) dp[i] = load(sp[i]);
        } else {
          for (int i = 0; i < rows; i++) dp[i] = load(sp[i]);
          for (int i = rows; i < R; i++) dp[i] = 0.f;
        }
      }
    } else {  // along p within a row (cs == 1 in every use): a transpose, R rows at a time
      if constexpr (sizeof(T) == 4)
        if (cs == 1 && rows == R && gemm_pack_rows_f32<R>(d, (const float*)s, rs, kc)) continue;
      constexpr int P = 8;
      int p = 0;
      if (rows == R)
        for (; p + P <= kc; p += P)
          for (int i = 0; i < R; i++) {
            const T* si = s + (size_t)i * rs + (size_t)p * cs;
            for (int q = 0; q < P; q++) d[(size_t)(p + q) * R + i] = load(si[(size_t)q * cs]);
          }
      for (; p < kc; p++) {
        float* dp = d + (size_t)p * R;
        for (int i = 0; i < rows; i++) dp[i] = load(s[(size_t)i * rs + (size_t)p * cs]);
        for (int i = rows; i < R; i++) dp[i] = 0.f;
      }
      if (rows < R)
        for (int q = 0; q < p; q++)
          for (int i = rows; i < R; i++) d[(size_t)q * R + i] = 0.f;
    }
  }
}

template <int R>
void gemm_pack(float* dst, const xft_gemm_operand& a, size_t i0, int m, size_t p0, int kc) {
  if (a.dtype == kGemmBf16)
    gemm_pack_typed<R>(dst, (const uint16_t*)a.data, a.rs, a.cs, i0, m, p0, kc, gemm_widen_bf16);
  else
    gemm_pack_typed<R>(dst, (const float*)a.data, a.rs, a.cs, i0, m, p0, kc, [](float v) { return v; });
}

// every register tile of an m x n block; edge tiles go through a full tile on the stack
template <int MR, int NR, typename Micro>
void gemm_block(const float* a, const float* b, int m, int n, int kc, float* c, size_t ldc, bool load, Micro micro) {
  alignas(64) float tile[MR * NR];
  memset(tile, 0, sizeof(tile));  // the rows and columns past an edge stay finite
  for (int j = 0; j < n; j += NR) {
    const float* bp = b + (size_t)j * kc;
    const int nn = n - j < NR ? n - j : NR;
    for (int i = 0; i < m; i += MR) {
      const float* ap = a + (size_t)i * kc;
      const int mm = m - i < MR ? m - i : MR;
      float* cp = c + (size_t)i * ldc + j;
      if (load && i + MR < m)  // the next tile's partial sums, while this one computes
        for (int r = 0; r < MR && i + MR + r < m; r++) {
          __builtin_prefetch(cp + (size_t)(MR + r) * ldc);
          __builtin_prefetch(cp + (size_t)(MR + r) * ldc + NR - 1);
        }
      if (mm == MR && nn == NR) {
        micro(kc, ap, bp, cp, ldc, load);
        continue;
      }
      if (load)
        for (int r = 0; r < mm; r++) memcpy(tile + r * NR, cp + (size_t)r * ldc, sizeof(float) * nn);
      micro(kc, ap, bp, tile, (size_t)NR, load);
      for (int r = 0; r < mm; r++) memcpy(cp + (size_t)r * ldc, tile + r * NR, sizeof(float) * nn);
    }
  }
}

}  // namespace
