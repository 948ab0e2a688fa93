/*
CPU twin of cuda/merge.cu: the per-layer mixing-coefficient merge of XFT.md.
  coefficients: shared_rate λ >= 0: c_0 = λ, c_i = (1 - λ) softmax(alpha)_{i-1}, alpha [E - 1]
                shared_rate < 0:    c = softmax(alpha), alpha [E]  (learned soup, no fixed rate)
  forward:  merged[t][j] = sum_e c_e * weights[t][e, j]                    (fp32 accumulation)
  backward: G_e = sum_t <dmerged[t], weights[t][e]>  (double accumulation here)
            λ >= 0: dalpha_{i-1} = (1 - λ) s_{i-1} (G_i - sum_j s_j G_{j+1}),  s = softmax(alpha)
            λ < 0:  dalpha_i = c_i (G_i - sum_j c_j G_j)
*/
#include <math.h>

#include <vector>

#include "xft_cpu.h"

namespace {

// mixing coefficients c [E] from alpha; also the softmax s of alpha (length E - 1 or E)
void coefficients(const float* alpha, int E, float shared_rate, std::vector<double>& c, std::vector<double>& s) {
  int A = shared_rate >= 0.f ? E - 1 : E;
  s.assign(A, 0.0);
  c.assign(E, 0.0);
  double m = -INFINITY, sum = 0.0;
  for (int i = 0; i < A; i++) m = fmax(m, (double)alpha[i]);
  for (int i = 0; i < A; i++) sum += (s[i] = exp((double)alpha[i] - m));
  for (int i = 0; i < A; i++) s[i] /= sum;
  if (shared_rate >= 0.f) {
    c[0] = shared_rate;
    for (int i = 1; i < E; i++) c[i] = (1.0 - shared_rate) * s[i - 1];
  } else {
    for (int i = 0; i < E; i++) c[i] = s[i];
  }
}

}  // namespace

int xft_cpu_merge_forward(const void* const* weights, void* const* merged, const size_t* numel,
                          int count, int dtype, int E, const float* alpha, float shared_rate) {
  std::vector<double> c, s;
  coefficients(alpha, E, shared_rate, c, s);
  std::vector<float> cf(c.begin(), c.end());
  for (int t = 0; t < count; t++) {
    size_t n = numel[t];
    for (size_t j = 0; j < n; j++) {
      float acc = 0.f;
      for (int e = 0; e < E; e++) acc += cf[e] * xft_cpu::load(weights[t], dtype, (size_t)e * n + j);
      xft_cpu::store(merged[t], dtype, j, acc);
    }
  }
  return 0;
}

int xft_cpu_merge_backward(const void* const* weights, const void* const* dmerged, const size_t* numel,
                           int count, int dtype, int E, const float* alpha, float shared_rate,
                           float* dalpha, int accumulate) {
  std::vector<double> c, s, G(E, 0.0);
  coefficients(alpha, E, shared_rate, c, s);
  for (int t = 0; t < count; t++) {
    size_t n = numel[t];
    for (int e = 0; e < E; e++) {
      double acc = 0.0;
      for (size_t j = 0; j < n; j++)
        acc += (double)xft_cpu::load(dmerged[t], dtype, j) * xft_cpu::load(weights[t], dtype, (size_t)e * n + j);
      G[e] += acc;
    }
  }
  if (shared_rate >= 0.f) {
    double mean = 0.0;
    for (int i = 1; i < E; i++) mean += s[i - 1] * G[i];
    for (int i = 1; i < E; i++) {
      float d = (float)((1.0 - shared_rate) * s[i - 1] * (G[i] - mean));
      dalpha[i - 1] = accumulate ? dalpha[i - 1] + d : d;
    }
  } else {
    double mean = 0.0;
    for (int i = 0; i < E; i++) mean += c[i] * G[i];
    for (int i = 0; i < E; i++) {
      float d = (float)(c[i] * (G[i] - mean));
      dalpha[i] = accumulate ? dalpha[i] + d : d;
    }
  }
  return 0;
}
