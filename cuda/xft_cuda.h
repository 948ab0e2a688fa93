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
The CPU backend (binding/cpu/xft_cpu.h) has a twin of every op with the same name, arguments and
semantics, with the prefix xft_cpu_ instead of xft_cuda_.
*/
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "optim.h"
#include "step.h"

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

// What the host offers, asked before the backend is chosen (binding/addon.cc turns it into backend()'s
// reason when the GPU cannot be used; lib/backend_reason.ts words it).
typedef struct xft_cuda_probe_result {
  int error;                // cudaGetDeviceCount's error (0 none; 35 cudaErrorInsufficientDriver: driver too old)
  int device_count;
  int driver_version;       // the newest CUDA the driver supports, e.g. 12040 (0: no driver could be loaded)
  int runtime_version;      // the CUDA runtime this build links, e.g. 13000
  int ordinal;              // the device asked for; major.minor its compute capability (0.0 when not queried)
  int major, minor;
  int max_smem_optin;       // cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes (0 when not queried)
  char name[256];
  char driver_release[32];  // the kernel module's version, e.g. "550.54.15" ("" when unknown)
} xft_cuda_probe_result;

// ---- runtime (cuda/runtime.cu) ----
const char* xft_cuda_error_string(int err);
const char* xft_cuda_error_name(int err);              // e.g. "cudaErrorInsufficientDriver"
int xft_cuda_probe(int ordinal, xft_cuda_probe_result* out);  // fills out; never fails
int xft_cuda_device_count(int* count);                 // 0 devices (or no driver) is not an error
int xft_cuda_init(int ordinal, xft_cuda_device* info); // select device, create stream and pool
int xft_cuda_query(xft_cuda_device* info);             // refresh info (free memory)
int xft_cuda_malloc(void** ptr, size_t bytes);         // stream-ordered pool allocation
int xft_cuda_free(void* ptr);                          // stream-ordered release to the pool
int xft_cuda_memcpy_h2d(void* dst, const void* host_src, size_t bytes); // host_src reusable on return (pinned staging)
int xft_cuda_memcpy_d2h(void* host_dst, const void* src, size_t bytes); // waits for the stream
int xft_cuda_memcpy_d2d(void* dst, const void* src, size_t bytes);
int xft_cuda_memset(void* dst, int byte, size_t bytes);
int xft_cuda_synchronize(void);
int xft_cuda_check(void);                              // last launch error, without waiting
int xft_cuda_pool_stats(size_t* used_bytes, size_t* reserved_bytes);
// Host waits since the start (memoryStats): a training step between two log points makes none.
//   host_syncs     stream synchronisations (each d2h copy, synchronize, trimPool, an unpinned h2d)
//   d2h_copies     device -> host copies (each also a host sync)
//   staging_waits  h2d uploads that found their pinned staging buffer still in flight (the host waited)
//   launches       kernel launches (the emulated backend counts them; -1 on a GPU)
typedef struct xft_cuda_sync_stats {
  unsigned long long host_syncs, d2h_copies, staging_waits;
  long long launches;
} xft_cuda_sync_stats;
void xft_cuda_get_sync_stats(xft_cuda_sync_stats* out);
// CUDA graphs (cuda/runtime.cu): capture the stream's work between begin and end (nothing runs; a
// synchronisation, device -> host copy or staged upload inside fails the capture), then replay it
// with one launch per call. handle >= 1; at most 64 graphs live.
int xft_cuda_graph_begin(void);
int xft_cuda_graph_end(int* handle);
int xft_cuda_graph_launch(int handle);
int xft_cuda_graph_destroy(int handle);
int xft_cuda_pool_trim(void);                          // release unused pool memory to the driver

