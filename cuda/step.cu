/*
The training step's device-side bookkeeping (cuda/step.h states the math) and the multi-tensor
zeroing of the gradients, so that a step makes no host synchronisation and few launches:
  loss_stats   a micro-batch's cross-entropy rows -> the ledger: one block, fp64 sums of the losses,
               counted tokens and correct predictions over rows with target >= 0 (fixed order:
               deterministic), then xft_ledger_micro
  stat_add     ledger[k] += (double) x[0]  (a layer's balance loss, in layer order)
  ledger_flag  1 when this rank's step has a non-finite loss (data parallel: summed over ranks)
  step_end     xft_ledger_step_end from the gradients' sum of squares: the log record, the control
               block the optimizers read (gradient scale, skip flag), the accumulators cleared
  zero_many    every gradient buffer of the run set to zero in one launch: a table of (pointer,
               bytes) on the device, each block clears kZeroChunk bytes of one tensor
The zeroing table is uploaded once and kept (cuda/xft_table.cuh, a cache keyed by the table's
bytes): a step re-uploads nothing, and a captured graph's table stays valid.
*/
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "xft_cuda.h"
#include "xft_reduce.cuh"
#include "xft_table.cuh"
#include "step.h"

extern "C" cudaStream_t xft_cuda_stream(void);

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

namespace {

const int kStatsThreads = 256;
const int kZeroThreads = 256;
const int64_t kZeroChunk = 16384;  // bytes per zeroing block

struct ZeroEntry {
  unsigned char* p;
  int64_t bytes;
  int64_t first_block;
};

// CUDA kernels

__global__ void __launch_bounds__(kStatsThreads) loss_stats_kernel(const float* losses, const int* predictions, const int* targets,
                                                                   int rows, double aux_div, double* ledger) {
  double sum = 0.0, tokens = 0.0, correct = 0.0;
  for (int r = threadIdx.x; r < rows; r += kStatsThreads)
    if (targets[r] >= 0) {
      sum += (double)losses[r];
      tokens += 1.0;
      correct += predictions[r] == targets[r] ? 1.0 : 0.0;
    }
  sum = block_sum(sum);
  __syncthreads();  // block_sum's shared partials are reused by the next sum
  tokens = block_sum(tokens);
  __syncthreads();
  correct = block_sum(correct);
  if (threadIdx.x == 0) xft_ledger_micro(ledger, sum, tokens, correct, aux_div);
}

__global__ void stat_add_kernel(const float* x, double* dst) { dst[0] += (double)x[0]; }

__global__ void ledger_flag_kernel(const double* ledger, float* out) { out[0] = xft_ledger_nonfinite(ledger); }

__global__ void step_end_kernel(const float* sumsq, double* ledger, float* control, const float* nonfinite, int slot, int slots,
                                double clip, double budget) {
  xft_ledger_step_end(ledger, control, sumsq[0], nonfinite, slot, slots, clip, budget);
}

__device__ __forceinline__ int find_entry(const ZeroEntry* t, int count, int64_t block) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (t[mid].first_block <= block) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

__global__ void __launch_bounds__(kZeroThreads) zero_many_kernel(const ZeroEntry* table, int count) {
  const ZeroEntry e = table[find_entry(table, count, blockIdx.x)];
  const int64_t begin = ((int64_t)blockIdx.x - e.first_block) * kZeroChunk;
  const int64_t end = begin + kZeroChunk < e.bytes ? begin + kZeroChunk : e.bytes;
  unsigned char* p = e.p + begin;
  const int64_t n = end - begin;
  if (((uintptr_t)p & 15) == 0) {  // chunks start at multiples of kZeroChunk: aligned when the buffer is
    const int64_t n16 = n / 16;
    for (int64_t i = threadIdx.x; i < n16; i += kZeroThreads) ((uint4*)p)[i] = make_uint4(0, 0, 0, 0);
    for (int64_t i = n16 * 16 + threadIdx.x; i < n; i += kZeroThreads) p[i] = 0;
  } else
    for (int64_t i = threadIdx.x; i < n; i += kZeroThreads) p[i] = 0;
}

std::vector<DeviceTable> g_zero_tables;  // the zeroing tables on the device (cuda/xft_table.cuh)

}  // namespace

// kernel launchers

extern "C" int xft_cuda_loss_stats(const float* losses, const int* predictions, const int* targets, int rows, double aux_div,
                                   double* ledger) {
  loss_stats_kernel<<<1, kStatsThreads, 0, xft_cuda_stream()>>>(losses, predictions, targets, rows, aux_div, ledger);
  return cudaGetLastError();
}

extern "C" int xft_cuda_stat_add(const float* x, double* dst) {
  stat_add_kernel<<<1, 1, 0, xft_cuda_stream()>>>(x, dst);
  return cudaGetLastError();
}

extern "C" int xft_cuda_ledger_flag(const double* ledger, float* out) {
  ledger_flag_kernel<<<1, 1, 0, xft_cuda_stream()>>>(ledger, out);
  return cudaGetLastError();
}

extern "C" int xft_cuda_step_end(const float* sumsq, double* ledger, float* control, const float* nonfinite, int slot, int slots,
                                 double clip, double budget) {
  step_end_kernel<<<1, 1, 0, xft_cuda_stream()>>>(sumsq, ledger, control, nonfinite, slot, slots, clip, budget);
  return cudaGetLastError();
}

extern "C" int xft_cuda_zero_many(void* const* ptrs, const size_t* bytes, int count) {
  std::vector<ZeroEntry> table;
  int64_t blocks = 0;
  for (int k = 0; k < count; k++) {
    if (bytes[k] == 0) continue;
    table.push_back(ZeroEntry{(unsigned char*)ptrs[k], (int64_t)bytes[k], blocks});
    blocks += CEIL_DIV((int64_t)bytes[k], kZeroChunk);
  }
  if (table.empty()) return 0;
  if (blocks > 2147483647) return cudaErrorInvalidValue;
  int err = 0;
  const ZeroEntry* dev = (const ZeroEntry*)xft_device_table(g_zero_tables, table.data(), table.size() * sizeof(ZeroEntry), &err);
  if (!dev) return err;
  zero_many_kernel<<<(unsigned)blocks, kZeroThreads, 0, xft_cuda_stream()>>>(dev, (int)table.size());
  return cudaGetLastError();
}
