/*
The CPU backend: a twin of every CUDA op in cuda/xft_cuda.h, with the same name (prefix
xft_cpu_ for xft_cuda_), the same arguments and the same semantics, on host pointers. It is the
oracle the GPU tests compare against and the fallback where no GPU exists. Arithmetic is fp32
(bf16 values are widened on load and rounded to nearest even on store) unless noted.
Functions return 0; the binding validates arguments before calling them.
*/
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <functional>

#include "../../cuda/xft_math.h"
#include "../../cuda/optim.h"
#include "../../cuda/step.h"

// fill.cc
int xft_cpu_fill_random(void* out, int dtype, size_t n, int kind, uint64_t seed, float a, float b);
int xft_cpu_fill_value(void* out, int dtype, size_t n, double value);
int xft_cpu_cast(void* out, int out_dtype, const void* in, int in_dtype, size_t n);

// routing.cc
int xft_cpu_route_forward(const void* logits, int dtype, int T, int N, int K, int normalize, int shared,
                          int* experts, float* weights, int* counts, int* offsets, int* order,
                          float* importance, float* load, float* probs);
int xft_cpu_route_backward(const void* logits, int dtype, int T, int N, int K, int normalize, int shared,
                           const int* experts, const float* dweights, const float* dimportance,
                           void* dlogits, const float* dprobs);
int xft_cpu_switch_loss_forward(const float* probs, const float* load, int N, int T, int S, float weight, float* loss);
int xft_cpu_switch_loss_backward(const float* load, int N, int T, int S, float weight, float dloss, float* dprobs);

// grouped_gemm.cc
int xft_cpu_grouped_gemm_forward(const void* x, const void* w, const int* offsets, void* y,
                                 int dtype, int M, int n, int k, int E);
int xft_cpu_grouped_gemm_backward(const void* x, const void* w, const int* offsets, const void* dy,
                                  void* dx, void* dw, int dtype, int dw_dtype, int M, int n, int k, int E,
                                  int accumulate, int dx_accumulate);
int xft_cpu_gateup_forward(const void* x, const int* gather, int gather_div, int S, const void* w_gate,
                           const void* w_up, const int* offsets, void* gu, void* h, int dtype, int M, int f, int d,
                           int E);
int xft_cpu_swiglu_down_backward(const void* dy, const void* w_down, const int* offsets, const void* gu, void* dgu,
                                 void* h, int dtype, int M, int f, int d, int E);
int xft_cpu_qkv_forward(const void* x, const void* wq, const void* wk, const void* wv, const int* offsets, void* q,
                        void* k, void* v, int dtype, int M, int nq, int nk, int d);
int xft_cpu_gateup_backward(const void* x, const int* gather, int gather_div, int S, const void* w_gate,
                            const void* w_up, const int* offsets, const void* dgu, void* dx, void* dw_gate,
                            void* dw_up, int dtype, int dw_dtype, int M, int f, int d, int E, int accumulate,
                            int dx_accumulate);

// the fast GEMM's kernel in use ("avx512", "avx2", "portable") or "reference" (XFT_CPU_REFERENCE=1)
const char* xft_cpu_gemm_kernel_name();
// the machine's fused multiply-add ceiling in GFLOP/s on `threads` threads at once, measured for about
// `ms` with the GEMM kernel's instruction set (register-only: no memory traffic); -1 if a thread
// could not be started
double xft_cpu_peak_gflops(int threads, double ms);

// router_linear.cc (the small-N router and noise linears: N <= 32)
int xft_cpu_router_linear_forward(const void* x, const void* w, void* y, int dtype, int T, int N, int d);
int xft_cpu_router_linear_backward(const void* x, const void* w, const void* dy, void* dx, void* dw, int dtype,
                                   int dw_dtype, int T, int N, int d, int accumulate);

// routing_probe.cc (UpIT's routing-vector loss on a probe's logits)
int xft_cpu_routing_probe(const void* h, const int* targets, void* dh, float* stats, int dtype, int N, float scale);

