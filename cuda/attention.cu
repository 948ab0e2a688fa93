/*
Causal multi-head self-attention with grouped-query heads (GQA/MQA), FlashAttention-2 style: the
T x T score matrix is never stored, only lse per query row. CPU twin: binding/cpu/attention.cc.

Layout: q, out, dout, dq [B*T, H*hd]; k, v, dk, dv [B*T, Hkv*hd]: row b*T + t, head h in columns
h*hd .. h*hd + hd. Query head h reads kv head h / G, G = H / Hkv. lse f32 [B, H, T]. One dtype
(f32 or bf16) for the activations. 1 <= hd <= 128.
Forward, per (b, h, query i), in PyTorch terms:
  s_j = scale * q_i . k_j for j <= i (scale = 1/sqrt(hd)),  lse_i = logsumexp_j s_j,
  P_ij = exp(s_j - lse_i),  out_i = sum_j P_ij v_j
Backward, with D_i = dout_i . out_i (= sum_j P_ij dout_i . v_j):
  dP_ij = dout_i . v_j,  dS_ij = P_ij (dP_ij - D_i)
  dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_{h in group, i >= j} dS_ij q_i,
  dv_j = sum_{h in group, i >= j} P_ij dout_i
Gradients overwrite. No atomics anywhere (dQ has its own pass): deterministic, run to run.

Two implementations, one contract:

1. bf16 tensor cores (flash_* kernels), for bf16 with hd 64 or 128 and 16-byte aligned tensors:
   mma.sync m16n8k16 (bf16 in, fp32 accumulate) for every product, fragments by ldmatrix (.trans
   for the P V-like products), 16-byte padded shared rows (conflict-free ldmatrix), cp.async
   double buffering (tile t + 1 is copied while tile t is used: one barrier per tile), the
   softmax in fp32 in the log2 domain (exp2f of scale*log2e*s), P and dS rounded to bf16 as mma
   operands (as FlashAttention-2 does; ~2-4e-3 relative against the fp32 twin). 4 warps, each
   owning 16 rows of the block's tile, so a warp's softmax needs only quad shuffles.
   - forward: a block per (64 query rows, h, b), longest rows first; the Q tile goes to registers;
     64-key K/V tiles 0 .. qt (causal: tiles past the diagonal are never loaded; only the diagonal
     tile is masked). Online softmax (running max m, partial sums l), O rescaled per tile;
     lse = m ln2 + ln l is saved for the backward.
   - backward, pass 0: D_i = dout_i . out_i (attention_backward_dot_kernel, scratch from
     cudaMallocAsync).
   - backward dK/dV: a block per (64 keys, kv head, b), K and V resident in shared memory; query
     tiles (32 rows at hd 128, 64 at hd 64) of every query head of the group, from the key tile
     on, stream with their lse and D. Keys are the mma rows (S^T = K Q^T), so P^T and dS^T are
     A operands in registers: dV += P^T dO, dK += dS^T Q.
   - backward dQ: a block per (64 query rows, h, b), Q and dO resident; K/V tiles (32 keys at
     hd 128, 64 at hd 64) up to the diagonal: S, dP recomputed, dQ += dS K. The price of
     determinism: 7 products in the backward instead of FlashAttention-2's 5 (its dQ uses atomics).
   Shared memory per block (hd 128 / 64): forward 87,040 / 46,080 B, dK/dV 70,144 / 56,320 B, dQ
   70,144 / 55,808 B: all under the 101,376 B opt-in of sm_86/89, so the same kernels run there.
   ptxas (nvcc 13.0, -O3), registers sm_80 / sm_90a, no spills: forward 212 / 230 (hd 128),
   144 / 146 (hd 64); dK/dV 249 / 248, 203 / 206; dQ 176 / 180, 196 / 204.
   Estimate (not measured) at B 8, T 2048, H 16, hd 128, causal, H100 SXM: one product (QK^T, PV,
   ...) is 2 B H T^2 hd / 2 = 68.7 GFLOP; forward 2 products (137 GFLOP), FlashAttention's count
   for the backward 5 (fwd+bwd 481 GFLOP), this backward executes 7 (481 GFLOP alone). Compute
   bound: HBM ~0.3 GB forward, ~0.6 GB backward (K/V re-reads hit L2). Each ldmatrix.x4 of B
   fragments (512 B per warp) feeds 2 mma (8 kFLOP): 16 FLOP per shared byte in the forward, a
   cap near 480 TFLOP/s at 128 B/clk/SM; ~11-16 in the backward. Expect forward 150-250 TFLOP/s
   (0.55-0.9 ms), backward 100-170 TFLOP/s executed (2.8-4.8 ms): fwd+bwd 85-140 TFLOP/s by the
   FlashAttention count, 0.35-0.6x PyTorch's FlashAttention-2 SDPA. Knobs if short: 32 rows per
   warp in the forward (two m16 tiles: half the K/V fragment traffic per FLOP), K/V A fragments
   kept in registers in dK/dV, dQ by atomics (5 products) as an opt-in non-deterministic mode.
2. fp32 math on the CUDA cores (attention_* kernels), everything else (f32, other head dims,
   misaligned views). 128 threads = 4 warps; tiles of 32 query rows and 32 keys, one per lane:
   - forward: a block per (query tile, h, b). The Q tile stays in shared memory; K/V tiles stream
     through it. Each warp owns 8 query rows (rows warp, warp + 4, ...); lane j scores key j of
     the tile, the warp keeps an online softmax (running max m, lane-partial sums l) and an fp32
     output accumulator with dimensions lane + 32c in registers.
   - backward dk/dv: a block per (key tile, kv head, b); each warp owns 8 keys, accumulates dk, dv
     in registers over the G query heads of the kv head and all query tiles at or after the key
     tile, with lane i handling query i of the tile. P is recomputed from lse.
   - backward dq: a block per (query tile, h, b), shaped like the forward; lane j handles key j.
   Shared-memory rows that lanes read at different rows have an odd stride (hd | 1): no bank
   conflicts.
*/
#include <cuda_runtime.h>
#include <stdint.h>

