/*
The whole interface between the binding and the CUDA backend. Plain C types only, so the
binding (g++) and the kernels (nvcc) agree on it without sharing CUDA headers.

Conventions
- Every function returns 0 on success or a cudaError_t value; xft_cuda_error_string(e) names it.
- Pointers are device pointers unless the argument says "host".
- Work is enqueued on one stream owned by the runtime (xft_cuda_stream) and returns without
  waiting; only the d2h copy and xft_cuda_synchronize wait.
- Shapes are row-major. dtype is an xft_dtype (xft_math.h): F32, BF16 or I32.
- Parameter gradients marked "accumulate" add into the output when accumulate != 0 and
  overwrite it otherwise; activation gradients always overwrite.
The CPU backend (binding/cpu/*.h) has a twin of every op with the same name, arguments and
semantics, with the prefix xft_cpu_ instead of xft_cuda_.
*/
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct xft_cuda_device {
  char name[256];
  int ordinal;
  int major, minor;          // compute capability
  int multiprocessors;
  size_t total_memory;       // bytes
  size_t free_memory;        // bytes, at the time of the query
  int driver_version;        // e.g. 13000
  int runtime_version;
} xft_cuda_device;

// ---- runtime (cuda/runtime.cu) ----
const char* xft_cuda_error_string(int err);
int xft_cuda_device_count(int* count);                 // 0 devices (or no driver) is not an error
int xft_cuda_init(int ordinal, xft_cuda_device* info); // select device, create stream and pool
int xft_cuda_query(xft_cuda_device* info);             // refresh info (free memory)
int xft_cuda_malloc(void** ptr, size_t bytes);         // stream-ordered pool allocation
int xft_cuda_free(void* ptr);                          // stream-ordered release to the pool
int xft_cuda_memcpy_h2d(void* dst, const void* host_src, size_t bytes); // host_src reusable on return
int xft_cuda_memcpy_d2h(void* host_dst, const void* src, size_t bytes); // waits for the stream
int xft_cuda_memcpy_d2d(void* dst, const void* src, size_t bytes);
int xft_cuda_memset(void* dst, int byte, size_t bytes);
int xft_cuda_synchronize(void);
int xft_cuda_check(void);                              // last launch error, without waiting
int xft_cuda_pool_stats(size_t* used_bytes, size_t* reserved_bytes);
int xft_cuda_pool_trim(void);                          // release unused pool memory to the driver

// ---- tensor fills and casts (cuda/fill.cu) ----
// kind 0: uniform in [a, b); kind 1: normal with mean a and std b. Element i depends on (seed, i) only.
int xft_cuda_fill_random(void* out, int dtype, size_t n, int kind, uint64_t seed, float a, float b);
int xft_cuda_fill_value(void* out, int dtype, size_t n, double value);
int xft_cuda_cast(void* out, int out_dtype, const void* in, int in_dtype, size_t n);

// ---- shared-expert routing with weight normalization (cuda/routing.cu) ----
// logits [T, N] (f32 or bf16), computed in fp32. With shared != 0 (XFT): E = N + 1 experts,
// expert 0 shared, logit column j is expert j + 1, K - 1 normal experts per token (1 <= K-1 <= N).
// With shared == 0 (vanilla sparse upcycling ablation): E = N, top-K of all experts, weights
// softmax over the selected logits (normalize ignored).
// Outputs: experts i32 [T, K], weights f32 [T, K], counts i32 [E], offsets i32 [E + 1],
// order i32 [T * K] (pairs t*K + s sorted by expert, then token), importance f32 [N], load f32 [N]
// (importance[j] = sum over tokens selecting logit column j of p_j; load[j] = their count).
// Ties in logits break toward the lower index.
int xft_cuda_route_forward(const void* logits, int dtype, int T, int N, int K, int normalize, int shared,
                           int* experts, float* weights, int* counts, int* offsets, int* order,
                           float* importance, float* load);
// dweights f32 [T, K]; dimportance f32 [N] or NULL; dlogits [T, N] in the logits dtype (overwrite).
int xft_cuda_route_backward(const void* logits, int dtype, int T, int N, int K, int normalize, int shared,
                            const int* experts, const float* dweights, const float* dimportance,
                            void* dlogits);

// ---- grouped expert GEMM (cuda/grouped_gemm.cu) ----
// x [M, k], w [E, n, k], offsets i32 [E + 1] (0 = o_0 <= ... <= o_E = M), y [M, n]:
// y[o_e:o_{e+1}] = x[o_e:o_{e+1}] @ w[e]^T. x, w, y, dy, dx share dtype (f32 or bf16); fp32 accumulation.
int xft_cuda_grouped_gemm_forward(const void* x, const void* w, const int* offsets, void* y,
                                  int dtype, int M, int n, int k, int E);
// dx [M, k] = dy @ w[e] per group (overwrite; skipped when dx is NULL);
// dw [E, n, k] = dy_e^T @ x_e (accumulate; zero for empty groups; skipped when dw is NULL).
int xft_cuda_grouped_gemm_backward(const void* x, const void* w, const int* offsets, const void* dy,
                                   void* dx, void* dw, int dtype, int M, int n, int k, int E,
                                   int accumulate);

// ---- mixing-coefficient merge (cuda/merge.cu) ----
// count tensors, tensor t an expert stack weights[t] of shape [E, numel[t]] (all of one dtype),
// merged[t] [numel[t]] = sum_e c_e * weights[t][e]. alpha f32 device [E - 1] (shared_rate in [0, 1]:
// c_0 = shared_rate, c_i = (1 - shared_rate) softmax(alpha)_{i-1}) or [E] (shared_rate < 0:
// c = softmax(alpha), no fixed shared rate). weights, merged, numel are host arrays of pointers/sizes.
int xft_cuda_merge_forward(const void* const* weights, void* const* merged, const size_t* numel,
                           int count, int dtype, int E, const float* alpha, float shared_rate);
// dalpha f32 device, same length as alpha (accumulate): with G_i = sum_t <dmerged[t], weights[t][i]>,
// dalpha_i = dc_i/dalpha . G (the softmax Jacobian; see merge.cu).
int xft_cuda_merge_backward(const void* const* weights, const void* const* dmerged, const size_t* numel,
                            int count, int dtype, int E, const float* alpha, float shared_rate,
                            float* dalpha, int accumulate);

// ---- [layers] supporting kernels of a Llama layer: embedding, rmsnorm, rope, swiglu, elementwise ----
// (declarations of cuda/{embedding,rmsnorm,rope,swiglu,elementwise}.cu go here)
// ---- [/layers] ----

// ---- [train] attention, cross-entropy, AdamW, MoE permutation, balance loss ----
// (declarations of cuda/{attention,cross_entropy,adamw,moe_permute}.cu go here)
// ---- [/train] ----

#ifdef __cplusplus
}
#endif
