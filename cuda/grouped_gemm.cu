/*
Grouped expert GEMM: one GEMM per expert over a contiguous group of rows (MegaBlocks / ScatterMoE
style), the same kernels serving a dense GEMM (E = 1). CPU twin: binding/cpu/grouped_gemm.cc.

Math, in PyTorch terms, with x [M, k] (rows grouped by expert), w [E, n, k] (nn.Linear layout),
offsets i32 [E + 1], group e = rows o_e .. o_{e+1}:
  forward:   y[o_e:o_{e+1}]  = x[o_e:o_{e+1}] @ w[e].T                  y  [M, n]
  backward:  dx[o_e:o_{e+1}] = dy[o_e:o_{e+1}] @ w[e]                   dx [M, k]  (overwrite)
             dw[e] (+)= dy[o_e:o_{e+1}].T @ x[o_e:o_{e+1}]              dw [E, n, k] (accumulate)
Any offsets are memory safe and give fully defined outputs, as in the CPU twin: each is clamped to
[0, M] and raised to the running maximum, o'_e = max(o'_{e-1}, clamp(o_e)), so groups never overlap
(a decreasing offset gives an empty group), and rows outside [o'_0, o'_E) of y and dx are written
as zeros (by the row kernel's blocks before their tiles; nothing to do for valid offsets). An
empty group gives dw[e] = 0 (or leaves it unchanged with accumulate).
All tensors share one dtype, except that dw may be f32 with bf16 inputs (the f32 gradients of bf16
weights: the fp32 accumulators stored unrounded); accumulation is fp32 and every result is rounded
once (bf16: nearest even, xft_f32_to_bf16; with accumulate dw = round(old + sum) in fp32). No atomics:
deterministic.

All three products are one tile GEMM C[m, j] = sum_kk A[m, kk] B[kk, j] whose operands are either
"K-major" (kk contiguous: x and dy as A, w as B in the forward) or "MN-major" (m or j contiguous:
w as B in dx, dy^T and x in dw):
  forward  A = x  [rows, k] K-major    B = w[e] [n, k] K-major     C = y  rows of the group
  dx       A = dy [rows, n] K-major    B = w[e] [n, k] MN-major    C = dx rows of the group
  dw       A = dy^T (dy MN-major)      B = x (MN-major)            C = dw[e], reduction over the rows

Block -> work mapping (no host knowledge of group sizes; offsets stay on the device):
- forward, dx: grid (column tiles, row-tile slots). Slot s is the s-th row tile of the groups taken
  in order; each block scans the offsets (E is small) to find its group and tile, and strides by
  gridDim.y so that any number of tiles is covered. gridDim.y = ceil(M/BM) + E
  covers every valid split in one pass. Column tiles vary fastest, so the blocks resident at once
  share a few A row tiles and one expert's weights in L2.
- dw: grid (k tiles, n tiles, E); each block reduces over all rows of its group (no split over
  rows, so no second pass and nothing to make deterministic).

bf16 (tensor cores): block tile 128 x 256 x 32, 8 warps as 2 x 4, warp tile 64 x 64 =
4 x 8 mma.sync.m16n8k16 (bf16 in, fp32 accumulate), fragments by ldmatrix (.trans for MN-major
operands), a cp.async shared-memory pipeline of 4 stages, or 3 on GPUs whose opt-in shared memory
per block is below what 4 need (sm_86, sm_89, sm_120: 101,376 B; chosen per device at run time). Shared rows are padded by 16 bytes, which
makes every ldmatrix phase conflict free (K-major rows are 80 bytes, MN-major rows 272 or 528).
The VEC variant (all rows 16-byte aligned: n, k multiples of 8 and aligned pointers) copies
16-byte chunks with cp.async, zero-filling tails through its src-size operand; otherwise the same
kernel fills shared memory with guarded scalar loads (any shape, any alignment).
fp32: plain FFMA (no TF32), block tile 64 x 64 x 16, 256 threads with 4 x 4 outputs each (rows
ty + 16 i, columns tx + 16 j), the next tile prefetched into registers during the math.
*/
#include <cuda_runtime.h>
#include <stdint.h>

#include "xft_cuda.h"
#include "xft_math.h"
// cp.async, ldmatrix and mma.sync wrappers, shared with attention.cu
#include "xft_mma.cuh"
#include "xft_smem.cuh"

extern "C" cudaStream_t xft_cuda_stream(void);

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