#include <initializer_list>

#include "xft_cuda.h"
#include "xft_math.h"
#include "xft_mma.cuh"
#include "xft_smem.cuh"

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

// bf16 tensor-core path (flash_* kernels), head dims 64 and 128
const int kPadBf16 = 8;                          // bf16 (16 bytes) of padding per shared row: conflict-free ldmatrix
const int kFBQ = 64, kFBK = 64;                  // forward: query rows, keys per tile (equal: one diagonal tile)
const int kFWarps = kFBQ / 16, kFThreads = kFWarps * kWarp;
const int kBBK = 64;                             // backward dK/dV: keys per block
const int kBBQ = 64;                             // backward dQ: query rows per block
const int kBWarps = 4, kBThreads = kBWarps * kWarp;
const float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
static_assert(kFBQ == kFBK && kBBK == 16 * kBWarps && kBBQ == 16 * kBWarps, "tile shapes");
// the backward's streamed tile: 32 rows at head dim 128 (registers), 64 at 64
template <int HD> struct BackwardTile { static const int kRows = HD == 128 ? 32 : 64; };

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

// ---- bf16 tensor-core kernels (head dims 64 and 128) ----

// rows t0 .. t0 + R of head `head` (kv or query) of batch b of a [B*T, heads*HD] bf16 tensor into
// s[R][HD + kPadBf16] by cp.async; rows at or after T are zero-filled (the source address is
// clamped to row T - 1 so it stays valid). Every 16-byte chunk is one thread's copy.
template <int R, int HD, int THREADS>
__device__ __forceinline__ void load_rows_async(uint16_t* s, const uint16_t* src, int b, int T, int t0, int heads,
                                                int head) {
  constexpr int kPerRow = HD / 8, kChunks = R * kPerRow;
  static_assert(kChunks % THREADS == 0, "chunks per thread");
  const size_t stride = (size_t)heads * HD;
  const uint16_t* base = src + (size_t)b * T * stride + (size_t)head * HD;
#pragma unroll
  for (int i = 0; i < kChunks / THREADS; i++) {
    const int c = threadIdx.x + i * THREADS, r = c / kPerRow, d = (c % kPerRow) * 8, t = t0 + r;
    cp_async_16(smem_u32(s + r * (HD + kPadBf16) + d), base + (size_t)min(t, T - 1) * stride + d, t < T ? 16 : 0);
  }
}

// f32 values of [R] rows t0 .. t0 + R of a [B, H, T] array (head h) into s, times mul; 0 past T
template <int R>
__device__ __forceinline__ void load_row_stats(float* s, const float* src, int b, int H, int h, int T, int t0, float mul) {
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    const int t = t0 + r;
    s[r] = t < T ? mul * src[((size_t)b * H + h) * T + t] : 0.f;
  }
}

