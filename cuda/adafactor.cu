/*
Adafactor (Shazeer & Stern, 2018) as transformers' Adafactor with scale_parameter = relative_step =
warmup_init = False, beta1 = None, weight_decay = 0: what the HF Trainer builds for --optim adafactor,
the XFT reference's optimizer. One step over many tensors (a host table, cuda/optim.h) in five
launches whatever their number. Per tensor, in PyTorch terms (gs = g * grad_scale, fp32 math):
  beta2t = 1 - t^decay_rate                                  (t >= 1; t = 1 gives beta2t = 0)
  update = gs**2 + eps1
  factored ([S, R, C]; a 2-D weight is S = 1; statistics over the last two dims, as transformers):
    row = beta2t row + (1 - beta2t) update.mean(-1)                      # [S, R]
    col = beta2t col + (1 - beta2t) update.mean(-2)                      # [S, C]
    u = ((row / row.mean(-1, keepdim)).rsqrt()[..., None] * col.rsqrt()[..., None, :]) * gs
  vector ([C]):
    v = beta2t v + (1 - beta2t) update;    u = v.rsqrt() * gs
  u = u / max(1, rms(u) / clip_threshold)    rms over the tensor, or over each slice (clip_per_slice:
                                             the reference's experts are separate 2-D parameters)
  p = p - lr u          p f32 or bf16 (in place: nearest even, or stochastic rounding); p_copy gets p
The state is row + col floats per matrix (S (R + C)) and n per vector, instead of AdamW's 2n.

Launches (each over all tensors; a block finds its tensor by binary search in a table of first blocks):
  1 stats    row statistics (a warp per row), column statistics (a block per 32 columns, 8 row
             lanes), the vectors' v (a thread per element)
  2 rowmean  a block per factored slice: row.mean(-1)
  3 sumsq    a block per chunk of kChunk elements of a clip group: sum of u^2 into its partial
  4 denom    a block per clip group: its partials in order -> max(1, rms / clip_threshold)
  5 apply    the chunks again: u recomputed, divided, applied, written
All sums are fp64 in a fixed order: the result does not depend on scheduling (deterministic).
*/
#include <cuda_runtime.h>
#include <math.h>
#include <string.h>

#include <vector>

#include "xft_cuda.h"
#include "xft_math.h"
#include "xft_reduce.cuh"
#include "optim.h"
#include "step.h"

extern "C" cudaStream_t xft_cuda_stream(void);

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

namespace {

const int kThreads = 256;              // every launch
const int kRowsPerBlock = kThreads / 32;  // stats: a warp per row
const int kColsPerBlock = 32;           // stats: a block per 32 columns, kThreads / 32 row lanes
const int64_t kChunk = kThreads * 8;   // sumsq / apply: elements per block

// The device table: per tensor its description and its first block (or slice, or group) per launch.
struct Plan {
  const xft_adafactor_tensor* t;  // [count]
  const int64_t* stats0;          // first block in launch 1
  const int64_t* row_blocks;      // of which row-statistics blocks (factored)
  const int64_t* slice0;          // first slice in launch 2 (rowmean index)
  const int64_t* elem0;           // first block in launches 3 and 5 (partial index)
  const int64_t* group0;          // first clip group in launch 4 (denom index)
  const int64_t* chunks;          // blocks per clip group
  float* rowmean;                 // [slices]
  double* partial;                // [elem blocks]
  float* denom;                   // [groups]
  const float* control;           // NULL, or the step's control block (cuda/step.h): skip flag and scale
  int count;
};

// CUDA kernels

// the tensor of block x: the last k with first[k] <= x (tensors with no blocks share the next one's first)
__device__ __forceinline__ int find_tensor(const int64_t* first, int count, int64_t x) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first[mid] <= x) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ float grad_of(const xft_adafactor_tensor& t, size_t i, float grad_scale) {
  return xft_load_value(t.g, t.g_dtype, i) * grad_scale;
}

