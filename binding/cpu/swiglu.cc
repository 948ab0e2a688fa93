/*
CPU twin of cuda/swiglu.cu: the SwiGLU activation of the Llama FFN, elementwise over n values.
  forward:  h = silu(g) * u,  silu(g) = g * s,  s = sigmoid(g) = 1 / (1 + exp(-g))
  backward: dg = dh * u * s * (1 + g * (1 - s)),  du = dh * silu(g)
g, u, h, dh, dg, du share one dtype (f32 or bf16); an output may be one of the inputs (the same
buffer, never a shifted overlap): element i is read before it is written, so the loops vectorize
with __restrict pointers.
Vectorized (binding/cpu/vec.h: fast exp, AVX2 clone) and split over threads; XFT_CPU_REFERENCE=1
computes exp with libm's expf.
*/
#include <math.h>

#include "vec.h"
#include "xft_cpu.h"

namespace {

template <class T, bool kFast>
XFT_INLINE void forward_body(const T* __restrict g, const T* __restrict u, T* __restrict h, size_t a, size_t b) {
  for (size_t i = a; i < b; i++) {
    const float gv = xft_cpu::ld(g, i), uv = xft_cpu::ld(u, i);
    const float s = 1.0f / (1.0f + (kFast ? xft_cpu::fast_exp(-gv) : expf(-gv)));
    xft_cpu::st(h, i, gv * s * uv);
  }
}

template <class T, bool kFast>
XFT_INLINE void backward_body(const T* __restrict g, const T* __restrict u, const T* __restrict dh, T* __restrict dg,
                              T* __restrict du, size_t a, size_t b) {
  for (size_t i = a; i < b; i++) {
    const float gv = xft_cpu::ld(g, i), uv = xft_cpu::ld(u, i), dhv = xft_cpu::ld(dh, i);
    const float s = 1.0f / (1.0f + (kFast ? xft_cpu::fast_exp(-gv) : expf(-gv)));
    xft_cpu::st(dg, i, dhv * uv * s * (1.0f + gv * (1.0f - s)));
    xft_cpu::st(du, i, dhv * gv * s);
  }
}

XFT_VEC void forward_f32(const float* g, const float* u, float* h, size_t a, size_t b) {
  forward_body<float, true>(g, u, h, a, b);
}
XFT_VEC void forward_bf16(const uint16_t* g, const uint16_t* u, uint16_t* h, size_t a, size_t b) {
  forward_body<uint16_t, true>(g, u, h, a, b);
}
XFT_VEC void backward_f32(const float* g, const float* u, const float* dh, float* dg, float* du, size_t a, size_t b) {
  backward_body<float, true>(g, u, dh, dg, du, a, b);
}
XFT_VEC void backward_bf16(const uint16_t* g, const uint16_t* u, const uint16_t* dh, uint16_t* dg, uint16_t* du, size_t a,
                           size_t b) {
  backward_body<uint16_t, true>(g, u, dh, dg, du, a, b);
}

}  // namespace

int xft_cpu_swiglu_forward(const void* g, const void* u, void* h, int dtype, size_t n) {
  const bool ref = xft_cpu::reference_mode(), bf = dtype == XFT_BF16;
  xft_cpu::parallel_for(n, 20.0 * (double)n, [&](size_t a, size_t b) {
    if (ref && bf) forward_body<uint16_t, false>((const uint16_t*)g, (const uint16_t*)u, (uint16_t*)h, a, b);
    else if (ref) forward_body<float, false>((const float*)g, (const float*)u, (float*)h, a, b);
    else if (bf) forward_bf16((const uint16_t*)g, (const uint16_t*)u, (uint16_t*)h, a, b);
    else forward_f32((const float*)g, (const float*)u, (float*)h, a, b);
  });
  return 0;
}

int xft_cpu_swiglu_backward(const void* g, const void* u, const void* dh, void* dg, void* du, int dtype, size_t n) {
  const bool ref = xft_cpu::reference_mode(), bf = dtype == XFT_BF16;
  xft_cpu::parallel_for(n, 30.0 * (double)n, [&](size_t a, size_t b) {
    typedef const uint16_t* CB;
    typedef const float* CF;
    if (ref && bf) backward_body<uint16_t, false>((CB)g, (CB)u, (CB)dh, (uint16_t*)dg, (uint16_t*)du, a, b);
    else if (ref) backward_body<float, false>((CF)g, (CF)u, (CF)dh, (float*)dg, (float*)du, a, b);
    else if (bf) backward_bf16((CB)g, (CB)u, (CB)dh, (uint16_t*)dg, (uint16_t*)du, a, b);
    else backward_f32((CF)g, (CF)u, (CF)dh, (float*)dg, (float*)du, a, b);
  });
  return 0;
}

// rows of gu [rows, 2f] = [g | u] into h [rows, f] on the calling thread (the fused FFN's epilogue,
// which splits the rows over threads itself): the same values as the whole-tensor op
void xft_cpu_swiglu_forward_rows(const void* gu, void* h, int dtype, size_t rows, size_t f) {
  const bool ref = xft_cpu::reference_mode(), bf = dtype == XFT_BF16;
  for (size_t r = 0; r < rows; r++) {
    if (bf) {
      const uint16_t* g = (const uint16_t*)gu + r * 2 * f;
      uint16_t* hr = (uint16_t*)h + r * f;
      if (ref) forward_body<uint16_t, false>(g, g + f, hr, 0, f);
      else forward_bf16(g, g + f, hr, 0, f);
    } else {
      const float* g = (const float*)gu + r * 2 * f;
      float* hr = (float*)h + r * f;
      if (ref) forward_body<float, false>(g, g + f, hr, 0, f);
      else forward_f32(g, g + f, hr, 0, f);
    }
  }
}

// dgu [rows, 2f] = [dg | du] from gu [rows, 2f] and dh [rows, f], on the calling thread
void xft_cpu_swiglu_backward_rows(const void* gu, const void* dh, void* dgu, int dtype, size_t rows, size_t f) {
  const bool ref = xft_cpu::reference_mode(), bf = dtype == XFT_BF16;
  for (size_t r = 0; r < rows; r++) {
    if (bf) {
      const uint16_t *g = (const uint16_t*)gu + r * 2 * f, *d = (const uint16_t*)dh + r * f;
      uint16_t* dg = (uint16_t*)dgu + r * 2 * f;
      if (ref) backward_body<uint16_t, false>(g, g + f, d, dg, dg + f, 0, f);
      else backward_bf16(g, g + f, d, dg, dg + f, 0, f);
    } else {
      const float *g = (const float*)gu + r * 2 * f, *d = (const float*)dh + r * f;
      float* dg = (float*)dgu + r * 2 * f;
      if (ref) backward_body<float, false>(g, g + f, d, dg, dg + f, 0, f);
      else backward_f32(g, g + f, d, dg, dg + f, 0, f);
    }
  }
}
