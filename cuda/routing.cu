/*
Shared-expert routing with routing weight normalization (XFT.md), and the permutation metadata
the grouped GEMMs need. CPU twin: binding/cpu/routing.cc (same semantics, same tie-breaking).

Per token t, with z = logits[t] (N columns, fp32 math) and p = softmax(z):
  selection: the S largest logits in descending order, ties toward the lower column
             (S = K - 1 with a shared expert, S = K without). Selecting on z, not p, keeps the
             choice identical to the CPU twin. NaN logits follow the twin's scan exactly: a NaN is
             taken only when it is the lowest untaken column, otherwise it is passed over.
  shared, normalize:  g_0 = 1 - p_1,  g_{i_j} = p_1 * softmax(p_1..p_S)_j        (sum g = 1)
  shared, !normalize: g_0 = 1 - p_1,  g_{i_j} = p_j
  no shared expert:   g_{i_j} = softmax(z_{i_1}..z_{i_S})_j
  experts[t] = [i_1 + 1, ..., i_S + 1, 0] with a shared expert, [i_1, ..., i_S] without;
  importance[j] = sum over tokens selecting column j of p_j with a shared expert, of g_j without
  (the reference's TopKBalancedNoisyGate sums the top-K renormalized scores);  load[j] = their count.
  order: the T*K pairs t*K + s sorted by expert, then by token (a stable counting sort).

Backward (dweights = dL/dg, dimportance = dL/dimportance or NULL), q = softmax(p_sel):
  normalize:  dp_{i_m} = p_1 q_m (dg_m - sum_j q_j dg_j),  dp_{i_1} += sum_j q_j dg_j - dg_0
  !normalize: dp_{i_m} = dg_m,                             dp_{i_1} -= dg_0
  shared:     dp_{i_m} += dimportance_{i_m};   dz = p * (dp - <p, dp>)
  no shared:  dg'_m = dg_m + dimportance_{i_m},  dz_{i_m} = g_m (dg'_m - <g, dg'>)  (dp = 0)
  probs (optional forward output) f32 [N] = sum over tokens of the full softmax p_j: the P_i of the
  Switch balance loss; its gradient dprobs (optional) starts dp for every column: dp_j = dprobs_j + ...

Switch balance loss (Fedus et al. 2021; UpIT's L_load; transformers' load_balancing_loss_func):
  f_i = load_i / (T S), P_i = probs_i / T,  loss = weight N sum_i f_i P_i  (1 under uniform routing)
  dprobs_i = dloss weight N f_i / T  (f is a constant: the gradient reaches the logits through P only).
  One block, fixed-order double sums.

Layout and launch
- A group of G lanes (G = the power of two >= N, at most 32) owns one token at a time; lane l
  holds columns l, l + G, ... (VPL = ceil(N / G) values per lane, in registers). Group
  reductions are xor butterflies, so every lane of a group ends with the same bits.
  N = 7 (E = 8): G = 8, four tokens per warp. N up to XFT_ROUTE_MAX_EXPERTS = 1024.
  Blocks of 256 threads (128 for VPL = 16, 64 for VPL = 32). Selection costs S rounds of a
  group argmax, O(S * N / 32) per token: cheap for top-k, slow only for S in the hundreds.
  With probs, each group adds its tokens' p into a shared row (lane-owned columns, token order),
  combined over groups in group order into prob_part [N, nb], reduced like importance.
  Softmax divisions use div_rn (IEEE x / y inline); sums run in a different order than the
  twin's, so weights and importance agree to rounding, selection and order exactly.
- forward, 3 kernels, no float atomics (bit-reproducible):
  1. route_forward_kernel, nb = ceil(T / (groups * tpg)) blocks, tpg in [1, 32] chosen so
     that nb stays near ROUTE_TARGET_BLOCKS: group g of block b takes tpg consecutive tokens;
     per token it writes experts, weights and the pair's rank among earlier tokens of the group that chose
     the same expert; per-lane counters and importance sums (in token order) are combined over
     the groups of the block in group order, giving hist [E, nb] (tokens of block b choosing
     e), imp_part [N, nb], and the ranks are made block-relative.
  2. route_scan_kernel (one block per expert): exclusive scan of hist[e, :] over blocks (in
     place: each block's base), counts[e], load, and importance[j] = fixed-order double sum
     of imp_part[j, :].
  3. route_order_kernel (grid-stride over the T*K pairs): offsets = exclusive scan of counts
     (every block, block 0 writes it); pair (t, s) with expert e goes to
     offsets[e] + hist[e, block of t] + rank: sorted by expert, then token, as the twin.
  Scratch (cudaMallocAsync on the stream): hist i32 [E, nb], imp_part f32 [N, nb], rank i32 [T*K].
- backward reads experts as given: an expert outside [shared, N + shared) is clamped for memory
  safety and reported as an index fault (xft_cuda.h; XFT_INDEX at the next synchronisation).
- backward, 1 kernel, grid-stride over blocks of tokens: the same groups, one token each; p, dp
  and dz of the token live in shared memory [N] per group, slot lanes scatter dp/dz by column,
  owner lanes finish dz + p (dp - <p, dp>). T = 0 writes nothing; forward with T = 0 zeroes
  counts, offsets, importance and load.
*/
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>