__global__ void __launch_bounds__(kThreads) adafactor_stats_kernel(Plan plan, float eps1, float beta, float grad_scale) {
  if (xft_control_skip(plan.control)) return;  // a non-finite step: nothing is written
  grad_scale = xft_control_scale(plan.control, grad_scale);
  const int k = find_tensor(plan.stats0, plan.count, blockIdx.x);
  const xft_adafactor_tensor t = plan.t[k];
  const int64_t local = (int64_t)blockIdx.x - plan.stats0[k];
  const int64_t S = t.slices, R = t.rows, C = t.cols;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (!t.row) {  // a vector
    const int64_t i = local * kThreads + threadIdx.x;
    if (i < C) {
      const float x = grad_of(t, i, grad_scale);
      t.v[i] = beta * t.v[i] + (1.f - beta) * (x * x + eps1);
    }
    return;
  }
  if (local < plan.row_blocks[k]) {  // a warp per row
    const int64_t sr = local * kRowsPerBlock + warp;
    if (sr >= S * R) return;  // whole warps leave; no barrier follows
    double sum = 0.0;
    for (int64_t c = lane; c < C; c += 32) {
      const float x = grad_of(t, sr * C + c, grad_scale);
      sum += (double)(x * x + eps1);
    }
    sum = warp_sum(sum);
    if (lane == 0) t.row[sr] = beta * t.row[sr] + (1.f - beta) * (float)(sum / (double)C);
    return;
  }
  // columns c0 .. c0 + 31 of slice s: lane = column, warp = row lane
  __shared__ double part[kThreads / 32][kColsPerBlock];
  const int64_t cb = local - plan.row_blocks[k], per_slice = CEIL_DIV(C, (int64_t)kColsPerBlock);
  const int64_t s = cb / per_slice, c = (cb % per_slice) * kColsPerBlock + lane;
  double sum = 0.0;
  if (c < C)
    for (int64_t r = warp; r < R; r += kThreads / 32) {
      const float x = grad_of(t, (s * R + r) * C + c, grad_scale);
      sum += (double)(x * x + eps1);
    }
  part[warp][lane] = sum;
  __syncthreads();
  if (warp == 0 && c < C) {
    double total = 0.0;
    for (int w = 0; w < kThreads / 32; w++) total += part[w][lane];
    t.col[s * C + c] = beta * t.col[s * C + c] + (1.f - beta) * (float)(total / (double)R);
  }
}

__global__ void __launch_bounds__(kThreads) adafactor_rowmean_kernel(Plan plan) {
  if (xft_control_skip(plan.control)) return;
  const int k = find_tensor(plan.slice0, plan.count, blockIdx.x);
  const xft_adafactor_tensor t = plan.t[k];
  const int64_t s = (int64_t)blockIdx.x - plan.slice0[k], R = t.rows;
  double sum = 0.0;
  for (int64_t r = threadIdx.x; r < R; r += kThreads) sum += t.row[s * R + r];
  sum = block_sum(sum);
  if (threadIdx.x == 0) plan.rowmean[blockIdx.x] = (float)(sum / (double)R);
}

// the unclipped update of element i of tensor k
__device__ __forceinline__ float update_of(const Plan& plan, int k, const xft_adafactor_tensor& t, int64_t i, float grad_scale) {
  const float gs = grad_of(t, i, grad_scale);
  if (!t.row) return (1.f / sqrtf(t.v[i])) * gs;
  const int64_t R = t.rows, C = t.cols, RC = R * C;
  const int64_t s = i / RC, r = (i % RC) / C, c = i % C;
  const float mean = plan.rowmean[plan.slice0[k] + s];
  return ((1.f / sqrtf(t.row[s * R + r] / mean)) * (1.f / sqrtf(t.col[s * C + c]))) * gs;
}

