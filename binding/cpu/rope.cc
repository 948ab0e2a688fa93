/*
CPU twin of cuda/rope.cu: rotary position embedding, Hugging Face Llama convention (rotate_half).
  x, out [rows, H * hd]: row r holds H heads of hd values at position p = r % T (rows = B * T).
  inv_freq_i = theta^(-2i/hd), i < hd/2 (computed in fp64, rounded to fp32: the same host code as the
  CUDA launcher, so both sides use bit-identical frequencies), angle = (p / scaling) * inv_freq_i in fp32.
  forward:  out[i] = x[i] cos - x[i + hd/2] sin,   out[i + hd/2] = x[i + hd/2] cos + x[i] sin
            (out = x * cos + rotate_half(x) * sin with cos, sin repeated over both halves)
  backward: dx = R^T dout, the same rotation by -angle.
out may alias x: every pair is read before it is written.
*/
#include <math.h>

#include <vector>

#include "xft_cpu.h"

namespace {

// identical to rope_inv_freq in cuda/rope.cu
void rope_inv_freq(float theta, int hd, float* inv_freq) {
  for (int i = 0; i < hd / 2; i++) inv_freq[i] = (float)(1.0 / pow((double)theta, (2.0 * i) / hd));
}

void rope(const void* x, void* out, int dtype, int rows, int T, int H, int hd, float theta, float scaling, float sign) {
  const int half = hd / 2;
  std::vector<float> inv_freq(half), cs(half), sn(half);
  rope_inv_freq(theta, hd, inv_freq.data());
  for (int r = 0; r < rows; r++) {
    const float pos = (float)(r % T) / scaling;
    for (int i = 0; i < half; i++) {
      const float angle = pos * inv_freq[i];
      cs[i] = cosf(angle);
      sn[i] = sign * sinf(angle);
    }
    for (int h = 0; h < H; h++) {
      const size_t base = ((size_t)r * H + h) * hd;
      for (int i = 0; i < half; i++) {
        const float x1 = xft_cpu::load(x, dtype, base + i), x2 = xft_cpu::load(x, dtype, base + half + i);
        xft_cpu::store(out, dtype, base + i, x1 * cs[i] - x2 * sn[i]);
        xft_cpu::store(out, dtype, base + half + i, x2 * cs[i] + x1 * sn[i]);
      }
    }
  }
}

}  // namespace

int xft_cpu_rope_forward(const void* x, void* out, int dtype, int rows, int T, int H, int hd, float theta,
                         float scaling) {
  rope(x, out, dtype, rows, T, H, hd, theta, scaling, 1.f);
  return 0;
}

int xft_cpu_rope_backward(const void* dout, void* dx, int dtype, int rows, int T, int H, int hd, float theta,
                          float scaling) {
  rope(dout, dx, dtype, rows, T, H, hd, theta, scaling, -1.f);
  return 0;
}
