/*
Small-N linear layers of the MoE router (router Linear(d, E-1), the mlp router's Linear(E-1, E-1),
the noise Linear(d, E-1)): N outputs per token with N <= 32, where the 128 x 256 tile of the
grouped GEMM would spend almost all its work on padding. CPU twin: binding/cpu/router_linear.cc.

Math, in PyTorch terms, with x [T, d], w [N, d] (nn.Linear layout), dy [T, N]:
  forward:   y  = x @ w.T                                              y  [T, N]
  backward:  dx = dy @ w                                               dx [T, d]  (overwrite)
             dw (+)= dy.T @ x                                          dw [N, d]  (accumulate)
x, w, y, dy, dx share one dtype (f32 or bf16); dw is that dtype or f32 (the f32 gradient of a bf16
weight, from the unrounded fp32 sums). Arithmetic is fp32, every output rounded once (bf16: nearest
even; with accumulate dw = round(old + sum)). Same contract as xft_cuda_grouped_gemm_* with E = 1.

Layout and work split (the x traffic is the cost: N FLOPs per byte read):
- forward: one warp per R = 2 token rows; lane l reads the 16-byte chunks l, l + 32, ... of both
  rows (8 bf16 / 4 f32; scalar when d or a pointer is not 16-byte aligned) and the same chunk of
  each of the N weight rows (w is small and stays in L1/L2), so x is read once for all N outputs.
  The R x NB partial sums are reduced across the warp by a fixed xor butterfly: deterministic.
- dx: one warp per R rows; lane n loads dy[t, n] and broadcasts it (shuffle) when the sum reaches
  n; each lane writes its chunks of dx[t, :] = sum_n dy[t, n] w[n, :] in n order.
- dw: two stages, deterministic (same bits run to run, on any GPU): the tokens are cut into
  P = min(64, ceil(T / 256)) slices (a function of T only); stage 1, grid (ceil(d / 256), P),
  one thread per column i and slice p sums dy[t, n] x[t, i] over the slice's tokens in order
  (dy staged in shared memory 32 tokens at a time) into a f32 workspace ws [P, N, d]; stage 2
  sums ws[0..P) in p order per element, adds the old dw under accumulate, and stores.
NB (the padded N: 4, 8, 16, 32) is a template parameter of the forward and dw kernels (register
arrays of partial sums); their loops over n < N are guarded.
*/
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>

#include "xft_cuda.h"
#include "xft_math.h"
#include "xft_vec.cuh"

extern "C" cudaStream_t xft_cuda_stream(void);
extern "C" int xft_cuda_malloc(void** ptr, size_t bytes);
extern "C" int xft_cuda_free(void* ptr);

