/*
Causal multi-head self-attention with grouped-query heads (GQA), flash-attention style: the T x T
score matrix is never stored, only lse per query row.

Layout: q, out, dout, dq [B*T, H*hd]; k, v, dk, dv [B*T, Hkv*hd]: row b*T + t, head h in columns
h*hd .. h*hd + hd. Query head h reads kv head h / G, G = H / Hkv. lse f32 [B, H, T]. One dtype
(f32 or bf16) for the activations; fp32 math (no tensor cores yet: correctness first). 1 <= hd <= 128.
Forward, per (b, h, query i), in PyTorch terms:
  s_j = scale * q_i . k_j for j <= i (scale = 1/sqrt(hd)),  lse_i = logsumexp_j s_j,
  P_ij = exp(s_j - lse_i),  out_i = sum_j P_ij v_j
Backward, with D_i = dout_i . out_i (= sum_j P_ij dout_i . v_j):
  dP_ij = dout_i . v_j,  dS_ij = P_ij (dP_ij - D_i)
  dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_{h in group, i >= j} dS_ij q_i,
  dv_j = sum_{h in group, i >= j} P_ij dout_i
Gradients overwrite; no atomics, so the result is deterministic.

Kernels (128 threads = 4 warps; tiles of 32 query rows and 32 keys, one key or query per lane):
- forward: a block per (query tile, h, b). The Q tile stays in shared memory; K/V tiles stream
  through it. Each warp owns 8 query rows (rows warp, warp + 4, ...); lane j scores key j of the
  tile, the warp keeps an online softmax (running max m, lane-partial sums l) and an fp32 output
  accumulator with dimensions lane + 32c in registers.
- backward, pass 0: D_i, one warp per (row, head), into scratch from cudaMallocAsync.
- backward, dk/dv: a block per (key tile, kv head, b); each warp owns 8 keys, accumulates dk, dv in
  registers over the G query heads of the kv head and all query tiles at or after the key tile,
  with lane i handling query i of the tile. P is recomputed from lse.
- backward, dq: a block per (query tile, h, b), shaped like the forward; lane j handles key j.
Shared-memory rows that lanes read at different rows have an odd stride (hd | 1): no bank conflicts.
*/
#include <cuda_runtime.h>

#include "xft_cuda.h"
#include "xft_math.h"

extern "C" cudaStream_t xft_cuda_stream(void);

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