// merge.cc
int xft_cpu_merge_forward(const void* const* weights, void* const* merged, const size_t* numel,
                          int count, int dtype, int E, const float* alpha, float shared_rate);
int xft_cpu_merge_backward(const void* const* weights, const void* const* dmerged, const size_t* numel,
                           int count, int dtype, int E, const float* alpha, float shared_rate,
                           float* dalpha, int accumulate);

// ---- [layers] (binding/cpu/{embedding,rmsnorm,rope,swiglu,elementwise}.cc) ----
// embedding.cc
int xft_cpu_embedding_forward(const int* ids, const void* table, void* out, int dtype, int R, int V, int d);
int xft_cpu_embedding_backward(const int* ids, const void* dout, float* dtable, int dtype, int R, int V, int d,
                               int accumulate);
// rmsnorm.cc
int xft_cpu_rmsnorm_forward(const void* x, const void* w, void* y, float* rstd, int dtype, int w_dtype, int R,
                            int d, float eps);
int xft_cpu_rmsnorm_backward(const void* x, const void* w, const float* rstd, const void* dy, void* dx, float* dw,
                             int dtype, int w_dtype, int R, int d, int accumulate);
// rope.cc
int xft_cpu_rope_forward(const void* x, void* out, int dtype, int rows, int T, int H, int hd, float theta,
                         float scaling);
int xft_cpu_rope_backward(const void* dout, void* dx, int dtype, int rows, int T, int H, int hd, float theta,
                          float scaling);
// swiglu.cc
int xft_cpu_swiglu_forward(const void* g, const void* u, void* h, int dtype, size_t n);
int xft_cpu_swiglu_backward(const void* g, const void* u, const void* dh, void* dg, void* du, int dtype, size_t n);
// the same over rows of gu [rows, 2f] = [g | u] (dgu [rows, 2f] = [dg | du]), on the calling thread
void xft_cpu_swiglu_forward_rows(const void* gu, void* h, int dtype, size_t rows, size_t f);
void xft_cpu_swiglu_backward_rows(const void* gu, const void* dh, void* dgu, int dtype, size_t rows, size_t f);
// elementwise.cc
int xft_cpu_add(const void* a, const void* b, void* y, int dtype, size_t n);
int xft_cpu_axpby(const void* x, int x_dtype, void* y, int y_dtype, size_t n, float alpha, float beta);
int xft_cpu_tanh_forward(const void* x, void* y, int dtype, size_t n);
int xft_cpu_tanh_backward(const void* y, const void* dy, void* dx, int dtype, size_t n);
int xft_cpu_router_noise_forward(const void* clean, const void* z, void* noisy, int dtype, size_t n,
                                 uint64_t seed, float eps);
int xft_cpu_router_noise_backward(const void* z, const void* dnoisy, void* dclean, void* dz, int dtype, size_t n,
                                  uint64_t seed);
int xft_cpu_sum_squares(const void* const* tensors, const size_t* numel, const int* dtypes, int count, float* out);
// ---- [/layers] ----

// ---- [train] (binding/cpu/{attention,cross_entropy,adamw,adafactor,moe_permute}.cc) ----
// attention.cc
int xft_cpu_attention_forward(const void* q, const void* k, const void* v, void* out, float* lse,
                              int dtype, int B, int T, int H, int Hkv, int hd);
int xft_cpu_attention_backward(const void* q, const void* k, const void* v, const void* out, const float* lse,
                               const void* dout, void* dq, void* dk, void* dv,
                               int dtype, int B, int T, int H, int Hkv, int hd);

// cross_entropy.cc
int xft_cpu_cross_entropy_forward(const void* logits, int dtype, const int* targets, int R, int V,
                                  float* losses, int* predictions);
int xft_cpu_cross_entropy_backward(const void* logits, int dtype, const int* targets, const float* dloss,
                                   int R, int V, void* dlogits);

