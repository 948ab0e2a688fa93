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

The fused SwiGLU FFN (the same main loops; operands through a row map, RowMap below):
  gate/up     gu [M, 2f] = [g | u], h = silu(g) u: one GEMM whose B tile interleaves W_gate and W_up
              by 32 rows for the same 128 (fp32: 32) output columns, so each warp holds g and u of the
              same elements in its accumulators and the epilogue writes g, u and h (two accumulators in
              effect, without a second register set: 128 outputs per block instead of 256). W_gate and
              W_up stay separate tensors in the Hugging Face layout. The MoE reads x through the routing
              order inside the A loads (row i: x[order[i] / K]), so the permuted copy xp is never made.
  down bwd    dh = dy @ W_down[e] with the SwiGLU backward in the epilogue: dh is never stored; g, u are
              read from gu, dg, du written into dgu [M, 2f], and h = silu(g) u recomputed for dW_down.
  gate/up bwd dx = [dg | du] @ [W_gate; W_up]: one GEMM over the 2f reduction (kConcat), rounded once;
              dW_gate, dW_up = dg^T x, du^T x in one launch (blockIdx.z: expert and half), x read
              through the gather again. The MoE's dx rows are summed per token by permuteBackward
              (scattering them from the epilogue would need atomics: not deterministic).
What backward keeps: gu = [g | u] in the activation dtype, not h: at 1.3B MoE shapes (d = 2048,
f = 5504, 8 x 2048 tokens, top-6: M = 98,304 routed rows, bf16) each [M, f] tensor is 1.08 GB and
each [M, d] one 0.40 GB. Before: xp, g, u, a kept = 3.65 GB per layer; now gu = 2.16 GB (-1.49 GB).
Keeping h too would save rewriting it in backward (1.08 GB of writes, ~0.25 ms at H200 bandwidth)
for 1.08 GB more memory per layer; keeping h instead of g, u would need the gate/up GEMM again.
Activation traffic per layer and step (estimate, reads + writes): forward 8.1 -> 4.7 GB (no xp
write/read, no separate SwiGLU pass), backward 15.5 -> 12.8 GB (no dh round trip, no dx add, one dx
GEMM); launches 5 -> 2 forward, 7 -> 4 backward.
The dx of q, k, v (and any grouped GEMM dx) can be added into an existing tensor in the epilogue
(dx_accumulate: C = round(C + acc), as a separate add of the rounded GEMM output would give), and
q, k, v run as one GEMM over [W_q; W_k; W_v] (kQkv) writing each where attention reads it.
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

// How an operand's memory rows (mn for K-major, kk for MN-major) map to addresses:
//   kPlain       row R at p + R ld
//   kGather      row R at p + (rows[R] / rows_div) ld, a zero row when that is outside [0, src_rows)
//                (rows == nullptr: plain); the MoE gate/up GEMM reads x through the routing order
//   kInterleave  the gate/up B tile: rows R of a tile alternate by 32 between W_gate (p) and W_up (p2)
//                for the same output columns, column (R / 64) 32 + R % 32, so each warp's 64 B rows
//                are 32 gate and 32 up columns and the SwiGLU epilogue finds g and u in one thread
//   kConcat      rows R < split from p, the others from p2 + (R - split) ld ([W_gate; W_up] stacked
//                along the reduction of dx = [dg | du] @ [W_gate; W_up])
//   kConcat3     row R0 = row0 + R of [W_q; W_k; W_v] stacked along the output columns: from p below
//                split, p2 below split2, else p3 (the fused q/k/v projection)
enum RowMap { kPlain, kGather, kInterleave, kConcat, kConcat3 };

// An operand tile source: element (mn, kk) is row(mn)[kk] (K-major) or row(kk)[mn] (MN-major),
// valid for mn < mn_rem and kk < k_rem; everything else reads as zero. For kInterleave mn_rem
// bounds the output column, not R.
template <typename T>
struct TileSrc {
  const T* p;
  size_t ld;
  int mn_rem;
  int k_rem;
  const T* p2 = nullptr;
  int split = 0;
  const T* p3 = nullptr;
  int split2 = 0, row0 = 0;
  const int* rows = nullptr;
  int rows_div = 1, src_rows = 0;
};

// memory row R (below `bound` rows, or columns for kInterleave), or nullptr where it reads as zeros
template <int MAP, typename T>
__device__ __forceinline__ const T* src_row(const TileSrc<T>& s, int R, int bound) {
  if constexpr (MAP == kInterleave) {
    const int c = (R / 64) * 32 + R % 32;
    if (c >= bound) return nullptr;
    return ((R / 32) % 2 ? s.p2 : s.p) + (size_t)c * s.ld;
  } else {
    if (R >= bound) return nullptr;
    if constexpr (MAP == kGather) {
      if (!s.rows) return s.p + (size_t)R * s.ld;
      const int i = __ldg(s.rows + R);
      const int src = i >= 0 ? i / s.rows_div : -1;
      return src >= 0 && src < s.src_rows ? s.p + (size_t)src * s.ld : nullptr;
    } else if constexpr (MAP == kConcat) {
      return R < s.split ? s.p + (size_t)R * s.ld : s.p2 + (size_t)(R - s.split) * s.ld;
    } else if constexpr (MAP == kConcat3) {
      const int r = s.row0 + R;
      return r < s.split ? s.p + (size_t)r * s.ld
                         : r < s.split2 ? s.p2 + (size_t)(r - s.split) * s.ld : s.p3 + (size_t)(r - s.split2) * s.ld;
    } else {
      return s.p + (size_t)R * s.ld;
    }
  }
}

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