// block x of launches 3 and 5: its tensor k, clip group q and element range [begin, end) of the tensor
struct Chunk {
  int k;
  int64_t q, begin, end;
};
__device__ __forceinline__ Chunk chunk_of(const Plan& plan) {
  Chunk ch;
  ch.k = find_tensor(plan.elem0, plan.count, blockIdx.x);
  const xft_adafactor_tensor& t = plan.t[ch.k];
  const int64_t n = t.slices * t.rows * t.cols, group_n = t.clip_per_slice ? t.rows * t.cols : n;
  const int64_t local = (int64_t)blockIdx.x - plan.elem0[ch.k], chunks = plan.chunks[ch.k];
  ch.q = local / chunks;
  ch.begin = ch.q * group_n + (local % chunks) * kChunk;
  const int64_t group_end = (ch.q + 1) * group_n;
  ch.end = ch.begin + kChunk < group_end ? ch.begin + kChunk : group_end;
  return ch;
}

__global__ void __launch_bounds__(kThreads) adafactor_sumsq_kernel(Plan plan, float grad_scale) {
  if (xft_control_skip(plan.control)) return;
  grad_scale = xft_control_scale(plan.control, grad_scale);
  const Chunk ch = chunk_of(plan);
  const xft_adafactor_tensor t = plan.t[ch.k];
  double sum = 0.0;
  for (int64_t i = ch.begin + threadIdx.x; i < ch.end; i += kThreads) {
    const float u = update_of(plan, ch.k, t, i, grad_scale);
    sum += (double)u * u;
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) plan.partial[blockIdx.x] = sum;
}

__global__ void __launch_bounds__(kThreads) adafactor_denom_kernel(Plan plan, float clip_threshold) {
  if (xft_control_skip(plan.control)) return;
  const int k = find_tensor(plan.group0, plan.count, blockIdx.x);
  const xft_adafactor_tensor t = plan.t[k];
  const int64_t q = (int64_t)blockIdx.x - plan.group0[k], chunks = plan.chunks[k];
  const int64_t n = t.slices * t.rows * t.cols, group_n = t.clip_per_slice ? t.rows * t.cols : n;
  const double* part = plan.partial + plan.elem0[k] + q * chunks;
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < chunks; j += kThreads) sum += part[j];
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    const float rms = (float)sqrt(sum / (double)group_n);
    plan.denom[blockIdx.x] = fmaxf(1.f, rms / clip_threshold);
  }
}

__global__ void __launch_bounds__(kThreads) adafactor_apply_kernel(Plan plan, float lr, float grad_scale, int stochastic) {
  if (xft_control_skip(plan.control)) return;
  grad_scale = xft_control_scale(plan.control, grad_scale);
  const Chunk ch = chunk_of(plan);
  const xft_adafactor_tensor t = plan.t[ch.k];
  const float denom = plan.denom[plan.group0[ch.k] + ch.q];
  for (int64_t i = ch.begin + threadIdx.x; i < ch.end; i += kThreads) {
    const float u = update_of(plan, ch.k, t, i, grad_scale) / denom;
    const float p = xft_load_value(t.p, t.p_dtype, i) - u * lr;
    xft_store_param(t.p, t.p_dtype, i, p, stochastic, t.sr_stream);
    if (t.p_copy) xft_store_value(t.p_copy, t.copy_dtype, i, p);
  }
}

size_t align_up(size_t x) { return CEIL_DIV(x, (size_t)16) * 16; }

}  // namespace

// kernel launchers