namespace {

const int kThreads = 256;                 // 8 warps, every kernel here
const int kWarps = kThreads / 32;
const int kRows = 2;                      // token rows per warp (forward, dx)
const int kSliceTokens = 256;             // dw: tokens per slice, at least
const int kMaxSlices = 64;                // dw: slices at most (workspace P * N * d f32)
const int kStageTokens = 32;              // dw: tokens of dy staged in shared memory at a time

// CUDA kernels

// y[t, n] = sum_i x[t, i] w[n, i] for rows t of this warp, n < N <= NB; W elements per access
template <typename T, int NB, int W>
__global__ void __launch_bounds__(kThreads, 2) router_forward_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                                  T* __restrict__ y, int rows, int N, int d) {
  const int lane = threadIdx.x % 32;
  const long long row0 = ((long long)blockIdx.x * kWarps + threadIdx.x / 32) * kRows;
  if (row0 >= rows) return;  // warp-uniform
  float acc[kRows][NB];
#pragma unroll
  for (int r = 0; r < kRows; r++)
#pragma unroll
    for (int n = 0; n < NB; n++) acc[r][n] = 0.f;
  const int chunks = d / W;
  for (int c = lane; c < chunks; c += 32) {
    float xv[kRows][W];
#pragma unroll
    for (int r = 0; r < kRows; r++) {
      if (row0 + r < rows) load_f32<T, W>(x + (size_t)(row0 + r) * d + (size_t)c * W, xv[r]);
      else
#pragma unroll
        for (int k = 0; k < W; k++) xv[r][k] = 0.f;
    }
#pragma unroll
    for (int n = 0; n < NB; n++) {
      if (n < N) {
        float wv[W];
        load_f32<T, W>(w + (size_t)n * d + (size_t)c * W, wv);
#pragma unroll
        for (int r = 0; r < kRows; r++)
#pragma unroll
          for (int k = 0; k < W; k++) acc[r][n] += xv[r][k] * wv[k];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; r++)
#pragma unroll
    for (int n = 0; n < NB; n++) {
      if (n < N) {
        float v = acc[r][n];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        acc[r][n] = v;
      }
    }
  // lane n writes output n of each row (a select, not a dynamically indexed register array)
#pragma unroll
  for (int r = 0; r < kRows; r++) {
    float v = 0.f;
#pragma unroll
    for (int n = 0; n < NB; n++) v = lane == n ? acc[r][n] : v;
    if (row0 + r < rows && lane < N) y[(size_t)(row0 + r) * N + lane] = from_f32<T>(v);
  }
}

// dx[t, i] = sum_n dy[t, n] w[n, i] (n in order) for rows t of this warp; lane n holds dy[t, n]
// and broadcasts it when the sum reaches n (no per-n register array: any N <= 32, one kernel)
template <typename T, int W>
__global__ void __launch_bounds__(kThreads) router_dx_kernel(const T* __restrict__ dy, const T* __restrict__ w,
                                                             T* __restrict__ dx, int rows, int N, int d) {
  const int lane = threadIdx.x % 32;
  const long long row0 = ((long long)blockIdx.x * kWarps + threadIdx.x / 32) * kRows;
  if (row0 >= rows) return;  // warp-uniform
  float mine[kRows];
#pragma unroll
  for (int r = 0; r < kRows; r++) mine[r] = row0 + r < rows && lane < N ? to_f32(dy[(size_t)(row0 + r) * N + lane]) : 0.f;
  const int chunks = d / W;
  for (int c0 = 0; c0 < chunks; c0 += 32) {  // warp-uniform trip count: every lane reaches the shuffles
    const int c = c0 + lane;
    const bool live = c < chunks;
    float out[kRows][W];
#pragma unroll
    for (int r = 0; r < kRows; r++)
#pragma unroll
      for (int k = 0; k < W; k++) out[r][k] = 0.f;
    for (int n = 0; n < N; n++) {
      float g[kRows];
#pragma unroll
      for (int r = 0; r < kRows; r++) g[r] = __shfl_sync(0xffffffffu, mine[r], n);
      if (live) {
        float wv[W];
        load_f32<T, W>(w + (size_t)n * d + (size_t)c * W, wv);
#pragma unroll
        for (int r = 0; r < kRows; r++)
#pragma unroll
          for (int k = 0; k < W; k++) out[r][k] += g[r] * wv[k];
      }
    }
    if (live)
#pragma unroll
      for (int r = 0; r < kRows; r++)
        if (row0 + r < rows) store_f32<T, W>(dx + (size_t)(row0 + r) * d + (size_t)c * W, out[r]);
  }
}

// stage 1: ws[p, n, i] = sum over the tokens t of slice p (in order) of dy[t, n] x[t, i]
template <typename T, int NB>
__global__ void __launch_bounds__(kThreads) router_dw_partial_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                                                     float* __restrict__ ws, int rows, int N, int d,
                                                                     int slice) {
  __shared__ float g[kStageTokens][NB];
  const int i = blockIdx.x * kThreads + threadIdx.x;
  const int p = blockIdx.y;
  const int t0 = p * slice, t1 = min(rows, t0 + slice);
  float acc[NB];
#pragma unroll
  for (int n = 0; n < NB; n++) acc[n] = 0.f;
  for (int tb = t0; tb < t1; tb += kStageTokens) {
    const int count = min(kStageTokens, t1 - tb);
    __syncthreads();  // the previous tile has been read
    for (int e = threadIdx.x; e < kStageTokens * NB; e += kThreads) {
      const int tt = e / NB, n = e % NB;
      g[tt][n] = tt < count && n < N ? to_f32(dy[(size_t)(tb + tt) * N + n]) : 0.f;
    }
    __syncthreads();
    if (i < d)
      for (int tt = 0; tt < count; tt++) {
        const float xv = to_f32(x[(size_t)(tb + tt) * d + i]);
#pragma unroll
        for (int n = 0; n < NB; n++)
          if (n < N) acc[n] += g[tt][n] * xv;
      }
  }
  if (i < d)
#pragma unroll
    for (int n = 0; n < NB; n++)
      if (n < N) ws[((size_t)p * N + n) * d + i] = acc[n];
}

// stage 2: dw[j] = (old +) sum_p ws[p, j] in p order, j over N * d
template <typename D>
__global__ void __launch_bounds__(kThreads) router_dw_reduce_kernel(const float* __restrict__ ws, D* __restrict__ dw,
                                                                    size_t count, int slices, int accumulate) {
  for (size_t j = (size_t)blockIdx.x * kThreads + threadIdx.x; j < count; j += (size_t)gridDim.x * kThreads) {
    float s = 0.f;
    for (int p = 0; p < slices; p++) s += ws[(size_t)p * count + j];
    if (accumulate) s = to_f32(dw[j]) + s;
    dw[j] = from_f32<D>(s);
  }
}

// kernel launchers

int padded_n(int N) { return N <= 4 ? 4 : N <= 8 ? 8 : N <= 16 ? 16 : 32; }

unsigned row_blocks(int rows) { return (unsigned)CEIL_DIV((long long)rows, (long long)kWarps * kRows); }

template <typename T, int NB>
void launch_forward(const T* x, const T* w, T* y, int T_, int N, int d, cudaStream_t stream) {
  constexpr int W = 16 / sizeof(T);
  if (d % W == 0 && aligned(x, 16) && aligned(w, 16))
    router_forward_kernel<T, NB, W><<<row_blocks(T_), kThreads, 0, stream>>>(x, w, y, T_, N, d);
  else
    router_forward_kernel<T, NB, 1><<<row_blocks(T_), kThreads, 0, stream>>>(x, w, y, T_, N, d);
}

template <typename T>
int router_forward(const T* x, const T* w, T* y, int T_, int N, int d) {
  cudaStream_t stream = xft_cuda_stream();
  switch (padded_n(N)) {
    case 4: launch_forward<T, 4>(x, w, y, T_, N, d, stream); break;
    case 8: launch_forward<T, 8>(x, w, y, T_, N, d, stream); break;
    case 16: launch_forward<T, 16>(x, w, y, T_, N, d, stream); break;
    default: launch_forward<T, 32>(x, w, y, T_, N, d, stream); break;
  }
  return cudaGetLastError();
}

template <typename T>
void launch_dx(const T* dy, const T* w, T* dx, int T_, int N, int d, cudaStream_t stream) {
  constexpr int W = 16 / sizeof(T);
  if (d % W == 0 && aligned(w, 16) && aligned(dx, 16))
    router_dx_kernel<T, W><<<row_blocks(T_), kThreads, 0, stream>>>(dy, w, dx, T_, N, d);
  else
    router_dx_kernel<T, 1><<<row_blocks(T_), kThreads, 0, stream>>>(dy, w, dx, T_, N, d);
}

template <typename T, int NB>
void launch_dw_partial(const T* x, const T* dy, float* ws, int T_, int N, int d, int slices, int slice,
                       cudaStream_t stream) {
  dim3 grid((unsigned)CEIL_DIV(d, kThreads), (unsigned)slices);
  router_dw_partial_kernel<T, NB><<<grid, kThreads, 0, stream>>>(x, dy, ws, T_, N, d, slice);
}

template <typename T>
int router_backward(const T* x, const T* w, const T* dy, T* dx, void* dw, int dw_dtype, int T_, int N, int d,
                    int accumulate) {
  cudaStream_t stream = xft_cuda_stream();
  const int NB = padded_n(N);
  if (dx && T_ > 0) {
    launch_dx<T>(dy, w, dx, T_, N, d, stream);
    int e = cudaGetLastError();
    if (e) return e;
  }
  if (!dw) return 0;
  // P slices of `slice` tokens (P depends on T only; an empty input gives one slice of zeros)
  const int slices = (int)std::min<long long>(kMaxSlices, std::max<long long>(1, CEIL_DIV((long long)T_, kSliceTokens)));
  const int slice = T_ == 0 ? 0 : (int)CEIL_DIV((long long)T_, slices);
  const size_t count = (size_t)N * d;
  float* ws = nullptr;
  int e = xft_cuda_malloc((void**)&ws, (size_t)slices * count * sizeof(float));
  if (e) return e;
  switch (NB) {
    case 4: launch_dw_partial<T, 4>(x, dy, ws, T_, N, d, slices, slice, stream); break;
    case 8: launch_dw_partial<T, 8>(x, dy, ws, T_, N, d, slices, slice, stream); break;
    case 16: launch_dw_partial<T, 16>(x, dy, ws, T_, N, d, slices, slice, stream); break;
    default: launch_dw_partial<T, 32>(x, dy, ws, T_, N, d, slices, slice, stream); break;
  }
  const unsigned grid = (unsigned)std::min<size_t>(CEIL_DIV(count, (size_t)kThreads), 4096);
  if (dw_dtype == XFT_BF16)
    router_dw_reduce_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(ws, (uint16_t*)dw, count, slices, accumulate);
  else
    router_dw_reduce_kernel<float><<<grid, kThreads, 0, stream>>>(ws, (float*)dw, count, slices, accumulate);
  e = cudaGetLastError();
  const int freed = xft_cuda_free(ws);  // stream-ordered: after the reduction
  return e ? e : freed;
}

}  // namespace

extern "C" int xft_cuda_router_linear_forward(const void* x, const void* w, void* y, int dtype, int T, int N, int d) {
  if (T == 0) return 0;
  if (dtype == XFT_BF16) return router_forward((const uint16_t*)x, (const uint16_t*)w, (uint16_t*)y, T, N, d);
  return router_forward((const float*)x, (const float*)w, (float*)y, T, N, d);
}

extern "C" int xft_cuda_router_linear_backward(const void* x, const void* w, const void* dy, void* dx, void* dw,
                                               int dtype, int dw_dtype, int T, int N, int d, int accumulate) {
  if (dtype == XFT_BF16)
    return router_backward((const uint16_t*)x, (const uint16_t*)w, (const uint16_t*)dy, (uint16_t*)dx, dw, dw_dtype,
                           T, N, d, accumulate);
  return router_backward((const float*)x, (const float*)w, (const float*)dy, (float*)dx, dw, dw_dtype, T, N, d,
                         accumulate);
}