namespace {

const int kWarp = 32;
const int kTile = 32;                            // query rows and keys per tile: one per lane
const int kWarps = 4;
const int kThreads = kWarps * kWarp;
const int kRowsPerWarp = kTile / kWarps;         // 8
const int kMaxHeadDim = 128;                     // 4 register chunks of 32 dimensions
const int kMinBlocks = 2;                        // per SM (shared memory allows 3 on H100)
const unsigned kFull = 0xffffffffu;

// CUDA kernels

__device__ __forceinline__ float load_value(const void* p, int dtype, size_t i) {
  return dtype == XFT_BF16 ? xft_bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

__device__ __forceinline__ void store_value(void* p, int dtype, size_t i, float v) {
  if (dtype == XFT_BF16) ((uint16_t*)p)[i] = xft_f32_to_bf16(v);
  else ((float*)p)[i] = v;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

__device__ __forceinline__ float dot(const float* a, const float* b, int n) {
  float s = 0.f;
#pragma unroll 4
  for (int d = 0; d < n; d++) s += a[d] * b[d];
  return s;
}

// rows t0 .. t0 + kTile of one head of a [B*T, heads*hd] tensor (batch b) into dst[kTile][ld] as
// fp32; rows at or after T are zero
__device__ __forceinline__ void load_tile(float* dst, int ld, const void* src, int dtype, int b, int T, int t0,
                                          int heads, int head, int hd) {
  const size_t stride = (size_t)heads * hd;
  const size_t base = (size_t)b * T * stride + (size_t)head * hd;
  for (int idx = threadIdx.x; idx < kTile * hd; idx += blockDim.x) {
    const int r = idx / hd, d = idx - r * hd, t = t0 + r;
    dst[r * ld + d] = t < T ? load_value(src, dtype, base + (size_t)t * stride + d) : 0.f;
  }
}

template <int NC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
attention_forward_kernel(const void* q, const void* k, const void* v, void* out, float* lse, int dtype, int T, int H,
                         int Hkv, int hd, float scale) {
  extern __shared__ float smem[];
  const int ldp = hd | 1;
  float* Qs = smem;                // [kTile][hd]
  float* Ks = Qs + kTile * hd;     // [kTile][ldp]
  float* Vs = Ks + kTile * ldp;    // [kTile][hd]
  const int qt = gridDim.x - 1 - blockIdx.x;  // the longest rows first
  const int h = blockIdx.y, b = blockIdx.z, kvh = h / (H / Hkv);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int q0 = qt * kTile;

  load_tile(Qs, hd, q, dtype, b, T, q0, H, h, hd);
  float acc[kRowsPerWarp][NC], m[kRowsPerWarp], l[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; rr++) {
    m[rr] = -INFINITY;
    l[rr] = 0.f;
#pragma unroll
    for (int c = 0; c < NC; c++) acc[rr][c] = 0.f;
  }

  const int last = min(q0 + kTile, T) - 1;  // the last query row of the tile
  for (int k0 = 0; k0 <= last; k0 += kTile) {
    __syncthreads();  // the previous K/V tile is consumed
    load_tile(Ks, ldp, k, dtype, b, T, k0, Hkv, kvh, hd);
    load_tile(Vs, hd, v, dtype, b, T, k0, Hkv, kvh, hd);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; rr++) {
      const int r = rr * kWarps + warp, i = q0 + r;
      if (i >= T || k0 > i) continue;  // warp-uniform
      const int j = k0 + lane;
      float s = -INFINITY;
      if (j <= i) s = scale * dot(Qs + r * hd, Ks + lane * ldp, hd);
      const float mnew = fmaxf(m[rr], warp_max(s));  // finite: key k0 <= i is in the tile
      const float corr = expf(m[rr] - mnew);
      const float p = expf(s - mnew);
      l[rr] = l[rr] * corr + p;
      const int jend = min(kTile, i - k0 + 1);
#pragma unroll
      for (int c = 0; c < NC; c++) acc[rr][c] *= corr;
      for (int jj = 0; jj < jend; jj++) {
        const float pj = __shfl_sync(kFull, p, jj);
#pragma unroll
        for (int c = 0; c < NC; c++) {
          const int d = lane + c * kWarp;
          if (d < hd) acc[rr][c] += pj * Vs[jj * hd + d];
        }
      }
      m[rr] = mnew;
    }
  }

  const size_t stride = (size_t)H * hd;
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; rr++) {
    const int r = rr * kWarps + warp, i = q0 + r;
    if (i >= T) continue;
    const float sum = warp_sum(l[rr]);
    const size_t base = ((size_t)b * T + i) * stride + (size_t)h * hd;
#pragma unroll
    for (int c = 0; c < NC; c++) {
      const int d = lane + c * kWarp;
      if (d < hd) store_value(out, dtype, base + d, acc[rr][c] / sum);
    }
    if (lane == 0) lse[((size_t)b * H + h) * T + i] = m[rr] + logf(sum);
  }
}

// D[b, h, t] = dout . out over the hd dimensions of (row b*T + t, head h); one warp each
__global__ void attention_backward_dot_kernel(const void* out, const void* dout, float* D, int dtype, int B, int T,
                                              int H, int hd) {
  const size_t warps = (size_t)B * T * H;
  const int lane = threadIdx.x % kWarp;
  for (size_t w = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / kWarp; w < warps;
       w += (size_t)gridDim.x * blockDim.x / kWarp) {
    const size_t row = w / H;  // b*T + t
    const int h = (int)(w % H);
    const size_t base = (row * H + h) * hd;
    float s = 0.f;
    for (int d = lane; d < hd; d += kWarp) s += load_value(dout, dtype, base + d) * load_value(out, dtype, base + d);
    s = warp_sum(s);
    const size_t b = row / T, t = row % T;
    if (lane == 0) D[(b * H + h) * T + t] = s;
  }
}

template <int NC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
attention_backward_dkdv_kernel(const void* q, const void* k, const void* v, const float* lse, const float* D,
                               const void* dout, void* dk, void* dv, int dtype, int T, int H, int Hkv, int hd,
                               float scale) {
  extern __shared__ float smem[];
  const int ldp = hd | 1;
  float* Ks = smem;                 // [kTile][hd]  (read by warp-uniform key rows: broadcast)
  float* Vs = Ks + kTile * hd;      // [kTile][hd]
  float* Qs = Vs + kTile * hd;      // [kTile][ldp] (lane i reads row i)
  float* dOs = Qs + kTile * ldp;    // [kTile][ldp]
  float* lse_s = dOs + kTile * ldp; // [kTile]
  float* D_s = lse_s + kTile;       // [kTile]
  const int kt = blockIdx.x;        // the earliest keys (most queries) first
  const int kvh = blockIdx.y, b = blockIdx.z, G = H / Hkv;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int k0 = kt * kTile;

  load_tile(Ks, hd, k, dtype, b, T, k0, Hkv, kvh, hd);
  load_tile(Vs, hd, v, dtype, b, T, k0, Hkv, kvh, hd);
  float dk_acc[kRowsPerWarp][NC], dv_acc[kRowsPerWarp][NC];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; rr++)
#pragma unroll
    for (int c = 0; c < NC; c++) dk_acc[rr][c] = dv_acc[rr][c] = 0.f;