namespace {

const int kThreads = 256;  // 8 warps, both paths
const int kWarp = 32;

// bf16 tensor-core tiles; the pipeline depth S (stages) is a template parameter chosen at run time
const int kBM = 128, kBN = 256, kBK = 32;
const int kWarpsM = 2, kWarpsN = 4;
const int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;  // 64 x 64 outputs per warp
const int kMT = kWM / 16, kNT = kWN / 8;              // 4 x 8 m16n8 mma tiles per warp
const int kPad = 8;                                   // bf16 (16 bytes) of padding per shared row
static_assert(kWarpsM * kWarpsN * kWarp == kThreads, "warp grid");
static_assert(kBK % 16 == 0 && kNT % 2 == 0, "mma shape");

// fp32 FFMA tiles
const int kFBM = 64, kFBN = 64, kFBK = 16;
const int kFLd = kFBM + 2;  // shared row stride: stride % 32 == 2 keeps the transposing stores conflict free
const int kFPer = kFBM * kFBK / kThreads;  // elements of a tile each thread fetches
static_assert(kFBM == kFBN && kFBM == 16 * 4 && kThreads == 16 * 16, "fp32 thread layout");

template <int DT> struct Elem { typedef float T; };
template <> struct Elem<XFT_BF16> { typedef uint16_t T; };

// An operand tile source: element (mn, kk) is p[mn * ld + kk] (K-major) or p[kk * ld + mn]
// (MN-major), valid for mn < mn_rem and kk < k_rem; everything else reads as zero.
template <typename T>
struct TileSrc {
  const T* p;
  size_t ld;
  int mn_rem;
  int k_rem;
};

// shared elements of one bf16 operand tile of R rows (m or j) by kBK
template <bool KMAJOR, int R>
__host__ __device__ constexpr int tile_elems() {
  return KMAJOR ? R * (kBK + kPad) : kBK * (R + kPad);
}

template <bool A_KMAJOR, bool B_KMAJOR, int S>
__host__ __device__ constexpr size_t mma_smem_bytes() {
  return sizeof(uint16_t) * S * (size_t)(tile_elems<A_KMAJOR, kBM>() + tile_elems<B_KMAJOR, kBN>());
}
// 4 stages: 122,880 B (forward), 108,544 B (dx), 102,400 B (dw), which A100/H100-class GPUs allow;
// 3 stages: 92,160 / 81,408 / 76,800 B, within the 101,376 B of sm_86, sm_89 and sm_120
static_assert(mma_smem_bytes<true, true, 3>() <= 101376 && mma_smem_bytes<true, false, 3>() <= 101376 &&
                  mma_smem_bytes<false, false, 3>() <= 101376, "3 stages fit 99 KiB");

const size_t kFSmemBytes = sizeof(float) * 2 * kFBK * kFLd;

// CUDA kernels

__device__ __forceinline__ int clamped_offset(const int* offsets, int e, int M) {
  return min(max(__ldg(offsets + e), 0), M);
}

// rows [r0, r1) of group e: o'_e .. o'_{e+1}, the clamped offsets' running maximum (as the CPU twin)
__device__ __forceinline__ void group_rows(const int* offsets, int e, int M, int& r0, int& r1) {
  r0 = clamped_offset(offsets, 0, M);
  for (int i = 1; i <= e; i++) r0 = max(r0, clamped_offset(offsets, i, M));
  r1 = max(r0, clamped_offset(offsets, e + 1, M));
}

// the slot-th row tile of BM rows over the groups in order: group e, rows [row0, row1) of which the
// tile holds min(BM, row1 - row0); false when slot is past the last tile
__device__ __forceinline__ bool find_row_tile(const int* offsets, int E, int M, int BM, int slot, int& e, int& row0,
                                              int& row1) {
  int r1 = clamped_offset(offsets, 0, M);
  for (e = 0; e < E; e++) {
    const int r0 = r1;
    r1 = max(r0, clamped_offset(offsets, e + 1, M));
    const int tiles = (r1 - r0 + BM - 1) / BM;
    if (slot < tiles) {
      row0 = r0 + slot * BM;
      row1 = r1;
      return true;
    }
    slot -= tiles;
  }
  return false;
}

// zeros in the rows of C [M, N] no group covers ([0, o'_0) and [o'_E, M)), columns n0 .. n0 + BN:
// row u of the uncovered ones goes to the blocks with blockIdx.y == u mod gridDim.y
template <typename T>
__device__ void zero_uncovered_rows(const int* offsets, int E, int M, T* C, int N, int n0, int BN) {
  const int lo = clamped_offset(offsets, 0, M);
  int hi = lo;
  for (int e = 1; e <= E; e++) hi = max(hi, clamped_offset(offsets, e, M));
  const int uncovered = lo + (M - hi), cols = min(BN, N - n0);
  for (int u = blockIdx.y; u < uncovered; u += gridDim.y) {
    T* row = C + (size_t)(u < lo ? u : hi + (u - lo)) * N + n0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) row[c] = T(0);
  }
}

