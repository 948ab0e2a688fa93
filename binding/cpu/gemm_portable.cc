// The fast CPU GEMM's portable kernel (gemm_kernels.h): a 4 x 16 register tile in plain C++ that the
// compiler vectorizes for the baseline of the target (SSE2 on x86-64, NEON on arm64). It fuses each
// multiply-add where fmaf is one instruction (__FP_FAST_FMAF, arm64), the order of gemm_kernels.h.
#include <math.h>

#include "gemm_kernel_impl.h"

namespace {

constexpr int MR = 4, NR = 16;

inline float madd(float a, float b, float c) {
#ifdef __FP_FAST_FMAF
  return fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

void micro_4x16(int kc, const float* a, const float* b, float* c, size_t ldc, bool load) {
  float acc[MR][NR];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NR; j++) acc[i][j] = load ? c[i * ldc + j] : 0.f;
  for (int p = 0; p < kc; p++) {
    for (int i = 0; i < MR; i++) {
      const float ai = a[i];
      for (int j = 0; j < NR; j++) acc[i][j] = madd(ai, b[j], acc[i][j]);
    }
    a += MR;
    b += NR;
  }
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NR; j++) c[i * ldc + j] = acc[i][j];
}

void block(const float* a, const float* b, int m, int n, int kc, float* c, size_t ldc, bool load) {
  gemm_block<MR, NR>(a, b, m, n, kc, c, ldc, load, micro_4x16);
}

}  // namespace

extern const xft_gemm_kernel xft_gemm_portable = {"portable", MR, NR, 256, 128, 256, gemm_pack<MR>, gemm_pack<NR>, block};
