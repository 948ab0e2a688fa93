/*
The per-token math of the noisy top-k load estimate (cuda/load_estimate.cu states it), shared by the
CUDA kernels and their CPU twin (binding/cpu/load_estimate.cc) so both compute the same thing.
`Row` is anything indexable by expert that yields fp32 (XftLoadRow: a row of a f32 or bf16 tensor).
*/
#pragma once
#include <math.h>
#include <stdint.h>

#include "xft_math.h"

#define XFT_LOAD_MAX_EXPERTS 256  // N <= this (the ranking is O(N^2) per token)

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

// The backward of one token in two passes over its experts, with no per-expert scratch (a
// per-thread array of N floats would live in local memory on the GPU): xft_load_token_grad sums
// what flows into the two threshold experts, then xft_load_expert_grad gives each expert's
// dclean_i and dc_i (before the sigmoid of z). g_i = dload_i phi(u_i) / c_i as in the forward's terms.
struct XftLoadTokenGrad {
  int j_out, j_in;      // the experts whose noisy logits are the thresholds
  float thr_out, thr_in;
  float g_out, g_in;    // -sum of g_i over the experts measured against thr_out / thr_in
};

// g_i and u_i of expert i; *in: measured against thr_in
template <typename Row>
XFT_HD float xft_load_expert_g(const Row& clean, const Row& z, const Row& noisy, const float* dload, int i, float eps,
                               const XftLoadTokenGrad& t, float* u, bool* in) {
  const float c = xft_load_softplus(z[i]) + eps;
  *in = noisy[i] > t.thr_in;
  *u = (clean[i] - (*in ? t.thr_in : t.thr_out)) / c;
  return dload[i] * expf(-0.5f * *u * *u) * 0.39894228040143268f / c;
}

// pass 1
template <typename Row>
XFT_HD XftLoadTokenGrad xft_load_token_grad(const Row& clean, const Row& z, const Row& noisy, const float* dload, int N,
                                            int k, float eps) {
  XftLoadTokenGrad t;
  xft_load_thresholds(noisy, N, k, &t.j_out, &t.j_in);
  t.thr_in = noisy[t.j_in];
  t.thr_out = noisy[t.j_out];
  t.g_in = 0.f;
  t.g_out = 0.f;
  for (int i = 0; i < N; i++) {
    float u;
    bool in;
    const float g = xft_load_expert_g(clean, z, noisy, dload, i, eps, t, &u, &in);
    if (in) t.g_in -= g;
    else t.g_out -= g;
  }
  return t;
}

// pass 2: dclean_i = g_i (+ g_j when i is the threshold expert j, j_in or j_out), dc_i = -g_i u_i
// (+ g_j n_i, its noise draw n_i = xft_normal(seed, base + i): noisy_i = clean_i + n_i c_i);
// j_in != j_out since 1 <= k < N
template <typename Row>
XFT_HD void xft_load_expert_grad(const Row& clean, const Row& z, const Row& noisy, const float* dload, int i, float eps,
                                 uint64_t seed, uint64_t base, const XftLoadTokenGrad& t, float* dclean, float* dc) {
  float u;
  bool in;
  const float g = xft_load_expert_g(clean, z, noisy, dload, i, eps, t, &u, &in);
  float dcl = g, dci = -g * u;
  if (i == t.j_in || i == t.j_out) {  // one draw site (two would each keep a local-memory frame on the GPU)
    const float gj = i == t.j_in ? t.g_in : t.g_out;
    dcl += gj;
    dci += gj * xft_normal(seed, base + i);
  }
  *dclean = dcl;
  *dc = dci;
}