// Index faults. A kernel that meets an index outside its range (e.g. routing.experts holding 1e6)
// skips the access and records it in one small device record; the record comes back with every
// d2h copy, xft_cuda_synchronize and xft_cuda_pool_trim (the points where the stream already
// waits), and xft_cuda_take_fault hands it over once and clears it. The binding turns it into an
// XFT_INDEX error there. The first op (in stream order) to fault since the last wait is kept, with
// its smallest faulting index, so the report is deterministic.
enum xft_fault_kind {
  XFT_FAULT_NONE = 0,
  XFT_FAULT_ROUTE_EXPERTS = 1,  // route_backward: experts[index] = value outside [shared, N + shared); bound = N
  XFT_FAULT_EMBEDDING_IDS = 2,  // embedding forward/backward: ids[index] = value outside [0, bound = V)
};
typedef struct xft_cuda_fault {
  int kind;   // xft_fault_kind
  int index;  // flat element index into the index tensor
  int value;  // the value found there
  int bound;  // the range it broke: N (logit columns) for experts, V for ids
} xft_cuda_fault;
// The device record (zeroed = no fault): worst = ~((index << 32) | (uint32)value), kept by atomicMax,
// so the smallest index wins.
typedef struct xft_cuda_fault_slot {
  int kind;
  int bound;
  unsigned long long worst;
} xft_cuda_fault_slot;
// The device pointer kernels record faults through (set by xft_cuda_init; NULL before).
xft_cuda_fault_slot* xft_cuda_fault_record(void);
// The fault seen at the last synchronisation (kind 0 if none); clears it on host and device.
int xft_cuda_take_fault(xft_cuda_fault* out);

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
// (importance[j] = sum over tokens selecting logit column j of p_j; load[j] = their count);
// probs f32 [N] or NULL: sum over all tokens of the full softmax p_j (the Switch loss's P).
// Ties in logits break toward the lower index.
int xft_cuda_route_forward(const void* logits, int dtype, int T, int N, int K, int normalize, int shared,
                           int* experts, float* weights, int* counts, int* offsets, int* order,
                           float* importance, float* load, float* probs);
// dweights f32 [T, K]; dimportance f32 [N] or NULL; dprobs f32 [N] or NULL (dL/dprobs);
// dlogits [T, N] in the logits dtype (overwrite).
int xft_cuda_route_backward(const void* logits, int dtype, int T, int N, int K, int normalize, int shared,
                            const int* experts, const float* dweights, const float* dimportance,
                            void* dlogits, const float* dprobs);
// Switch balance loss (cuda/routing.cu): loss f32 [1] = weight N sum_i (load_i / (T S)) (probs_i / T),
// S = experts selected per token; dprobs f32 [N] = dloss weight N load_i / (T S T) (load a constant).
int xft_cuda_switch_loss_forward(const float* probs, const float* load, int N, int T, int S, float weight, float* loss);
int xft_cuda_switch_loss_backward(const float* load, int N, int T, int S, float weight, float dloss, float* dprobs);

// ---- grouped expert GEMM (cuda/grouped_gemm.cu) ----
// x [M, k], w [E, n, k], offsets i32 [E + 1] (0 = o_0 <= ... <= o_E = M), y [M, n]:
// y[o_e:o_{e+1}] = x[o_e:o_{e+1}] @ w[e]^T. x, w, y, dy, dx share dtype (f32 or bf16); fp32 accumulation.
// Other offsets are memory safe and fully defined: each is clamped to [0, M] and raised to the
// running maximum (o'_e = max(o'_{e-1}, clamp(o_e))), group e is rows o'_e .. o'_{e+1}, and rows
// outside [o'_0, o'_E) of y and dx are zero.
int xft_cuda_grouped_gemm_forward(const void* x, const void* w, const int* offsets, void* y,
                                  int dtype, int M, int n, int k, int E);
// dx [M, k] = dy @ w[e] per group (overwrite, or with dx_accumulate dx = round(dx + dy @ w[e]) and rows
// outside the groups unchanged: the dx of q, k, v summed in the GEMM epilogue; skipped when dx is NULL);
// dw [E, n, k] = dy_e^T @ x_e (accumulate; zero for empty groups; skipped when dw is NULL), stored in
// dw_dtype: dtype, or F32 with bf16 inputs (the fp32 accumulators unrounded: f32 gradients of bf16 weights).
int xft_cuda_grouped_gemm_backward(const void* x, const void* w, const int* offsets, const void* dy,
                                   void* dx, void* dw, int dtype, int dw_dtype, int M, int n, int k, int E,
                                   int accumulate, int dx_accumulate);

