/*
CPU twin of cuda/cross_entropy.cu: softmax cross-entropy over a vocabulary, with a loss mask.

logits z [R, V] (f32 or bf16), targets i32 [R]; a target outside [0, V) (negative: not a response
token) ignores the row. fp32 math. In PyTorch terms:
  losses[r] = logsumexp(z[r]) - z[r, targets[r]]      (0 where ignored)
  predictions[r] = argmax(z[r])                       (lowest index on ties; every row)
Backward (fused, llm.c style), dloss f32 [R] = dL/dlosses:
  dlogits[r] = (softmax(z[r]) - onehot(targets[r])) * dloss[r]   (zero rows where ignored)
dlogits may be logits itself: row r is fully read (max, sum) before it is overwritten.
Rows run on threads; within a row the max, the exps (binding/cpu/vec.h's fast exp, or libm's expf
with XFT_CPU_REFERENCE=1) and the writes are vectorized; the sum of exps accumulates in double in
8 interleaved partial sums (one row's result does not depend on the thread count).
*/
#include <math.h>

#include <vector>

#include "vec.h"
#include "xft_cpu.h"

namespace {

const int kLanes = 8;

// max of z[0..V) (NaN ignored, as fmaxf), lane-wise so that it vectorizes; -inf for an all-NaN row
template <class T>
XFT_INLINE float row_max(const T* __restrict z, int V) {
  float lane[kLanes];
  for (int l = 0; l < kLanes; l++) lane[l] = -INFINITY;
  int j = 0;
  for (; j + kLanes <= V; j += kLanes)
    for (int l = 0; l < kLanes; l++) lane[l] = fmaxf(lane[l], xft_cpu::ld(z, (size_t)j + l));
  float m = -INFINITY;
  for (int l = 0; l < kLanes; l++) m = fmaxf(m, lane[l]);
  for (; j < V; j++) m = fmaxf(m, xft_cpu::ld(z, (size_t)j));
  return m;
}

// e[j] = exp(z[j] - m); returns sum_j e[j] accumulated in double
template <class T, bool kFast>
XFT_INLINE double row_exp(const T* __restrict z, int V, float m, float* __restrict e) {
  for (int j = 0; j < V; j++) {
    const float x = xft_cpu::ld(z, (size_t)j) - m;
    e[j] = kFast ? xft_cpu::fast_exp(x) : expf(x);
  }
  double lane[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int j = 0;
  for (; j + kLanes <= V; j += kLanes)
    for (int l = 0; l < kLanes; l++) lane[l] += (double)e[j + l];
  double sum = 0.0;
  for (int l = 0; l < kLanes; l++) sum += lane[l];
  for (; j < V; j++) sum += (double)e[j];
  return sum;
}

template <class T, bool kFast>
XFT_INLINE void forward_rows(const T* logits, const int* targets, int V, float* losses, int* predictions, float* e,
                             size_t r0, size_t r1) {
  for (size_t r = r0; r < r1; r++) {
    const T* z = logits + (size_t)r * V;
    const float m = row_max(z, V);
    // argmax: the lowest index holding the max (a NaN first value wins, as a sequential scan with > does)
    int best = 0;
    if (xft_cpu::ld(z, 0) == xft_cpu::ld(z, 0))
      while (best < V - 1 && xft_cpu::ld(z, (size_t)best) != m) best++;
    predictions[r] = best;
    const int target = targets[r];
    if (target < 0 || target >= V) {
      losses[r] = 0.f;
      continue;
    }
    const float sum = (float)row_exp<T, kFast>(z, V, m, e);
    losses[r] = logf(sum) + m - xft_cpu::ld(z, (size_t)target);
  }
}

template <class T, bool kFast>
XFT_INLINE void backward_rows(const T* logits, const int* targets, const float* dloss, int V, T* dlogits, float* e,
                              size_t r0, size_t r1) {
  for (size_t r = r0; r < r1; r++) {
    const T* z = logits + (size_t)r * V;
    T* dz = dlogits + (size_t)r * V;
    const int target = targets[r];
    if (target < 0 || target >= V) {
      for (int j = 0; j < V; j++) xft_cpu::st(dz, (size_t)j, 0.f);
      continue;
    }
    const float m = row_max(z, V);
    const float sum = (float)row_exp<T, kFast>(z, V, m, e);
    const float inv = 1.0f / sum, dl = dloss[r];
    for (int j = 0; j < V; j++) xft_cpu::st(dz, (size_t)j, (e[j] * inv) * dl);
    xft_cpu::st(dz, (size_t)target, (e[target] * inv - 1.f) * dl);
  }
}

XFT_VEC void forward_f32(const float* x, const int* t, int V, float* l, int* p, float* e, size_t a, size_t b) {
  forward_rows<float, true>(x, t, V, l, p, e, a, b);
}
XFT_VEC void forward_bf16(const uint16_t* x, const int* t, int V, float* l, int* p, float* e, size_t a, size_t b) {
  forward_rows<uint16_t, true>(x, t, V, l, p, e, a, b);
}
XFT_VEC void backward_f32(const float* x, const int* t, const float* d, int V, float* dx, float* e, size_t a, size_t b) {
  backward_rows<float, true>(x, t, d, V, dx, e, a, b);
}
XFT_VEC void backward_bf16(const uint16_t* x, const int* t, const float* d, int V, uint16_t* dx, float* e, size_t a,
                           size_t b) {
  backward_rows<uint16_t, true>(x, t, d, V, dx, e, a, b);
}

}  // namespace

int xft_cpu_cross_entropy_forward(const void* logits, int dtype, const int* targets, int R, int V,
                                  float* losses, int* predictions) {
  const bool ref = xft_cpu::reference_mode(), bf = dtype == XFT_BF16;
  xft_cpu::parallel_for((size_t)R, 12.0 * (double)R * V, [&](size_t a, size_t b) {
    std::vector<float> e(V);
    typedef const uint16_t* CB;
    typedef const float* CF;
    if (ref && bf) forward_rows<uint16_t, false>((CB)logits, targets, V, losses, predictions, e.data(), a, b);
    else if (ref) forward_rows<float, false>((CF)logits, targets, V, losses, predictions, e.data(), a, b);
    else if (bf) forward_bf16((CB)logits, targets, V, losses, predictions, e.data(), a, b);
    else forward_f32((CF)logits, targets, V, losses, predictions, e.data(), a, b);
  });
  return 0;
}

int xft_cpu_cross_entropy_backward(const void* logits, int dtype, const int* targets, const float* dloss,
                                   int R, int V, void* dlogits) {
  const bool ref = xft_cpu::reference_mode(), bf = dtype == XFT_BF16;
  xft_cpu::parallel_for((size_t)R, 14.0 * (double)R * V, [&](size_t a, size_t b) {
    std::vector<float> e(V);
    typedef const uint16_t* CB;
    typedef const float* CF;
    if (ref && bf) backward_rows<uint16_t, false>((CB)logits, targets, dloss, V, (uint16_t*)dlogits, e.data(), a, b);
    else if (ref) backward_rows<float, false>((CF)logits, targets, dloss, V, (float*)dlogits, e.data(), a, b);
    else if (bf) backward_bf16((CB)logits, targets, dloss, V, (uint16_t*)dlogits, e.data(), a, b);
    else backward_f32((CF)logits, targets, dloss, V, (float*)dlogits, e.data(), a, b);
  });
  return 0;
}