// ---- bf16 tensor-core tile GEMM ----

// one 16-byte chunk of 8 bf16 into shared memory, of which the first n (<= 8) are read from src and
// the rest are zero. VEC: src is 16-byte aligned (cp.async); otherwise guarded scalar loads.
template <bool VEC>
__device__ __forceinline__ void load_chunk(uint16_t* dst, const uint16_t* src, int n) {
  if (VEC) {
    cp_async_16(smem_u32(dst), src, 2 * n);
  } else {
    uint32_t v[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const uint32_t lo = 2 * j < n ? src[2 * j] : 0u, hi = 2 * j + 1 < n ? src[2 * j + 1] : 0u;
      v[j] = lo | (hi << 16);
    }
    *(uint4*)dst = make_uint4(v[0], v[1], v[2], v[3]);
  }
}

// the operand tile (R rows of m or j) x (kBK of the reduction, from k0) into shared memory:
// K-major as s[mn][kBK + kPad], MN-major as s[kk][R + kPad]
template <bool KMAJOR, int R, bool VEC>
__device__ __forceinline__ void load_tile(uint16_t* s, const TileSrc<uint16_t>& src, int k0, int tid) {
  if (KMAJOR) {
    const int kPerRow = kBK / 8, kChunks = R * kPerRow;
    static_assert(kChunks % kThreads == 0, "chunks per thread");
#pragma unroll
    for (int i = 0; i < kChunks / kThreads; i++) {
      const int c = tid + i * kThreads, mn = c / kPerRow, kk = (c % kPerRow) * 8;
      const int n = mn < src.mn_rem ? min(src.k_rem - (k0 + kk), 8) : 0;
      uint16_t* dst = s + mn * (kBK + kPad) + kk;
      if (n > 0) load_chunk<VEC>(dst, src.p + (size_t)mn * src.ld + (k0 + kk), n);
      else *(uint4*)dst = make_uint4(0u, 0u, 0u, 0u);
    }
  } else {
    const int kPerRow = R / 8, kChunks = kBK * kPerRow;
    static_assert(kChunks % kThreads == 0, "chunks per thread");
#pragma unroll
    for (int i = 0; i < kChunks / kThreads; i++) {
      const int c = tid + i * kThreads, kk = c / kPerRow, mn = (c % kPerRow) * 8;
      const int n = k0 + kk < src.k_rem ? min(src.mn_rem - mn, 8) : 0;
      uint16_t* dst = s + kk * (R + kPad) + mn;
      if (n > 0) load_chunk<VEC>(dst, src.p + (size_t)(k0 + kk) * src.ld + mn, n);
      else *(uint4*)dst = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// acc[mt][nt] = the kBM x kBN tile of A B over the reduction length K, for this warp's 64 x 64 part.
// Pipeline of kStages (>= 2) shared buffers: tile t is cp.async group t; at iteration t, wait until
// group t landed, barrier (which also retires the reads of stage t - 1), refill that stage with tile
// t + kStages - 1, then compute.
template <bool A_KMAJOR, bool B_KMAJOR, bool VEC, int kStages>
__device__ __forceinline__ void mma_mainloop(const TileSrc<uint16_t>& a, const TileSrc<uint16_t>& b, int K,
                                             float (&acc)[kMT][kNT][4], uint16_t* smem) {
  const int kAElems = tile_elems<A_KMAJOR, kBM>(), kBElems = tile_elems<B_KMAJOR, kBN>();
  const int kStageElems = kAElems + kBElems;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;

#pragma unroll
  for (int mt = 0; mt < kMT; mt++)
#pragma unroll
    for (int nt = 0; nt < kNT; nt++)
#pragma unroll
      for (int c = 0; c < 4; c++) acc[mt][nt][c] = 0.f;

  const int ktiles = CEIL_DIV(K, kBK);
#pragma unroll
  for (int s = 0; s < kStages - 1; s++) {
    if (s < ktiles) {
      load_tile<A_KMAJOR, kBM, VEC>(smem + s * kStageElems, a, s * kBK, tid);
      load_tile<B_KMAJOR, kBN, VEC>(smem + s * kStageElems + kAElems, b, s * kBK, tid);
    }
    cp_async_commit();
  }

  // Per-lane ldmatrix element offsets within a stage (mma tile 0, k step 0), and the steps per
  // mma tile (mt, or pair p of n8 tiles) and per k16 step. Lane l addresses row l % 8 of 8x8
  // matrix q = l / 8. Fragment order: A {m0-7 k0-7, m8-15 k0-7, m0-7 k8-15, m8-15 k8-15};
  // B pair {j0-7 k0-7, j0-7 k8-15, j8-15 k0-7, j8-15 k8-15} = b[2p][0], b[2p][1], b[2p+1][0], b[2p+1][1].
  const int q = lane / 8, r8 = lane % 8;
  int a_off, a_mt, a_ks, b_off, b_p, b_ks;
  if (A_KMAJOR) {  // s[m][kk]: row m = (q % 2) * 8 + r8, column kk = (q / 2) * 8
    a_off = (wm * kWM + (q % 2) * 8 + r8) * (kBK + kPad) + (q / 2) * 8;
    a_mt = 16 * (kBK + kPad);
    a_ks = 16;
  } else {  // s[kk][m] with .trans: row kk = (q / 2) * 8 + r8, column m = (q % 2) * 8
    a_off = ((q / 2) * 8 + r8) * (kBM + kPad) + wm * kWM + (q % 2) * 8;
    a_mt = 16;
    a_ks = 16 * (kBM + kPad);
  }
  if (B_KMAJOR) {  // s[j][kk]: row j = (q / 2) * 8 + r8, column kk = (q % 2) * 8
    b_off = (wn * kWN + (q / 2) * 8 + r8) * (kBK + kPad) + (q % 2) * 8;
    b_p = 16 * (kBK + kPad);
    b_ks = 16;
  } else {  // s[kk][j] with .trans: row kk = (q % 2) * 8 + r8, column j = (q / 2) * 8
    b_off = ((q % 2) * 8 + r8) * (kBN + kPad) + wn * kWN + (q / 2) * 8;
    b_p = 16;
    b_ks = 16 * (kBN + kPad);
  }
  const uint32_t smem_base = smem_u32(smem);

  for (int kt = 0; kt < ktiles; kt++) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < ktiles) {
      uint16_t* s = smem + (next % kStages) * kStageElems;
      load_tile<A_KMAJOR, kBM, VEC>(s, a, next * kBK, tid);
      load_tile<B_KMAJOR, kBN, VEC>(s + kAElems, b, next * kBK, tid);
    }
    cp_async_commit();

    const uint32_t sa = smem_base + 2u * (uint32_t)((kt % kStages) * kStageElems);
    const uint32_t sb = sa + 2u * (uint32_t)kAElems;
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ks++) {
      uint32_t af[kMT][4], bf[kNT][2];
#pragma unroll
      for (int mt = 0; mt < kMT; mt++) {
        const uint32_t addr = sa + 2u * (uint32_t)(a_off + mt * a_mt + ks * a_ks);
        if (A_KMAJOR) ldmatrix_x4(af[mt], addr);
        else ldmatrix_x4_trans(af[mt], addr);
      }
#pragma unroll
      for (int p = 0; p < kNT / 2; p++) {
        const uint32_t addr = sb + 2u * (uint32_t)(b_off + p * b_p + ks * b_ks);
        uint32_t r[4];
        if (B_KMAJOR) ldmatrix_x4(r, addr);
        else ldmatrix_x4_trans(r, addr);
        bf[2 * p][0] = r[0];
        bf[2 * p][1] = r[1];
        bf[2 * p + 1][0] = r[2];
        bf[2 * p + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < kMT; mt++)
#pragma unroll
        for (int nt = 0; nt < kNT; nt++) mma_bf16(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
    }
  }
  cp_async_wait<0>();  // only empty groups remain; leaves nothing in flight for the caller
}

// one column pair (v0, v1) of an output row into C at dst: bf16 rounded to nearest even (VEC: one
// 32-bit word) or f32 unrounded (VEC: one float2); accumulate adds the old value first (in fp32)
template <bool VEC>
__device__ __forceinline__ void store_pair(uint16_t* dst, float v0, float v1, bool pair, bool accumulate) {
  if (VEC && pair) {
    if (accumulate) {
      const uint32_t old = *(const uint32_t*)dst;
      v0 += xft_bf16_to_f32((uint16_t)(old & 0xffffu));
      v1 += xft_bf16_to_f32((uint16_t)(old >> 16));
    }
    *(uint32_t*)dst = (uint32_t)xft_f32_to_bf16(v0) | ((uint32_t)xft_f32_to_bf16(v1) << 16);
    return;
  }
  if (accumulate) v0 += xft_bf16_to_f32(dst[0]);
  dst[0] = xft_f32_to_bf16(v0);
  if (pair) {
    if (accumulate) v1 += xft_bf16_to_f32(dst[1]);
    dst[1] = xft_f32_to_bf16(v1);
  }
}

template <bool VEC>
__device__ __forceinline__ void store_pair(float* dst, float v0, float v1, bool pair, bool accumulate) {
  if (VEC && pair) {
    if (accumulate) {
      const float2 old = *(const float2*)dst;
      v0 += old.x;
      v1 += old.y;
    }
    *(float2*)dst = make_float2(v0, v1);
    return;
  }
  dst[0] = accumulate ? v0 + dst[0] : v0;
  if (pair) dst[1] = accumulate ? v1 + dst[1] : v1;
}

// the warp's accumulators into the tile C (row stride ld) of row_rem x col_rem valid outputs, C bf16
// (rounded once) or f32 (an f32 dw of bf16 inputs, unrounded); accumulate: C = C + acc in fp32.
// mma C fragment: c0, c1 at (g, 2t), (g, 2t + 1); c2, c3 at row g + 8. VEC: C is aligned for a pair
// store (4 bytes for bf16, 8 for f32) and ld even.
template <bool VEC, typename OutT>
__device__ __forceinline__ void mma_store(OutT* C, size_t ld, int row_rem, int col_rem,
                                          const float (&acc)[kMT][kNT][4], bool accumulate) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < kMT; mt++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int r = wm * kWM + mt * 16 + h * 8 + g;
      if (r >= row_rem) continue;
#pragma unroll
      for (int nt = 0; nt < kNT; nt++) {
        const int c = wn * kWN + nt * 8 + 2 * t;
        if (c >= col_rem) continue;
        store_pair<VEC>(C + (size_t)r * ld + c, acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1], c + 1 < col_rem, accumulate);
      }
    }
}