#include "xft_cuda.h"
#include "xft_fault.cuh"
#include "xft_math.h"

extern "C" cudaStream_t xft_cuda_stream(void);

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

// logit columns N (normal experts with a shared expert; all experts without), E <= N + 1.
// Mirrored by the binding (kMaxRouteColumns) and lib/ops.ts (MAX_ROUTE_EXPERTS).
#define XFT_ROUTE_MAX_EXPERTS 1024
#define ROUTE_TARGET_BLOCKS 1024       // forward: grow tokens per group until about this many blocks
#define ROUTE_MAX_TOKENS_PER_GROUP 32
#define ROUTE_SCAN_BLOCK 256
#define ROUTE_ORDER_BLOCK 256
#define ROUTE_ORDER_MAX_GRID 4096
#define ROUTE_BACKWARD_MAX_GRID 8192
#define ROUTE_MIN_BLOCKS 2             // launch-bounds hint; without it ptxas spills a register in a few instances

static const unsigned FULL_MASK = 0xffffffffu;

// CUDA kernels

__device__ __forceinline__ float load_logit(const void* logits, int dtype, size_t i) {
  return dtype == XFT_BF16 ? xft_bf16_to_f32(((const uint16_t*)logits)[i]) : ((const float*)logits)[i];
}

// x / y, IEEE round to nearest, for a normal y (here a softmax denominator in [1, N]): the fast path
// of div.rn.f32 (MUFU.RCP, one Newton step, one residual correction) without its out-of-line slow
// path, whose call makes ptxas spill. Differs from x / y only where the quotient is subnormal.
__device__ __forceinline__ float div_rn(float x, float y) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  r = fmaf(fmaf(-y, r, 1.f), r, r);
  const float q = x * r;
  return fmaf(fmaf(-y, q, x), r, q);
}

// reductions over the G lanes of a group (G a power of two, groups aligned in the warp);
// xor butterflies: + and fmaxf are commutative, so all lanes of the group get identical bits
template <int G>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_MASK, x, o);
  return x;
}

template <int G>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, o));
  return x;
}

// exclusive prefix sum of v over the block (every thread calls it); *total = the block sum.
// smem: 32 ints. Ends with a barrier, so smem may be reused right after.
template <int BLOCK>
__device__ __forceinline__ int block_exclusive_scan(int v, int* smem, int* total) {
  constexpr int WARPS = BLOCK / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    int y = __shfl_up_sync(FULL_MASK, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) smem[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < WARPS ? smem[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      int y = __shfl_up_sync(FULL_MASK, w, o);
      if (lane >= o) w += y;
    }
    smem[lane] = w;
  }
  __syncthreads();
  const int base = warp ? smem[warp - 1] : 0;
  *total = smem[WARPS - 1];
  __syncthreads();
  return base + x - v;
}

// sum of v over the block in a fixed order (every thread calls it); the result in every thread
template <int BLOCK>
__device__ __forceinline__ double block_sum_double(double v, double* smem) {
  constexpr int WARPS = BLOCK / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  double s = 0.0;
#pragma unroll
  for (int w = 0; w < WARPS; w++) s += smem[w];
  __syncthreads();
  return s;
}

// threads per block of the routing kernels: the per-group shared arrays hold G * VPL columns
// (backward: 3 floats per column, at most 24 KiB per block)
template <int VPL>
struct RouteBlock {
  static constexpr int value = VPL >= 32 ? 64 : VPL >= 16 ? 128 : 256;
};

