// CPU twin of cuda/fill.cu: counter-based random fills, constant fills, dtype casts.
#include <math.h>
#include <stdlib.h>

#include "xft_cpu.h"

namespace xft_cpu {

void to_f32(float* dst, const void* src, int dtype, size_t n) {
  if (dtype == XFT_BF16) {
    const uint16_t* s = (const uint16_t*)src;
    for (size_t i = 0; i < n; i++) dst[i] = xft_bf16_to_f32(s[i]);
  } else {
    const float* s = (const float*)src;
    for (size_t i = 0; i < n; i++) dst[i] = s[i];
  }
}
}  // namespace xft_cpu

int xft_cpu_fill_random(void* out, int dtype, size_t n, int kind, uint64_t seed, float a, float b) {
  for (size_t i = 0; i < n; i++) {
    float v = kind == 0 ? a + (b - a) * xft_uniform01(seed, i) : a + b * xft_normal(seed, i);
    if (dtype == XFT_I32) ((int32_t*)out)[i] = xft_f32_to_i32(floorf(v));
    else xft_cpu::store(out, dtype, i, v);
  }
  return 0;
}

int xft_cpu_fill_value(void* out, int dtype, size_t n, double value) {
  if (dtype == XFT_I32) {
    int32_t v = !(value == value) ? 0 : value >= 2147483647.0 ? 2147483647 : value <= -2147483648.0 ? (-2147483647 - 1) : (int32_t)value;
    for (size_t i = 0; i < n; i++) ((int32_t*)out)[i] = v;
  } else {
    for (size_t i = 0; i < n; i++) xft_cpu::store(out, dtype, i, (float)value);
  }
  return 0;
}

int xft_cpu_cast(void* out, int out_dtype, const void* in, int in_dtype, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (in_dtype == XFT_I32) {
      int32_t v = ((const int32_t*)in)[i];
      if (out_dtype == XFT_I32) ((int32_t*)out)[i] = v;
      else xft_cpu::store(out, out_dtype, i, (float)v);
    } else {
      float v = xft_cpu::load(in, in_dtype, i);
      if (out_dtype == XFT_I32) ((int32_t*)out)[i] = xft_f32_to_i32(v);  // truncation toward zero, saturating
      else xft_cpu::store(out, out_dtype, i, v);
    }
  }
  return 0;
}
