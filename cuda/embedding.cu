/*
Token embedding (HF nn.Embedding without padding_idx).
  forward:  out[r, :] = table[ids[r], :]           ids i32 [R], table [V, d], out [R, d] (table dtype)
            a row whose id is outside [0, V) is written as zeros and reported as an index fault
            (xft_cuda.h: XFT_INDEX at the next synchronisation); lib/ops_layers.ts rejects such ids
            on CPU tensors, and no kernel reads or writes outside the table.
  backward: dtable[v, :] (+)= sum over r with ids[r] = v of dout[r, :]      dout [R, d], dtable f32 [V, d]
            Deterministic, without float atomics: the (id, r) pairs are radix-sorted by id (a stable
            sort, so r ascends within an id; invalid ids become V and sort last). An id's rows are
            summed in token order in fp32 in chunks of XFT_EMBEDDING_CHUNK (256) rows, each from zero
            by its own block (a frequent id does not serialise on one block), then the block of the
            id's first chunk adds the other chunks' sums in order and adds the total to dtable
            (zeroed first unless accumulate). binding/cpu/embedding.cc adds in the same order.
Layout: row-major. Rows move as 16-byte vectors (8 bf16 or 4 f32) when d and the pointers allow.
*/
#include <cuda_runtime.h>
#include <stdint.h>

#include <cub/device/device_radix_sort.cuh>

#include "xft_cuda.h"
#include "xft_fault.cuh"
#include "xft_math.h"

extern "C" cudaStream_t xft_cuda_stream(void);

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

namespace {

// ---- vector access: W consecutive elements as one aligned load or store ----
template <typename T, int W> struct alignas(sizeof(T) * W) Vec { T v[W]; };
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(uint16_t v) { return xft_bf16_to_f32(v); }
template <typename T, int W> __device__ __forceinline__ void load_f32(const T* p, float (&f)[W]) {
  Vec<T, W> v = *reinterpret_cast<const Vec<T, W>*>(p);
#pragma unroll
  for (int k = 0; k < W; k++) f[k] = to_f32(v.v[k]);
}
inline bool aligned(const void* p, size_t bytes) { return ((uintptr_t)p % bytes) == 0; }

// CUDA kernels

// one block per row
template <typename T, int W>
__global__ void embedding_forward_kernel(const int* __restrict__ ids, const T* __restrict__ table,
                                         T* __restrict__ out, int V, int d, xft_cuda_fault_slot* fault) {
  const int r = blockIdx.x;
  const int id = ids[r];
  const bool valid = id >= 0 && id < V;
  if (!valid && threadIdx.x == 0) xft_raise_fault(fault, XFT_FAULT_EMBEDDING_IDS, r, id, V);
  const T* src = table + (valid ? (size_t)id * d : 0);
  T* dst = out + (size_t)r * d;
  for (int c = threadIdx.x * W; c < d; c += blockDim.x * W) {
    Vec<T, W> v;
    if (valid) v = *reinterpret_cast<const Vec<T, W>*>(src + c);
    else
#pragma unroll
      for (int k = 0; k < W; k++) v.v[k] = T(0);
    *reinterpret_cast<Vec<T, W>*>(dst + c) = v;
  }
}

// sort keys: the id, or V for an invalid id; values: the row
__global__ void embedding_keys_kernel(const int* __restrict__ ids, unsigned* __restrict__ keys,
                                      int* __restrict__ rows, int R, int V, xft_cuda_fault_slot* fault) {
  for (size_t r = blockIdx.x * (size_t)blockDim.x + threadIdx.x; r < (size_t)R; r += (size_t)gridDim.x * blockDim.x) {
    const int id = ids[r];
    const bool valid = id >= 0 && id < V;
    if (!valid) xft_raise_fault(fault, XFT_FAULT_EMBEDDING_IDS, (int)r, id, V);
    keys[r] = valid ? (unsigned)id : (unsigned)V;
    rows[r] = (int)r;
  }
}

// the run of key v around sorted position s: [first, end) (keys are sorted)
__device__ __forceinline__ void key_run(const unsigned* keys, int R, int s, unsigned v, int& first, int& end) {
  int lo = 0, hi = s;  // first position with key v
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (keys[mid] < v) lo = mid + 1;
    else hi = mid;
  }
  first = lo;
  lo = s + 1, hi = R;  // first position after s with a larger key
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (keys[mid] == v) lo = mid + 1;
    else hi = mid;
  }
  end = lo;
}