// Kernel 1 of the forward. Block b, group g takes tokens [(b * GROUPS + g) * tpg, + tpg).
// hist [E, nb]: tokens of block b that chose expert e; imp_part [N, nb]: their scores summed in
// token order; rank [T*K]: index of the pair among the block's pairs of the same expert.
// weights doubles as the stash of the selected p (or z) between the two passes over slots.
template <int G, int VPL>
__global__ void __launch_bounds__(RouteBlock<VPL>::value, ROUTE_MIN_BLOCKS)
route_forward_kernel(const void* __restrict__ logits, int dtype, int T, int N, int K, int normalize, int shared,
                     int tpg, int nb, int* __restrict__ experts, float* __restrict__ weights,
                     int* __restrict__ rank, int* __restrict__ hist, float* __restrict__ imp_part,
                     float* __restrict__ prob_part) {
  constexpr int BLOCK = RouteBlock<VPL>::value;
  constexpr int GROUPS = BLOCK / G;
  constexpr int COLS = G * VPL;
  __shared__ int cnt_sh[GROUPS][COLS + 1];  // per group: tokens per expert, then the group's base
  __shared__ float imp_sh[GROUPS][COLS];    // per group: importance per column
  __shared__ float prob_sh[GROUPS][COLS];   // per group: sum of the full softmax per column (prob_part only)

  const int lg = threadIdx.x % G, g = threadIdx.x / G;
  const int E = N + shared, S = shared ? K - 1 : K;
  const bool stash = shared ? normalize != 0 : true;  // weights need a second pass over the slots
  const long long t0 = ((long long)blockIdx.x * GROUPS + g) * tpg;

  int cnt[VPL];   // tokens of this group that chose column lg + G*v so far
  float imp[VPL]; // and their scores (p, or g without a shared expert), summed in token order
#pragma unroll
  for (int v = 0; v < VPL; v++) {
    cnt[v] = 0;
    imp[v] = 0.f;
  }
  int nlive = 0;
  if (prob_part) {
#pragma unroll
    for (int v = 0; v < VPL; v++) prob_sh[g][lg + G * v] = 0.f;
  }

  // trip counts are uniform over the warp (tpg, S), so the full-mask shuffles are safe;
  // tokens past T run with no valid column and write nothing
  for (int i = 0; i < tpg; i++) {
    const long long t = t0 + i;
    const bool live = t < T;
    const size_t row = (size_t)t * N, prow = (size_t)t * K;

    float z[VPL];
    unsigned avail = 0;  // bit v: column lg + G*v exists and is not yet taken
#pragma unroll
    for (int v = 0; v < VPL; v++) {
      const int j = lg + G * v;
      z[v] = -INFINITY;
      if (live && j < N) {
        z[v] = load_logit(logits, dtype, row + j);
        avail |= 1u << v;
      }
    }
    float m = -INFINITY;
#pragma unroll
    for (int v = 0; v < VPL; v++) m = fmaxf(m, z[v]);
    m = group_max<G>(m);
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < VPL; v++)
      if (avail >> v & 1u) sum += expf(z[v] - m);
    sum = group_sum<G>(sum);
    if (prob_part) {
#pragma unroll
      for (int v = 0; v < VPL; v++)
        if (avail >> v & 1u) prob_sh[g][lg + G * v] += div_rn(expf(z[v] - m), sum);
    }

    float p1 = 0.f, xmax = -INFINITY;
    for (int s = 0; s < S; s++) {
      // this lane's candidates: the largest non-NaN untaken logit (ties: lower column), and the
      // lowest untaken column as 2*j + isnan(z_j)
      float bv = -INFINITY;
      int bi = INT_MAX;
      int first = INT_MAX - 1;
#pragma unroll
      for (int v = 0; v < VPL; v++) {
        if (avail >> v & 1u) {
          const int j = lg + G * v;
          const bool nan = z[v] != z[v];
          first = min(first, 2 * j + (int)nan);
          if (!nan && (z[v] > bv || (z[v] == bv && j < bi))) {
            bv = z[v];
            bi = j;
          }
        }
      }
#pragma unroll
      for (int o = G / 2; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
        const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
        const int of = __shfl_xor_sync(FULL_MASK, first, o);
        if (ov > bv || (ov == bv && oi < bi)) {
          bv = ov;
          bi = oi;
        }
        first = min(first, of);
      }
      const int sel = (first & 1) ? first >> 1 : bi;  // the twin's scan stops on a leading NaN

      // the owner lane of column sel takes it, counts it and computes its p
      float ps = 0.f, zs = 0.f;
      int rk = 0;
#pragma unroll
      for (int v = 0; v < VPL; v++) {
        if (lg + G * v == sel) {
          avail &= ~(1u << v);
          ps = div_rn(expf(z[v] - m), sum);
          zs = z[v];
          rk = cnt[v];
          cnt[v] += 1;
          if (shared) imp[v] += ps;
        }
      }
      const int owner = sel % G;
      ps = __shfl_sync(FULL_MASK, ps, owner, G);
      zs = __shfl_sync(FULL_MASK, zs, owner, G);
      rk = __shfl_sync(FULL_MASK, rk, owner, G);
      if (s == 0) p1 = ps;
      const float x = shared ? ps : zs;  // what the weight softmax runs over
      xmax = fmaxf(xmax, x);
      if (live && lg == s % G) {
        experts[prow + s] = sel + shared;
        rank[prow + s] = rk;
        weights[prow + s] = (shared && !normalize) ? ps : x;  // final, or the stash for pass 2
      }
    }

    if (stash) {
      // lane s % G wrote slot s above and reads it back here: no synchronization needed
      float se = 0.f;
      if (live)
        for (int s = lg; s < S; s += G) se += expf(weights[prow + s] - xmax);
      se = group_sum<G>(se);
      if (live)
        for (int s = lg; s < S; s += G) {
          const float q = div_rn(expf(weights[prow + s] - xmax), se);
          weights[prow + s] = shared ? p1 * q : q;
        }
    }
    if (!shared) {
      // importance sums the final weights g: slot s was written by lane s % G, which hands g_s and
      // its column to the column's owner lane (S is uniform over the warp: full-mask shuffles are safe)
      for (int s = 0; s < S; s++) {
        const int src = s % G;
        float gs = 0.f;
        int cs = -1;
        if (live && lg == src) {
          gs = weights[prow + s];
          cs = experts[prow + s];
        }
        gs = __shfl_sync(FULL_MASK, gs, src, G);
        cs = __shfl_sync(FULL_MASK, cs, src, G);
#pragma unroll
        for (int v = 0; v < VPL; v++)
          if (lg + G * v == cs) imp[v] += gs;
      }
    }
    if (shared && live && lg == (K - 1) % G) {
      experts[prow + K - 1] = 0;
      weights[prow + K - 1] = 1.f - p1;
      rank[prow + K - 1] = i;  // every live token of the group takes the shared expert
    }
    nlive += live ? 1 : 0;
  }

  // combine the groups of the block, in group (= token) order
