// The fast CPU GEMM's portable kernel (gemm_kernels.h), for any CPU without AVX2 + FMA: on arm64 a
// 4 x 16 register tile of NEON fused multiply-adds (the order and the bits of the x86 kernels), elsewhere
// a 4 x 8 tile of GCC/Clang vector types that the compiler maps to the baseline (SSE2 on x86-64), the
// product rounded before the add.
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "gemm_kernel_impl.h"

namespace {

#if defined(__aarch64__)
constexpr int MR = 4, NR = 16;

void micro(int kc, const float* a, const float* b, float* c, size_t ldc, bool load) {
  float32x4_t acc[MR][4];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < 4; j++) acc[i][j] = load ? vld1q_f32(c + i * ldc + 4 * j) : vdupq_n_f32(0.f);
  for (int p = 0; p < kc; p++) {
    float32x4_t bv[4];
    for (int j = 0; j < 4; j++) bv[j] = vld1q_f32(b + 4 * j);
    for (int i = 0; i < MR; i++) {
      const float32x4_t ai = vdupq_n_f32(a[i]);
      for (int j = 0; j < 4; j++) acc[i][j] = vfmaq_f32(acc[i][j], ai, bv[j]);
    }
    a += MR;
    b += NR;
  }
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < 4; j++) vst1q_f32(c + i * ldc + 4 * j, acc[i][j]);
}
#else
constexpr int MR = 4, NR = 8;
typedef float v4 __attribute__((vector_size(16)));

inline v4 load4(const float* p) {
  v4 v;
  memcpy(&v, p, sizeof(v));
  return v;
}

void micro(int kc, const float* a, const float* b, float* c, size_t ldc, bool load) {
  v4 acc[MR][2];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < 2; j++) acc[i][j] = load ? load4(c + i * ldc + 4 * j) : v4{0.f, 0.f, 0.f, 0.f};
  for (int p = 0; p < kc; p++) {
    const v4 b0 = load4(b), b1 = load4(b + 4);
    for (int i = 0; i < MR; i++) {
      const v4 ai = {a[i], a[i], a[i], a[i]};
      acc[i][0] = ai * b0 + acc[i][0];
      acc[i][1] = ai * b1 + acc[i][1];
    }
    a += MR;
    b += NR;
  }
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < 2; j++) memcpy(c + i * ldc + 4 * j, &acc[i][j], sizeof(v4));
}
#endif

void block(const float* a, const float* b, int m, int n, int kc, float* c, size_t ldc, bool load) {
  gemm_block<MR, NR>(a, b, m, n, kc, c, ldc, load, micro);
}

// 12 chains of 4-float vector multiply-adds (fused on arm64, the product rounded first elsewhere): the
// baseline's ceiling; each chain converges to a / (1 - m) = 0.1
constexpr int kPeakChains = 12;
typedef float peak_v4 __attribute__((vector_size(16)));
float peak(long iters) {
  peak_v4 acc[kPeakChains];
  for (int i = 0; i < kPeakChains; i++) acc[i] = peak_v4{1.f, 1.f, 1.f, 1.f} + 1e-3f * i;
  const peak_v4 m = {0.999999f, 0.999999f, 0.999999f, 0.999999f}, a = {1e-7f, 1e-7f, 1e-7f, 1e-7f};
  for (long it = 0; it < iters; it++) {
#pragma GCC unroll 12
    for (int i = 0; i < kPeakChains; i++) acc[i] = acc[i] * m + a;
  }
  for (int i = 1; i < kPeakChains; i++) acc[0] += acc[i];
  return acc[0][0] + acc[0][1] + acc[0][2] + acc[0][3];
}

}  // namespace

extern const xft_gemm_kernel xft_gemm_portable = {"portable", MR, NR, 256, 128, 256, gemm_pack<MR>, gemm_pack<NR>, block,
                                                  peak, kPeakChains * 4 * 2};