// ---- fp32 FFMA tile GEMM ----

// this thread's kFPer elements of a 64 x kFBK operand tile from k0, in a coalesced order
template <bool KMAJOR>
__device__ __forceinline__ void ffma_fetch(float (&r)[kFPer], const TileSrc<float>& src, int k0, int tid) {
#pragma unroll
  for (int l = 0; l < kFPer; l++) {
    const int idx = tid + l * kThreads;
    const int mn = KMAJOR ? idx / kFBK : idx % kFBM, kk = KMAJOR ? idx % kFBK : idx / kFBM;
    const int gk = k0 + kk;
    r[l] = 0.f;
    if (mn < src.mn_rem && gk < src.k_rem)
      r[l] = KMAJOR ? src.p[(size_t)mn * src.ld + gk] : src.p[(size_t)gk * src.ld + mn];
  }
}

// the fetched elements into s[kk][mn] (row stride kFLd)
template <bool KMAJOR>
__device__ __forceinline__ void ffma_stash(float* s, const float (&r)[kFPer], int tid) {
#pragma unroll
  for (int l = 0; l < kFPer; l++) {
    const int idx = tid + l * kThreads;
    const int mn = KMAJOR ? idx / kFBK : idx % kFBM, kk = KMAJOR ? idx % kFBK : idx / kFBM;
    s[kk * kFLd + mn] = r[l];
  }
}