#pragma unroll
  for (int v = 0; v < VPL; v++) {
    const int j = lg + G * v;
    if (j < N) {
      cnt_sh[g][j + shared] = cnt[v];
      imp_sh[g][j] = imp[v];
    }
  }
  if (shared && lg == 0) cnt_sh[g][0] = nlive;
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += BLOCK) {
    int run = 0;
    for (int gg = 0; gg < GROUPS; gg++) {
      const int c = cnt_sh[gg][e];
      cnt_sh[gg][e] = run;
      run += c;
    }
    hist[(size_t)e * nb + blockIdx.x] = run;
  }
  for (int j = threadIdx.x; j < N; j += BLOCK) {
    float a = 0.f;
    for (int gg = 0; gg < GROUPS; gg++) a += imp_sh[gg][j];
    imp_part[(size_t)j * nb + blockIdx.x] = a;
    if (prob_part) {
      float b = 0.f;
      for (int gg = 0; gg < GROUPS; gg++) b += prob_sh[gg][j];
      prob_part[(size_t)j * nb + blockIdx.x] = b;
    }
  }
  __syncthreads();

  // ranks relative to the block: add the group's base (experts and rank of slot s were
  // written by this same lane, s % G == lg)
  for (int i = 0; i < tpg; i++) {
    const long long t = t0 + i;
    if (t >= T) break;
    const size_t prow = (size_t)t * K;
    for (int s = lg; s < K; s += G) rank[prow + s] += cnt_sh[g][experts[prow + s]];
  }
}

// Kernel 2 of the forward: block e scans hist[e, :] over the forward blocks (exclusive, in
// place), writes counts[e] and load; block j < N reduces imp_part[j, :] in a fixed order.
__global__ void __launch_bounds__(ROUTE_SCAN_BLOCK)
route_scan_kernel(int* __restrict__ hist, const float* __restrict__ imp_part, const float* __restrict__ prob_part,
                  int nb, int N, int shared, int* __restrict__ counts, float* __restrict__ importance,
                  float* __restrict__ load, float* __restrict__ probs) {
  __shared__ int scan_sh[32];
  __shared__ double sum_sh[32];
  const int e = blockIdx.x;
  int* h = hist + (size_t)e * nb;
  int run = 0;
  for (int base = 0; base < nb; base += ROUTE_SCAN_BLOCK) {
    const int i = base + threadIdx.x;
    const int c = i < nb ? h[i] : 0;
    int total;
    const int ex = block_exclusive_scan<ROUTE_SCAN_BLOCK>(c, scan_sh, &total);
    if (i < nb) h[i] = run + ex;
    run += total;
  }
  if (threadIdx.x == 0) {
    counts[e] = run;
    if (e >= shared) load[e - shared] = (float)run;
  }
  if (e < N) {
    const float* ip = imp_part + (size_t)e * nb;
    double a = 0.0;
    for (int i = threadIdx.x; i < nb; i += ROUTE_SCAN_BLOCK) a += (double)ip[i];
    a = block_sum_double<ROUTE_SCAN_BLOCK>(a, sum_sh);
    if (threadIdx.x == 0) importance[e] = (float)a;
    if (probs) {
      const float* pp = prob_part + (size_t)e * nb;
      double b = 0.0;
      for (int i = threadIdx.x; i < nb; i += ROUTE_SCAN_BLOCK) b += (double)pp[i];
      b = block_sum_double<ROUTE_SCAN_BLOCK>(b, sum_sh);
      if (threadIdx.x == 0) probs[e] = (float)b;
    }
  }
}