// adamw.cc, adafactor.cc (the table and options: cuda/optim.h)
int xft_cpu_adamw(void* p, int p_dtype, const void* g, int g_dtype, float* m, float* v, size_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int step, float grad_scale, void* p_copy, int copy_dtype,
                  int stochastic, uint64_t sr_stream);
int xft_cpu_adafactor(const xft_adafactor_tensor* tensors, int count, const xft_adafactor_options* o);
int xft_cpu_adamw_multi(const xft_adamw_tensor* tensors, int count, const xft_adamw_options* o);
// step.cc (the training step's ledger, cuda/step.h)
int xft_cpu_loss_stats(const float* losses, const int* predictions, const int* targets, int rows, double aux_div, double* ledger);
int xft_cpu_stat_add(const float* x, double* dst);
int xft_cpu_ledger_flag(const double* ledger, float* out);
int xft_cpu_step_end(const float* sumsq, double* ledger, float* control, const float* nonfinite, int slot, int slots, double clip,
                     double budget);
int xft_cpu_zero_many(void* const* ptrs, const size_t* bytes, int count);

// moe_permute.cc
int xft_cpu_invert_permutation(const int* order, int* position, int n);
int xft_cpu_permute_forward(const void* x, const int* order, void* xp, int dtype, int T, int K, int d);
int xft_cpu_permute_backward(const void* dxp, const int* position, void* dx, int dtype, int T, int K, int d);
int xft_cpu_unpermute_forward(const void* y, const int* position, const float* g, void* out, int dtype,
                              int T, int K, int d);
int xft_cpu_unpermute_backward(const void* dout, const void* y, const int* position, const float* g,
                               void* dy, float* dg, int dtype, int T, int K, int d);
int xft_cpu_balance_loss_forward(const float* importance, const float* load, int N, float weight, float* loss);
int xft_cpu_balance_loss_backward(const float* importance, const float* load, int N, float weight, float dloss,
                                  float* dimportance, float* dload);
// load_estimate.cc
int xft_cpu_load_estimate_forward(const void* clean, const void* z, const void* noisy, int dtype, int T, int N, int k,
                                  float eps, float* prob, float* load);
int xft_cpu_load_estimate_backward(const void* clean, const void* z, const void* noisy, const float* dload, int dtype,
                                   int T, int N, int k, float eps, uint64_t seed, void* dclean, void* dz);
// ---- [/train] ----

// helpers shared by the CPU files
namespace xft_cpu {
// value i of a f32 or bf16 buffer, as fp32
inline float load(const void* p, int dtype, size_t i) { return xft_load_value(p, dtype, i); }
// store fp32 v into a f32 or bf16 buffer (round to nearest even for bf16)
inline void store(void* p, int dtype, size_t i, float v) { xft_store_value(p, dtype, i, v); }
// widen n values of a f32 or bf16 buffer into dst
void to_f32(float* dst, const void* src, int dtype, size_t n);
// threads.cc: a persistent pool. fn(begin, end) over [0, n) split into contiguous ranges (a few per
// thread, taken in turn) on up to xft_cpu::threads() threads when `work` (a flop count) makes it worth a
// thread, inline otherwise; each index is handled by exactly one call, so a kernel that writes
// disjoint outputs per index gives the same bits on any number of threads.
void parallel_for(size_t n, double work, const std::function<void(size_t, size_t)>& fn);
// fn(i) for each task i < tasks, handed out one at a time to the pool's threads (uneven tasks balance)
void parallel_tasks(size_t tasks, double work, const std::function<void(size_t)>& fn);
// the threads parallel_for and parallel_tasks use for `work` (1 below the threshold of a thread's worth)
int threads_for(double work);
// threads for the CPU backend: XFT_NUM_THREADS (alias XFT_CPU_THREADS, read at each call), else the
// cores this process may run on; at most 64
int threads();
}  // namespace xft_cpu
