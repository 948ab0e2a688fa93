/*
Rotary position embedding, Hugging Face Llama convention (rotate_half: dims i and i + hd/2 pair up).
  x, out [rows, H * hd] (f32 or bf16): row r holds H heads of hd values, at position p = r % T
  (rows = B * T, sequences contiguous). For i < hd/2:
    inv_freq_i = theta^(-2i/hd)       computed on the host in fp64, rounded to fp32 (rope_inv_freq,
                                      the same code as binding/cpu/rope.cc: bit-identical frequencies)
    angle      = (p / scaling) * inv_freq_i    in fp32 (scaling: HF linear rope_scaling factor, 1 = none)
  forward:  out[i] = x[i] cos - x[i + hd/2] sin,   out[i + hd/2] = x[i + hd/2] cos + x[i] sin
            i.e. out = x * cos + rotate_half(x) * sin
  backward: dx = R^T dout: the same kernel with sin negated (rotation by -angle).
In place (out == x) is allowed: each pair is read and written by one thread.
Layout of the work: a thread takes W consecutive pairs (i0..i0+W-1 and their partners, 16-byte
vectors when hd/2 allows) of one row, computes their W sin/cos once and applies them to up to
kHeadsPerThread heads of the row (blockIdx.y picks the group of heads).
*/
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "xft_cuda.h"
#include "xft_math.h"
#include "xft_vec.cuh"

extern "C" cudaStream_t xft_cuda_stream(void);


namespace {

const int kMaxHalf = 256;       // hd <= 512, mirrored in binding/layer_ops.cc and lib/ops_layers.ts
const int kHeadsPerThread = 8;

// the frequencies, passed by value as a kernel parameter (1 KiB)
struct RopeFreqs {
  float inv_freq[kMaxHalf];
};

// identical to rope_inv_freq in binding/cpu/rope.cc
void rope_inv_freq(float theta, int hd, float* inv_freq) {
  for (int i = 0; i < hd / 2; i++) inv_freq[i] = (float)(1.0 / pow((double)theta, (2.0 * i) / hd));
}


// CUDA kernels

// x and out may alias (in place), hence no __restrict__
template <typename T, int W>
__global__ void rope_kernel(const T* x, T* out, int rows, int T_, int H, int hd, float scaling, float sign,
                            const RopeFreqs freqs) {
  const int half = hd / 2, chunks = half / W;
  const size_t item = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (item >= (size_t)rows * chunks) return;
  const int r = (int)(item / chunks), i0 = (int)(item % chunks) * W;
  const float pos = (float)(r % T_) / scaling;
  float cs[W], sn[W];
#pragma unroll
  for (int k = 0; k < W; k++) {
    sincosf(pos * freqs.inv_freq[i0 + k], &sn[k], &cs[k]);
    sn[k] *= sign;
  }
  const int h0 = blockIdx.y * kHeadsPerThread;
  const int h1 = min(H, h0 + kHeadsPerThread);
  for (int h = h0; h < h1; h++) {
    const size_t base = ((size_t)r * H + h) * hd + i0;
    float x1[W], x2[W], o1[W], o2[W];
    load_f32<T, W>(x + base, x1);
    load_f32<T, W>(x + base + half, x2);
#pragma unroll
    for (int k = 0; k < W; k++) {
      o1[k] = x1[k] * cs[k] - x2[k] * sn[k];
      o2[k] = x2[k] * cs[k] + x1[k] * sn[k];
    }
    store_f32<T, W>(out + base, o1);
    store_f32<T, W>(out + base + half, o2);
  }
}

// kernel launchers

template <typename T>
int rope(const T* x, T* out, int rows, int T_, int H, int hd, float theta, float scaling, float sign) {
  constexpr int W = 16 / sizeof(T);
  RopeFreqs freqs;
  rope_inv_freq(theta, hd, freqs.inv_freq);
  for (int i = hd / 2; i < kMaxHalf; i++) freqs.inv_freq[i] = 0.f;
  const int half = hd / 2, block = 128;
  const bool vec = half % W == 0 && aligned(x, 16) && aligned(out, 16);
  const size_t items = (size_t)rows * (vec ? half / W : half);
  const size_t gx = CEIL_DIV(items, (size_t)block);
  if (gx > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid((unsigned)gx, CEIL_DIV(H, kHeadsPerThread));
  cudaStream_t stream = xft_cuda_stream();
  if (vec) rope_kernel<T, W><<<grid, block, 0, stream>>>(x, out, rows, T_, H, hd, scaling, sign, freqs);
  else rope_kernel<T, 1><<<grid, block, 0, stream>>>(x, out, rows, T_, H, hd, scaling, sign, freqs);
  return cudaGetLastError();
}

int rope_dispatch(const void* x, void* out, int dtype, int rows, int T_, int H, int hd, float theta, float scaling,
                  float sign) {
  if (rows == 0 || H == 0) return 0;
  if (hd < 2 || hd % 2 || hd / 2 > kMaxHalf || T_ < 1 || CEIL_DIV(H, kHeadsPerThread) > 65535)
    return cudaErrorInvalidValue;
  if (dtype == XFT_BF16) return rope((const uint16_t*)x, (uint16_t*)out, rows, T_, H, hd, theta, scaling, sign);
  return rope((const float*)x, (float*)out, rows, T_, H, hd, theta, scaling, sign);
}

}  // namespace

extern "C" int xft_cuda_rope_forward(const void* x, void* out, int dtype, int rows, int T, int H, int hd, float theta,
                                     float scaling) {
  return rope_dispatch(x, out, dtype, rows, T, H, hd, theta, scaling, 1.f);
}

extern "C" int xft_cuda_rope_backward(const void* dout, void* dx, int dtype, int rows, int T, int H, int hd,
                                      float theta, float scaling) {
  return rope_dispatch(dout, dx, dtype, rows, T, H, hd, theta, scaling, -1.f);
}