// acc[n8 tile][4] += the warp's 16 rows (A, K-major in shared a[row][HD + pad], rows a_row0..+16) times
// the N rows of b[row][HD + pad] (rows b_row0..+N) transposed: C = A B^T over the HD reduction.
// Both operands K-major, so plain ldmatrix: A matrices {m0-7 k0-7, m8-15 k0-7, m0-7 k8-15, m8-15 k8-15},
// B pair {j0-7 k0-7, j0-7 k8-15, j8-15 k0-7, j8-15 k8-15}.
template <int HD, int N>
__device__ __forceinline__ void mma_abt(float (&acc)[N / 8][4], uint32_t a_base, int a_row0, uint32_t b_base, int b_row0) {
  constexpr int kLd = HD + kPadBf16;
  const int lane = threadIdx.x % kWarp, q = lane / 8, r8 = lane % 8;
  const uint32_t a_addr = a_base + 2u * (uint32_t)((a_row0 + (q % 2) * 8 + r8) * kLd + (q / 2) * 8);
  const uint32_t b_addr = b_base + 2u * (uint32_t)((b_row0 + (q / 2) * 8 + r8) * kLd + (q % 2) * 8);
#pragma unroll
  for (int ks = 0; ks < HD / 16; ks++) {
    uint32_t af[4];
    ldmatrix_x4(af, a_addr + 2u * 16u * ks);
#pragma unroll
    for (int p = 0; p < N / 16; p++) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b_addr + 2u * (uint32_t)(p * 16 * kLd + 16 * ks));
      mma_bf16(acc[2 * p], af, bf[0], bf[1]);
      mma_bf16(acc[2 * p + 1], af, bf[2], bf[3]);
    }
  }
}

// the C fragments p[N / 8][4] of a warp's 16 x N tile rounded to bf16 A fragments (k16 steps of N)
template <int N>
__device__ __forceinline__ void pack_a(uint32_t (&a)[N / 16][4], const float (&p)[N / 8][4]) {
#pragma unroll
  for (int ks = 0; ks < N / 16; ks++) {
    a[ks][0] = pack_bf16x2(p[2 * ks][0], p[2 * ks][1]);
    a[ks][1] = pack_bf16x2(p[2 * ks][2], p[2 * ks][3]);
    a[ks][2] = pack_bf16x2(p[2 * ks + 1][0], p[2 * ks + 1][1]);
    a[ks][3] = pack_bf16x2(p[2 * ks + 1][2], p[2 * ks + 1][3]);
  }
}

// acc[HD / 8][4] += P (16 x N, bf16 A fragments of this warp) times the N rows of b[row][HD + pad]
// from b_row0 (row = the reduction index): ldmatrix.trans B fragments.
template <int HD, int N>
__device__ __forceinline__ void mma_pb(float (&acc)[HD / 8][4], const uint32_t (&pa)[N / 16][4], uint32_t b_base,
                                       int b_row0) {
  constexpr int kLd = HD + kPadBf16;
  const int lane = threadIdx.x % kWarp, q = lane / 8, r8 = lane % 8;
  const uint32_t b_addr = b_base + 2u * (uint32_t)((b_row0 + (q % 2) * 8 + r8) * kLd + (q / 2) * 8);
#pragma unroll
  for (int ks = 0; ks < N / 16; ks++)
#pragma unroll
    for (int dp = 0; dp < HD / 16; dp++) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, b_addr + 2u * (uint32_t)(ks * 16 * kLd + dp * 16));
      mma_bf16(acc[2 * dp], pa[ks], bf[0], bf[1]);
      mma_bf16(acc[2 * dp + 1], pa[ks], bf[2], bf[3]);
    }
}

// the C fragments acc[HD / 8][4] (rows row0 + lane / 4 and + 8 of a [B*T, heads*HD] bf16 tensor,
// times mul) stored as bf16 pairs; rows at or after T are skipped
template <int HD>
__device__ __forceinline__ void store_rows(uint16_t* dst, const float (&acc)[HD / 8][4], int b, int T, int row0,
                                           int heads, int head, float mul0, float mul1) {
  const int lane = threadIdx.x % kWarp;
  const size_t stride = (size_t)heads * HD;
#pragma unroll
  for (int half = 0; half < 2; half++) {
    const int t = row0 + lane / 4 + 8 * half;
    if (t >= T) continue;
    const float mul = half ? mul1 : mul0;
    uint32_t* row = (uint32_t*)(dst + ((size_t)b * T + t) * stride + (size_t)head * HD);
#pragma unroll
    for (int nt = 0; nt < HD / 8; nt++)
      row[nt * 4 + lane % 4] = pack_bf16x2(mul * acc[nt][2 * half], mul * acc[nt][2 * half + 1]);
  }
}