// acc[i][j] = the 64 x 64 tile of A B at (ty + 16 i, tx + 16 j), summed over kk in order
template <bool A_KMAJOR, bool B_KMAJOR>
__device__ __forceinline__ void ffma_mainloop(const TileSrc<float>& a, const TileSrc<float>& b, int K,
                                              float (&acc)[4][4], float* smem) {
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  float* As = smem;
  float* Bs = smem + kFBK * kFLd;
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
  const int ktiles = CEIL_DIV(K, kFBK);
  float ra[kFPer], rb[kFPer];
  if (ktiles > 0) {
    ffma_fetch<A_KMAJOR>(ra, a, 0, tid);
    ffma_fetch<B_KMAJOR>(rb, b, 0, tid);
  }
  for (int kt = 0; kt < ktiles; kt++) {
    ffma_stash<A_KMAJOR>(As, ra, tid);
    ffma_stash<B_KMAJOR>(Bs, rb, tid);
    __syncthreads();
    if (kt + 1 < ktiles) {
      ffma_fetch<A_KMAJOR>(ra, a, (kt + 1) * kFBK, tid);
      ffma_fetch<B_KMAJOR>(rb, b, (kt + 1) * kFBK, tid);
    }
#pragma unroll
    for (int kk = 0; kk < kFBK; kk++) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; i++) av[i] = As[kk * kFLd + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; j++) bv[j] = Bs[kk * kFLd + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
}

__device__ __forceinline__ void ffma_store(float* C, size_t ld, int row_rem, int col_rem, const float (&acc)[4][4],
                                           bool accumulate) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int r = ty + 16 * i;
    if (r >= row_rem) continue;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int c = tx + 16 * j;
      if (c >= col_rem) continue;
      float* dst = C + (size_t)r * ld + c;
      *dst = accumulate ? acc[i][j] + *dst : acc[i][j];
    }
  }
}

