/*
The differentiable load of the balance loss under router noise: the noisy top-k estimate of
Shazeer et al. (2017), as the XFT reference's noisy gate computes it (with one difference, below).

Per token t, over its N router logits with k selected (1 <= k < N):
  c_i     = softplus(z_i) + eps                      the noise scale (z = x W_noise)
  noisy_i = clean_i + n_i c_i                        the logits routing selected from (router noise)
  thr_out = the k-th largest noisy logit, thr_in = the (k+1)-th largest (ties: the lower index
            ranks higher, as in routing)
  prob_i  = Phi((clean_i - thr_i) / c_i),  thr_i = thr_in if noisy_i > thr_in else thr_out:
            the probability that expert i stays selected when its own noise is drawn again
  load_i  = sum_t prob_{t,i}                         f32 [N], summed in token order per expert
The reference decides "noisy_i > thr_in" on the noise term alone (logits_noise > threshold); here it
is decided on the noisy logit, as in Shazeer et al.

Backward from dload [N]: with u = (clean_i - thr_i)/c_i, phi = N(0,1) density, g_i = dload_i phi(u)/c_i:
  dclean_i += g_i;   dc_i += -g_i u;   and thr_i, the noisy logit of expert j_in or j_out, gets -g_i,
  which flows to clean_j (+1) and to c_j (n_j = xft_normal(seed, t N + j), the forward's noise);
  dz = dc sigmoid(z).
Layout: clean, z, noisy, dclean, dz [T, N] row-major (f32 or bf16, fp32 math); prob f32 [T, N] is
the forward's per-token probabilities (scratch for the reduction). One thread per token (N <= 256;
the backward keeps no per-expert array: two passes over the token's experts, no local memory);
the reduction over tokens is one block per expert in a fixed order (deterministic).
*/
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "xft_cuda.h"
#include "xft_math.h"
#include "load_estimate.h"

extern "C" cudaStream_t xft_cuda_stream(void);

namespace {

constexpr int kTokenThreads = 128;
constexpr int kReduceThreads = 256;

__global__ void load_estimate_token_kernel(const void* clean, const void* z, const void* noisy, int dtype, int T, int N,
                                           int k, float eps, float* prob) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const size_t base = (size_t)t * N;
  XftLoadRow c{clean, dtype, base}, zr{z, dtype, base}, v{noisy, dtype, base};
  xft_load_estimate_token(c, zr, v, N, k, eps, prob + base);
}

__global__ void load_estimate_sum_kernel(const float* prob, int T, int N, float* load) {
  // expert blockIdx.x: thread j sums tokens j, j + blockDim, ... in order; then a fixed tree
  __shared__ float part[kReduceThreads];
  const int i = blockIdx.x;
  float s = 0.f;
  for (int t = threadIdx.x; t < T; t += blockDim.x) s += prob[(size_t)t * N + i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) load[i] = part[0];
}

__global__ void load_estimate_backward_kernel(const void* clean, const void* z, const void* noisy, const float* dload,
                                              int dtype, int T, int N, int k, float eps, uint64_t seed, void* dclean,
                                              void* dz) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const size_t base = (size_t)t * N;
  XftLoadRow c{clean, dtype, base}, zr{z, dtype, base}, v{noisy, dtype, base};
  const XftLoadTokenGrad g = xft_load_token_grad(c, zr, v, dload, N, k, eps);
  for (int i = 0; i < N; i++) {
    float dcl, dc;
    xft_load_expert_grad(c, zr, v, dload, i, eps, seed, base, g, &dcl, &dc);
    xft_store_value(dclean, dtype, base + i, dcl);
    xft_store_value(dz, dtype, base + i, dc / (1.f + expf(-zr[i])));
  }
}

}  // namespace

extern "C" int xft_cuda_load_estimate_forward(const void* clean, const void* z, const void* noisy, int dtype, int T, int N,
                                              int k, float eps, float* prob, float* load) {
  if (N <= 0) return 0;
  cudaStream_t stream = xft_cuda_stream();
  if (T > 0) load_estimate_token_kernel<<<(T + kTokenThreads - 1) / kTokenThreads, kTokenThreads, 0, stream>>>(clean, z, noisy, dtype, T, N, k, eps, prob);
  load_estimate_sum_kernel<<<N, kReduceThreads, 0, stream>>>(prob, T, N, load);
  return cudaGetLastError();
}

extern "C" int xft_cuda_load_estimate_backward(const void* clean, const void* z, const void* noisy, const float* dload,
                                               int dtype, int T, int N, int k, float eps, uint64_t seed, void* dclean,
                                               void* dz) {
  if (T <= 0 || N <= 0) return 0;
  load_estimate_backward_kernel<<<(T + kTokenThreads - 1) / kTokenThreads, kTokenThreads, 0, xft_cuda_stream()>>>(
      clean, z, noisy, dload, dtype, T, N, k, eps, seed, dclean, dz);
  return cudaGetLastError();
}