// Forward: a block per (query tile of kFBQ rows, h, b), kFWarps warps of 16 query rows each. The
// Q tile (group 0, with K/V tile 0) goes to registers once; K/V tiles of kFBK keys stream through two
// shared stages (tile t + 1 copied while tile t is used). Causal: key tiles 0 .. qt only (kFBQ ==
// kFBK), and only the diagonal one is masked. Online softmax in the log2 domain (s2 = scale log2e
// q.k), per row: m = running max, l = this lane's partial sum (reduced over the quad at the end).
template <int HD>
__global__ void __launch_bounds__(kFThreads, 2)
flash_forward_kernel(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, float* lse, int T, int H,
                     int Hkv, float scale_log2) {
  extern __shared__ __align__(16) uint16_t fsmem[];
  constexpr int kLd = HD + kPadBf16, kQElems = kFBQ * kLd, kKVElems = kFBK * kLd;
  uint16_t* Qs = fsmem;               // [kFBQ][kLd]
  uint16_t* KVs = fsmem + kQElems;    // 2 stages of K [kFBK][kLd], V [kFBK][kLd]
  const int qt = gridDim.x - 1 - blockIdx.x;  // the longest rows first
  const int h = blockIdx.y, b = blockIdx.z, kvh = h / (H / Hkv);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int q0 = qt * kFBQ, ntiles = qt + 1;

  load_rows_async<kFBQ, HD, kFThreads>(Qs, q, b, T, q0, H, h);
  load_rows_async<kFBK, HD, kFThreads>(KVs, k, b, T, 0, Hkv, kvh);
  load_rows_async<kFBK, HD, kFThreads>(KVs + kKVElems, v, b, T, 0, Hkv, kvh);
  cp_async_commit();

  float o[HD / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
  for (int nt = 0; nt < HD / 8; nt++)
#pragma unroll
    for (int c = 0; c < 4; c++) o[nt][c] = 0.f;
  uint32_t qf[HD / 16][4];
  const uint32_t smem_base = smem_u32(fsmem);

  for (int kt = 0; kt < ntiles; kt++) {
    cp_async_wait<0>();
    __syncthreads();  // tile kt visible to all; every warp is done with tile kt - 1 (the other stage)
    if (kt + 1 < ntiles) {
      uint16_t* st = KVs + ((kt + 1) % 2) * 2 * kKVElems;
      load_rows_async<kFBK, HD, kFThreads>(st, k, b, T, (kt + 1) * kFBK, Hkv, kvh);
      load_rows_async<kFBK, HD, kFThreads>(st + kKVElems, v, b, T, (kt + 1) * kFBK, Hkv, kvh);
    }
    cp_async_commit();
    if (kt == 0) {
      const int qq = lane / 8, r8 = lane % 8;
#pragma unroll
      for (int ks = 0; ks < HD / 16; ks++)
        ldmatrix_x4(qf[ks], smem_base + 2u * (uint32_t)((warp * 16 + (qq % 2) * 8 + r8) * kLd + ks * 16 + (qq / 2) * 8));
    }
    const uint32_t ks_base = smem_base + 2u * (uint32_t)(kQElems + (kt % 2) * 2 * kKVElems);
    const uint32_t vs_base = ks_base + 2u * (uint32_t)kKVElems;

    // S = Q K^T for this warp's 16 rows and the tile's kFBK keys
    float s[kFBK / 8][4];
#pragma unroll
    for (int nt = 0; nt < kFBK / 8; nt++)
#pragma unroll
      for (int c = 0; c < 4; c++) s[nt][c] = 0.f;
    {
      const int qq = lane / 8, r8 = lane % 8;
      const uint32_t b_addr = ks_base + 2u * (uint32_t)(((qq / 2) * 8 + r8) * kLd + (qq % 2) * 8);
#pragma unroll
      for (int ks = 0; ks < HD / 16; ks++)
#pragma unroll
        for (int p = 0; p < kFBK / 16; p++) {
          uint32_t bf[4];
          ldmatrix_x4(bf, b_addr + 2u * (uint32_t)(p * 16 * kLd + 16 * ks));
          mma_bf16(s[2 * p], qf[ks], bf[0], bf[1]);
          mma_bf16(s[2 * p + 1], qf[ks], bf[2], bf[3]);
        }
    }

    // scale, causal mask on the diagonal tile, online softmax
    const bool diagonal = kt == qt;
    float mnew[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < kFBK / 8; nt++)
#pragma unroll
      for (int c = 0; c < 4; c++) {
        float x = s[nt][c] * scale_log2;
        if (diagonal) {
          const int i = warp * 16 + lane / 4 + (c / 2) * 8, j = nt * 8 + 2 * (lane % 4) + (c % 2);  // within the tiles
          if (j > i) x = -INFINITY;
        }
        s[nt][c] = x;
        mnew[c / 2] = fmaxf(mnew[c / 2], x);
      }
    float corr[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
      mnew[r] = fmaxf(mnew[r], __shfl_xor_sync(kFull, mnew[r], 1));
      mnew[r] = fmaxf(mnew[r], __shfl_xor_sync(kFull, mnew[r], 2));  // finite: key kt * kFBK <= every row
      corr[r] = exp2f(m[r] - mnew[r]);
      m[r] = mnew[r];
      l[r] *= corr[r];
    }
#pragma unroll
    for (int nt = 0; nt < kFBK / 8; nt++)
#pragma unroll
      for (int c = 0; c < 4; c++) {
        const float p = exp2f(s[nt][c] - m[c / 2]);
        s[nt][c] = p;
        l[c / 2] += p;
      }
#pragma unroll
    for (int nt = 0; nt < HD / 8; nt++)
#pragma unroll
      for (int c = 0; c < 4; c++) o[nt][c] *= corr[c / 2];

    // O += P V
    uint32_t pa[kFBK / 16][4];
    pack_a<kFBK>(pa, s);
    mma_pb<HD, kFBK>(o, pa, vs_base, 0);
  }

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; r++) {
    l[r] += __shfl_xor_sync(kFull, l[r], 1);
    l[r] += __shfl_xor_sync(kFull, l[r], 2);
    inv[r] = 1.f / l[r];
    const int t = q0 + warp * 16 + lane / 4 + 8 * r;
    if (lane % 4 == 0 && t < T) lse[((size_t)b * H + h) * T + t] = m[r] * kLn2 + logf(l[r]);
  }
  store_rows<HD>(out, o, b, T, q0 + warp * 16, H, h, inv[0], inv[1]);
}

