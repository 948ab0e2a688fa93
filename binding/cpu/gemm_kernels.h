/*
The fast CPU GEMM's instruction-set kernels (grouped_gemm.cc drives them): C (+)= A B^T over packed
panels, A [m, K] and B [n, K] read through strides, f32 or bf16 (widened while packing), fp32
accumulation. One kernel per instruction set, each in its own file compiled for it
(gemm_avx512.cc: AVX-512F, gemm_avx2.cc: AVX2 + FMA, gemm_portable.cc: plain C++ for any CPU);
grouped_gemm.cc picks one at run time from the CPU's features.

Summation order (the same in every kernel, whatever the blocking or thread count): each output
element is one chain c = fma(a_p, b_p, c) over p = 0 .. K-1 in order, starting from 0; a depth block
after the first continues the chain from the partial sums it loads from C. The AVX2 and AVX-512
kernels therefore give the same bits; the portable one does too where the compiler has a fast fused
multiply-add (__FP_FAST_FMAF: arm64), and rounds the product separately elsewhere.

This header holds plain declarations only: the ISA files include nothing else that a linker could
merge across files compiled for different instruction sets (templates, inline functions).
*/
#pragma once
#include <stddef.h>

// element (i, p) of an operand at data[i * rs + p * cs]; dtype XFT_F32 or XFT_BF16
struct xft_gemm_operand {
  const void* data;
  int dtype;
  size_t rs, cs;
};

struct xft_gemm_kernel {
  const char* name;
  int mr, nr;  // the register tile: mr rows of A by nr rows of B
  int kc;      // depth of one packed block
  int mc, nc;  // largest block of C one task computes (multiples of mr, nr)
  // rows [i0, i0 + m) by depth [p0, p0 + kc) of an operand into ceil(m / r) panels of r x kc, p-major
  // (panel q at dst + q * r * kc, element (i, p) at p * r + i), rows past m zero; r = mr (pack_a) or nr
  void (*pack_a)(float* dst, const xft_gemm_operand& a, size_t i0, int m, size_t p0, int kc);
  void (*pack_b)(float* dst, const xft_gemm_operand& b, size_t i0, int m, size_t p0, int kc);
  // c[i, j] (i < m, j < n; row stride ldc) = (load ? c[i, j] : 0) + sum_p a[i, p] b[j, p] over one
  // packed depth block of kc > 0 (a: ceil(m / mr) packed panels, b: ceil(n / nr))
  void (*block)(const float* a, const float* b, int m, int n, int kc, float* c, size_t ldc, bool load);
  // the machine's ceiling for this instruction set (bench/cpu's peak probe): `iters` rounds of
  // independent register-only fused multiply-adds, peak_flops each, no memory traffic; returns a sum of
  // the results (so that the compiler keeps the loop)
  float (*peak)(long iters);
  int peak_flops;
};

extern const xft_gemm_kernel xft_gemm_portable;
#if defined(__x86_64__) || defined(_M_X64)
extern const xft_gemm_kernel xft_gemm_avx2;
extern const xft_gemm_kernel xft_gemm_avx512;
#endif
