/*
The per-token math of the noisy top-k load estimate (cuda/load_estimate.cu states it), shared by the
CUDA kernels and their CPU twin (binding/cpu/load_estimate.cc) so both compute the same thing.
`Row` is anything indexable by expert that yields fp32 (XftLoadRow: a row of a f32 or bf16 tensor).
*/
#pragma once
#include <math.h>
#include <stdint.h>

#include "xft_math.h"

#define XFT_LOAD_MAX_EXPERTS 256

// row `base` of a [T, N] f32 or bf16 tensor, read as fp32 by expert
struct XftLoadRow {
  const void* p;
  int dtype;
  size_t base;
  XFT_HD float operator[](int i) const { return xft_load_value(p, dtype, base + i); }
};

XFT_HD float xft_load_softplus(float z) { return z > 20.f ? z : log1pf(expf(z)); }

// j_out: the index of the k-th largest value (rank k - 1), j_in: the (k+1)-th (rank k);
// rank(i) = #{j : v_j > v_i or (v_j == v_i and j < i)}.
template <typename Row>
XFT_HD void xft_load_thresholds(const Row& v, int N, int k, int* j_out, int* j_in) {
  *j_out = 0;
  *j_in = 0;
  for (int i = 0; i < N; i++) {
    const float vi = v[i];
    int r = 0;
    for (int j = 0; j < N; j++) {
      const float vj = v[j];
      r += (vj > vi || (vj == vi && j < i)) ? 1 : 0;
    }
    if (r == k - 1) *j_out = i;
    if (r == k) *j_in = i;
  }
}

// prob[i] = Phi((clean_i - thr_i) / c_i) for the N experts of one token
template <typename Row>
XFT_HD void xft_load_estimate_token(const Row& clean, const Row& z, const Row& noisy, int N, int k, float eps, float* prob) {
  int j_out, j_in;
  xft_load_thresholds(noisy, N, k, &j_out, &j_in);
  const float thr_in = noisy[j_in], thr_out = noisy[j_out];
  for (int i = 0; i < N; i++) {
    const float c = xft_load_softplus(z[i]) + eps;
    const float thr = noisy[i] > thr_in ? thr_in : thr_out;
    const float u = (clean[i] - thr) / c;
    prob[i] = 0.5f * erfcf(-u * 0.70710678118654752f);
  }
}

// dclean[i], dc[i] (before the sigmoid of z) of one token from dload [N]; noise index base + i
template <typename Row>
XFT_HD void xft_load_estimate_token_backward(const Row& clean, const Row& z, const Row& noisy, const float* dload, int N,
                                             int k, float eps, uint64_t seed, uint64_t base, float* dclean, float* dc) {
  int j_out, j_in;
  xft_load_thresholds(noisy, N, k, &j_out, &j_in);
  const float thr_in = noisy[j_in], thr_out = noisy[j_out];
  float g_in = 0.f, g_out = 0.f;
  for (int i = 0; i < N; i++) {
    const float c = xft_load_softplus(z[i]) + eps;
    const bool in = noisy[i] > thr_in;
    const float u = (clean[i] - (in ? thr_in : thr_out)) / c;
    const float g = dload[i] * expf(-0.5f * u * u) * 0.39894228040143268f / c;
    dclean[i] = g;
    dc[i] = -g * u;
    if (in) g_in -= g;
    else g_out -= g;
  }
  // the thresholds are noisy logits: noisy_j = clean_j + n_j c_j
  dclean[j_in] += g_in;
  dc[j_in] += g_in * xft_normal(seed, base + j_in);
  dclean[j_out] += g_out;
  dc[j_out] += g_out * xft_normal(seed, base + j_out);
}