// Backward dK, dV: a block per (key tile of kBBK keys, kv head, b), kBWarps warps of 16 keys each,
// K and V of the tile in shared memory for the whole block. Query tiles of BQ rows (of every query
// head of the group, from the key tile on) stream through two shared stages with their lse and D.
// Per query tile, for the warp's keys j and the tile's queries i (S^T = K Q^T, keys as the rows):
//   P^T = exp2(s2 - lse2) masked to i >= j, i < T;  dP^T = V dO^T;  dS^T = P^T (dP^T - D)
//   dV += P^T dO;  dK += dS^T Q      (dK scaled by `scale` at the end)
template <int HD, int BQ>
__global__ void __launch_bounds__(kBThreads, 2)
flash_backward_dkdv_kernel(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* dout,
                           const float* lse, const float* D, uint16_t* dk, uint16_t* dv, int T, int H, int Hkv,
                           float scale, float scale_log2) {
  extern __shared__ __align__(16) uint16_t bsmem[];
  constexpr int kLd = HD + kPadBf16, kKVElems = kBBK * kLd, kQElems = BQ * kLd;
  constexpr int kStageElems = 2 * kQElems + 2 * BQ * 2;  // Q, dO, then lse2 and D as f32 (2 bf16 slots each)
  uint16_t* Ks = bsmem;
  uint16_t* Vs = Ks + kKVElems;
  uint16_t* stages = Vs + kKVElems;
  const int kt = blockIdx.x;  // the earliest keys (most queries) first
  const int kvh = blockIdx.y, b = blockIdx.z, G = H / Hkv;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int k0 = kt * kBBK;
  const int qt0 = k0 / BQ, nq = CEIL_DIV(T, BQ) - qt0, n = G * nq;  // query tiles per head, in all

  load_rows_async<kBBK, HD, kBThreads>(Ks, k, b, T, k0, Hkv, kvh);
  load_rows_async<kBBK, HD, kBThreads>(Vs, v, b, T, k0, Hkv, kvh);
  auto load_stage = [&](int it) {
    uint16_t* st = stages + (it % 2) * kStageElems;
    const int h = kvh * G + it / nq, q0 = (qt0 + it % nq) * BQ;
    load_rows_async<BQ, HD, kBThreads>(st, q, b, T, q0, H, h);
    load_rows_async<BQ, HD, kBThreads>(st + kQElems, dout, b, T, q0, H, h);
    float* stats = (float*)(st + 2 * kQElems);
    load_row_stats<BQ>(stats, lse, b, H, h, T, q0, kLog2e);
    load_row_stats<BQ>(stats + BQ, D, b, H, h, T, q0, 1.f);
  };
  load_stage(0);
  cp_async_commit();

  float dk_acc[HD / 8][4], dv_acc[HD / 8][4];
#pragma unroll
  for (int nt = 0; nt < HD / 8; nt++)
#pragma unroll
    for (int c = 0; c < 4; c++) dk_acc[nt][c] = dv_acc[nt][c] = 0.f;
  const uint32_t smem_base = smem_u32(bsmem);
  const uint32_t ks_base = smem_base, vs_base = smem_base + 2u * (uint32_t)kKVElems;

  for (int it = 0; it < n; it++) {
    cp_async_wait<0>();
    __syncthreads();  // stage it (and K, V) visible; every warp is done with stage it - 1
    if (it + 1 < n) load_stage(it + 1);
    cp_async_commit();
    const int q0 = (qt0 + it % nq) * BQ;
    const uint32_t qs_base = smem_base + 2u * (uint32_t)(2 * kKVElems + (it % 2) * kStageElems);
    const uint32_t dos_base = qs_base + 2u * (uint32_t)kQElems;
    const float* stats = (const float*)(stages + (it % 2) * kStageElems + 2 * kQElems);

    // P^T, rounded to bf16 at once (the mma operand; dS below uses the same rounded P)
    uint32_t pa[BQ / 16][4];
    {
      float s[BQ / 8][4];
#pragma unroll
      for (int nt = 0; nt < BQ / 8; nt++)
#pragma unroll
        for (int c = 0; c < 4; c++) s[nt][c] = 0.f;
      mma_abt<HD, BQ>(s, ks_base, warp * 16, qs_base, 0);  // S^T = K Q^T
#pragma unroll
      for (int nt = 0; nt < BQ / 8; nt++)
#pragma unroll
        for (int c = 0; c < 4; c++) {
          const int j = k0 + warp * 16 + lane / 4 + (c / 2) * 8, ii = nt * 8 + 2 * (lane % 4) + (c % 2), i = q0 + ii;
          s[nt][c] = i >= j && i < T ? exp2f(s[nt][c] * scale_log2 - stats[ii]) : 0.f;
        }
      pack_a<BQ>(pa, s);
    }
    mma_pb<HD, BQ>(dv_acc, pa, dos_base, 0);  // dV += P^T dO
    {
      float dp[BQ / 8][4];
#pragma unroll
      for (int nt = 0; nt < BQ / 8; nt++)
#pragma unroll
        for (int c = 0; c < 4; c++) dp[nt][c] = 0.f;
      mma_abt<HD, BQ>(dp, vs_base, warp * 16, dos_base, 0);  // dP^T = V dO^T
#pragma unroll
      for (int nt = 0; nt < BQ / 8; nt++)
#pragma unroll
        for (int c = 0; c < 4; c++) {
          const int ii = nt * 8 + 2 * (lane % 4) + (c % 2);
          const uint32_t pair = pa[nt / 2][(nt % 2) * 2 + c / 2];  // P^T (row, ii) as packed above
          const float p = xft_bf16_to_f32((uint16_t)(c % 2 ? pair >> 16 : pair & 0xffffu));
          dp[nt][c] = p * (dp[nt][c] - stats[BQ + ii]);
        }
      pack_a<BQ>(pa, dp);
    }
    mma_pb<HD, BQ>(dk_acc, pa, qs_base, 0);  // dK += dS^T Q
  }

  store_rows<HD>(dk, dk_acc, b, T, k0 + warp * 16, Hkv, kvh, scale, scale);
  store_rows<HD>(dv, dv_acc, b, T, k0 + warp * 16, Hkv, kvh, 1.f, 1.f);
}