// Kernel 3 of the forward: offsets, then each pair to its place in order.
// tpb: tokens per forward block; hist holds each forward block's base per expert.
__global__ void __launch_bounds__(ROUTE_ORDER_BLOCK)
route_order_kernel(const int* __restrict__ experts, const int* __restrict__ rank, const int* __restrict__ hist,
                   const int* __restrict__ counts, int* __restrict__ offsets, int* __restrict__ order,
                   int T, int K, int E, int nb, int tpb) {
  __shared__ int off_sh[XFT_ROUTE_MAX_EXPERTS + 2];
  __shared__ int scan_sh[32];
  int run = 0;
  for (int base = 0; base < E; base += ROUTE_ORDER_BLOCK) {
    const int e = base + threadIdx.x;
    const int c = e < E ? counts[e] : 0;
    int total;
    const int ex = block_exclusive_scan<ROUTE_ORDER_BLOCK>(c, scan_sh, &total);
    if (e < E) off_sh[e] = run + ex;
    run += total;
  }
  if (threadIdx.x == 0) off_sh[E] = run;
  __syncthreads();
  if (blockIdx.x == 0)
    for (int e = threadIdx.x; e <= E; e += ROUTE_ORDER_BLOCK) offsets[e] = off_sh[e];
  const long long P = (long long)T * K;  // <= INT_MAX, checked by the launcher
  for (long long q = blockIdx.x * ROUTE_ORDER_BLOCK + threadIdx.x; q < P; q += (long long)gridDim.x * ROUTE_ORDER_BLOCK) {
    const int pr = (int)q, t = pr / K;
    const int e = experts[pr];
    order[off_sh[e] + hist[(size_t)e * nb + t / tpb] + rank[pr]] = pr;
  }
}

