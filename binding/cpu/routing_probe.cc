/*
CPU twin of cuda/routing_probe.cu: UpIT's routing-vector loss on one layer's probe logits, fused with
its gradient. h [N] (f32 or bf16) = x r^T, targets i32 [N], m = (targets >= 0):
  stats[0] += sum(m * softplus(-h)),  stats[1] += sum(m * sigmoid(h)),  stats[2] += sum(m)   (accumulate)
  dh = m * -sigmoid(-h) * scale                                   (overwrite, h's dtype; NULL: skipped)
softplus(z) = max(z, 0) + log1p(exp(-|z|)), sigmoid(z) = 1 / (1 + exp(-z)); per-token values in fp32,
sums in fp64 in token order (the CUDA kernel's fixed order differs: the sums agree to rounding).
*/
#include <math.h>

#include "xft_cpu.h"

namespace {

inline float probe_softplus(float z) { return fmaxf(z, 0.f) + log1pf(expf(-fabsf(z))); }
inline float probe_sigmoid(float z) { return 1.f / (1.f + expf(-z)); }

}  // namespace

int xft_cpu_routing_probe(const void* h, const int* targets, void* dh, float* stats, int dtype, int N, float scale) {
  if (N < 0) return 1;
  double loss = 0.0, sig = 0.0, count = 0.0;
  for (int t = 0; t < N; t++) {
    const float z = xft_cpu::load(h, dtype, (size_t)t);
    float g = 0.f;
    if (targets[t] >= 0) {
      loss += (double)probe_softplus(-z);
      sig += (double)probe_sigmoid(z);
      count += 1.0;
      g = -probe_sigmoid(-z) * scale;
    }
    if (dh) xft_cpu::store(dh, dtype, (size_t)t, g);
  }
  stats[0] += (float)loss;
  stats[1] += (float)sig;
  stats[2] += (float)count;
  return 0;
}