// ---- the fused SwiGLU FFN GEMMs (cuda/grouped_gemm.cu): gate and up as one grouped GEMM ----
// Rows, offsets and groups as the grouped GEMM. w_gate, w_up [E, f, d], w_down [E, d, f] (HF layout, one
// matrix per expert); gu [M, 2f] holds g = gu[:, :f] and u = gu[:, f:]; all of one dtype (f32 or bf16).
// gather: NULL (GEMM row i reads x[i], x [M, d], S = M) or i32 [M] (row i reads x[gather[i] / gather_div],
// x [S, d]: the MoE reads x through the routing order with gather_div = K; a zero row where the index
// is negative or the row is outside [0, S)).
// g = x_i @ w_gate[e]^T, u = x_i @ w_up[e]^T (fp32 accumulation, rounded to dtype),
// h [M, f] = silu(g) * u from the rounded g, u (exactly swiglu_forward of them). Rows outside the groups: zeros.
int xft_cuda_gateup_forward(const void* x, const int* gather, int gather_div, int S, const void* w_gate,
                            const void* w_up, const int* offsets, void* gu, void* h, int dtype, int M, int f, int d,
                            int E);
// dh = dy @ w_down[e] ([M, d] @ [d, f], rounded to dtype, never stored), then exactly swiglu_backward:
// dgu[:, :f] = dg, dgu[:, f:] = du from g, u = gu, and h [M, f] = silu(g) * u recomputed (dW_down's input).
int xft_cuda_swiglu_down_backward(const void* dy, const void* w_down, const int* offsets, const void* gu,
                                  void* dgu, void* h, int dtype, int M, int f, int d, int E);
// dx [M, d] = dg @ w_gate[e] + du @ w_up[e], one reduction over the 2f columns of dgu (overwrite, or add with
// dx_accumulate as the grouped GEMM; skipped when NULL); dw_gate, dw_up [E, f, d] (accumulate, dw_dtype as the
// grouped GEMM; both or neither) = dg_e^T @ x_e, du_e^T @ x_e with x read through gather as in the forward.
// q, k, v projections as one GEMM (cuda/grouped_gemm.cu kQkv): x [M, d], wq [nq, d], wk, wv [nk, d] (HF
// layout); offsets i32 [2] (rows o_0 .. o_1 computed, the others zero, as a one-group grouped GEMM);
// q [M, nq] = x wq^T, k, v [M, nk] = x wk^T, x wv^T, each exactly the grouped GEMM's output.
int xft_cuda_qkv_forward(const void* x, const void* wq, const void* wk, const void* wv, const int* offsets,
                         void* q, void* k, void* v, int dtype, int M, int nq, int nk, int d);
int xft_cuda_gateup_backward(const void* x, const int* gather, int gather_div, int S, const void* w_gate,
                             const void* w_up, const int* offsets, const void* dgu, void* dx, void* dw_gate,
                             void* dw_up, int dtype, int dw_dtype, int M, int f, int d, int E, int accumulate,
                             int dx_accumulate);

// ---- small-N linear layers of the router (cuda/router_linear.cu) ----
// x [T, d], w [N, d] with 1 <= N <= 32, y [T, N] = x @ w^T (x, w, y, dy, dx one dtype, fp32 sums).
// The grouped GEMM's contract with E = 1: dx [T, d] = dy @ w (overwrite; skipped when NULL),
// dw [N, d] = dy^T @ x (accumulate; skipped when NULL) in dw_dtype (dtype, or F32 with bf16 inputs).
// Deterministic: fixed summation orders, dw by token slices that depend on T only.
int xft_cuda_router_linear_forward(const void* x, const void* w, void* y, int dtype, int T, int N, int d);
int xft_cuda_router_linear_backward(const void* x, const void* w, const void* dy, void* dx, void* dw, int dtype,
                                    int dw_dtype, int T, int N, int d, int accumulate);

// ---- UpIT's routing-vector loss on a probe's logits (cuda/routing_probe.cu) ----
// h [N] (dtype) = x r^T, targets i32 [N] (a token counts where targets >= 0); stats f32 [3] (accumulate) +=
// (sum softplus(-h), sum sigmoid(h), count) over the counted tokens; dh [N] (dtype, overwrite; skipped when
// NULL) = counted ? -sigmoid(-h) * scale : 0. Deterministic (one block, fixed reduction order).
int xft_cuda_routing_probe(const void* h, const int* targets, void* dh, float* stats, int dtype, int N, float scale);

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
// Activations (x, y, dx, dy, ...) are f32 or bf16 (`dtype`), fp32 arithmetic; parameter gradients
// are f32 with an accumulate flag; activation gradients overwrite.

