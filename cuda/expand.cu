/*
UpIT's expert expansion (../shared/UPIT.md stage 2): the delta products that choose the parents, and
the fused DARE crossover that breeds a child. Interface: expand.h; CPU twin: binding/cpu/expand.cc.

Delta dots, per tensor of n elements (base θ0, a, others o_q; f32 or bf16, all one dtype):
  out[q] = Σ_i (a_i − θ0_i)(o_q,i − θ0_i)        (torch: ((a - θ0).double() * (o_q - θ0).double()).sum())
  Differences, products and sums in fp64 with each operation rounded (no FMA). A fixed reduction order,
  the same in the twin, so both give the same bits run after run:
  - G = expand_dot_grid(n) blocks (a function of n alone: up to EXPAND_DOT_GRID, fewer for small
    tensors), L = G × EXPAND_BLOCK lanes; lane ℓ (block ℓ / EXPAND_BLOCK, thread ℓ % EXPAND_BLOCK) takes
    the groups of EXPAND_GROUP consecutive elements g ≡ ℓ (mod L) in ascending order and adds their
    products one element at a time;
  - each block combines its lanes with block_sum (xft_reduce.cuh: an xor butterfly per warp, then over
    the warps' results) into one partial; one block per output combines the G partials (thread t takes
    partial t, 0 past G) with block_sum again. No atomics.
  Up to EXPAND_DOT_CHUNK others per pass (fp64 accumulators in registers); more take more passes.
DARE crossover, per tensor (UPIT.md 2.3–2.4): keep = 1 − p,
  m_x,i = [u(stream(seed, tensor_id, x), i) >= p]      parent slot x = 0 (a = θj) or 1 (b = θk), expand.h
  t_x,i = m_x,i (x_i − θ0_i) / keep                     fp64: DARE_p(Δ), kept entries Δ/(1 − p) exactly
  child_i = round(θ0_i + (α t_a,i + β t_b,i))           fp64, one rounding to f32 or bf16 (expand_f64_to_bf16)
  The masks depend on (seed, tensor_id, slot, i) only: the same bits on any device, grid or order.
Layout: both kernels are grid-stride loops over elements (memory bound: 3 reads and 1 write per
element for the child); the dots read each group of EXPAND_GROUP elements per lane.
*/
#include <cuda_runtime.h>
#include <stdint.h>

#include "expand.h"
#include "xft_cuda.h"
#include "xft_math.h"
#include "xft_reduce.cuh"
#include "xft_vec.cuh"

extern "C" cudaStream_t xft_cuda_stream(void);

#define EXPAND_CHILD_MAX_GRID 4096

// CUDA kernels

// the others of one pass, passed by value as a kernel parameter
struct ExpandOthers {
  const void* p[EXPAND_DOT_CHUNK];
};

// partial[q * EXPAND_DOT_GRID + block] = this block's share of out[q0 + q], q < nq <= EXPAND_DOT_CHUNK
template <typename T>
__global__ void __launch_bounds__(EXPAND_BLOCK)
expand_dots_kernel(const T* __restrict__ base, const T* __restrict__ a, const ExpandOthers others, int nq, size_t n,
                   double* __restrict__ partial) {
  double acc[EXPAND_DOT_CHUNK];
#pragma unroll
  for (int q = 0; q < EXPAND_DOT_CHUNK; q++) acc[q] = 0.0;
  const size_t lane = (size_t)blockIdx.x * EXPAND_BLOCK + threadIdx.x, lanes = (size_t)gridDim.x * EXPAND_BLOCK;
  for (size_t g = lane; g * EXPAND_GROUP < n; g += lanes) {
    for (size_t i = g * EXPAND_GROUP; i < (g + 1) * EXPAND_GROUP && i < n; i++) {
      const double b0 = (double)to_f32(base[i]);
      const double da = __dadd_rn((double)to_f32(a[i]), -b0);
#pragma unroll
      for (int q = 0; q < EXPAND_DOT_CHUNK; q++)
        if (q < nq) {
          const double dq = __dadd_rn((double)to_f32(((const T*)others.p[q])[i]), -b0);
          acc[q] = __dadd_rn(acc[q], __dmul_rn(da, dq));
        }
    }
  }
#pragma unroll
  for (int q = 0; q < EXPAND_DOT_CHUNK; q++)
    if (q < nq) {
      const double s = block_sum(acc[q]);
      if (threadIdx.x == 0) partial[(size_t)q * EXPAND_DOT_GRID + blockIdx.x] = s;
      __syncthreads();  // block_sum's shared scratch is reused by the next q
    }
}

