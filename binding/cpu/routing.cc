/*
CPU twin of cuda/routing.cu: shared-expert routing with routing weight normalization (XFT.md).

Per token t, with z = logits[t] (N columns, fp32) and p = softmax(z):
  selection: the S largest logits, in descending order, ties toward the lower column
             (S = K - 1 with a shared expert, S = K without); selecting on z, not p, makes the
             choice identical on CPU and GPU, since softmax is monotonic.
  shared, normalize:  g_0 = 1 - p_1,  g_{i_j} = p_1 * softmax(p_1..p_S)_j        (sum g = 1)
  shared, !normalize: g_0 = 1 - p_1,  g_{i_j} = p_j                              (paper ablation)
  no shared expert:   g_{i_j} = softmax(z_{i_1}..z_{i_S})_j                      (vanilla upcycling)
experts[t] = [i_1 + 1, ..., i_S + 1, 0] with a shared expert, [i_1, ..., i_S] without.
importance[j] = sum over tokens selecting column j of its score: p_j with a shared expert, g_j (the
top-K renormalized weight) without, as the reference's gates (TopKUniversalBalanced*NoisyGate sum the
selected p, TopKBalancedNoisyGate the selected softmax scores); load[j] = their count.
counts/offsets/order: a stable counting sort of the T*K (token, slot) pairs by expert.

Backward (dweights = dL/dg, dimportance = dL/dimportance or none), per token, q = softmax(p_sel).
experts come from the caller: binding/xft_ops.cc rejects an expert outside the logit columns
(XFT_INDEX) before this runs; here it is clamped, as in the kernel, so nothing reads or writes
out of bounds even so.
  normalize:  dp_{i_m} = p_1 q_m (dg_m - sum_j q_j dg_j),  dp_{i_1} += sum_j q_j dg_j - dg_0
  !normalize: dp_{i_m} = dg_m,                             dp_{i_1} -= dg_0
  shared:     dp_{i_m} += dimportance_{i_m};   dz = p * (dp - <p, dp>)
  no shared:  importance sums g, so its gradient joins dg: dg'_m = dg_m + dimportance_{i_m},
              dz_{i_m} = g_m (dg'_m - <g, dg'>)  (dp = 0)
  probs (optional forward output) f32 [N] = sum over tokens of the full softmax p_j, the P_i of the
  Switch balance loss; its gradient dprobs (optional) joins dp for every column: dp_j += dprobs_j.

Switch balance loss (Fedus et al. 2021, the L_load of UpIT, Mixtral's load_balancing_loss):
  f_i = load_i / (T S) (fraction of the token->expert assignments), P_i = probs_i / T,
  loss = weight N sum_i f_i P_i (1 under uniform routing);  dprobs_i = dloss weight N f_i / T
  (f is a constant, as in Switch and Mixtral: the gradient reaches the logits through P only).
*/
#include <math.h>

#include <algorithm>
#include <vector>

#include "xft_cpu.h"

namespace {

// indices of the S largest values of z[0..N), descending, ties toward the lower index
void select_top(const float* z, int N, int S, int* sel) {
  std::vector<char> taken(N, 0);
  for (int s = 0; s < S; s++) {
    int best = -1;
    for (int j = 0; j < N; j++) {
      if (taken[j]) continue;
      if (best < 0 || z[j] > z[best]) best = j;
    }
    taken[best] = 1;
    sel[s] = best;
  }
}

void softmax(const float* z, int n, float* p) {
  float m = -INFINITY;
  for (int j = 0; j < n; j++) m = fmaxf(m, z[j]);
  float sum = 0.f;
  for (int j = 0; j < n; j++) sum += (p[j] = expf(z[j] - m));
  for (int j = 0; j < n; j++) p[j] /= sum;
}

}  // namespace