// Backward: one group per token (grid-stride over blocks of GROUPS tokens); dp and dz of the
// token are scattered by slot into shared memory, then read back by the owner lanes.
// Values of selected columns are recomputed from global (L1-resident) rather than kept per slot.
template <int G, int VPL>
__global__ void __launch_bounds__(RouteBlock<VPL>::value, ROUTE_MIN_BLOCKS)
route_backward_kernel(const void* __restrict__ logits, int dtype, int T, int N, int K, int normalize, int shared,
                      const int* __restrict__ experts, const float* __restrict__ dweights,
                      const float* __restrict__ dimportance, const float* __restrict__ dprobs,
                      void* __restrict__ dlogits, xft_cuda_fault_slot* fault) {
  constexpr int BLOCK = RouteBlock<VPL>::value;
  constexpr int GROUPS = BLOCK / G;
  constexpr int COLS = G * VPL;
  __shared__ float p_sh[GROUPS][COLS];
  __shared__ float dp_sh[GROUPS][COLS];
  __shared__ float dz_sh[GROUPS][COLS];

  const int lg = threadIdx.x % G, g = threadIdx.x / G;
  const int S = shared ? K - 1 : K;
  float* p = p_sh[g];
  float* dp = dp_sh[g];
  float* dz = dz_sh[g];

  // the trip count is uniform over the block
  for (long long base = (long long)blockIdx.x * GROUPS; base < T; base += (long long)gridDim.x * GROUPS) {
    const long long t = base + g;
    const bool live = t < T;
    const size_t row = (size_t)t * N, prow = (size_t)t * K;

    float z[VPL];
    unsigned have = 0;
#pragma unroll
    for (int v = 0; v < VPL; v++) {
      const int j = lg + G * v;
      z[v] = -INFINITY;
      if (live && j < N) {
        z[v] = load_logit(logits, dtype, row + j);
        have |= 1u << v;
      }
    }
    float m = -INFINITY;
#pragma unroll
    for (int v = 0; v < VPL; v++) m = fmaxf(m, z[v]);
    m = group_max<G>(m);
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < VPL; v++)
      if (have >> v & 1u) sum += expf(z[v] - m);
    sum = group_sum<G>(sum);
#pragma unroll
    for (int v = 0; v < VPL; v++)
      if (have >> v & 1u) {
        const int j = lg + G * v;
        p[j] = div_rn(expf(z[v] - m), sum);
        dp[j] = dprobs ? dprobs[j] : 0.f;
        dz[j] = 0.f;
      }
    __syncwarp();  // p, and the zeroed dp, dz rows, before other lanes read or scatter

    // slot s: its logit column (clamped: guards memory only, valid experts never need it) and
    // the value the weight softmax runs over, p_sel (shared) or z_sel (no shared). An expert out of
    // range is reported as an index fault (the host raises XFT_INDEX at its next synchronisation).
    auto slot_col = [&](int s) -> int { return min(max(experts[prow + s] - shared, 0), N - 1); };
    if (live)
      for (int s = lg; s < S; s += G) {
        const int ex = experts[prow + s];
        if (ex < shared || ex >= N + shared) xft_raise_fault(fault, XFT_FAULT_ROUTE_EXPERTS, (long long)prow + s, ex, N);
      }
    auto col_x = [&](int c) -> float { return shared ? p[c] : load_logit(logits, dtype, row + c); };
    // dL/dg of slot s; without a shared expert importance sums g, so its gradient joins here
    auto slot_dg = [&](int s, int c) -> float {
      return (!shared && dimportance) ? __fadd_rn(dweights[prow + s], dimportance[c]) : dweights[prow + s];
    };

    float p1 = 0.f, dg0 = 0.f;
    if (live && shared) {
      p1 = col_x(slot_col(0));
      dg0 = dweights[prow + K - 1];
    }
    const bool soft = shared ? normalize != 0 : true;  // weights are a softmax over the slots
    float xmax = -INFINITY, se = 0.f, a = 0.f;
    if (soft) {
      if (live)
        for (int s = lg; s < S; s += G) xmax = fmaxf(xmax, col_x(slot_col(s)));
      xmax = group_max<G>(xmax);
      if (live)
        for (int s = lg; s < S; s += G) se += expf(col_x(slot_col(s)) - xmax);
      se = group_sum<G>(se);
      if (live)
        for (int s = lg; s < S; s += G) {
          const int c = slot_col(s);
          const float q = div_rn(expf(col_x(c) - xmax), se);
          a = __fadd_rn(a, __fmul_rn(q, slot_dg(s, c)));
        }
      a = group_sum<G>(a);
    }
    if (live)
      for (int s = lg; s < S; s += G) {
        const int c = slot_col(s);
        const float x = col_x(c);
        const float dg = slot_dg(s, c);
        float d = 0.f;
        if (shared) {
          if (normalize) {
            const float q = div_rn(expf(x - xmax), se);
            d = __fmul_rn(__fmul_rn(p1, q), dg - a);
            if (s == 0) d = __fadd_rn(d, a - dg0);
          } else {
            d = dg;
            if (s == 0) d = d - dg0;
          }
        } else {
          const float q = div_rn(expf(x - xmax), se);
          dz[c] = __fmul_rn(q, dg - a);
        }
        if (dimportance && shared) d = __fadd_rn(d, dimportance[c]);
        dp[c] = __fadd_rn(dp[c], d);
      }
    __syncwarp();  // the scatter before the owners read

    float pdp = 0.f;
#pragma unroll
    for (int v = 0; v < VPL; v++)
      if (have >> v & 1u) {
        const int j = lg + G * v;
        pdp = __fadd_rn(pdp, __fmul_rn(p[j], dp[j]));
      }
    pdp = group_sum<G>(pdp);
#pragma unroll
    for (int v = 0; v < VPL; v++)
      if (have >> v & 1u) {
        const int j = lg + G * v;
        const float out = __fadd_rn(dz[j], __fmul_rn(p[j], dp[j] - pdp));
        if (dtype == XFT_BF16) ((uint16_t*)dlogits)[row + j] = xft_f32_to_bf16(out);
        else ((float*)dlogits)[row + j] = out;
      }
    __syncwarp();  // every lane done with this token's p, dp, dz before the next token writes them
  }
}

// Switch balance loss: one block; fixed-order double sums (bit-reproducible)
#define SWITCH_LOSS_BLOCK 256