  for (int h = kvh * G; h < (kvh + 1) * G; h++)
    for (int q0 = k0; q0 < T; q0 += kTile) {  // query tiles at or after the key tile (kTile aligned)
      __syncthreads();  // the previous Q/dO tile is consumed (and K/V are visible)
      load_tile(Qs, ldp, q, dtype, b, T, q0, H, h, hd);
      load_tile(dOs, ldp, dout, dtype, b, T, q0, H, h, hd);
      if (threadIdx.x < kTile) {
        const int i = q0 + threadIdx.x;
        const size_t at = ((size_t)b * H + h) * T + i;
        lse_s[threadIdx.x] = i < T ? lse[at] : 0.f;
        D_s[threadIdx.x] = i < T ? D[at] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; rr++) {
        const int r = rr * kWarps + warp, j = k0 + r;
        if (j >= T || q0 + kTile - 1 < j) continue;  // warp-uniform
        const int i = q0 + lane;
        float P = 0.f, dS = 0.f;
        if (i < T && i >= j) {
          P = expf(scale * dot(Qs + lane * ldp, Ks + r * hd, hd) - lse_s[lane]);
          dS = P * (dot(dOs + lane * ldp, Vs + r * hd, hd) - D_s[lane]);
        }
        const int iend = min(kTile, T - q0);
        for (int ii = 0; ii < iend; ii++) {
          const float Pi = __shfl_sync(kFull, P, ii), dSi = __shfl_sync(kFull, dS, ii);
#pragma unroll
          for (int c = 0; c < NC; c++) {
            const int d = lane + c * kWarp;
            if (d < hd) {
              dv_acc[rr][c] += Pi * dOs[ii * ldp + d];
              dk_acc[rr][c] += dSi * Qs[ii * ldp + d];
            }
          }
        }
      }
    }

  const size_t stride = (size_t)Hkv * hd;
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; rr++) {
    const int r = rr * kWarps + warp, j = k0 + r;
    if (j >= T) continue;
    const size_t base = ((size_t)b * T + j) * stride + (size_t)kvh * hd;
#pragma unroll
    for (int c = 0; c < NC; c++) {
      const int d = lane + c * kWarp;
      if (d < hd) {
        store_value(dk, dtype, base + d, scale * dk_acc[rr][c]);
        store_value(dv, dtype, base + d, dv_acc[rr][c]);
      }
    }
  }
}