extern "C" int xft_cuda_adafactor(const xft_adafactor_tensor* tensors, int count, const xft_adafactor_options* o) {
  if (count <= 0) return 0;
  // the table on the host: first blocks per launch (prefix sums)
  std::vector<int64_t> stats0(count), row_blocks(count), slice0(count), elem0(count), group0(count), chunks(count);
  int64_t nstats = 0, nslices = 0, nelem = 0, ngroups = 0;
  for (int k = 0; k < count; k++) {
    const xft_adafactor_tensor& t = tensors[k];
    const int64_t S = t.slices, R = t.rows, C = t.cols, n = S * R * C;
    const bool factored = t.row != nullptr;
    stats0[k] = nstats, slice0[k] = nslices, elem0[k] = nelem, group0[k] = ngroups;
    row_blocks[k] = factored ? CEIL_DIV(S * R, (int64_t)kRowsPerBlock) : 0;
    if (n == 0) {
      chunks[k] = 0;
      continue;
    }
    nstats += factored ? row_blocks[k] + S * CEIL_DIV(C, (int64_t)kColsPerBlock) : CEIL_DIV(C, (int64_t)kThreads);
    if (factored) nslices += S;
    const int64_t groups = t.clip_per_slice ? S : 1;
    chunks[k] = CEIL_DIV(n / groups, kChunk);
    nelem += groups * chunks[k];
    ngroups += groups;
  }
  if (nelem == 0) return 0;
  // one pool allocation: the table, then the scratch of launches 2-4
  const size_t table_bytes = align_up(count * sizeof(xft_adafactor_tensor)), arr = align_up(count * sizeof(int64_t));
  const size_t off_rowmean = table_bytes + 6 * arr, off_partial = off_rowmean + align_up(nslices * sizeof(float) + 4);
  const size_t off_denom = off_partial + align_up(nelem * sizeof(double)), total = off_denom + align_up(ngroups * sizeof(float));
  std::vector<unsigned char> host(off_rowmean);
  memcpy(host.data(), tensors, count * sizeof(xft_adafactor_tensor));
  const std::vector<int64_t>* arrays[6] = {&stats0, &row_blocks, &slice0, &elem0, &group0, &chunks};
  for (int a = 0; a < 6; a++) memcpy(host.data() + table_bytes + a * arr, arrays[a]->data(), count * sizeof(int64_t));
  unsigned char* dev = nullptr;
  int err = xft_cuda_malloc((void**)&dev, total);
  if (err) return err;
  err = xft_cuda_memcpy_h2d(dev, host.data(), host.size());
  if (err) {
    xft_cuda_free(dev);
    return err;
  }
  Plan plan;
  plan.t = (const xft_adafactor_tensor*)dev;
  int64_t* a0 = (int64_t*)(dev + table_bytes);
  plan.stats0 = a0, plan.row_blocks = (int64_t*)((unsigned char*)a0 + arr), plan.slice0 = (int64_t*)((unsigned char*)a0 + 2 * arr);
  plan.elem0 = (int64_t*)((unsigned char*)a0 + 3 * arr), plan.group0 = (int64_t*)((unsigned char*)a0 + 4 * arr);
  plan.chunks = (int64_t*)((unsigned char*)a0 + 5 * arr);
  plan.rowmean = (float*)(dev + off_rowmean), plan.partial = (double*)(dev + off_partial), plan.denom = (float*)(dev + off_denom);
  plan.count = count;
  plan.control = o->control;
  const float beta = xft_adafactor_beta2t(o->step, o->decay_rate);
  cudaStream_t stream = xft_cuda_stream();
  adafactor_stats_kernel<<<(unsigned)nstats, kThreads, 0, stream>>>(plan, o->eps1, beta, o->grad_scale);
  if (nslices) adafactor_rowmean_kernel<<<(unsigned)nslices, kThreads, 0, stream>>>(plan);
  adafactor_sumsq_kernel<<<(unsigned)nelem, kThreads, 0, stream>>>(plan, o->grad_scale);
  adafactor_denom_kernel<<<(unsigned)ngroups, kThreads, 0, stream>>>(plan, o->clip_threshold);
  adafactor_apply_kernel<<<(unsigned)nelem, kThreads, 0, stream>>>(plan, o->lr, o->grad_scale, o->stochastic);
  err = cudaGetLastError();
  const int freed = xft_cuda_free(dev);
  return err ? err : freed;
}
