/*
The per-layer mixing-coefficient merge of XFT.md. CPU twin: binding/cpu/merge.cc.

Coefficients (computed in double, as the twin does, then rounded to fp32 for the forward):
  shared_rate λ >= 0: c_0 = λ, c_i = (1 - λ) softmax(alpha)_{i-1}, alpha [E - 1]
  shared_rate < 0:    c = softmax(alpha), alpha [E]   (learned soup, no fixed shared rate)
Forward, per tensor t with expert stack W = weights[t] [E, n]:
  merged[t][j] = sum_e c_e * W[e, j]     fp32, e ascending, multiply and add rounded separately
                                          (no FMA): bit for bit the twin, given the same fp32 c
Backward (dalpha accumulates when accumulate != 0):
  G_e = sum_t <dmerged[t], weights[t][e]>           products and sums in double
  λ >= 0: dalpha_{i-1} = (1 - λ) s_{i-1} (G_i - sum_j s_j G_{j+1}),  s = softmax(alpha)
  λ < 0:  dalpha_i = c_i (G_i - sum_j c_j G_j)

Layout and launch
- Memory bound: each expert element is read once per pass (dmerged once in the backward when
  E <= MERGE_CHUNK). A grid-stride loop over 16-byte vectors (4 f32 or 8 bf16, xft_vec.cuh)
  when the stack, the output and the row length n * size are 16-byte aligned, scalar
  elements otherwise.
  One launch per tensor, at most MERGE_*_MAX_GRID blocks of MERGE_BLOCK threads.
- forward: merge_coefficients_kernel (1 thread) writes c f32 [E] to scratch; each block of
  merge_forward_kernel copies it to shared memory.
- backward: merge_backward_kernel keeps G for a chunk of up to MERGE_CHUNK experts in double
  registers per thread, reduces them over the block in a fixed order and writes one partial per
  block, partial f64 [E, nparts]; merge_backward_final_kernel (1 block) sums each expert's
  partials in a fixed order (a warp per expert) and applies the softmax Jacobian. No atomics:
  the result is bit-reproducible run to run.
*/
#include <cuda_runtime.h>
#include <stdint.h>

#include <vector>

#include "xft_cuda.h"
#include "xft_math.h"
#include "xft_vec.cuh"

extern "C" cudaStream_t xft_cuda_stream(void);

#define XFT_MERGE_MAX_EXPERTS 1024  // E; the binding checks 2 <= E <= 1024
#define MERGE_BLOCK 256
#define MERGE_FORWARD_MAX_GRID 2048
#define MERGE_BACKWARD_MAX_GRID 1024
#define MERGE_CHUNK 64              // experts per pass of the backward (double accumulators per thread)
#define MERGE_FINAL_BLOCK 256

static const unsigned FULL_MASK = 0xffffffffu;

// CUDA kernels

// 16-byte vectors: 4 f32 or 8 bf16
template <typename T> struct Vec16 { static constexpr int V = 16 / sizeof(T); };

// c [E] in double exactly as the twin computes it: s = softmax(alpha) (max, exp, sum, divide)
// and c. Runs on one thread. s_out (length A) may be null.
__device__ void merge_coefficients(const float* alpha, int E, float shared_rate, double* c, double* s_out) {
  const bool fixed = shared_rate >= 0.f;
  const int A = fixed ? E - 1 : E;
  double m = -INFINITY, sum = 0.0;
  for (int i = 0; i < A; i++) m = fmax(m, (double)alpha[i]);
  for (int i = 0; i < A; i++) sum += exp((double)alpha[i] - m);
  for (int i = 0; i < A; i++) {
    const double s = exp((double)alpha[i] - m) / sum;
    if (s_out) s_out[i] = s;
    if (fixed) c[i + 1] = (1.0 - (double)shared_rate) * s;
    else c[i] = s;
  }
  if (fixed) c[0] = (double)shared_rate;
}

__global__ void merge_coefficients_kernel(const float* __restrict__ alpha, int E, float shared_rate,
                                          float* __restrict__ coef) {
  __shared__ double c[XFT_MERGE_MAX_EXPERTS];
  merge_coefficients(alpha, E, shared_rate, c, nullptr);
  for (int e = 0; e < E; e++) coef[e] = (float)c[e];
}