// ---- kernels ----

template <int DT> struct Tiles { static const int BM = kFBM, BN = kFBN, kMinBlocks = 2; };
template <> struct Tiles<XFT_BF16> { static const int BM = kBM, BN = kBN, kMinBlocks = 1; };

// forward (B = w K-major: C = y, N = n, K = k) and dx (B = w MN-major: C = dx, N = k, K = n):
// C[rows of e] = A[rows of e] @ op(B[e]), A [M, K], B [E, N*K], C [M, N].
template <int DT, bool B_KMAJOR, bool VEC, int S>
__global__ void __launch_bounds__(kThreads, Tiles<DT>::kMinBlocks)
    grouped_rows_kernel(const void* A, const void* B, const int* __restrict__ offsets, void* C, int M, int N, int K,
                        int E) {
  typedef typename Elem<DT>::T T;
  extern __shared__ __align__(16) unsigned char smem[];
  const int BM = Tiles<DT>::BM, BN = Tiles<DT>::BN;
  const int n0 = blockIdx.x * BN;
  zero_uncovered_rows<T>(offsets, E, M, (T*)C, N, n0, BN);
  for (int slot = blockIdx.y;; slot += gridDim.y) {
    int e, row0, row1;
    if (!find_row_tile(offsets, E, M, BM, slot, e, row0, row1)) return;
    const T* Be = (const T*)B + (size_t)e * N * K;
    TileSrc<T> a = {(const T*)A + (size_t)row0 * K, (size_t)K, row1 - row0, K};
    TileSrc<T> b = B_KMAJOR ? TileSrc<T>{Be + (size_t)n0 * K, (size_t)K, N - n0, K}
                            : TileSrc<T>{Be + n0, (size_t)N, N - n0, K};
    T* Ct = (T*)C + (size_t)row0 * N + n0;
    if constexpr (DT == XFT_BF16) {
      float acc[kMT][kNT][4];
      mma_mainloop<true, B_KMAJOR, VEC, S>(a, b, K, acc, (uint16_t*)smem);
      mma_store<VEC>(Ct, (size_t)N, row1 - row0, N - n0, acc, false);
    } else {
      float acc[4][4];
      ffma_mainloop<true, B_KMAJOR>(a, b, K, acc, (float*)smem);
      ffma_store(Ct, (size_t)N, row1 - row0, N - n0, acc, false);
    }
    __syncthreads();  // the next tile's prologue overwrites shared memory
  }
}

// dw[e] [n, k] (+)= dy[rows of e]^T @ x[rows of e]; block (k tile, n tile, e). F32OUT: bf16 inputs, f32 dw.
template <int DT, bool VEC, bool F32OUT, int S>
__global__ void __launch_bounds__(kThreads, Tiles<DT>::kMinBlocks)
    grouped_dw_kernel(const void* dy, const void* x, const int* __restrict__ offsets, void* dw, int M, int n, int k,
                      int accumulate) {
  typedef typename Elem<DT>::T T;
  extern __shared__ __align__(16) unsigned char smem[];
  const int e = blockIdx.z, j0 = blockIdx.y * Tiles<DT>::BM, i0 = blockIdx.x * Tiles<DT>::BN;
  int r0, r1;
  group_rows(offsets, e, M, r0, r1);
  const int rows = r1 - r0;
  TileSrc<T> a = {(const T*)dy + (size_t)r0 * n + j0, (size_t)n, n - j0, rows};  // dy^T: MN-major
  TileSrc<T> b = {(const T*)x + (size_t)r0 * k + i0, (size_t)k, k - i0, rows};   // x: MN-major
  const size_t c0 = (size_t)e * n * k + (size_t)j0 * k + i0;
  T* Ct = (T*)dw + c0;
  if constexpr (DT == XFT_BF16) {
    float acc[kMT][kNT][4];
    mma_mainloop<false, false, VEC, S>(a, b, rows, acc, (uint16_t*)smem);
    if constexpr (F32OUT) mma_store<VEC>((float*)dw + c0, (size_t)k, n - j0, k - i0, acc, accumulate != 0);
    else mma_store<VEC>(Ct, (size_t)k, n - j0, k - i0, acc, accumulate != 0);
  } else {
    float acc[4][4];
    ffma_mainloop<false, false>(a, b, rows, acc, (float*)smem);
    ffma_store(Ct, (size_t)k, n - j0, k - i0, acc, accumulate != 0);
  }
}

