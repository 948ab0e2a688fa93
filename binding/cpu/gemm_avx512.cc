// The fast CPU GEMM's AVX-512F kernel (gemm_kernels.h): a 12 x 32 register tile, 24 zmm accumulators.
// CMakeLists.txt compiles this file alone with -mavx512f -mfma; grouped_gemm.cc calls it only where
// the CPU has AVX-512F.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "gemm_kernel_impl.h"

namespace {

constexpr int MR = 12, NR = 32;

inline __attribute__((always_inline)) void micro_12x32(int kc, const float* a, const float* b, float* c, size_t ldc,
                                                       bool load) {
  __m512 acc[MR][2];
#pragma GCC unroll 12
  for (int i = 0; i < MR; i++) {
    acc[i][0] = load ? _mm512_loadu_ps(c + i * ldc) : _mm512_setzero_ps();
    acc[i][1] = load ? _mm512_loadu_ps(c + i * ldc + 16) : _mm512_setzero_ps();
  }
  for (int p = 0; p < kc; p++) {
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
    _mm_prefetch((const char*)(b + 8 * NR), _MM_HINT_T0);
#pragma GCC unroll 12
    for (int i = 0; i < MR; i++) {
      const __m512 ai = _mm512_set1_ps(a[i]);
      acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
    }
    a += MR;
    b += NR;
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; i++) {
    _mm512_storeu_ps(c + i * ldc, acc[i][0]);
    _mm512_storeu_ps(c + i * ldc + 16, acc[i][1]);
  }
}

void block(const float* a, const float* b, int m, int n, int kc, float* c, size_t ldc, bool load) {
  gemm_block<MR, NR>(a, b, m, n, kc, c, ldc, load, micro_12x32);
}

// 16 chains of zmm FMAs: enough in flight for 2 FMA pipes of up to 8 cycles' latency; each chain
// converges to a / (1 - m) = 0.1 (no overflow, no subnormals)
constexpr int kPeakChains = 16;
float peak(long iters) {
  __m512 acc[kPeakChains];
  for (int i = 0; i < kPeakChains; i++) acc[i] = _mm512_set1_ps(1.f + 1e-3f * i);
  const __m512 m = _mm512_set1_ps(0.999999f), a = _mm512_set1_ps(1e-7f);
  for (long it = 0; it < iters; it++) {
#pragma GCC unroll 16
    for (int i = 0; i < kPeakChains; i++) acc[i] = _mm512_fmadd_ps(acc[i], m, a);
  }
  for (int i = 1; i < kPeakChains; i++) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  float v[16];  // not _mm512_reduce_add_ps: GCC 12 warns of an uninitialized value inside it
  _mm512_storeu_ps(v, acc[0]);
  float sum = 0.f;
  for (float x : v) sum += x;
  return sum;
}

}  // namespace

extern const xft_gemm_kernel xft_gemm_avx512 = {"avx512", MR, NR, 256, 144, 256, gemm_pack<MR>, gemm_pack<NR>, block,
                                                peak, kPeakChains * 16 * 2};
#endif