// embedding (cuda/embedding.cu). ids i32 [R], table [V, d], out [R, d] (table dtype):
// out[r] = table[ids[r]]; a row whose id is outside [0, V) is written as zeros.
int xft_cuda_embedding_forward(const int* ids, const void* table, void* out, int dtype, int R, int V, int d);
// dout [R, d] (dtype), dtable f32 [V, d] (accumulate): dtable[v] = sum over r with ids[r] = v of dout[r],
// summed in token order (deterministic); rows with invalid ids are skipped.
int xft_cuda_embedding_backward(const int* ids, const void* dout, float* dtable, int dtype, int R, int V, int d,
                                int accumulate);

// rmsnorm (cuda/rmsnorm.cu). x [R, d] (dtype), w [d] (w_dtype), y [R, d] (dtype), rstd f32 [R]:
// rstd[r] = 1 / sqrt(mean(x[r]^2) + eps), y[r] = x[r] * rstd[r] * w. 1 <= d <= 8192 (cuda/rmsnorm.cu kMaxD; the binding and lib/ops_layers.ts
// refuse more with XFT_SHAPE); y may alias x.
int xft_cuda_rmsnorm_forward(const void* x, const void* w, void* y, float* rstd, int dtype, int w_dtype, int R,
                             int d, float eps);
// dy, dx [R, d] (dtype; dx overwritten, may alias dy); dw f32 [d] (accumulate; skipped when NULL):
// dx = rstd * (w * dy - x * rstd^2 * mean(w * dy * x)), dw = sum_r dy * x * rstd (deterministic).
int xft_cuda_rmsnorm_backward(const void* x, const void* w, const float* rstd, const void* dy, void* dx, float* dw,
                              int dtype, int w_dtype, int R, int d, int accumulate);

// rope (cuda/rope.cu), Hugging Face Llama (rotate_half): x, out [rows, H * hd] (dtype), heads contiguous
// in a row, row r at position p = r % T; inv_freq_i = theta^(-2i/hd) (i < hd/2; computed on the host in
// double, rounded to fp32), angle = (p / scaling) * inv_freq_i in fp32 (scaling: HF linear rope_scaling
// factor, 1 for none). out[i] = x[i] cos - x[i + hd/2] sin, out[i + hd/2] = x[i + hd/2] cos + x[i] sin.
// hd even, 2 <= hd <= 512. out may alias x (in place).
int xft_cuda_rope_forward(const void* x, void* out, int dtype, int rows, int T, int H, int hd, float theta,
                          float scaling);
// dx = R^T dout (the rotation by -angle); dx may alias dout.
int xft_cuda_rope_backward(const void* dout, void* dx, int dtype, int rows, int T, int H, int hd, float theta,
                           float scaling);

// swiglu (cuda/swiglu.cu). g, u, h [n] (dtype): h = silu(g) * u, silu(g) = g * sigmoid(g).
int xft_cuda_swiglu_forward(const void* g, const void* u, void* h, int dtype, size_t n);
// dg = dh * u * s * (1 + g * (1 - s)), du = dh * silu(g), s = sigmoid(g). dg, du may alias g, u.
int xft_cuda_swiglu_backward(const void* g, const void* u, const void* dh, void* dg, void* du, int dtype, size_t n);

// elementwise (cuda/elementwise.cu), n elements each; outputs may alias inputs of the same dtype.
// y = a + b (one dtype)
int xft_cuda_add(const void* a, const void* b, void* y, int dtype, size_t n);
// y = alpha * x + beta * y, x in x_dtype, y in y_dtype (f32 or bf16); beta == 0 does not read y.
int xft_cuda_axpby(const void* x, int x_dtype, void* y, int y_dtype, size_t n, float alpha, float beta);
// y = tanh(x); dx = dy * (1 - y^2)
int xft_cuda_tanh_forward(const void* x, void* y, int dtype, size_t n);
int xft_cuda_tanh_backward(const void* y, const void* dy, void* dx, int dtype, size_t n);
// router noise: noisy[i] = clean[i] + n_i * (softplus(z[i]) + eps), n_i = xft_normal(seed, i) (xft_math.h),
// softplus(z) = z > 20 ? z : log1p(exp(z)) (torch threshold 20).
int xft_cuda_router_noise_forward(const void* clean, const void* z, void* noisy, int dtype, size_t n,
                                  uint64_t seed, float eps);