// Backward dQ (a separate pass, so no atomics: deterministic): a block per (query tile of kBBQ rows,
// h, b), kBWarps warps of 16 rows; Q and dO stay in shared memory, K/V tiles of BK keys stream through
// two stages up to the diagonal. Per key tile: S = Q K^T, P = exp2(s2 - lse2) (masked j <= i),
// dP = dO V^T, dS = P (dP - D), dQ += dS K (scaled by `scale` at the end).
template <int HD, int BK>
__global__ void __launch_bounds__(kBThreads, 2)
flash_backward_dq_kernel(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* dout,
                         const float* lse, const float* D, uint16_t* dq, int T, int H, int Hkv, float scale,
                         float scale_log2) {
  extern __shared__ __align__(16) uint16_t bsmem[];
  constexpr int kLd = HD + kPadBf16, kQElems = kBBQ * kLd, kKVElems = BK * kLd;
  uint16_t* Qs = bsmem;
  uint16_t* dOs = Qs + kQElems;
  uint16_t* KVs = dOs + kQElems;                        // 2 stages of K [BK][kLd], V [BK][kLd]
  float* stats = (float*)(KVs + 4 * kKVElems);          // lse2 [kBBQ], D [kBBQ]
  const int qt = gridDim.x - 1 - blockIdx.x;  // the longest rows first
  const int h = blockIdx.y, b = blockIdx.z, kvh = h / (H / Hkv);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int q0 = qt * kBBQ, ntiles = CEIL_DIV(min(q0 + kBBQ, T), BK);  // key tiles up to the last row

  load_rows_async<kBBQ, HD, kBThreads>(Qs, q, b, T, q0, H, h);
  load_rows_async<kBBQ, HD, kBThreads>(dOs, dout, b, T, q0, H, h);
  load_rows_async<BK, HD, kBThreads>(KVs, k, b, T, 0, Hkv, kvh);
  load_rows_async<BK, HD, kBThreads>(KVs + kKVElems, v, b, T, 0, Hkv, kvh);
  load_row_stats<kBBQ>(stats, lse, b, H, h, T, q0, kLog2e);
  load_row_stats<kBBQ>(stats + kBBQ, D, b, H, h, T, q0, 1.f);
  cp_async_commit();

  float dq_acc[HD / 8][4];
#pragma unroll
  for (int nt = 0; nt < HD / 8; nt++)
#pragma unroll
    for (int c = 0; c < 4; c++) dq_acc[nt][c] = 0.f;
  const uint32_t smem_base = smem_u32(bsmem);
  const uint32_t qs_base = smem_base, dos_base = smem_base + 2u * (uint32_t)kQElems;
  const int r0 = warp * 16 + lane / 4;  // this lane's rows r0 and r0 + 8 of the tile

  for (int kt = 0; kt < ntiles; kt++) {
    cp_async_wait<0>();
    __syncthreads();  // tile kt visible to all; every warp is done with tile kt - 1 (the other stage)
    if (kt + 1 < ntiles) {
      uint16_t* st = KVs + ((kt + 1) % 2) * 2 * kKVElems;
      load_rows_async<BK, HD, kBThreads>(st, k, b, T, (kt + 1) * BK, Hkv, kvh);
      load_rows_async<BK, HD, kBThreads>(st + kKVElems, v, b, T, (kt + 1) * BK, Hkv, kvh);
    }
    cp_async_commit();
    const int k0 = kt * BK;
    const uint32_t ks_base = smem_base + 2u * (uint32_t)(2 * kQElems + (kt % 2) * 2 * kKVElems);
    const uint32_t vs_base = ks_base + 2u * (uint32_t)kKVElems;

    float s[BK / 8][4], dp[BK / 8][4];
#pragma unroll
    for (int nt = 0; nt < BK / 8; nt++)
#pragma unroll
      for (int c = 0; c < 4; c++) s[nt][c] = dp[nt][c] = 0.f;
    mma_abt<HD, BK>(s, qs_base, warp * 16, ks_base, 0);    // S = Q K^T
    mma_abt<HD, BK>(dp, dos_base, warp * 16, vs_base, 0);  // dP = dO V^T
    const bool masked = k0 + BK - 1 > q0;  // some key after some row of the tile
#pragma unroll
    for (int nt = 0; nt < BK / 8; nt++)
#pragma unroll
      for (int c = 0; c < 4; c++) {
        const int r = r0 + (c / 2) * 8, j = k0 + nt * 8 + 2 * (lane % 4) + (c % 2);
        const float p = masked && j > q0 + r ? 0.f : exp2f(s[nt][c] * scale_log2 - stats[r]);
        dp[nt][c] = p * (dp[nt][c] - stats[kBBQ + r]);
      }
    uint32_t pa[BK / 16][4];
    pack_a<BK>(pa, dp);
    mma_pb<HD, BK>(dq_acc, pa, ks_base, 0);  // dQ += dS K
  }

  store_rows<HD>(dq, dq_acc, b, T, q0 + warp * 16, H, h, scale, scale);
}