// acc = sum of dout rows rows[j], j in [j0, j1), from zero in order, at columns c .. c + W
template <typename T, int W>
__device__ __forceinline__ void sum_rows(const int* rows, const T* dout, int d, int c, int j0, int j1, float (&acc)[W]) {
#pragma unroll
  for (int k = 0; k < W; k++) acc[k] = 0.f;
#pragma unroll 4
  for (int j = j0; j < j1; j++) {
    float f[W];
    load_f32<T, W>(dout + (size_t)rows[j] * d + c, f);
#pragma unroll
    for (int k = 0; k < W; k++) acc[k] += f[k];
  }
}

// one block per sorted position s; the block at the start of a valid id's second, third, ... chunk
// sums that chunk into partial[s / CHUNK] (such starts are >= CHUNK apart, so the slots are distinct)
template <typename T, int W>
__global__ void embedding_chunk_kernel(const unsigned* __restrict__ keys, const int* __restrict__ rows,
                                       const T* __restrict__ dout, float* __restrict__ partial, int R, int V, int d) {
  const int s = blockIdx.x;
  const unsigned v = keys[s];
  if (v >= (unsigned)V || s == 0 || keys[s - 1] != v) return;
  int first, end;
  key_run(keys, R, s, v, first, end);
  if ((s - first) % XFT_EMBEDDING_CHUNK != 0) return;
  float* dst = partial + (size_t)(s / XFT_EMBEDDING_CHUNK) * d;
  for (int c = threadIdx.x * W; c < d; c += blockDim.x * W) {
    float acc[W];
    sum_rows<T, W>(rows, dout, d, c, s, min(end, s + XFT_EMBEDDING_CHUNK), acc);
#pragma unroll
    for (int k = 0; k < W; k++) dst[c + k] = acc[k];
  }
}

// one block per sorted position s; the block at the first position of a valid id sums the id's first
// chunk, adds the other chunks' sums in order, and adds the total to dtable
template <typename T, int W>
__global__ void embedding_backward_kernel(const unsigned* __restrict__ keys, const int* __restrict__ rows,
                                          const T* __restrict__ dout, const float* __restrict__ partial,
                                          float* __restrict__ dtable, int R, int V, int d) {
  const int s = blockIdx.x;
  const unsigned v = keys[s];
  if (v >= (unsigned)V || (s > 0 && keys[s - 1] == v)) return;
  int first, end;
  key_run(keys, R, s, v, first, end);
  float* dst = dtable + (size_t)v * d;
  for (int c = threadIdx.x * W; c < d; c += blockDim.x * W) {
    float acc[W];
    sum_rows<T, W>(rows, dout, d, c, s, min(end, s + XFT_EMBEDDING_CHUNK), acc);
    for (int j0 = s + XFT_EMBEDDING_CHUNK; j0 < end; j0 += XFT_EMBEDDING_CHUNK) {
      const float* p = partial + (size_t)(j0 / XFT_EMBEDDING_CHUNK) * d + c;
#pragma unroll
      for (int k = 0; k < W; k++) acc[k] += p[k];
    }
#pragma unroll
    for (int k = 0; k < W; k++) dst[c + k] += acc[k];
  }
}

// kernel launchers

int block_for(int vectors) {
  int b = CEIL_DIV(vectors, 32) * 32;
  return b < 32 ? 32 : b > 256 ? 256 : b;
}

template <typename T>
int embedding_forward(const int* ids, const T* table, T* out, int R, int V, int d) {
  constexpr int W = 16 / sizeof(T);
  cudaStream_t stream = xft_cuda_stream();
  if (d % W == 0 && aligned(table, 16) && aligned(out, 16))
    embedding_forward_kernel<T, W><<<R, block_for(d / W), 0, stream>>>(ids, table, out, V, d, xft_cuda_fault_record());
  else
    embedding_forward_kernel<T, 1><<<R, block_for(d), 0, stream>>>(ids, table, out, V, d, xft_cuda_fault_record());
  return cudaGetLastError();
}