// dclean = dnoisy (skipped when NULL), dz = dnoisy * n_i * sigmoid(z)
int xft_cuda_router_noise_backward(const void* z, const void* dnoisy, void* dclean, void* dz, int dtype, size_t n,
                                   uint64_t seed);
// out f32 [1] (device) = sum over count tensors of the sum of squares of their elements (deterministic;
// fp64 accumulation). tensors, numel, dtypes are host arrays (dtype f32 or bf16 per tensor).
int xft_cuda_sum_squares(const void* const* tensors, const size_t* numel, const int* dtypes, int count, float* out);
// ---- [/layers] ----

// ---- [train] attention, cross-entropy, AdamW, Adafactor, MoE permutation, balance loss ----
// attention (cuda/attention.cu): causal multi-head self-attention with grouped-query heads.
// q, out [B*T, H*hd]; k, v [B*T, Hkv*hd] (row b*T + t, head h at columns h*hd..); H % Hkv == 0,
// query head h reads kv head h / (H / Hkv); 1 <= hd <= 128, B, H <= 65535; q, k, v, out, dout, dq, dk, dv share
// dtype (f32 or bf16). bf16 with hd 64 or 128 and 16-byte aligned tensors: tensor cores (bf16 products, fp32
// softmax and accumulation); otherwise fp32 math. scale = 1/sqrt(hd). lse f32 [B, H, T] = logsumexp_j(scale q_i.k_j).
int xft_cuda_attention_forward(const void* q, const void* k, const void* v, void* out, float* lse,
                               int dtype, int B, int T, int H, int Hkv, int hd);
// dq [B*T, H*hd], dk, dv [B*T, Hkv*hd] (overwrite; dk/dv sum over the query heads of a kv head),
// from the forward's out and lse. Deterministic (no atomics).
int xft_cuda_attention_backward(const void* q, const void* k, const void* v, const void* out, const float* lse,
                                const void* dout, void* dq, void* dk, void* dv,
                                int dtype, int B, int T, int H, int Hkv, int hd);

// cross-entropy (cuda/cross_entropy.cu): logits [R, V] (f32 or bf16), targets i32 [R]; a target
// outside [0, V) (negative: the loss mask) ignores the row. losses f32 [R] = logsumexp(z) - z[target]
// (0 where ignored); predictions i32 [R] = argmax (lowest index on ties), for every row.
int xft_cuda_cross_entropy_forward(const void* logits, int dtype, const int* targets, int R, int V,
                                   float* losses, int* predictions);
// dlogits [R, V] (logits dtype, overwrite) = (softmax(z) - onehot(target)) * dloss[r], zero rows where
// ignored; dloss f32 [R]. dlogits may be logits itself (in place).
int xft_cuda_cross_entropy_backward(const void* logits, int dtype, const int* targets, const float* dloss,
                                    int R, int V, void* dlogits);

// AdamW (cuda/adamw.cu), in place: with gs = g * grad_scale,
// m = b1 m + (1 - b1) gs, v = b2 v + (1 - b2) gs^2, p -= lr (m/(1 - b1^t) / (sqrt(v/(1 - b2^t)) + eps) + wd p).
// step t >= 1; m, v f32 [n]; p f32 or bf16 (bf16: rounded to nearest even, or stochastically from
// sr_stream when stochastic != 0, cuda/optim.h); g f32 or bf16. p_copy (NULL: none) receives the
// updated p in copy_dtype (f32 or bf16, nearest even).
int xft_cuda_adamw(void* p, int p_dtype, const void* g, int g_dtype, float* m, float* v, size_t n, float lr, float beta1,
                   float beta2, float eps, float weight_decay, int step, float grad_scale, void* p_copy, int copy_dtype,
                   int stochastic, uint64_t sr_stream);
// Adafactor (cuda/adafactor.cu): one step over `count` tensors (host table, cuda/optim.h) in a fixed
// number of launches; semantics in cuda/adafactor.cu. Deterministic (fixed reduction order).
int xft_cuda_adafactor(const xft_adafactor_tensor* tensors, int count, const xft_adafactor_options* o);
// AdamW over `count` tensors in one launch (host table, cuda/optim.h; the same update per element as
// xft_cuda_adamw); o->control (NULL: none) is a device control block (cuda/step.h): skip flag and scale.
int xft_cuda_adamw_multi(const xft_adamw_tensor* tensors, int count, const xft_adamw_options* o);

