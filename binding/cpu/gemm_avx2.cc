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

}  // namespace

extern const xft_gemm_kernel xft_gemm_avx2 = {"avx2", MR, NR, 256, 144, 256, gemm_pack<MR>, gemm_pack<NR>, block};
#endif