int xft_cpu_route_forward(const void* logits, int dtype, int T, int N, int K, int normalize, int shared,
                          int* experts, float* weights, int* counts, int* offsets, int* order,
                          float* importance, float* load, float* probs) {
  const int S = shared ? K - 1 : K, E = shared ? N + 1 : N;
  std::vector<float> z(N), p(N), q(K), zs(K);
  std::vector<int> sel(K);
  for (int j = 0; j < N; j++) importance[j] = load[j] = 0.f;
  if (probs)
    for (int j = 0; j < N; j++) probs[j] = 0.f;
  for (int e = 0; e < E; e++) counts[e] = 0;
  for (int t = 0; t < T; t++) {
    xft_cpu::to_f32(z.data(), (const char*)logits + (size_t)t * N * (dtype == XFT_BF16 ? 2 : 4), dtype, N);
    softmax(z.data(), N, p.data());
    if (probs)
      for (int j = 0; j < N; j++) probs[j] += p[j];
    select_top(z.data(), N, S, sel.data());
    int* ex = experts + (size_t)t * K;
    float* g = weights + (size_t)t * K;
    if (shared) {
      float p1 = p[sel[0]];
      if (normalize) {
        for (int j = 0; j < S; j++) zs[j] = p[sel[j]];
        softmax(zs.data(), S, q.data());
        for (int j = 0; j < S; j++) g[j] = p1 * q[j];
      } else {
        for (int j = 0; j < S; j++) g[j] = p[sel[j]];
      }
      for (int j = 0; j < S; j++) ex[j] = sel[j] + 1;
      ex[K - 1] = 0;
      g[K - 1] = 1.f - p1;
    } else {
      for (int j = 0; j < S; j++) zs[j] = z[sel[j]];
      softmax(zs.data(), S, g);
      for (int j = 0; j < S; j++) ex[j] = sel[j];
    }
    for (int j = 0; j < S; j++) {
      importance[sel[j]] += shared ? p[sel[j]] : g[j];
      load[sel[j]] += 1.f;
    }
    for (int s = 0; s < K; s++) counts[ex[s]]++;
  }
  offsets[0] = 0;
  for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
  std::vector<int> cursor(offsets, offsets + E);
  for (int t = 0; t < T; t++)
    for (int s = 0; s < K; s++) order[cursor[experts[(size_t)t * K + s]]++] = t * K + s;
  return 0;
}

int xft_cpu_route_backward(const void* logits, int dtype, int T, int N, int K, int normalize, int shared,
                           const int* experts, const float* dweights, const float* dimportance,
                           void* dlogits, const float* dprobs) {
  const int S = shared ? K - 1 : K;
  std::vector<float> z(N), p(N), dp(N), dz(N), q(K), zs(K), g(K);
  std::vector<int> sel(K);
  for (int t = 0; t < T; t++) {
    xft_cpu::to_f32(z.data(), (const char*)logits + (size_t)t * N * (dtype == XFT_BF16 ? 2 : 4), dtype, N);
    softmax(z.data(), N, p.data());
    const int* ex = experts + (size_t)t * K;
    const float* dg = dweights + (size_t)t * K;
    // clamped as the kernel does (memory safety only: the binding rejects such experts first)
    for (int j = 0; j < S; j++) sel[j] = std::min(std::max(shared ? ex[j] - 1 : ex[j], 0), N - 1);
    for (int j = 0; j < N; j++) {
      dp[j] = dprobs ? dprobs[j] : 0.f;
      dz[j] = 0.f;
    }
    // per slot: d (the slot's dp, summed as the kernel does), then dp[col] += d
    if (shared) {
      float a = 0.f, p1 = p[sel[0]];
      if (normalize) {
        for (int j = 0; j < S; j++) zs[j] = p[sel[j]];
        softmax(zs.data(), S, q.data());
        for (int j = 0; j < S; j++) a += q[j] * dg[j];
      }
      for (int m = 0; m < S; m++) {
        float d;
        if (normalize) {
          d = p1 * q[m] * (dg[m] - a);
          if (m == 0) d += a - dg[K - 1];
        } else {
          d = dg[m];
          if (m == 0) d = d - dg[K - 1];
        }
        if (dimportance) d += dimportance[sel[m]];
        dp[sel[m]] += d;
      }
    } else {
      for (int j = 0; j < S; j++) zs[j] = z[sel[j]];
      softmax(zs.data(), S, g.data());
      for (int j = 0; j < S; j++) q[j] = dg[j] + (dimportance ? dimportance[sel[j]] : 0.f);
      float a = 0.f;
      for (int j = 0; j < S; j++) a += g[j] * q[j];
      for (int m = 0; m < S; m++) dz[sel[m]] = g[m] * (q[m] - a);
    }
    float pdp = 0.f;
    for (int j = 0; j < N; j++) pdp += p[j] * dp[j];
    char* out = (char*)dlogits + (size_t)t * N * (dtype == XFT_BF16 ? 2 : 4);
    for (int j = 0; j < N; j++) xft_cpu::store(out, dtype, j, dz[j] + p[j] * (dp[j] - pdp));
  }
  return 0;
}

int xft_cpu_switch_loss_forward(const float* probs, const float* load, int N, int T, int S, float weight, float* loss) {
  double acc = 0.0;
  if (T > 0)
    for (int i = 0; i < N; i++) acc += (double)load[i] * (double)probs[i];
  loss[0] = T > 0 ? (float)((double)weight * N * acc / ((double)T * S * (double)T)) : 0.f;
  return 0;
}

int xft_cpu_switch_loss_backward(const float* load, int N, int T, int S, float weight, float dloss, float* dprobs) {
  for (int i = 0; i < N; i++)
    dprobs[i] = T > 0 ? (float)((double)dloss * weight * N * (double)load[i] / ((double)T * S * (double)T)) : 0.f;
  return 0;
}