size_t forward_smem(int hd) { return sizeof(float) * (size_t)kTile * (2 * hd + (hd | 1)); }
size_t backward_smem(int hd) { return sizeof(float) * ((size_t)kTile * (2 * hd + 2 * (hd | 1)) + 2 * kTile); }

template <int NC>
cudaError_t launch_forward(const void* q, const void* k, const void* v, void* out, float* lse, int dtype, int B, int T,
                           int H, int Hkv, int hd, float scale) {
  const size_t smem = forward_smem(hd);
  cudaError_t e = xft_allow_smem(attention_forward_kernel<NC>, smem);
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
  cudaError_t e = xft_allow_smem(attention_backward_dkdv_kernel<NC>, smem);
  if (e != cudaSuccess) return e;
  e = xft_allow_smem(attention_backward_dq_kernel<NC>, smem);
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

// ---- bf16 tensor-core launchers ----

template <int HD> size_t flash_forward_smem() { return sizeof(uint16_t) * (size_t)(kFBQ + 4 * kFBK) * (HD + kPadBf16); }
template <int HD> size_t flash_dkdv_smem() {
  const int bq = BackwardTile<HD>::kRows;
  return sizeof(uint16_t) * ((size_t)2 * kBBK * (HD + kPadBf16) + 2 * ((size_t)2 * bq * (HD + kPadBf16) + 4 * bq));
}
template <int HD> size_t flash_dq_smem() {
  const int bk = BackwardTile<HD>::kRows;
  return sizeof(uint16_t) * ((size_t)2 * kBBQ * (HD + kPadBf16) + (size_t)4 * bk * (HD + kPadBf16)) + sizeof(float) * 2 * kBBQ;
}

template <int HD>
cudaError_t flash_forward(const void* q, const void* k, const void* v, void* out, float* lse, int B, int T, int H,
                          int Hkv) {
  const size_t smem = flash_forward_smem<HD>();
  const cudaError_t allowed = xft_allow_smem(flash_forward_kernel<HD>, smem);
  if (allowed != cudaSuccess) return allowed;
  const float scale_log2 = kLog2e / sqrtf((float)HD);
  flash_forward_kernel<HD><<<dim3(CEIL_DIV(T, kFBQ), H, B), kFThreads, smem, xft_cuda_stream()>>>(
      (const uint16_t*)q, (const uint16_t*)k, (const uint16_t*)v, (uint16_t*)out, lse, T, H, Hkv, scale_log2);
  return cudaGetLastError();
}

template <int HD>
cudaError_t flash_backward(const void* q, const void* k, const void* v, const float* lse, const float* D,
                           const void* dout, void* dq, void* dk, void* dv, int B, int T, int H, int Hkv) {
  constexpr int kRows = BackwardTile<HD>::kRows;
  const size_t smem_kv = flash_dkdv_smem<HD>(), smem_q = flash_dq_smem<HD>();
  const cudaError_t allowed_kv = xft_allow_smem(flash_backward_dkdv_kernel<HD, kRows>, smem_kv);
  const cudaError_t allowed_q = xft_allow_smem(flash_backward_dq_kernel<HD, kRows>, smem_q);
  if (allowed_kv != cudaSuccess) return allowed_kv;
  if (allowed_q != cudaSuccess) return allowed_q;
  const float scale = 1.0f / sqrtf((float)HD), scale_log2 = kLog2e * scale;
  cudaStream_t stream = xft_cuda_stream();
  flash_backward_dkdv_kernel<HD, kRows><<<dim3(CEIL_DIV(T, kBBK), Hkv, B), kBThreads, smem_kv, stream>>>(
      (const uint16_t*)q, (const uint16_t*)k, (const uint16_t*)v, (const uint16_t*)dout, lse, D, (uint16_t*)dk,
      (uint16_t*)dv, T, H, Hkv, scale, scale_log2);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  flash_backward_dq_kernel<HD, kRows><<<dim3(CEIL_DIV(T, kBBQ), H, B), kBThreads, smem_q, stream>>>(
      (const uint16_t*)q, (const uint16_t*)k, (const uint16_t*)v, (const uint16_t*)dout, lse, D, (uint16_t*)dq, T, H,
      Hkv, scale, scale_log2);
  return cudaGetLastError();
}

// the tensor-core path takes bf16 with head dim 64 or 128 and 16-byte aligned tensors (cp.async rows)
bool use_flash(int dtype, int hd, std::initializer_list<const void*> tensors) {
  if (dtype != XFT_BF16 || (hd != 64 && hd != 128)) return false;
  for (const void* p : tensors)
    if ((uintptr_t)p % 16) return false;
  return true;
}

}  // namespace

// kernel launchers

extern "C" int xft_cuda_attention_forward(const void* q, const void* k, const void* v, void* out, float* lse,
                                          int dtype, int B, int T, int H, int Hkv, int hd) {
  if (!valid_sizes(B, T, H, Hkv, hd)) return cudaErrorInvalidValue;
  if (T == 0) return 0;
  if (use_flash(dtype, hd, {q, k, v, out}))
    return hd == 64 ? flash_forward<64>(q, k, v, out, lse, B, T, H, Hkv) : flash_forward<128>(q, k, v, out, lse, B, T, H, Hkv);
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
  if (e == cudaSuccess && use_flash(dtype, hd, {q, k, v, dout, dq, dk, dv})) {
    e = hd == 64 ? flash_backward<64>(q, k, v, lse, D, dout, dq, dk, dv, B, T, H, Hkv)
                 : flash_backward<128>(q, k, v, lse, D, dout, dq, dk, dv, B, T, H, Hkv);
  } else if (e == cudaSuccess) {
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