template <int NC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
attention_backward_dq_kernel(const void* q, const void* k, const void* v, const float* lse, const float* D,
                             const void* dout, void* dq, int dtype, int T, int H, int Hkv, int hd, float scale) {
  extern __shared__ float smem[];
  const int ldp = hd | 1;
  float* Qs = smem;                  // [kTile][hd]  (warp-uniform rows: broadcast)
  float* dOs = Qs + kTile * hd;      // [kTile][hd]
  float* Ks = dOs + kTile * hd;      // [kTile][ldp] (lane j reads row j)
  float* Vs = Ks + kTile * ldp;      // [kTile][ldp]
  float* lse_s = Vs + kTile * ldp;   // [kTile]
  float* D_s = lse_s + kTile;        // [kTile]
  const int qt = gridDim.x - 1 - blockIdx.x;  // the longest rows first
  const int h = blockIdx.y, b = blockIdx.z, kvh = h / (H / Hkv);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int q0 = qt * kTile;

  load_tile(Qs, hd, q, dtype, b, T, q0, H, h, hd);
  load_tile(dOs, hd, dout, dtype, b, T, q0, H, h, hd);
  if (threadIdx.x < kTile) {
    const int i = q0 + threadIdx.x;
    const size_t at = ((size_t)b * H + h) * T + i;
    lse_s[threadIdx.x] = i < T ? lse[at] : 0.f;
    D_s[threadIdx.x] = i < T ? D[at] : 0.f;
  }
  float dq_acc[kRowsPerWarp][NC];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; rr++)
#pragma unroll
    for (int c = 0; c < NC; c++) dq_acc[rr][c] = 0.f;

  const int last = min(q0 + kTile, T) - 1;
  for (int k0 = 0; k0 <= last; k0 += kTile) {
    __syncthreads();  // the previous K/V tile is consumed (and the Q tile is visible)
    load_tile(Ks, ldp, k, dtype, b, T, k0, Hkv, kvh, hd);
    load_tile(Vs, ldp, v, dtype, b, T, k0, Hkv, kvh, hd);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; rr++) {
      const int r = rr * kWarps + warp, i = q0 + r;
      if (i >= T || k0 > i) continue;  // warp-uniform
      const int j = k0 + lane;
      float dS = 0.f;
      if (j <= i) {
        const float P = expf(scale * dot(Qs + r * hd, Ks + lane * ldp, hd) - lse_s[r]);
        dS = P * (dot(dOs + r * hd, Vs + lane * ldp, hd) - D_s[r]);
      }
      const int jend = min(kTile, i - k0 + 1);
      for (int jj = 0; jj < jend; jj++) {
        const float dSj = __shfl_sync(kFull, dS, jj);
#pragma unroll
        for (int c = 0; c < NC; c++) {
          const int d = lane + c * kWarp;
          if (d < hd) dq_acc[rr][c] += dSj * Ks[jj * ldp + d];
        }
      }
    }
  }

  const size_t stride = (size_t)H * hd;
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; rr++) {
    const int r = rr * kWarps + warp, i = q0 + r;
    if (i >= T) continue;
    const size_t base = ((size_t)b * T + i) * stride + (size_t)h * hd;
#pragma unroll
    for (int c = 0; c < NC; c++) {
      const int d = lane + c * kWarp;
      if (d < hd) store_value(dq, dtype, base + d, scale * dq_acc[rr][c]);
    }
  }
}

size_t forward_smem(int hd) { return sizeof(float) * (size_t)kTile * (2 * hd + (hd | 1)); }
size_t backward_smem(int hd) { return sizeof(float) * ((size_t)kTile * (2 * hd + 2 * (hd | 1)) + 2 * kTile); }