__global__ void __launch_bounds__(SWITCH_LOSS_BLOCK)
switch_loss_forward_kernel(const float* __restrict__ probs, const float* __restrict__ load, int N, int T, int S,
                           float weight, float* __restrict__ loss) {
  __shared__ double sum_sh[32];
  double a = 0.0;
  for (int i = threadIdx.x; i < N; i += SWITCH_LOSS_BLOCK) a += (double)load[i] * (double)probs[i];
  a = block_sum_double<SWITCH_LOSS_BLOCK>(a, sum_sh);
  if (threadIdx.x == 0) loss[0] = T > 0 ? (float)((double)weight * N * a / ((double)T * S * (double)T)) : 0.f;
}

__global__ void __launch_bounds__(SWITCH_LOSS_BLOCK)
switch_loss_backward_kernel(const float* __restrict__ load, int N, int T, int S, float weight, float dloss,
                            float* __restrict__ dprobs) {
  for (int i = threadIdx.x; i < N; i += SWITCH_LOSS_BLOCK)
    dprobs[i] = T > 0 ? (float)((double)dloss * weight * N * (double)load[i] / ((double)T * S * (double)T)) : 0.f;
}

// kernel launchers

// group width: the power of two >= N, at most 32; VPL = columns per lane
static void route_shape(int N, int* G, int* VPL) {
  int g = 1;
  while (g < N && g < 32) g *= 2;
  int v = 1;
  while (g * v < N) v *= 2;
  *G = g;
  *VPL = v;
}

static int route_block(int VPL) {
  return VPL >= 32 ? RouteBlock<32>::value : VPL >= 16 ? RouteBlock<16>::value : RouteBlock<1>::value;
}

#define ROUTE_DISPATCH(G_, VPL_, KERNEL, GRID, ...)                                             \
  do {                                                                                          \
    if (G_ == 1) KERNEL<1, 1><<<GRID, RouteBlock<1>::value, 0, stream>>>(__VA_ARGS__);          \
    else if (G_ == 2) KERNEL<2, 1><<<GRID, RouteBlock<1>::value, 0, stream>>>(__VA_ARGS__);     \
    else if (G_ == 4) KERNEL<4, 1><<<GRID, RouteBlock<1>::value, 0, stream>>>(__VA_ARGS__);     \
    else if (G_ == 8) KERNEL<8, 1><<<GRID, RouteBlock<1>::value, 0, stream>>>(__VA_ARGS__);     \
    else if (G_ == 16) KERNEL<16, 1><<<GRID, RouteBlock<1>::value, 0, stream>>>(__VA_ARGS__);   \
    else if (VPL_ == 1) KERNEL<32, 1><<<GRID, RouteBlock<1>::value, 0, stream>>>(__VA_ARGS__);  \
    else if (VPL_ == 2) KERNEL<32, 2><<<GRID, RouteBlock<2>::value, 0, stream>>>(__VA_ARGS__);  \
    else if (VPL_ == 4) KERNEL<32, 4><<<GRID, RouteBlock<4>::value, 0, stream>>>(__VA_ARGS__);  \
    else if (VPL_ == 8) KERNEL<32, 8><<<GRID, RouteBlock<8>::value, 0, stream>>>(__VA_ARGS__);  \
    else if (VPL_ == 16) KERNEL<32, 16><<<GRID, RouteBlock<16>::value, 0, stream>>>(__VA_ARGS__); \
    else KERNEL<32, 32><<<GRID, RouteBlock<32>::value, 0, stream>>>(__VA_ARGS__);               \
  } while (0)

static bool route_args_ok(int T, int N, int K, int shared) {
  const int S = shared ? K - 1 : K;
  return T >= 0 && N >= 1 && N <= XFT_ROUTE_MAX_EXPERTS && S >= 1 && S <= N && (long long)T * K <= INT_MAX;
}