// merged[j] = sum_e c_e W[e, j]; nvec 16-byte vectors, then elements nvec * V .. n one by one
template <typename T>
__global__ void __launch_bounds__(MERGE_BLOCK)
merge_forward_kernel(const T* __restrict__ w, T* __restrict__ out, size_t n, size_t nvec, int E,
                     const float* __restrict__ coef) {
  constexpr int V = Vec16<T>::V;
  __shared__ float c[XFT_MERGE_MAX_EXPERTS];
  for (int e = threadIdx.x; e < E; e += MERGE_BLOCK) c[e] = coef[e];
  __syncthreads();
  const size_t stride = (size_t)gridDim.x * MERGE_BLOCK;
  const size_t first = (size_t)blockIdx.x * MERGE_BLOCK + threadIdx.x;
  for (size_t i = first; i < nvec; i += stride) {
    float acc[V];
#pragma unroll
    for (int k = 0; k < V; k++) acc[k] = 0.f;
    const T* src = w + i * V;
#pragma unroll 4
    for (int e = 0; e < E; e++) {
      float x[V];
      load_f32<T, V>(src + (size_t)e * n, x);
#pragma unroll
      for (int k = 0; k < V; k++) acc[k] = __fadd_rn(acc[k], __fmul_rn(c[e], x[k]));
    }
    store_f32<T, V>(out + i * V, acc);
  }
  for (size_t j = nvec * V + first; j < n; j += stride) {
    float acc = 0.f;
    for (int e = 0; e < E; e++) acc = __fadd_rn(acc, __fmul_rn(c[e], to_f32(w[(size_t)e * n + j])));
    out[j] = from_f32<T>(acc);
  }
}

// partial[(e0 + k) * nparts + part0 + block] = this block's share of <dmerged, W[e0 + k]>,
// k < ne <= EC; the per-thread sums run over a fixed set of elements, the block reduction is fixed
template <typename T, int EC>
__global__ void __launch_bounds__(MERGE_BLOCK)
merge_backward_kernel(const T* __restrict__ w, const T* __restrict__ dm, size_t n, size_t nvec, int e0, int ne,
                      double* __restrict__ partial, int nparts, int part0) {
  constexpr int V = Vec16<T>::V;
  constexpr int WARPS = MERGE_BLOCK / 32;
  __shared__ double red[WARPS][EC];
  double acc[EC];
#pragma unroll
  for (int k = 0; k < EC; k++) acc[k] = 0.0;
  const T* we = w + (size_t)e0 * n;
  const size_t stride = (size_t)gridDim.x * MERGE_BLOCK;
  const size_t first = (size_t)blockIdx.x * MERGE_BLOCK + threadIdx.x;
  for (size_t i = first; i < nvec; i += stride) {
    float d[V];
    load_f32<T, V>(dm + i * V, d);
#pragma unroll
    for (int k = 0; k < EC; k++) {
      if (k < ne) {
        float x[V];
        load_f32<T, V>(we + (size_t)k * n + i * V, x);
        double a = acc[k];
#pragma unroll
        for (int v = 0; v < V; v++) a = fma((double)d[v], (double)x[v], a);  // exact products
        acc[k] = a;
      }
    }
  }
  for (size_t j = nvec * V + first; j < n; j += stride) {
    const double d = (double)to_f32(dm[j]);
#pragma unroll
    for (int k = 0; k < EC; k++)
      if (k < ne) acc[k] = fma(d, (double)to_f32(we[(size_t)k * n + j]), acc[k]);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < EC; k++) {
    double a = acc[k];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(FULL_MASK, a, o);
    if (lane == 0) red[warp][k] = a;
  }
  __syncthreads();
  for (int k = threadIdx.x; k < ne; k += MERGE_BLOCK) {
    double s = 0.0;
#pragma unroll
    for (int q = 0; q < WARPS; q++) s += red[q][k];
    partial[(size_t)(e0 + k) * nparts + part0 + blockIdx.x] = s;
  }
}