size_t align_up(size_t n) { return (n + 255) & ~(size_t)255; }

template <typename T>
int embedding_backward(const int* ids, const T* dout, float* dtable, int R, int V, int d, int accumulate) {
  constexpr int W = 16 / sizeof(T);
  cudaStream_t stream = xft_cuda_stream();
  cudaError_t e;
  if (!accumulate && (e = cudaMemsetAsync(dtable, 0, (size_t)V * d * sizeof(float), stream)) != cudaSuccess) return e;
  if (R == 0) return 0;
  // keys take values 0..V: sort on the low bits that can be set
  int end_bit = 0;
  while (end_bit < 32 && ((unsigned long long)V >> end_bit) != 0) end_bit++;
  size_t sort_bytes = 0;
  if ((e = cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, (const unsigned*)nullptr, (unsigned*)nullptr,
                                           (const int*)nullptr, (int*)nullptr, R, 0, end_bit, stream)) != cudaSuccess)
    return e;
  const size_t arr = align_up((size_t)R * 4);
  const size_t partial_bytes = align_up((size_t)CEIL_DIV(R, XFT_EMBEDDING_CHUNK) * d * sizeof(float));
  char* scratch = nullptr;
  if ((e = cudaMallocAsync((void**)&scratch, 4 * arr + partial_bytes + sort_bytes, stream)) != cudaSuccess) return e;
  unsigned* keys_in = (unsigned*)scratch;
  unsigned* keys = (unsigned*)(scratch + arr);
  int* rows_in = (int*)(scratch + 2 * arr);
  int* rows = (int*)(scratch + 3 * arr);
  float* partial = (float*)(scratch + 4 * arr);  // chunk sums, slot s / CHUNK for a chunk starting at s
  void* sort_tmp = scratch + 4 * arr + partial_bytes;
  int grid = CEIL_DIV(R, 256);
  embedding_keys_kernel<<<grid < 65535 ? grid : 65535, 256, 0, stream>>>(ids, keys_in, rows_in, R, V, xft_cuda_fault_record());
  e = cudaGetLastError();
  if (e == cudaSuccess)
    e = cub::DeviceRadixSort::SortPairs(sort_tmp, sort_bytes, keys_in, keys, rows_in, rows, R, 0, end_bit, stream);
  if (e == cudaSuccess) {
    if (d % W == 0 && aligned(dout, 16)) {
      embedding_chunk_kernel<T, W><<<R, block_for(d / W), 0, stream>>>(keys, rows, dout, partial, R, V, d);
      embedding_backward_kernel<T, W><<<R, block_for(d / W), 0, stream>>>(keys, rows, dout, partial, dtable, R, V, d);
    } else {
      embedding_chunk_kernel<T, 1><<<R, block_for(d), 0, stream>>>(keys, rows, dout, partial, R, V, d);
      embedding_backward_kernel<T, 1><<<R, block_for(d), 0, stream>>>(keys, rows, dout, partial, dtable, R, V, d);
    }
    e = cudaGetLastError();
  }
  cudaError_t f = cudaFreeAsync(scratch, stream);
  return e != cudaSuccess ? e : f;
}

}  // namespace

extern "C" int xft_cuda_embedding_forward(const int* ids, const void* table, void* out, int dtype, int R, int V, int d) {
  if (R == 0 || d == 0) return 0;
  if (dtype == XFT_BF16) return embedding_forward(ids, (const uint16_t*)table, (uint16_t*)out, R, V, d);
  return embedding_forward(ids, (const float*)table, (float*)out, R, V, d);
}

extern "C" int xft_cuda_embedding_backward(const int* ids, const void* dout, float* dtable, int dtype, int R, int V,
                                           int d, int accumulate) {
  if (V == 0 || d == 0) return 0;
  if (dtype == XFT_BF16) return embedding_backward(ids, (const uint16_t*)dout, dtable, R, V, d, accumulate);
  return embedding_backward(ids, (const float*)dout, dtable, R, V, d, accumulate);
}
