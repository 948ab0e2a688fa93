/*
The CPU backend: a twin of every CUDA op in cuda/xft_cuda.h, with the same name (prefix
xft_cpu_ for xft_cuda_), the same arguments and the same semantics, on host pointers. It is the
oracle the GPU tests compare against and the fallback where no GPU exists. Arithmetic is fp32
(bf16 values are widened on load and rounded to nearest even on store) unless noted.
Functions return 0; the binding validates arguments before calling them.
*/
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "../../cuda/xft_math.h"

// fill.cc
int xft_cpu_fill_random(void* out, int dtype, size_t n, int kind, uint64_t seed, float a, float b);
int xft_cpu_fill_value(void* out, int dtype, size_t n, double value);
int xft_cpu_cast(void* out, int out_dtype, const void* in, int in_dtype, size_t n);

// routing.cc
int xft_cpu_route_forward(const void* logits, int dtype, int T, int N, int K, int normalize, int shared,
                          int* experts, float* weights, int* counts, int* offsets, int* order,
                          float* importance, float* load);
int xft_cpu_route_backward(const void* logits, int dtype, int T, int N, int K, int normalize, int shared,
                           const int* experts, const float* dweights, const float* dimportance,
                           void* dlogits);

// grouped_gemm.cc
int xft_cpu_grouped_gemm_forward(const void* x, const void* w, const int* offsets, void* y,
                                 int dtype, int M, int n, int k, int E);
int xft_cpu_grouped_gemm_backward(const void* x, const void* w, const int* offsets, const void* dy,
                                  void* dx, void* dw, int dtype, int M, int n, int k, int E,
                                  int accumulate);

// merge.cc
int xft_cpu_merge_forward(const void* const* weights, void* const* merged, const size_t* numel,
                          int count, int dtype, int E, const float* alpha, float shared_rate);
int xft_cpu_merge_backward(const void* const* weights, const void* const* dmerged, const size_t* numel,
                           int count, int dtype, int E, const float* alpha, float shared_rate,
                           float* dalpha, int accumulate);

// ---- [layers] (binding/cpu/{embedding,rmsnorm,rope,swiglu,elementwise}.cc) ----
// ---- [/layers] ----

// ---- [train] (binding/cpu/{attention,cross_entropy,adamw,moe_permute}.cc) ----
// ---- [/train] ----

// helpers shared by the CPU files
namespace xft_cpu {
// value i of a f32 or bf16 buffer, as fp32
inline float load(const void* p, int dtype, size_t i) {
  return dtype == XFT_BF16 ? xft_bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}
// store fp32 v into a f32 or bf16 buffer (round to nearest even for bf16)
inline void store(void* p, int dtype, size_t i, float v) {
  if (dtype == XFT_BF16) ((uint16_t*)p)[i] = xft_f32_to_bf16(v);
  else ((float*)p)[i] = v;
}
// widen n values of a f32 or bf16 buffer into dst
void to_f32(float* dst, const void* src, int dtype, size_t n);
}  // namespace xft_cpu
