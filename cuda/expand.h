/*
UpIT's expert expansion ops (../shared/UPIT.md stage 2): the interface of cuda/expand.cu and its CPU
twin binding/cpu/expand.cc (same names, xft_cpu_ for xft_cuda_, same arguments, same bits). Pointers
are device pointers for CUDA and host pointers for the CPU; every tensor of a call has `numel`
elements of `dtype` (XFT_F32 or XFT_BF16). Functions return 0 or a cudaError_t value.

expand_delta_dots: out[q] = sum_i (a_i - base_i) (others[q]_i - base_i), q < count, fp64 values written
  to `out` (8 bytes each, on the device of the inputs) in the fixed reduction order described in
  cuda/expand.cu, so that the CPU and the GPU give the same bits.
expand_child: child_i = round(base_i + (alpha * t_j,i + beta * t_k,i)), t_x,i = m_x,i (x_i - base_i) / (1 - p)
  in fp64, m_x,i the counter-based keep mask of parent slot x (0 for a, 1 for b) of (seed, tensor_id);
  one rounding to `out_dtype`.
*/
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "xft_math.h"

#ifdef __cplusplus
extern "C" {
#endif

int xft_cuda_expand_delta_dots(const void* base, const void* a, const void* const* others, int count, int dtype,
                               size_t numel, double* out);
int xft_cpu_expand_delta_dots(const void* base, const void* a, const void* const* others, int count, int dtype,
                              size_t numel, double* out);
int xft_cuda_expand_child(const void* base, const void* a, const void* b, int dtype, size_t numel, void* out,
                          int out_dtype, double alpha, double beta, double drop_rate, uint64_t seed, uint32_t tensor_id);
int xft_cpu_expand_child(const void* base, const void* a, const void* b, int dtype, size_t numel, void* out,
                         int out_dtype, double alpha, double beta, double drop_rate, uint64_t seed, uint32_t tensor_id);

#ifdef __cplusplus
}
#endif

// the reduction layout of expand_delta_dots, shared by the kernels and the twin
#define EXPAND_BLOCK 256     // threads per block (8 warps)
#define EXPAND_DOT_GRID 256  // the most blocks: at most one partial per thread of the final block
#define EXPAND_GROUP 4       // consecutive elements a lane takes at a time
#define EXPAND_DOT_CHUNK 8   // others per pass (fp64 accumulators per thread)

// blocks of the first pass for n elements, a function of n alone (the twin uses it too): enough for one
// group per lane, at most EXPAND_DOT_GRID; the lanes are its EXPAND_BLOCK threads each
XFT_HD int expand_dot_grid(size_t n) {
  const size_t groups = (n + EXPAND_GROUP - 1) / EXPAND_GROUP;
  const size_t blocks = (groups + EXPAND_BLOCK - 1) / EXPAND_BLOCK;
  return blocks < 1 ? 1 : blocks > EXPAND_DOT_GRID ? EXPAND_DOT_GRID : (int)blocks;
}

// the keep-mask stream of parent slot 0 (a) or 1 (b) of a tensor, and the keep decision of element i:
// u = 53 random bits / 2^53 in [0, 1), kept when u >= p (p = 0 keeps every element)
XFT_HD uint64_t expand_stream(uint64_t seed, uint32_t tensor_id, int slot) {
  return xft_hash64(xft_hash64(seed, tensor_id), (uint64_t)slot);
}
XFT_HD bool expand_keep(uint64_t stream, uint64_t i, double drop_rate) {
  return (double)(xft_hash64(stream, i) >> 11) * (1.0 / 9007199254740992.0) >= drop_rate;
}

// fp64 -> bf16 bits in one rounding (to nearest even): fp32 rounded to odd first (its 16 extra bits keep
// the information the final rounding needs), then fp32 -> bf16
XFT_HD uint16_t expand_f64_to_bf16(double d) {
  if (d != d) return 0x7fc0u;
  float f = (float)d;
  if ((double)f != d) {
    uint32_t u = xft_f32_bits(f);
    if (fabs((double)f) > fabs(d)) u -= 1u;  // the nearest fp32 went away from zero: truncate instead
    f = xft_bits_f32(u | 1u);
  }
  return xft_f32_to_bf16(f);
}