// the training step's device bookkeeping (cuda/step.cu, cuda/step.h; ledger f64, control f32 [2]):
// a micro-batch's cross-entropy rows (losses f32, predictions, targets i32 [rows]) into the ledger
int xft_cuda_loss_stats(const float* losses, const int* predictions, const int* targets, int rows, double aux_div,
                        double* ledger);
// dst[0] += (double) x[0]
int xft_cuda_stat_add(const float* x, double* dst);
// the step's end: log record `slot`, the control block, the accumulators cleared (sumsq f32 [1])
int xft_cuda_ledger_flag(const double* ledger, float* out);
int xft_cuda_step_end(const float* sumsq, double* ledger, float* control, const float* nonfinite, int slot, int slots, double clip,
                      double budget);
// every buffer ptrs[k] of bytes[k] bytes set to zero, in one launch
int xft_cuda_zero_many(void* const* ptrs, const size_t* bytes, int count);

// MoE permutation (cuda/moe_permute.cu), around the grouped GEMMs. order i32 [T*K] from routing
// (pairs t*K + s sorted by expert); position i32 [T*K] its inverse. x, dx, out, dout [T, d];
// xp, dxp, y, dy [T*K, d]; all of one dtype (f32 or bf16), fp32 math; g, dg f32 [T, K].
// Any index values give fully defined outputs: out-of-range indices read as zero rows and are
// never written through; entries nothing maps to are -1 (position) or zero rows (dy); where several
// map to one entry, the largest source index wins (deterministic).
int xft_cuda_invert_permutation(const int* order, int* position, int n);              // position[order[i]] = i
int xft_cuda_permute_forward(const void* x, const int* order, void* xp, int dtype, int T, int K, int d);
//   xp[i] = x[order[i] / K]
int xft_cuda_permute_backward(const void* dxp, const int* position, void* dx, int dtype, int T, int K, int d);
//   dx[t] = sum_s dxp[position[t*K + s]]   (slot order, overwrite)
int xft_cuda_unpermute_forward(const void* y, const int* position, const float* g, void* out, int dtype,
                               int T, int K, int d);
//   out[t] = sum_s g[t, s] y[position[t*K + s]]
int xft_cuda_unpermute_backward(const void* dout, const void* y, const int* position, const float* g,
                                void* dy, float* dg, int dtype, int T, int K, int d);
//   dy[position[t*K + s]] = g[t, s] dout[t];  dg[t, s] = <dout[t], y[position[t*K + s]]>  (overwrite)
//   (dy rows no pair maps to are zero; uses a T*K int scratch from the pool)

// balance loss (cuda/moe_permute.cu): loss f32 [1] = weight (cv2(importance) + cv2(load)),
// cv2(x) = var(x) / (mean(x)^2 + 1e-10), unbiased variance (N - 1), cv2 = 0 when N == 1; f32 [N] inputs.
int xft_cuda_balance_loss_forward(const float* importance, const float* load, int N, float weight, float* loss);
// dimportance, dload f32 [N] (overwrite) = dloss * dloss/dx, dloss a host scalar.
int xft_cuda_balance_loss_backward(const float* importance, const float* load, int N, float weight, float dloss,
                                   float* dimportance, float* dload);
// load estimate (cuda/load_estimate.cu): the differentiable noisy top-k load of the balance loss.
// clean, z, noisy [T, N] (dtype); 1 <= k < N <= 256; prob f32 [T, N] (written: per-token probabilities),
// load f32 [N] = sum_t prob (fixed order). Semantics in cuda/load_estimate.cu.
int xft_cuda_load_estimate_forward(const void* clean, const void* z, const void* noisy, int dtype, int T, int N, int k,
                                   float eps, float* prob, float* load);
// dclean, dz [T, N] (dtype, overwrite) from dload f32 [N]; seed: the router noise's (n = xft_normal(seed, t*N + i)).
int xft_cuda_load_estimate_backward(const void* clean, const void* z, const void* noisy, const float* dload, int dtype,
                                    int T, int N, int k, float eps, uint64_t seed, void* dclean, void* dz);
// ---- [/train] ----

#ifdef __cplusplus
}
#endif