// kernel launchers

bool aligned(const void* p, uintptr_t bytes) { return ((uintptr_t)p & (bytes - 1)) == 0; }

// The device's opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), asked once
// per device: 232,448 B on H100, 166,912 B on A100, 101,376 B on sm_86, sm_89 and sm_120.
int smem_optin() {
  static int cached[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (dev >= 0 && dev < 64 && cached[dev] > 0) return cached[dev];
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 0;
  if (dev >= 0 && dev < 64) cached[dev] = v;
  return v;
}

// the deepest bf16 pipeline (4, else 3 stages) whose shared memory fits the device; 0 if none does
template <bool A_KMAJOR, bool B_KMAJOR>
int bf16_stages() {
  const size_t optin = (size_t)smem_optin();
  return mma_smem_bytes<A_KMAJOR, B_KMAJOR, 4>() <= optin ? 4 : mma_smem_bytes<A_KMAJOR, B_KMAJOR, 3>() <= optin ? 3 : 0;
}

template <int DT, bool B_KMAJOR, bool VEC, int S>
cudaError_t launch_rows_staged(const void* A, const void* B, const int* offsets, void* C, int M, int N, int K, int E) {
  size_t smem = kFSmemBytes;
  if constexpr (DT == XFT_BF16) smem = mma_smem_bytes<true, B_KMAJOR, S>();
  cudaError_t err = xft_allow_smem(grouped_rows_kernel<DT, B_KMAJOR, VEC, S>, smem);
  if (err != cudaSuccess) return err;
  const long long slots = CEIL_DIV((long long)M, (long long)Tiles<DT>::BM) + E;  // >= row tiles of any valid split
  dim3 grid((unsigned)CEIL_DIV((long long)N, (long long)Tiles<DT>::BN), (unsigned)(slots < 65535 ? slots : 65535));
  grouped_rows_kernel<DT, B_KMAJOR, VEC, S><<<grid, kThreads, smem, xft_cuda_stream()>>>(A, B, offsets, C, M, N, K, E);
  return cudaGetLastError();
}

template <int DT, bool B_KMAJOR, bool VEC>
cudaError_t launch_rows(const void* A, const void* B, const int* offsets, void* C, int M, int N, int K, int E) {
  if constexpr (DT != XFT_BF16) {
    return launch_rows_staged<DT, B_KMAJOR, VEC, 0>(A, B, offsets, C, M, N, K, E);
  } else {
    switch (bf16_stages<true, B_KMAJOR>()) {
      case 4: return launch_rows_staged<DT, B_KMAJOR, VEC, 4>(A, B, offsets, C, M, N, K, E);
      case 3: return launch_rows_staged<DT, B_KMAJOR, VEC, 3>(A, B, offsets, C, M, N, K, E);
      default: return cudaErrorInvalidConfiguration;  // under 92,160 B of shared memory: no sm_80+ GPU
    }
  }
}

template <int DT, bool VEC, bool F32OUT, int S>
cudaError_t launch_dw_staged(const void* dy, const void* x, const int* offsets, void* dw, int M, int n, int k, int E,
                             int accumulate) {
  size_t smem = kFSmemBytes;
  if constexpr (DT == XFT_BF16) smem = mma_smem_bytes<false, false, S>();
  cudaError_t err = xft_allow_smem(grouped_dw_kernel<DT, VEC, F32OUT, S>, smem);
  if (err != cudaSuccess) return err;
  const long long tiles_k = CEIL_DIV((long long)k, (long long)Tiles<DT>::BN);
  const long long tiles_n = CEIL_DIV((long long)n, (long long)Tiles<DT>::BM);
  if (tiles_n > 65535 || E > 65535) return cudaErrorInvalidValue;
  dim3 grid((unsigned)tiles_k, (unsigned)tiles_n, (unsigned)E);
  grouped_dw_kernel<DT, VEC, F32OUT, S><<<grid, kThreads, smem, xft_cuda_stream()>>>(dy, x, offsets, dw, M, n, k, accumulate);
  return cudaGetLastError();
}

template <int DT, bool VEC, bool F32OUT = false>
cudaError_t launch_dw(const void* dy, const void* x, const int* offsets, void* dw, int M, int n, int k, int E,
                      int accumulate) {
  if constexpr (DT != XFT_BF16) {
    return launch_dw_staged<DT, VEC, F32OUT, 0>(dy, x, offsets, dw, M, n, k, E, accumulate);
  } else {
    switch (bf16_stages<false, false>()) {
      case 4: return launch_dw_staged<DT, VEC, F32OUT, 4>(dy, x, offsets, dw, M, n, k, E, accumulate);
      case 3: return launch_dw_staged<DT, VEC, F32OUT, 3>(dy, x, offsets, dw, M, n, k, E, accumulate);
      default: return cudaErrorInvalidConfiguration;
    }
  }
}

bool valid_args(int dtype, int M, int n, int k, int E) {
  return (dtype == XFT_F32 || dtype == XFT_BF16) && M >= 0 && n >= 0 && k >= 0 && E >= 1;
}

}  // namespace

