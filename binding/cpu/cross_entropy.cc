/*
CPU twin of cuda/cross_entropy.cu: softmax cross-entropy over a vocabulary, with a loss mask.

logits z [R, V] (f32 or bf16), targets i32 [R]; a target outside [0, V) (negative: not a response
token) ignores the row. fp32 math. In PyTorch terms:
  losses[r] = logsumexp(z[r]) - z[r, targets[r]]      (0 where ignored)
  predictions[r] = argmax(z[r])                       (lowest index on ties; every row)
Backward (fused, llm.c style), dloss f32 [R] = dL/dlosses:
  dlogits[r] = (softmax(z[r]) - onehot(targets[r])) * dloss[r]   (zero rows where ignored)
dlogits may be logits itself: row r is fully read (max, sum) before it is overwritten.
*/
#include <math.h>

#include "xft_cpu.h"

namespace {

// max and sum of exp(z - max) of one row; the sum is accumulated in double (a sequential fp32 sum
// over a 50k vocabulary drifts by ~1e-5 relative, more than the CUDA kernel's tree of partial sums)
void row_stats(const void* logits, int dtype, size_t base, int V, float* max_out, float* sum_out) {
  float m = -INFINITY;
  for (int j = 0; j < V; j++) m = fmaxf(m, xft_cpu::load(logits, dtype, base + j));
  double sum = 0.0;
  for (int j = 0; j < V; j++) sum += expf(xft_cpu::load(logits, dtype, base + j) - m);
  *max_out = m;
  *sum_out = (float)sum;
}

}  // namespace

int xft_cpu_cross_entropy_forward(const void* logits, int dtype, const int* targets, int R, int V,
                                  float* losses, int* predictions) {
  for (int r = 0; r < R; r++) {
    size_t base = (size_t)r * V;
    int best = 0;
    float best_value = xft_cpu::load(logits, dtype, base);
    for (int j = 1; j < V; j++) {
      float z = xft_cpu::load(logits, dtype, base + j);
      if (z > best_value) best_value = z, best = j;
    }
    predictions[r] = best;
    const int target = targets[r];
    if (target < 0 || target >= V) {
      losses[r] = 0.f;
      continue;
    }
    float m, sum;
    row_stats(logits, dtype, base, V, &m, &sum);
    losses[r] = logf(sum) + m - xft_cpu::load(logits, dtype, base + target);
  }
  return 0;
}

int xft_cpu_cross_entropy_backward(const void* logits, int dtype, const int* targets, const float* dloss,
                                   int R, int V, void* dlogits) {
  for (int r = 0; r < R; r++) {
    size_t base = (size_t)r * V;
    const int target = targets[r];
    if (target < 0 || target >= V) {
      for (int j = 0; j < V; j++) xft_cpu::store(dlogits, dtype, base + j, 0.f);
      continue;
    }
    float m, sum;
    row_stats(logits, dtype, base, V, &m, &sum);
    const float inv = 1.0f / sum, dl = dloss[r];
    for (int j = 0; j < V; j++) {
      float p = expf(xft_cpu::load(logits, dtype, base + j) - m) * inv;
      xft_cpu::store(dlogits, dtype, base + j, (p - (j == target ? 1.f : 0.f)) * dl);
    }
  }
  return 0;
}
