/*
Deterministic block reductions in fp64 (elementwise.cu's sumSquares, adafactor.cu's statistics): the
warp's lanes combined by xor shuffles, then the warps' partials in warp 0, always in the same order,
so that a sum is the same bits on every run.
*/
#pragma once

namespace {

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// the block's total in thread 0 (fixed order); blockDim.x a multiple of 32, at most 1024
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double red[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  return warp == 0 ? warp_sum(lane < (int)(blockDim.x / 32) ? red[lane] : 0.0) : 0.0;
}

}  // namespace