// zeros in the rows of C (row stride ld) no group covers ([0, o'_0) and [o'_E, M)), `cols` columns
// from C: row u of the uncovered ones goes to the blocks with blockIdx.y == u mod gridDim.y
template <typename T>
__device__ void zero_uncovered_rows(const int* offsets, int E, int M, T* C, size_t ld, int cols) {
  const int lo = clamped_offset(offsets, 0, M);
  int hi = lo;
  for (int e = 1; e <= E; e++) hi = max(hi, clamped_offset(offsets, e, M));
  const int uncovered = lo + (M - hi);
  for (int u = blockIdx.y; u < uncovered; u += gridDim.y) {
    T* row = C + (size_t)(u < lo ? u : hi + (u - lo)) * ld;
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
template <bool KMAJOR, int R, bool VEC, int MAP>
__device__ __forceinline__ void load_tile(uint16_t* s, const TileSrc<uint16_t>& src, int k0, int tid) {
  if (KMAJOR) {
    const int kPerRow = kBK / 8, kChunks = R * kPerRow;
    static_assert(kChunks % kThreads == 0, "chunks per thread");
#pragma unroll
    for (int i = 0; i < kChunks / kThreads; i++) {
      const int c = tid + i * kThreads, mn = c / kPerRow, kk = (c % kPerRow) * 8;
      const uint16_t* row = src_row<MAP>(src, mn, src.mn_rem);
      const int n = row ? min(src.k_rem - (k0 + kk), 8) : 0;
      uint16_t* dst = s + mn * (kBK + kPad) + kk;
      if (n > 0) load_chunk<VEC>(dst, row + (k0 + kk), n);
      else *(uint4*)dst = make_uint4(0u, 0u, 0u, 0u);
    }
  } else {
    const int kPerRow = R / 8, kChunks = kBK * kPerRow;
    static_assert(kChunks % kThreads == 0, "chunks per thread");
#pragma unroll
    for (int i = 0; i < kChunks / kThreads; i++) {
      const int c = tid + i * kThreads, kk = c / kPerRow, mn = (c % kPerRow) * 8;
      const uint16_t* row = src_row<MAP>(src, k0 + kk, src.k_rem);
      const int n = row ? min(src.mn_rem - mn, 8) : 0;
      uint16_t* dst = s + kk * (R + kPad) + mn;
      if (n > 0) load_chunk<VEC>(dst, row + mn, n);
      else *(uint4*)dst = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// acc[mt][nt] = the kBM x kBN tile of A B over the reduction length K, for this warp's 64 x 64 part.
// Pipeline of kStages (>= 2) shared buffers: tile t is cp.async group t; at iteration t, wait until
// group t landed, barrier (which also retires the reads of stage t - 1), refill that stage with tile
// t + kStages - 1, then compute.
template <bool A_KMAJOR, bool B_KMAJOR, bool VEC, int kStages, int MAPA = kPlain, int MAPB = kPlain>
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
      load_tile<A_KMAJOR, kBM, VEC, MAPA>(smem + s * kStageElems, a, s * kBK, tid);
      load_tile<B_KMAJOR, kBN, VEC, MAPB>(smem + s * kStageElems + kAElems, b, s * kBK, tid);
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
      load_tile<A_KMAJOR, kBM, VEC, MAPA>(s, a, next * kBK, tid);
      load_tile<B_KMAJOR, kBN, VEC, MAPB>(s + kAElems, b, next * kBK, tid);
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
template <bool KMAJOR, int MAP>
__device__ __forceinline__ void ffma_fetch(float (&r)[kFPer], const TileSrc<float>& src, int k0, int tid) {
#pragma unroll
  for (int l = 0; l < kFPer; l++) {
    const int idx = tid + l * kThreads;
    const int mn = KMAJOR ? idx / kFBK : idx % kFBM, kk = KMAJOR ? idx % kFBK : idx / kFBM;
    const int gk = k0 + kk;
    const float* row = KMAJOR ? src_row<MAP>(src, mn, src.mn_rem) : src_row<MAP>(src, gk, src.k_rem);
    r[l] = 0.f;
    if (row && (KMAJOR ? gk < src.k_rem : mn < src.mn_rem)) r[l] = row[KMAJOR ? gk : mn];
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
template <bool A_KMAJOR, bool B_KMAJOR, int MAPA = kPlain, int MAPB = kPlain>
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
    ffma_fetch<A_KMAJOR, MAPA>(ra, a, 0, tid);
    ffma_fetch<B_KMAJOR, MAPB>(rb, b, 0, tid);
  }
  for (int kt = 0; kt < ktiles; kt++) {
    ffma_stash<A_KMAJOR>(As, ra, tid);
    ffma_stash<B_KMAJOR>(Bs, rb, tid);
    __syncthreads();
    if (kt + 1 < ktiles) {
      ffma_fetch<A_KMAJOR, MAPA>(ra, a, (kt + 1) * kFBK, tid);
      ffma_fetch<B_KMAJOR, MAPB>(rb, b, (kt + 1) * kFBK, tid);
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


// ---- SwiGLU epilogues (the math and rounding of cuda/swiglu.cu, element for element) ----

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }
__device__ __forceinline__ float round_to(float v, const float*) { return v; }
__device__ __forceinline__ float round_to(float v, const uint16_t*) { return xft_bf16_to_f32(xft_f32_to_bf16(v)); }

// (v0, v1) from src (pair: both, else v0 only); VEC: one aligned 32-bit (bf16) or 64-bit (f32) load
template <bool VEC>
__device__ __forceinline__ void load_pair(const uint16_t* src, float& v0, float& v1, bool pair) {
  if (VEC && pair) {
    const uint32_t w = *(const uint32_t*)src;
    v0 = xft_bf16_to_f32((uint16_t)(w & 0xffffu));
    v1 = xft_bf16_to_f32((uint16_t)(w >> 16));
    return;
  }
  v0 = xft_bf16_to_f32(src[0]);
  v1 = pair ? xft_bf16_to_f32(src[1]) : 0.f;
}
template <bool VEC>
__device__ __forceinline__ void load_pair(const float* src, float& v0, float& v1, bool pair) {
  if (VEC && pair) {
    const float2 w = *(const float2*)src;
    v0 = w.x;
    v1 = w.y;
    return;
  }
  v0 = src[0];
  v1 = pair ? src[1] : 0.f;
}

// gate/up forward at one column pair of one row: g, u rounded to the dtype as a GEMM output is, then
// h = silu(g) u from the rounded values; g into gu[c], u into gu[f + c], h into h[c]
template <bool VEC, typename T>
__device__ __forceinline__ void gateup_pair(T* gu, T* h, size_t f, float g0, float g1, float u0, float u1, bool pair) {
  g0 = round_to(g0, gu), g1 = round_to(g1, gu), u0 = round_to(u0, gu), u1 = round_to(u1, gu);
  store_pair<VEC>(gu, g0, g1, pair, false);
  store_pair<VEC>(gu + f, u0, u1, pair, false);
  store_pair<VEC>(h, g0 * sigmoid(g0) * u0, g1 * sigmoid(g1) * u1, pair, false);
}

// down backward at one column pair: dh rounded to the dtype, then from g = gu[c], u = gu[f + c]:
// dg into dgu[c], du into dgu[f + c], and h = silu(g) u recomputed into h[c] (for dW_down)
template <bool VEC, typename T>
__device__ __forceinline__ void swiglu_down_pair(const T* gu, T* dgu, T* h, size_t f, float d0, float d1, bool pair) {
  float g[2], u[2], dh[2] = {round_to(d0, gu), round_to(d1, gu)}, dg[2], du[2], hv[2];
  load_pair<VEC>(gu, g[0], g[1], pair);
  load_pair<VEC>(gu + f, u[0], u[1], pair);
#pragma unroll
  for (int i = 0; i < 2; i++) {
    const float s = sigmoid(g[i]);
    dg[i] = dh[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    du[i] = dh[i] * g[i] * s;
    hv[i] = g[i] * s * u[i];
  }
  store_pair<VEC>(dgu, dg[0], dg[1], pair, false);
  store_pair<VEC>(dgu + f, du[0], du[1], pair, false);
  store_pair<VEC>(h, hv[0], hv[1], pair, false);
}

// ---- kernels ----

template <int DT> struct Tiles { static const int BM = kFBM, BN = kFBN, kMinBlocks = 2; };
template <> struct Tiles<XFT_BF16> { static const int BM = kBM, BN = kBN, kMinBlocks = 1; };

// What a row kernel computes (A [M, K] rows grouped by expert, C the output tile):
//   kLinear     C [M, N] (+)= A @ op(B[e])                    forward (B K-major) and dx (B MN-major)
//   kGateUp     gu [M, 2f] = [x W_gate^T | x W_up^T], h [M, f] = silu(g) u; A = x read through the
//               optional gather, B = W_gate and W_up interleaved (kInterleave), N = f, column tiles
//               of BN / 2 outputs of both g and u
//   kSwigluDown dgu [M, 2f] = swiglu'(gu, dh), h [M, f] = silu(g) u with dh = dy @ W_down[e] (B MN-major,
//               N = f, K = d) never stored
//   kGateUpDx   dx [M, d] (+)= dgu @ [W_gate; W_up] (B MN-major, kConcat at split = f, K = 2f)
//   kQkv        [q | k | v] = x @ [W_q; W_k; W_v]^T (B K-major, kConcat3; N = nq + 2 nk output columns),
//               column c written to q [M, nq], k [M, nk] or v [M, nk] where attention reads them
enum Mode { kLinear, kGateUp, kSwigluDown, kGateUpDx, kQkv };

struct RowsArgs {
  const void* A;
  const void* B;
  const void* B2;        // kGateUp, kGateUpDx: W_up [E, f, d] (B is W_gate); kQkv: W_k
  const void* B3;        // kQkv: W_v (B is W_q)
  void* C2;              // kQkv: k [M, nk] (C is q [M, nq])
  void* C3;              // kQkv: v [M, nk]
  int nk;                // kQkv: columns of k and v (nq = N - 2 nk)
  const int* offsets;    // [E + 1]
  void* C;               // kLinear, kGateUpDx: [M, N]; kGateUp: gu [M, 2N]; kSwigluDown: dgu [M, 2N]
  int M, N, K, E;
  const int* gather;     // kGateUp: row i reads x[gather[i] / gather_div] (zero outside [0, src_rows)); or nullptr
  int gather_div, src_rows;
  int split;             // kGateUpDx: f
  void* H;               // kGateUp, kSwigluDown: h [M, f]
  const void* GU;        // kSwigluDown: gu [M, 2f]
  int accumulate;        // kLinear, kGateUpDx: C += (rows outside the groups unchanged)
};

// kQkv: output column c of row r in q, k or v
template <typename T>
__device__ __forceinline__ T* qkv_dst(const RowsArgs& a, int r, int c, int nq) {
  const int nk = a.nk;
  return c < nq ? (T*)a.C + (size_t)r * nq + c
                : c < nq + nk ? (T*)a.C2 + (size_t)r * nk + (c - nq) : (T*)a.C3 + (size_t)r * nk + (c - nq - nk);
}
// columns c, c + 1 (pair) of row r; VEC: nq and nk even, so a pair never straddles two of q, k, v
template <bool VEC, typename T>
__device__ __forceinline__ void qkv_pair(const RowsArgs& a, int r, int c, int nq, float v0, float v1, bool pair) {
  if (VEC && pair) {
    store_pair<true>(qkv_dst<T>(a, r, c, nq), v0, v1, true, false);
    return;
  }
  store_pair<false>(qkv_dst<T>(a, r, c, nq), v0, 0.f, false, false);
  if (pair) store_pair<false>(qkv_dst<T>(a, r, c + 1, nq), v1, 0.f, false, false);
}

template <int DT, bool B_KMAJOR, bool VEC, int S, int MODE>
__global__ void __launch_bounds__(kThreads, Tiles<DT>::kMinBlocks) grouped_rows_kernel(const RowsArgs args) {
  typedef typename Elem<DT>::T T;
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int BM = Tiles<DT>::BM, BN = MODE == kGateUp ? Tiles<DT>::BN / 2 : Tiles<DT>::BN;
  constexpr bool kSwiglu = MODE == kGateUp || MODE == kSwigluDown;
  constexpr int MAPA = MODE == kGateUp ? kGather : kPlain;
  constexpr int MAPB = MODE == kGateUp ? kInterleave : MODE == kGateUpDx ? kConcat : MODE == kQkv ? kConcat3 : kPlain;
  const int M = args.M, N = args.N, K = args.K, E = args.E;
  const size_t ldc = kSwiglu ? 2 * (size_t)N : (size_t)N;
  const int nq = N - 2 * args.nk;  // kQkv
  const int n0 = blockIdx.x * BN, cols = min(BN, N - n0);
  T* C = (T*)args.C;
  T* H = (T*)args.H;
  if (kSwiglu) {
    zero_uncovered_rows<T>(args.offsets, E, M, C + n0, ldc, cols);
    zero_uncovered_rows<T>(args.offsets, E, M, C + N + n0, ldc, cols);
    zero_uncovered_rows<T>(args.offsets, E, M, H + n0, (size_t)N, cols);
  } else if (MODE == kQkv) {
    // the tile's columns [n0, n0 + cols) of [q | k | v], each part with its own row stride
    const int nk = args.nk;
    if (n0 < nq) zero_uncovered_rows<T>(args.offsets, E, M, C + n0, (size_t)nq, min(cols, nq - n0));
    const int k0 = max(n0, nq), k1 = min(n0 + cols, nq + nk);
    if (k0 < k1) zero_uncovered_rows<T>(args.offsets, E, M, (T*)args.C2 + (k0 - nq), (size_t)nk, k1 - k0);
    const int v0 = max(n0, nq + nk), v1 = n0 + cols;
    if (v0 < v1) zero_uncovered_rows<T>(args.offsets, E, M, (T*)args.C3 + (v0 - nq - nk), (size_t)nk, v1 - v0);
  } else if (!args.accumulate) {
    zero_uncovered_rows<T>(args.offsets, E, M, C + n0, ldc, cols);
  }
  const size_t b_stride = (size_t)N * (MODE == kGateUpDx ? args.split : K);
  for (int slot = blockIdx.y;; slot += gridDim.y) {
    int e, row0, row1;
    if (!find_row_tile(args.offsets, E, M, BM, slot, e, row0, row1)) return;
    const T* Be = (const T*)args.B + e * b_stride;
    TileSrc<T> a = {(const T*)args.A + (size_t)row0 * K, (size_t)K, row1 - row0, K};
    if (MODE == kGateUp && args.gather) {
      a.p = (const T*)args.A;
      a.rows = args.gather + row0;
      a.rows_div = args.gather_div;
      a.src_rows = args.src_rows;
    }
    TileSrc<T> b = B_KMAJOR ? TileSrc<T>{Be + (size_t)n0 * K, (size_t)K, N - n0, K}
                            : TileSrc<T>{Be + n0, (size_t)N, N - n0, K};
    if (MODE == kGateUp) b.p2 = (const T*)args.B2 + e * b_stride + (size_t)n0 * K;
    if (MODE == kGateUpDx) {
      b.p2 = (const T*)args.B2 + e * b_stride + n0;
      b.split = args.split;
    }
    if (MODE == kQkv) {  // one weight each (E = 1): rows n0.. of [W_q; W_k; W_v]
      b = TileSrc<T>{(const T*)args.B, (size_t)K, N - n0, K};
      b.p2 = (const T*)args.B2;
      b.p3 = (const T*)args.B3;
      b.split = nq;
      b.split2 = nq + args.nk;
      b.row0 = n0;
    }
    const int row_rem = row1 - row0;
    T* Ct = C + (size_t)row0 * ldc + n0;
    T* Ht = kSwiglu ? H + (size_t)row0 * N + n0 : nullptr;
    const T* GUt = MODE == kSwigluDown ? (const T*)args.GU + (size_t)row0 * ldc + n0 : nullptr;
    if constexpr (DT == XFT_BF16) {
      float acc[kMT][kNT][4];
      mma_mainloop<true, B_KMAJOR, VEC, S, MAPA, MAPB>(a, b, K, acc, (uint16_t*)smem);
      if constexpr (MODE == kQkv) {
        const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
        const int wm = warp / kWarpsN, wn = warp % kWarpsN, g = lane / 4, t = lane % 4;
#pragma unroll
        for (int mt = 0; mt < kMT; mt++)
#pragma unroll
          for (int hh = 0; hh < 2; hh++) {
            const int r = wm * kWM + mt * 16 + hh * 8 + g;
            if (r >= row_rem) continue;
#pragma unroll
            for (int nt = 0; nt < kNT; nt++) {
              const int c = wn * kWN + nt * 8 + 2 * t;
              if (c >= cols) continue;
              qkv_pair<VEC, T>(args, row0 + r, n0 + c, nq, acc[mt][nt][2 * hh], acc[mt][nt][2 * hh + 1], c + 1 < cols);
            }
          }
      } else if constexpr (!kSwiglu) {
        mma_store<VEC>(Ct, ldc, row_rem, cols, acc, args.accumulate != 0);
      } else {
        // mma C fragment: c0, c1 at (g, 2t), (g, 2t + 1); c2, c3 at row g + 8 (as mma_store)
        const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
        const int wm = warp / kWarpsN, wn = warp % kWarpsN, g = lane / 4, t = lane % 4;
#pragma unroll
        for (int mt = 0; mt < kMT; mt++)
#pragma unroll
          for (int hh = 0; hh < 2; hh++) {
            const int r = wm * kWM + mt * 16 + hh * 8 + g;
            if (r >= row_rem) continue;
            if constexpr (MODE == kGateUp) {
              // the warp's 64 B rows: n8 tiles 0..3 are gate columns wn 32 + nt 8 + 2t, tiles 4..7 up
#pragma unroll
              for (int nt = 0; nt < kNT / 2; nt++) {
                const int c = wn * (kWN / 2) + nt * 8 + 2 * t;
                if (c >= cols) continue;
                gateup_pair<VEC>(Ct + (size_t)r * ldc + c, Ht + (size_t)r * N + c, (size_t)N, acc[mt][nt][2 * hh],
                                 acc[mt][nt][2 * hh + 1], acc[mt][nt + kNT / 2][2 * hh], acc[mt][nt + kNT / 2][2 * hh + 1],
                                 c + 1 < cols);
              }
            } else {
#pragma unroll
              for (int nt = 0; nt < kNT; nt++) {
                const int c = wn * kWN + nt * 8 + 2 * t;
                if (c >= cols) continue;
                swiglu_down_pair<VEC>(GUt + (size_t)r * ldc + c, Ct + (size_t)r * ldc + c, Ht + (size_t)r * N + c,
                                      (size_t)N, acc[mt][nt][2 * hh], acc[mt][nt][2 * hh + 1], c + 1 < cols);
              }
            }
          }
      }
    } else {
      float acc[4][4];
      ffma_mainloop<true, B_KMAJOR, MAPA, MAPB>(a, b, K, acc, (float*)smem);
      if constexpr (MODE == kQkv) {
        const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
        for (int i = 0; i < 4; i++) {
          const int r = ty + 16 * i;
          if (r >= row_rem) continue;
#pragma unroll
          for (int j = 0; j < 4; j++) {
            const int c = tx + 16 * j;
            if (c < cols) qkv_pair<false, T>(args, row0 + r, n0 + c, nq, acc[i][j], 0.f, false);
          }
        }
      } else if constexpr (!kSwiglu) {
        ffma_store(Ct, ldc, row_rem, cols, acc, args.accumulate != 0);
      } else {
        // outputs (ty + 16 i, tx + 16 j); kGateUp: the 64 B rows are 32 gate then 32 up columns (j = 0, 1 and 2, 3)
        const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
        for (int i = 0; i < 4; i++) {
          const int r = ty + 16 * i;
          if (r >= row_rem) continue;
#pragma unroll
          for (int j = 0; j < (MODE == kGateUp ? 2 : 4); j++) {
            const int c = tx + 16 * j;
            if (c >= cols) continue;
            if constexpr (MODE == kGateUp)
              gateup_pair<false>(Ct + (size_t)r * ldc + c, Ht + (size_t)r * N + c, (size_t)N, acc[i][j], 0.f, acc[i][j + 2],
                                 0.f, false);
            else
              swiglu_down_pair<false>(GUt + (size_t)r * ldc + c, Ct + (size_t)r * ldc + c, Ht + (size_t)r * N + c,
                                      (size_t)N, acc[i][j], 0.f, false);
          }
        }
      }
    }
    __syncthreads();  // the next tile's prologue overwrites shared memory
  }
}

struct DwArgs {
  const void* dy;        // [M, dy_ld]: columns 0..n, and half..half + n for dw2
  size_t dy_ld;
  int half;
  const void* x;         // [M, k], or [src_rows, k] read through gather
  const int* gather;     // row i of the GEMM reads x[gather[i] / gather_div] (zero outside [0, src_rows)); or nullptr
  int gather_div, src_rows;
  const int* offsets;
  void* dw;              // [E, n, k]
  void* dw2;             // [E, n, k] from dy columns half.. (the gate/up pair: dW_up), or nullptr
  int M, n, k, E;
  int accumulate;
};

// dw[e] [n, k] (+)= dy[rows of e]^T @ x[rows of e]; block (k tile, n tile, e + E half). F32OUT: bf16
// inputs, f32 dw. GATHER: x read through args.gather (the MoE gate/up dW without a permuted copy of x).
template <int DT, bool VEC, bool F32OUT, int S, bool GATHER>
__global__ void __launch_bounds__(kThreads, Tiles<DT>::kMinBlocks) grouped_dw_kernel(const DwArgs args) {
  typedef typename Elem<DT>::T T;
  extern __shared__ __align__(16) unsigned char smem[];
  const int n = args.n, k = args.k, M = args.M;
  const int half = blockIdx.z / args.E, e = blockIdx.z % args.E;
  const int j0 = blockIdx.y * Tiles<DT>::BM, i0 = blockIdx.x * Tiles<DT>::BN;
  int r0, r1;
  group_rows(args.offsets, e, M, r0, r1);
  const int rows = r1 - r0;
  const T* dy = (const T*)args.dy + (size_t)half * args.half;
  TileSrc<T> a = {dy + (size_t)r0 * args.dy_ld + j0, args.dy_ld, n - j0, rows};  // dy^T: MN-major
  TileSrc<T> b = {(const T*)args.x + (size_t)r0 * k + i0, (size_t)k, k - i0, rows};  // x: MN-major
  if (GATHER && args.gather) {
    b.p = (const T*)args.x + i0;
    b.rows = args.gather + r0;
    b.rows_div = args.gather_div;
    b.src_rows = args.src_rows;
  }
  constexpr int MAPB = GATHER ? kGather : kPlain;
  void* dw = half ? args.dw2 : args.dw;
  const size_t c0 = (size_t)e * n * k + (size_t)j0 * k + i0;
  T* Ct = (T*)dw + c0;
  if constexpr (DT == XFT_BF16) {
    float acc[kMT][kNT][4];
    mma_mainloop<false, false, VEC, S, kPlain, MAPB>(a, b, rows, acc, (uint16_t*)smem);
    if constexpr (F32OUT) mma_store<VEC>((float*)dw + c0, (size_t)k, n - j0, k - i0, acc, args.accumulate != 0);
    else mma_store<VEC>(Ct, (size_t)k, n - j0, k - i0, acc, args.accumulate != 0);
  } else {
    float acc[4][4];
    ffma_mainloop<false, false, kPlain, MAPB>(a, b, rows, acc, (float*)smem);
    ffma_store(Ct, (size_t)k, n - j0, k - i0, acc, args.accumulate != 0);
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

template <int DT, bool B_KMAJOR, bool VEC, int S, int MODE>
cudaError_t launch_rows_staged(const RowsArgs& args) {
  size_t smem = kFSmemBytes;
  if constexpr (DT == XFT_BF16) smem = mma_smem_bytes<true, B_KMAJOR, S>();
  cudaError_t err = xft_allow_smem(grouped_rows_kernel<DT, B_KMAJOR, VEC, S, MODE>, smem);
  if (err != cudaSuccess) return err;
  const int BN = MODE == kGateUp ? Tiles<DT>::BN / 2 : Tiles<DT>::BN;
  const long long slots = CEIL_DIV((long long)args.M, (long long)Tiles<DT>::BM) + args.E;  // >= row tiles of any valid split
  dim3 grid((unsigned)CEIL_DIV((long long)args.N, (long long)BN), (unsigned)(slots < 65535 ? slots : 65535));
  grouped_rows_kernel<DT, B_KMAJOR, VEC, S, MODE><<<grid, kThreads, smem, xft_cuda_stream()>>>(args);
  return cudaGetLastError();
}

template <int DT, bool B_KMAJOR, bool VEC, int MODE = kLinear>
cudaError_t launch_rows(const RowsArgs& args) {
  if constexpr (DT != XFT_BF16) {
    return launch_rows_staged<DT, B_KMAJOR, VEC, 0, MODE>(args);
  } else {
    switch (bf16_stages<true, B_KMAJOR>()) {
      case 4: return launch_rows_staged<DT, B_KMAJOR, VEC, 4, MODE>(args);
      case 3: return launch_rows_staged<DT, B_KMAJOR, VEC, 3, MODE>(args);
      default: return cudaErrorInvalidConfiguration;  // under 92,160 B of shared memory: no sm_80+ GPU
    }
  }
}

template <int DT, bool VEC, bool F32OUT, int S, bool GATHER>
cudaError_t launch_dw_staged(const DwArgs& args) {
  size_t smem = kFSmemBytes;
  if constexpr (DT == XFT_BF16) smem = mma_smem_bytes<false, false, S>();
  cudaError_t err = xft_allow_smem(grouped_dw_kernel<DT, VEC, F32OUT, S, GATHER>, smem);
  if (err != cudaSuccess) return err;
  const long long tiles_k = CEIL_DIV((long long)args.k, (long long)Tiles<DT>::BN);
  const long long tiles_n = CEIL_DIV((long long)args.n, (long long)Tiles<DT>::BM);
  const long long z = (long long)args.E * (args.dw2 ? 2 : 1);
  if (tiles_n > 65535 || z > 65535) return cudaErrorInvalidValue;
  dim3 grid((unsigned)tiles_k, (unsigned)tiles_n, (unsigned)z);
  grouped_dw_kernel<DT, VEC, F32OUT, S, GATHER><<<grid, kThreads, smem, xft_cuda_stream()>>>(args);
  return cudaGetLastError();
}

template <int DT, bool VEC, bool F32OUT = false, bool GATHER = false>
cudaError_t launch_dw(const DwArgs& args) {
  if constexpr (DT != XFT_BF16) {
    return launch_dw_staged<DT, VEC, F32OUT, 0, GATHER>(args);
  } else {
    switch (bf16_stages<false, false>()) {
      case 4: return launch_dw_staged<DT, VEC, F32OUT, 4, GATHER>(args);
      case 3: return launch_dw_staged<DT, VEC, F32OUT, 3, GATHER>(args);
      default: return cudaErrorInvalidConfiguration;
    }
  }
}

// dw (and dw2) by dtype, dw dtype and alignment; rows16: the dy rows (and their starts) are 16-byte aligned
template <bool GATHER>
cudaError_t dispatch_dw(const DwArgs& a, int dtype, int dw_dtype, bool rows16) {
  const bool x16 = aligned(a.x, 16) && a.k % 8 == 0;
  auto al = [&](uintptr_t b) { return aligned(a.dw, b) && (!a.dw2 || aligned(a.dw2, b)); };
  if (dtype == XFT_F32) return launch_dw<XFT_F32, false, false, GATHER>(a);
  if (dw_dtype == XFT_F32)  // f32 gradients of bf16 weights: the accumulators stored unrounded
    return rows16 && x16 && al(8) ? launch_dw<XFT_BF16, true, true, GATHER>(a) : launch_dw<XFT_BF16, false, true, GATHER>(a);
  return rows16 && x16 && al(4) ? launch_dw<XFT_BF16, true, false, GATHER>(a) : launch_dw<XFT_BF16, false, false, GATHER>(a);
}

bool valid_args(int dtype, int M, int n, int k, int E) {
  return (dtype == XFT_F32 || dtype == XFT_BF16) && M >= 0 && n >= 0 && k >= 0 && E >= 1;
}

RowsArgs rows_args(const void* A, const void* B, const int* offsets, void* C, int M, int N, int K, int E) {
  RowsArgs r = {};
  r.A = A;
  r.B = B;
  r.offsets = offsets;
  r.C = C;
  r.M = M;
  r.N = N;
  r.K = K;
  r.E = E;
  r.gather_div = 1;
  return r;
}

}  // namespace

extern "C" int xft_cuda_grouped_gemm_forward(const void* x, const void* w, const int* offsets, void* y, int dtype,
                                             int M, int n, int k, int E) {
  if (!valid_args(dtype, M, n, k, E)) return cudaErrorInvalidValue;
  if (M == 0 || n == 0) return 0;
  const RowsArgs a = rows_args(x, w, offsets, y, M, n, k, E);
  if (dtype == XFT_F32) return launch_rows<XFT_F32, true, false>(a);
  // 16-byte rows for x and w (k % 8), 4-byte column pairs for y (n even)
  const bool vec = k % 8 == 0 && n % 2 == 0 && aligned(x, 16) && aligned(w, 16) && aligned(y, 4);
  return vec ? launch_rows<XFT_BF16, true, true>(a) : launch_rows<XFT_BF16, true, false>(a);
}

extern "C" int xft_cuda_grouped_gemm_backward(const void* x, const void* w, const int* offsets, const void* dy,
                                              void* dx, void* dw, int dtype, int dw_dtype, int M, int n, int k, int E,
                                              int accumulate, int dx_accumulate) {
  if (!valid_args(dtype, M, n, k, E) || (dw_dtype != dtype && dw_dtype != XFT_F32)) return cudaErrorInvalidValue;
  // 16-byte rows for dy (n % 8, also at any group start) and for w and x (k % 8), 4-byte column
  // pairs for dx and dw (k even)
  const bool rows16 = n % 8 == 0 && k % 8 == 0 && aligned(dy, 16);
  cudaError_t err = cudaSuccess;
  if (dx && M > 0 && k > 0) {  // dx [M, k] (+)= dy [M, n] @ w[e] [n, k]
    RowsArgs a = rows_args(dy, w, offsets, dx, M, k, n, E);
    a.accumulate = dx_accumulate;
    if (dtype == XFT_F32) err = launch_rows<XFT_F32, false, false>(a);
    else if (rows16 && aligned(w, 16) && aligned(dx, 4)) err = launch_rows<XFT_BF16, false, true>(a);
    else err = launch_rows<XFT_BF16, false, false>(a);
    if (err != cudaSuccess) return err;
  }
  if (dw && n > 0 && k > 0) {  // also when M == 0: every group is empty, dw = 0 (or unchanged)
    DwArgs a = {dy, (size_t)n, 0, x, nullptr, 1, 0, offsets, dw, nullptr, M, n, k, E, accumulate};
    err = dispatch_dw<false>(a, dtype, dw_dtype, rows16);
  }
  return err;
}

extern "C" int xft_cuda_gateup_forward(const void* x, const int* gather, int gather_div, int S, const void* w_gate,
                                       const void* w_up, const int* offsets, void* gu, void* h, int dtype, int M, int f,
                                       int d, int E) {
  if (!valid_args(dtype, M, f, d, E) || gather_div < 1 || S < 0) return cudaErrorInvalidValue;
  if (M == 0 || f == 0) return 0;
  RowsArgs a = rows_args(x, w_gate, offsets, gu, M, f, d, E);
  a.B2 = w_up;
  a.gather = gather;
  a.gather_div = gather_div;
  a.src_rows = S;
  a.H = h;
  if (dtype == XFT_F32) return launch_rows<XFT_F32, true, false, kGateUp>(a);
  // 16-byte rows for x and the weights (d % 8), 4-byte column pairs for gu and h (f even)
  const bool vec = d % 8 == 0 && f % 2 == 0 && aligned(x, 16) && aligned(w_gate, 16) && aligned(w_up, 16) &&
                   aligned(gu, 4) && aligned(h, 4);
  return vec ? launch_rows<XFT_BF16, true, true, kGateUp>(a) : launch_rows<XFT_BF16, true, false, kGateUp>(a);
}

extern "C" int xft_cuda_swiglu_down_backward(const void* dy, const void* w_down, const int* offsets, const void* gu,
                                             void* dgu, void* h, int dtype, int M, int f, int d, int E) {
  if (!valid_args(dtype, M, f, d, E)) return cudaErrorInvalidValue;
  if (M == 0 || f == 0) return 0;
  // dh [M, f] = dy [M, d] @ w_down[e] [d, f]: B MN-major, N = f, K = d
  RowsArgs a = rows_args(dy, w_down, offsets, dgu, M, f, d, E);
  a.GU = gu;
  a.H = h;
  if (dtype == XFT_F32) return launch_rows<XFT_F32, false, false, kSwigluDown>(a);
  const bool vec = d % 8 == 0 && f % 8 == 0 && aligned(dy, 16) && aligned(w_down, 16) && aligned(gu, 4) &&
                   aligned(dgu, 4) && aligned(h, 4);
  return vec ? launch_rows<XFT_BF16, false, true, kSwigluDown>(a) : launch_rows<XFT_BF16, false, false, kSwigluDown>(a);
}

extern "C" int xft_cuda_gateup_backward(const void* x, const int* gather, int gather_div, int S, const void* w_gate,
                                        const void* w_up, const int* offsets, const void* dgu, void* dx, void* dw_gate,
                                        void* dw_up, int dtype, int dw_dtype, int M, int f, int d, int E, int accumulate,
                                        int dx_accumulate) {
  if (!valid_args(dtype, M, f, d, E) || (dw_dtype != dtype && dw_dtype != XFT_F32) || gather_div < 1 || S < 0 ||
      (!dw_gate) != (!dw_up))
    return cudaErrorInvalidValue;
  // dgu rows 16-byte aligned (f % 8: both halves and every row start), weight and x rows (d % 8)
  const bool rows16 = f % 8 == 0 && d % 8 == 0 && aligned(dgu, 16);
  cudaError_t err = cudaSuccess;
  if (dx && M > 0 && d > 0) {  // dx [M, d] (+)= dgu [M, 2f] @ [W_gate; W_up] [2f, d]
    RowsArgs a = rows_args(dgu, w_gate, offsets, dx, M, d, 2 * f, E);
    a.B2 = w_up;
    a.split = f;
    a.accumulate = dx_accumulate;
    if (dtype == XFT_F32) err = launch_rows<XFT_F32, false, false, kGateUpDx>(a);
    else if (rows16 && aligned(w_gate, 16) && aligned(w_up, 16) && aligned(dx, 4))
      err = launch_rows<XFT_BF16, false, true, kGateUpDx>(a);
    else err = launch_rows<XFT_BF16, false, false, kGateUpDx>(a);
    if (err != cudaSuccess) return err;
  }
  if (dw_gate && f > 0 && d > 0) {  // dW_gate, dW_up [E, f, d] (+)= dg^T x, du^T x, x through the gather
    DwArgs a = {dgu, 2 * (size_t)f, f, x, gather, gather_div, S, offsets, dw_gate, dw_up, M, f, d, E, accumulate};
    err = gather ? dispatch_dw<true>(a, dtype, dw_dtype, rows16) : dispatch_dw<false>(a, dtype, dw_dtype, rows16);
  }
  return err;
}

extern "C" int xft_cuda_qkv_forward(const void* x, const void* wq, const void* wk, const void* wv, const int* offsets,
                                    void* q, void* k, void* v, int dtype, int M, int nq, int nk, int d) {
  if (!valid_args(dtype, M, nq + 2 * nk, d, 1) || nq < 1 || nk < 1) return cudaErrorInvalidValue;
  if (M == 0) return 0;
  RowsArgs a = rows_args(x, wq, offsets, q, M, nq + 2 * nk, d, 1);
  a.B2 = wk;
  a.B3 = wv;
  a.C2 = k;
  a.C3 = v;
  a.nk = nk;
  if (dtype == XFT_F32) return launch_rows<XFT_F32, true, false, kQkv>(a);
  // 16-byte rows for x and the weights (d % 8), 4-byte column pairs in q, k, v (nq, nk even)
  const bool vec = d % 8 == 0 && nq % 2 == 0 && nk % 2 == 0 && aligned(x, 16) && aligned(wq, 16) && aligned(wk, 16) &&
                   aligned(wv, 16) && aligned(q, 4) && aligned(k, 4) && aligned(v, 4);
  return vec ? launch_rows<XFT_BF16, true, true, kQkv>(a) : launch_rows<XFT_BF16, true, false, kQkv>(a);
}