extern "C" int xft_cuda_grouped_gemm_forward(const void* x, const void* w, const int* offsets, void* y, int dtype,
                                             int M, int n, int k, int E) {
  if (!valid_args(dtype, M, n, k, E)) return cudaErrorInvalidValue;
  if (M == 0 || n == 0) return 0;
  if (dtype == XFT_F32) return launch_rows<XFT_F32, true, false>(x, w, offsets, y, M, n, k, E);
  // 16-byte rows for x and w (k % 8), 4-byte column pairs for y (n even)
  const bool vec = k % 8 == 0 && n % 2 == 0 && aligned(x, 16) && aligned(w, 16) && aligned(y, 4);
  return vec ? launch_rows<XFT_BF16, true, true>(x, w, offsets, y, M, n, k, E)
             : launch_rows<XFT_BF16, true, false>(x, w, offsets, y, M, n, k, E);
}

extern "C" int xft_cuda_grouped_gemm_backward(const void* x, const void* w, const int* offsets, const void* dy,
                                              void* dx, void* dw, int dtype, int dw_dtype, int M, int n, int k, int E,
                                              int accumulate) {
  if (!valid_args(dtype, M, n, k, E) || (dw_dtype != dtype && dw_dtype != XFT_F32)) return cudaErrorInvalidValue;
  // 16-byte rows for dy (n % 8, also at any group start) and for w and x (k % 8), 4-byte column
  // pairs for dx and dw (k even)
  const bool rows16 = n % 8 == 0 && k % 8 == 0 && aligned(dy, 16);
  cudaError_t err = cudaSuccess;
  if (dx && M > 0 && k > 0) {  // dx [M, k] = dy [M, n] @ w[e] [n, k]
    if (dtype == XFT_F32) err = launch_rows<XFT_F32, false, false>(dy, w, offsets, dx, M, k, n, E);
    else if (rows16 && aligned(w, 16) && aligned(dx, 4))
      err = launch_rows<XFT_BF16, false, true>(dy, w, offsets, dx, M, k, n, E);
    else err = launch_rows<XFT_BF16, false, false>(dy, w, offsets, dx, M, k, n, E);
    if (err != cudaSuccess) return err;
  }
  if (dw && n > 0 && k > 0) {  // also when M == 0: every group is empty, dw = 0 (or unchanged)
    if (dtype == XFT_F32) err = launch_dw<XFT_F32, false>(dy, x, offsets, dw, M, n, k, E, accumulate);
    else if (dw_dtype == XFT_F32)  // f32 gradients of bf16 weights: the accumulators stored unrounded
      err = rows16 && aligned(x, 16) && aligned(dw, 8) ? launch_dw<XFT_BF16, true, true>(dy, x, offsets, dw, M, n, k, E, accumulate)
                                                       : launch_dw<XFT_BF16, false, true>(dy, x, offsets, dw, M, n, k, E, accumulate);
    else if (rows16 && aligned(x, 16) && aligned(dw, 4))
      err = launch_dw<XFT_BF16, true>(dy, x, offsets, dw, M, n, k, E, accumulate);
    else err = launch_dw<XFT_BF16, false>(dy, x, offsets, dw, M, n, k, E, accumulate);
  }
  return err;
}