// G_e = sum of partial[e, :] (a warp per expert, lanes over parts, fixed order), then dalpha
__global__ void __launch_bounds__(MERGE_FINAL_BLOCK)
merge_backward_final_kernel(const double* __restrict__ partial, int nparts, int E, const float* __restrict__ alpha,
                            float shared_rate, float* __restrict__ dalpha, int accumulate) {
  __shared__ double G[XFT_MERGE_MAX_EXPERTS];
  __shared__ double c[XFT_MERGE_MAX_EXPERTS];
  __shared__ double s[XFT_MERGE_MAX_EXPERTS];
  constexpr int WARPS = MERGE_FINAL_BLOCK / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int e = warp; e < E; e += WARPS) {
    const double* pe = partial + (size_t)e * nparts;
    double a = 0.0;
    for (int p = lane; p < nparts; p += 32) a += pe[p];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(FULL_MASK, a, o);
    if (lane == 0) G[e] = a;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  merge_coefficients(alpha, E, shared_rate, c, s);
  if (shared_rate >= 0.f) {
    double mean = 0.0;
    for (int i = 1; i < E; i++) mean = __dadd_rn(mean, __dmul_rn(s[i - 1], G[i]));
    for (int i = 1; i < E; i++) {
      const float d = (float)((1.0 - (double)shared_rate) * s[i - 1] * (G[i] - mean));
      dalpha[i - 1] = accumulate ? dalpha[i - 1] + d : d;
    }
  } else {
    double mean = 0.0;
    for (int i = 0; i < E; i++) mean = __dadd_rn(mean, __dmul_rn(c[i], G[i]));
    for (int i = 0; i < E; i++) {
      const float d = (float)(c[i] * (G[i] - mean));
      dalpha[i] = accumulate ? dalpha[i] + d : d;
    }
  }
}

// kernel launchers

// 16-byte vectors when every stack row, the output (or dmerged) and the row length allow them
static size_t merge_vectors(const void* a, const void* b, size_t n, int dtype) {
  const size_t es = dtype == XFT_BF16 ? 2 : 4, V = 16 / es;
  return aligned(a, 16) && aligned(b, 16) && (n * es) % 16 == 0 ? n / V : 0;
}

static int merge_grid(size_t nvec, size_t n, int max_grid) {
  const size_t units = nvec ? nvec : n;
  const size_t g = CEIL_DIV(units, (size_t)MERGE_BLOCK);
  return (int)(g < 1 ? 1 : g > (size_t)max_grid ? (size_t)max_grid : g);
}

extern "C" int xft_cuda_merge_forward(const void* const* weights, void* const* merged, const size_t* numel,
                                      int count, int dtype, int E, const float* alpha, float shared_rate) {
  if (E < 1 || E > XFT_MERGE_MAX_EXPERTS || count < 0 || (dtype != XFT_F32 && dtype != XFT_BF16))
    return cudaErrorInvalidValue;
  bool any = false;
  for (int t = 0; t < count; t++) any = any || numel[t] > 0;
  if (!any) return cudaGetLastError();
  cudaStream_t stream = xft_cuda_stream();
  float* coef = nullptr;
  cudaError_t err = cudaMallocAsync((void**)&coef, sizeof(float) * E, stream);
  if (err != cudaSuccess) return err;
  merge_coefficients_kernel<<<1, 1, 0, stream>>>(alpha, E, shared_rate, coef);
  err = cudaGetLastError();
  for (int t = 0; t < count && err == cudaSuccess; t++) {
    const size_t n = numel[t];
    if (n == 0) continue;
    const size_t nvec = merge_vectors(weights[t], merged[t], n, dtype);
    const int grid = merge_grid(nvec, n, MERGE_FORWARD_MAX_GRID);
    if (dtype == XFT_BF16)
      merge_forward_kernel<uint16_t><<<grid, MERGE_BLOCK, 0, stream>>>(
          (const uint16_t*)weights[t], (uint16_t*)merged[t], n, nvec, E, coef);
    else
      merge_forward_kernel<float><<<grid, MERGE_BLOCK, 0, stream>>>(
          (const float*)weights[t], (float*)merged[t], n, nvec, E, coef);
    err = cudaGetLastError();
  }
  const cudaError_t ferr = cudaFreeAsync(coef, stream);
  return err != cudaSuccess ? err : ferr;
}

