// The fast CPU GEMM's AVX2 + FMA kernel (gemm_kernels.h): a 6 x 16 register tile, 12 ymm accumulators.
// CMakeLists.txt compiles this file alone with -mavx2 -mfma; grouped_gemm.cc calls it only where the
// CPU has both.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "gemm_kernel_impl.h"

namespace {

constexpr int MR = 6, NR = 16;

inline __attribute__((always_inline)) void micro_6x16(int kc, const float* a, const float* b, float* c, size_t ldc,
                                                      bool load) {
  __m256 acc[MR][2];
#pragma GCC unroll 6
  for (int i = 0; i < MR; i++) {
    acc[i][0] = load ? _mm256_loadu_ps(c + i * ldc) : _mm256_setzero_ps();
    acc[i][1] = load ? _mm256_loadu_ps(c + i * ldc + 8) : _mm256_setzero_ps();
  }
  for (int p = 0; p < kc; p++) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    _mm_prefetch((const char*)(b + 8 * NR), _MM_HINT_T0);
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) {
      const __m256 ai = _mm256_broadcast_ss(a + i);
      acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
    }
    a += MR;
    b += NR;
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; i++) {
    _mm256_storeu_ps(c + i * ldc, acc[i][0]);
    _mm256_storeu_ps(c + i * ldc + 8, acc[i][1]);
  }
}

void block(const float* a, const float* b, int m, int n, int kc, float* c, size_t ldc, bool load) {
  gemm_block<MR, NR>(a, b, m, n, kc, c, ldc, load, micro_6x16);
}

// 12 chains of ymm FMAs (16 registers: 12 accumulators and the 2 operands): enough in flight for 2 FMA
// pipes of up to 6 cycles' latency; each chain converges to a / (1 - m) = 0.1
constexpr int kPeakChains = 12;
float peak(long iters) {
  __m256 acc[kPeakChains];
  for (int i = 0; i < kPeakChains; i++) acc[i] = _mm256_set1_ps(1.f + 1e-3f * i);
  const __m256 m = _mm256_set1_ps(0.999999f), a = _mm256_set1_ps(1e-7f);
  for (long it = 0; it < iters; it++) {
#pragma GCC unroll 12
    for (int i = 0; i < kPeakChains; i++) acc[i] = _mm256_fmadd_ps(acc[i], m, a);
  }
  for (int i = 1; i < kPeakChains; i++) acc[0] = _mm256_add_ps(acc[0], acc[i]);
  float v[8];
  _mm256_storeu_ps(v, acc[0]);
  return v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7];
}

}  // namespace

extern const xft_gemm_kernel xft_gemm_avx2 = {"avx2", MR, NR, 256, 144, 256, gemm_pack<MR>, gemm_pack<NR>, block,
                                              peak, kPeakChains * 8 * 2};
#endif