// out[q0 + q] = the nparts partials of q combined (block q, one partial per thread)
__global__ void __launch_bounds__(EXPAND_BLOCK)
expand_dots_final_kernel(const double* __restrict__ partial, int nparts, double* __restrict__ out) {
  const double s = block_sum((int)threadIdx.x < nparts ? partial[(size_t)blockIdx.x * EXPAND_DOT_GRID + threadIdx.x] : 0.0);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

template <typename T>
__global__ void __launch_bounds__(EXPAND_BLOCK)
expand_child_kernel(const T* __restrict__ base, const T* __restrict__ a, const T* __restrict__ b, size_t n,
                    void* __restrict__ out, int out_dtype, double alpha, double beta, double drop_rate,
                    uint64_t stream_a, uint64_t stream_b) {
  const double keep = 1.0 - drop_rate;
  const size_t stride = (size_t)gridDim.x * EXPAND_BLOCK;
  for (size_t i = (size_t)blockIdx.x * EXPAND_BLOCK + threadIdx.x; i < n; i += stride) {
    const double b0 = (double)to_f32(base[i]);
    const double ta = expand_keep(stream_a, i, drop_rate) ? __dadd_rn((double)to_f32(a[i]), -b0) / keep : 0.0;
    const double tb = expand_keep(stream_b, i, drop_rate) ? __dadd_rn((double)to_f32(b[i]), -b0) / keep : 0.0;
    const double y = __dadd_rn(b0, __dadd_rn(__dmul_rn(alpha, ta), __dmul_rn(beta, tb)));
    if (out_dtype == XFT_BF16) ((uint16_t*)out)[i] = expand_f64_to_bf16(y);
    else ((float*)out)[i] = (float)y;
  }
}

// kernel launchers

extern "C" int xft_cuda_expand_delta_dots(const void* base, const void* a, const void* const* others, int count,
                                          int dtype, size_t numel, double* out) {
  if (count < 0 || (dtype != XFT_F32 && dtype != XFT_BF16)) return cudaErrorInvalidValue;
  if (count == 0) return cudaSuccess;
  cudaStream_t stream = xft_cuda_stream();
  // the partials of one pass [EXPAND_DOT_CHUNK, EXPAND_DOT_GRID]
  double* partial = nullptr;
  cudaError_t err = cudaMallocAsync((void**)&partial, sizeof(double) * EXPAND_DOT_CHUNK * EXPAND_DOT_GRID, stream);
  if (err != cudaSuccess) return err;
  const int grid = expand_dot_grid(numel);
  for (int q0 = 0; q0 < count && err == cudaSuccess; q0 += EXPAND_DOT_CHUNK) {
    const int nq = count - q0 < EXPAND_DOT_CHUNK ? count - q0 : EXPAND_DOT_CHUNK;
    ExpandOthers ptrs = {};
    for (int q = 0; q < nq; q++) ptrs.p[q] = others[q0 + q];
    if (dtype == XFT_BF16)
      expand_dots_kernel<uint16_t><<<grid, EXPAND_BLOCK, 0, stream>>>(
          (const uint16_t*)base, (const uint16_t*)a, ptrs, nq, numel, partial);
    else
      expand_dots_kernel<float><<<grid, EXPAND_BLOCK, 0, stream>>>(
          (const float*)base, (const float*)a, ptrs, nq, numel, partial);
    err = cudaGetLastError();
    if (err != cudaSuccess) break;
    expand_dots_final_kernel<<<nq, EXPAND_BLOCK, 0, stream>>>(partial, grid, out + q0);
    err = cudaGetLastError();
  }
  const cudaError_t ferr = cudaFreeAsync(partial, stream);
  return err != cudaSuccess ? err : ferr;
}

extern "C" int xft_cuda_expand_child(const void* base, const void* a, const void* b, int dtype, size_t numel,
                                     void* out, int out_dtype, double alpha, double beta, double drop_rate,
                                     uint64_t seed, uint32_t tensor_id) {
  if ((dtype != XFT_F32 && dtype != XFT_BF16) || (out_dtype != XFT_F32 && out_dtype != XFT_BF16) ||
      !(drop_rate >= 0.0 && drop_rate < 1.0))
    return cudaErrorInvalidValue;
  if (numel == 0) return cudaSuccess;
  cudaStream_t stream = xft_cuda_stream();
  const size_t g = CEIL_DIV(numel, (size_t)EXPAND_BLOCK);
  const int grid = (int)(g > EXPAND_CHILD_MAX_GRID ? EXPAND_CHILD_MAX_GRID : g);
  const uint64_t sa = expand_stream(seed, tensor_id, 0), sb = expand_stream(seed, tensor_id, 1);
  if (dtype == XFT_BF16)
    expand_child_kernel<uint16_t><<<grid, EXPAND_BLOCK, 0, stream>>>(
        (const uint16_t*)base, (const uint16_t*)a, (const uint16_t*)b, numel, out, out_dtype, alpha, beta, drop_rate, sa, sb);
  else
    expand_child_kernel<float><<<grid, EXPAND_BLOCK, 0, stream>>>(
        (const float*)base, (const float*)a, (const float*)b, numel, out, out_dtype, alpha, beta, drop_rate, sa, sb);
  return cudaGetLastError();
}