template <int NC>
cudaError_t launch_forward(const void* q, const void* k, const void* v, void* out, float* lse, int dtype, int B, int T,
                           int H, int Hkv, int hd, float scale) {
  const size_t smem = forward_smem(hd);
  cudaError_t e = cudaFuncSetAttribute(attention_forward_kernel<NC>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  dim3 grid(CEIL_DIV(T, kTile), H, B);
  attention_forward_kernel<NC><<<grid, kThreads, smem, xft_cuda_stream()>>>(q, k, v, out, lse, dtype, T, H, Hkv, hd, scale);
  return cudaGetLastError();
}

template <int NC>
cudaError_t launch_backward(const void* q, const void* k, const void* v, const float* lse, const float* D,
                            const void* dout, void* dq, void* dk, void* dv, int dtype, int B, int T, int H, int Hkv,
                            int hd, float scale) {
  const size_t smem = backward_smem(hd);
  cudaError_t e = cudaFuncSetAttribute(attention_backward_dkdv_kernel<NC>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  e = cudaFuncSetAttribute(attention_backward_dq_kernel<NC>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  cudaStream_t stream = xft_cuda_stream();
  const int tiles = CEIL_DIV(T, kTile);
  attention_backward_dkdv_kernel<NC><<<dim3(tiles, Hkv, B), kThreads, smem, stream>>>(q, k, v, lse, D, dout, dk, dv, dtype,
                                                                                       T, H, Hkv, hd, scale);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  attention_backward_dq_kernel<NC><<<dim3(tiles, H, B), kThreads, smem, stream>>>(q, k, v, lse, D, dout, dq, dtype, T, H,
                                                                                   Hkv, hd, scale);
  return cudaGetLastError();
}

bool valid_sizes(int B, int T, int H, int Hkv, int hd) {
  return B >= 1 && B <= 65535 && T >= 0 && H >= 1 && H <= 65535 && Hkv >= 1 && H % Hkv == 0 && hd >= 1 &&
         hd <= kMaxHeadDim;
}

}  // namespace

// kernel launchers

extern "C" int xft_cuda_attention_forward(const void* q, const void* k, const void* v, void* out, float* lse,
                                          int dtype, int B, int T, int H, int Hkv, int hd) {
  if (!valid_sizes(B, T, H, Hkv, hd)) return cudaErrorInvalidValue;
  if (T == 0) return 0;
  const float scale = 1.0f / sqrtf((float)hd);
  switch (CEIL_DIV(hd, kWarp)) {
    case 1: return launch_forward<1>(q, k, v, out, lse, dtype, B, T, H, Hkv, hd, scale);
    case 2: return launch_forward<2>(q, k, v, out, lse, dtype, B, T, H, Hkv, hd, scale);
    case 3: return launch_forward<3>(q, k, v, out, lse, dtype, B, T, H, Hkv, hd, scale);
    default: return launch_forward<4>(q, k, v, out, lse, dtype, B, T, H, Hkv, hd, scale);
  }
}

extern "C" int xft_cuda_attention_backward(const void* q, const void* k, const void* v, const void* out, const float* lse,
                                           const void* dout, void* dq, void* dk, void* dv,
                                           int dtype, int B, int T, int H, int Hkv, int hd) {
  if (!valid_sizes(B, T, H, Hkv, hd)) return cudaErrorInvalidValue;
  if (T == 0) return 0;
  const float scale = 1.0f / sqrtf((float)hd);
  cudaStream_t stream = xft_cuda_stream();
  float* D = nullptr;  // [B, H, T]
  cudaError_t e = cudaMallocAsync((void**)&D, sizeof(float) * (size_t)B * H * T, stream);
  if (e != cudaSuccess) return e;
  const size_t warps = (size_t)B * T * H;
  size_t blocks = CEIL_DIV(warps, (size_t)(kThreads / kWarp));
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  attention_backward_dot_kernel<<<(unsigned)blocks, kThreads, 0, stream>>>(out, dout, D, dtype, B, T, H, hd);
  e = cudaGetLastError();
  if (e == cudaSuccess) {
    switch (CEIL_DIV(hd, kWarp)) {
      case 1: e = launch_backward<1>(q, k, v, lse, D, dout, dq, dk, dv, dtype, B, T, H, Hkv, hd, scale); break;
      case 2: e = launch_backward<2>(q, k, v, lse, D, dout, dq, dk, dv, dtype, B, T, H, Hkv, hd, scale); break;
      case 3: e = launch_backward<3>(q, k, v, lse, D, dout, dq, dk, dv, dtype, B, T, H, Hkv, hd, scale); break;
      default: e = launch_backward<4>(q, k, v, lse, D, dout, dq, dk, dv, dtype, B, T, H, Hkv, hd, scale); break;
    }
  }
  cudaError_t f = cudaFreeAsync(D, stream);
  return e != cudaSuccess ? e : f;
}
