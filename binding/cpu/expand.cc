/*
CPU twin of cuda/expand.cu: UpIT's delta dots (parent similarity) and fused DARE crossover, with the same
bits as the kernels (interface and math: cuda/expand.h, cuda/expand.cu).
  delta dots: out[q] = Σ_i (a_i − θ0_i)(o_q,i − θ0_i) in fp64, summed in the kernels' order: L = G·EXPAND_BLOCK
              lane accumulators, G = expand_dot_grid(n) (lane ℓ takes the groups of EXPAND_GROUP elements
              g ≡ ℓ mod L, ascending), then the GPU's block reductions replayed (an xor butterfly per warp of
              32 lanes, then over the block's warps; the same again over the G partials, zeros past G).
  child:      child_i = round(θ0_i + (α t_a,i + β t_b,i)), t_x,i = m_x,i (x_i − θ0_i) / (1 − p), fp64, the
              keep masks from expand.h (counter-based: the same bits on either device).
Threads (threads.cc): the dots split the lanes, the child splits the elements; either way each output
value is computed by one thread in a fixed order, so the bits do not depend on the thread count.
*/
#include <math.h>

#include <vector>

#include "../../cuda/expand.h"
#include "xft_cpu.h"

namespace {

// the result of an xor butterfly over 32 lanes (every lane ends with the same value: + commutes)
double warp_sum(const double* v) {
  double w[32], t[32];
  for (int l = 0; l < 32; l++) w[l] = v[l];
  for (int o = 16; o > 0; o >>= 1) {
    for (int l = 0; l < 32; l++) t[l] = w[l] + w[l ^ o];
    for (int l = 0; l < 32; l++) w[l] = t[l];
  }
  return w[0];
}

// xft_reduce.cuh's block_sum over EXPAND_BLOCK values: each warp's sum, then warp 0 over those (zeros
// in the lanes past the last warp)
double block_sum(const double* v) {
  constexpr int warps = EXPAND_BLOCK / 32;
  double red[32] = {0.0};
  for (int w = 0; w < warps; w++) red[w] = warp_sum(v + w * 32);
  return warp_sum(red);
}

template <typename T>
inline double value(const T* p, size_t i);
template <>
inline double value<float>(const float* p, size_t i) { return (double)p[i]; }
template <>
inline double value<uint16_t>(const uint16_t* p, size_t i) { return (double)xft_bf16_to_f32(p[i]); }

template <typename T>
void delta_dots(const T* base, const T* a, const T* const* others, int nq, size_t n, double* out) {
  const int grid = expand_dot_grid(n);
  const size_t lanes = (size_t)grid * EXPAND_BLOCK, groups = (n + EXPAND_GROUP - 1) / EXPAND_GROUP;
  // acc[q * lanes + lane]
  std::vector<double> acc((size_t)nq * lanes, 0.0);
  const size_t used = groups < lanes ? groups : lanes;
  xft_cpu::parallel_for(used, 3.0 * n * (nq + 1), [&](size_t l0, size_t l1) {
    for (size_t g0 = 0; g0 < groups; g0 += lanes)
      for (size_t lane = l0; lane < l1 && g0 + lane < groups; lane++) {
        const size_t g = g0 + lane;
        for (size_t i = g * EXPAND_GROUP; i < (g + 1) * EXPAND_GROUP && i < n; i++) {
          const double b0 = value(base, i), da = value(a, i) - b0;
          for (int q = 0; q < nq; q++) acc[(size_t)q * lanes + lane] += da * (value(others[q], i) - b0);
        }
      }
  });
  std::vector<double> partial(EXPAND_BLOCK, 0.0);
  for (int q = 0; q < nq; q++) {
    for (int b = 0; b < grid; b++) partial[b] = block_sum(&acc[(size_t)q * lanes + (size_t)b * EXPAND_BLOCK]);
    out[q] = block_sum(partial.data());
  }
}

template <typename T>
void child(const T* base, const T* a, const T* b, size_t n, void* out, int out_dtype, double alpha, double beta,
           double drop_rate, uint64_t stream_a, uint64_t stream_b) {
  const double keep = 1.0 - drop_rate;
  xft_cpu::parallel_for(n, 40.0 * n, [&](size_t i0, size_t i1) {
    for (size_t i = i0; i < i1; i++) {
      const double b0 = value(base, i);
      const double ta = expand_keep(stream_a, i, drop_rate) ? (value(a, i) - b0) / keep : 0.0;
      const double tb = expand_keep(stream_b, i, drop_rate) ? (value(b, i) - b0) / keep : 0.0;
      const double y = b0 + (alpha * ta + beta * tb);
      if (out_dtype == XFT_BF16) ((uint16_t*)out)[i] = expand_f64_to_bf16(y);
      else ((float*)out)[i] = (float)y;
    }
  });
}

}  // namespace

int xft_cpu_expand_delta_dots(const void* base, const void* a, const void* const* others, int count, int dtype,
                              size_t numel, double* out) {
  for (int q0 = 0; q0 < count; q0 += EXPAND_DOT_CHUNK) {
    const int nq = count - q0 < EXPAND_DOT_CHUNK ? count - q0 : EXPAND_DOT_CHUNK;
    if (dtype == XFT_BF16)
      delta_dots<uint16_t>((const uint16_t*)base, (const uint16_t*)a, (const uint16_t* const*)(others + q0), nq, numel, out + q0);
    else
      delta_dots<float>((const float*)base, (const float*)a, (const float* const*)(others + q0), nq, numel, out + q0);
  }
  return 0;
}

int xft_cpu_expand_child(const void* base, const void* a, const void* b, int dtype, size_t numel, void* out,
                         int out_dtype, double alpha, double beta, double drop_rate, uint64_t seed, uint32_t tensor_id) {
  const uint64_t sa = expand_stream(seed, tensor_id, 0), sb = expand_stream(seed, tensor_id, 1);
  if (dtype == XFT_BF16)
    child<uint16_t>((const uint16_t*)base, (const uint16_t*)a, (const uint16_t*)b, numel, out, out_dtype, alpha, beta, drop_rate, sa, sb);
  else
    child<float>((const float*)base, (const float*)a, (const float*)b, numel, out, out_dtype, alpha, beta, drop_rate, sa, sb);
  return 0;
}
