/*
CPU twin of cuda/swiglu.cu: the SwiGLU activation of the Llama FFN, elementwise over n values.
  forward:  h = silu(g) * u,  silu(g) = g * s,  s = sigmoid(g) = 1 / (1 + exp(-g))
  backward: dg = dh * u * s * (1 + g * (1 - s)),  du = dh * silu(g)
g, u, h, dh, dg, du share one dtype (f32 or bf16); outputs may alias inputs.
*/
#include <math.h>

#include "xft_cpu.h"

int xft_cpu_swiglu_forward(const void* g, const void* u, void* h, int dtype, size_t n) {
  for (size_t i = 0; i < n; i++) {
    const float gv = xft_cpu::load(g, dtype, i), uv = xft_cpu::load(u, dtype, i);
    const float s = 1.0f / (1.0f + expf(-gv));
    xft_cpu::store(h, dtype, i, gv * s * uv);
  }
  return 0;
}

int xft_cpu_swiglu_backward(const void* g, const void* u, const void* dh, void* dg, void* du, int dtype, size_t n) {
  for (size_t i = 0; i < n; i++) {
    const float gv = xft_cpu::load(g, dtype, i), uv = xft_cpu::load(u, dtype, i), dhv = xft_cpu::load(dh, dtype, i);
    const float s = 1.0f / (1.0f + expf(-gv));
    xft_cpu::store(dg, dtype, i, dhv * uv * s * (1.0f + gv * (1.0f - s)));
    xft_cpu::store(du, dtype, i, dhv * gv * s);
  }
  return 0;
}