template <typename T>
static void launch_merge_backward(int grid, cudaStream_t stream, const T* w, const T* dm, size_t n, size_t nvec,
                                  int e0, int ne, double* partial, int nparts, int part0) {
  if (ne <= 8)
    merge_backward_kernel<T, 8><<<grid, MERGE_BLOCK, 0, stream>>>(w, dm, n, nvec, e0, ne, partial, nparts, part0);
  else if (ne <= 16)
    merge_backward_kernel<T, 16><<<grid, MERGE_BLOCK, 0, stream>>>(w, dm, n, nvec, e0, ne, partial, nparts, part0);
  else if (ne <= 32)
    merge_backward_kernel<T, 32><<<grid, MERGE_BLOCK, 0, stream>>>(w, dm, n, nvec, e0, ne, partial, nparts, part0);
  else
    merge_backward_kernel<T, MERGE_CHUNK><<<grid, MERGE_BLOCK, 0, stream>>>(w, dm, n, nvec, e0, ne, partial, nparts,
                                                                           part0);
}

extern "C" int xft_cuda_merge_backward(const void* const* weights, const void* const* dmerged, const size_t* numel,
                                       int count, int dtype, int E, const float* alpha, float shared_rate,
                                       float* dalpha, int accumulate) {
  if (E < 1 || E > XFT_MERGE_MAX_EXPERTS || count < 0 || (dtype != XFT_F32 && dtype != XFT_BF16))
    return cudaErrorInvalidValue;
  cudaStream_t stream = xft_cuda_stream();
  // blocks per tensor, fixed by the sizes alone; partial f64 [E, nparts]
  std::vector<int> grid(count > 0 ? count : 1, 0);
  std::vector<size_t> nvec(count > 0 ? count : 1, 0);
  long long nparts = 0;
  for (int t = 0; t < count; t++) {
    if (numel[t] == 0) continue;
    nvec[t] = merge_vectors(weights[t], dmerged[t], numel[t], dtype);
    grid[t] = merge_grid(nvec[t], numel[t], MERGE_BACKWARD_MAX_GRID);
    nparts += grid[t];
  }
  if (nparts > INT32_MAX / XFT_MERGE_MAX_EXPERTS) return cudaErrorInvalidValue;
  double* partial = nullptr;
  cudaError_t err = cudaMallocAsync((void**)&partial, sizeof(double) * (size_t)E * (nparts ? nparts : 1), stream);
  if (err != cudaSuccess) return err;
  int part0 = 0;
  for (int t = 0; t < count && err == cudaSuccess; t++) {
    const size_t n = numel[t];
    if (n == 0) continue;
    for (int e0 = 0; e0 < E && err == cudaSuccess; e0 += MERGE_CHUNK) {
      const int ne = E - e0 < MERGE_CHUNK ? E - e0 : MERGE_CHUNK;
      if (dtype == XFT_BF16)
        launch_merge_backward<uint16_t>(grid[t], stream, (const uint16_t*)weights[t], (const uint16_t*)dmerged[t], n,
                                        nvec[t], e0, ne, partial, (int)nparts, part0);
      else
        launch_merge_backward<float>(grid[t], stream, (const float*)weights[t], (const float*)dmerged[t], n, nvec[t],
                                     e0, ne, partial, (int)nparts, part0);
      err = cudaGetLastError();
    }
    part0 += grid[t];
  }
  if (err == cudaSuccess) {
    merge_backward_final_kernel<<<1, MERGE_FINAL_BLOCK, 0, stream>>>(partial, (int)nparts, E, alpha, shared_rate,
                                                                     dalpha, accumulate);
    err = cudaGetLastError();
  }
  const cudaError_t ferr = cudaFreeAsync(partial, stream);
  return err != cudaSuccess ? err : ferr;
}