extern "C" int xft_cuda_route_forward(const void* logits, int dtype, int T, int N, int K, int normalize, int shared,
                                      int* experts, float* weights, int* counts, int* offsets, int* order,
                                      float* importance, float* load, float* probs) {
  shared = shared ? 1 : 0;
  if (!route_args_ok(T, N, K, shared)) return cudaErrorInvalidValue;
  cudaStream_t stream = xft_cuda_stream();
  const int E = N + shared;
  cudaError_t err;
  if (T == 0) {
    if ((err = cudaMemsetAsync(counts, 0, sizeof(int) * E, stream)) != cudaSuccess) return err;
    if ((err = cudaMemsetAsync(offsets, 0, sizeof(int) * (E + 1), stream)) != cudaSuccess) return err;
    if ((err = cudaMemsetAsync(importance, 0, sizeof(float) * N, stream)) != cudaSuccess) return err;
    if ((err = cudaMemsetAsync(load, 0, sizeof(float) * N, stream)) != cudaSuccess) return err;
    if (probs && (err = cudaMemsetAsync(probs, 0, sizeof(float) * N, stream)) != cudaSuccess) return err;
    return cudaGetLastError();
  }

  int G, VPL;
  route_shape(N, &G, &VPL);
  const int groups = route_block(VPL) / G;
  int tpg = CEIL_DIV(T, groups * ROUTE_TARGET_BLOCKS);
  tpg = tpg < 1 ? 1 : tpg > ROUTE_MAX_TOKENS_PER_GROUP ? ROUTE_MAX_TOKENS_PER_GROUP : tpg;
  const int tpb = groups * tpg;  // tokens per forward block
  const int nb = CEIL_DIV(T, tpb);

  // scratch: hist i32 [E, nb] | imp_part f32 [N, nb] | rank i32 [T*K] | prob_part f32 [N, nb] (with probs)
  const size_t hist_n = (size_t)E * nb, imp_n = (size_t)N * nb, rank_n = (size_t)T * K, prob_n = probs ? imp_n : 0;
  void* scratch = nullptr;
  if ((err = cudaMallocAsync(&scratch, sizeof(int) * (hist_n + imp_n + rank_n + prob_n), stream)) != cudaSuccess) return err;
  int* hist = (int*)scratch;
  float* imp_part = (float*)(hist + hist_n);
  int* rank = (int*)(imp_part + imp_n);
  float* prob_part = probs ? (float*)(rank + rank_n) : nullptr;

  ROUTE_DISPATCH(G, VPL, route_forward_kernel, nb, logits, dtype, T, N, K, normalize, shared, tpg, nb, experts,
                 weights, rank, hist, imp_part, prob_part);
  err = cudaGetLastError();
  if (err == cudaSuccess) {
    route_scan_kernel<<<E, ROUTE_SCAN_BLOCK, 0, stream>>>(hist, imp_part, prob_part, nb, N, shared, counts, importance,
                                                          load, probs);
    err = cudaGetLastError();
  }
  if (err == cudaSuccess) {
    int grid = CEIL_DIV(T * K, ROUTE_ORDER_BLOCK);
    grid = grid > ROUTE_ORDER_MAX_GRID ? ROUTE_ORDER_MAX_GRID : grid;
    route_order_kernel<<<grid, ROUTE_ORDER_BLOCK, 0, stream>>>(experts, rank, hist, counts, offsets, order, T, K, E,
                                                               nb, tpb);
    err = cudaGetLastError();
  }
  cudaError_t ferr = cudaFreeAsync(scratch, stream);
  return err != cudaSuccess ? err : ferr;
}

extern "C" int xft_cuda_route_backward(const void* logits, int dtype, int T, int N, int K, int normalize, int shared,
                                       const int* experts, const float* dweights, const float* dimportance,
                                       void* dlogits, const float* dprobs) {
  shared = shared ? 1 : 0;
  if (!route_args_ok(T, N, K, shared)) return cudaErrorInvalidValue;
  if (T == 0) return cudaGetLastError();
  cudaStream_t stream = xft_cuda_stream();
  int G, VPL;
  route_shape(N, &G, &VPL);
  const int groups = route_block(VPL) / G;
  int grid = CEIL_DIV(T, groups);
  grid = grid > ROUTE_BACKWARD_MAX_GRID ? ROUTE_BACKWARD_MAX_GRID : grid;
  ROUTE_DISPATCH(G, VPL, route_backward_kernel, grid, logits, dtype, T, N, K, normalize, shared, experts, dweights,
                 dimportance, dprobs, dlogits, xft_cuda_fault_record());
  return cudaGetLastError();
}

extern "C" int xft_cuda_switch_loss_forward(const float* probs, const float* load, int N, int T, int S, float weight,
                                            float* loss) {
  if (N < 1 || T < 0 || S < 1) return cudaErrorInvalidValue;
  switch_loss_forward_kernel<<<1, SWITCH_LOSS_BLOCK, 0, xft_cuda_stream()>>>(probs, load, N, T, S, weight, loss);
  return cudaGetLastError();
}

extern "C" int xft_cuda_switch_loss_backward(const float* load, int N, int T, int S, float weight, float dloss,
                                             float* dprobs) {
  if (N < 1 || T < 0 || S < 1) return cudaErrorInvalidValue;
  switch_loss_backward_kernel<<<1, SWITCH_LOSS_BLOCK, 0, xft_cuda_stream()>>>(load, N, T, S, weight, dloss, dprobs);
  return cudaGetLastError();
}
