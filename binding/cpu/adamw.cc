/*
CPU twin of cuda/adamw.cu: the AdamW update (decoupled weight decay, Loshchilov & Hutter),
as torch.optim.AdamW, fp32 math. m, v f32 [n], updated in place; p f32 (a master copy, or the
weights of an f32 run) or bf16 (the weights themselves, no master: written back rounded to nearest
even, or stochastically from sr_stream, see cuda/optim.h); g f32 or bf16:
  gs = g * grad_scale                      (clipping factor and/or 1/accumulation steps)
  m = beta1 m + (1 - beta1) gs,   v = beta2 v + (1 - beta2) gs^2
  mhat = m / (1 - beta1^t),       vhat = v / (1 - beta2^t)          (step t >= 1)
  p = p - lr (mhat / (sqrt(vhat) + eps) + weight_decay p)
p_copy (NULL: none) receives the updated p as f32 or bf16 (nearest even): the compute copy.
Vectorized over elements with the same operations in the same order as the scalar loop (the same
bits, on any number of threads and with or without the AVX2 clone; sqrt and division are exactly
rounded); stochastic rounding takes the generic path.
*/
#include <math.h>

#include "vec.h"
#include "xft_cpu.h"
#include "../../cuda/optim.h"
#include "../../cuda/step.h"

namespace {

struct AdamwArgs {
  void* p;
  const void* g;
  float *m, *v;
  void* p_copy;
  float lr, beta1, beta2, eps, weight_decay, grad_scale, bc1, bc2;
};

// kCopy: 0 no copy, 1 f32 copy, 2 bf16 copy
template <class TP, class TG, int kCopy>
XFT_INLINE void adamw_body(const AdamwArgs& A, size_t a, size_t b) {
  TP* __restrict p = (TP*)A.p;
  const TG* __restrict g = (const TG*)A.g;
  float* __restrict m = A.m;
  float* __restrict v = A.v;
  const float lr = A.lr, beta1 = A.beta1, beta2 = A.beta2, eps = A.eps, wd = A.weight_decay, scale = A.grad_scale;
  const float bc1 = A.bc1, bc2 = A.bc2;
  for (size_t i = a; i < b; i++) {
    float gs = xft_cpu::ld(g, i) * scale;
    float mi = beta1 * m[i] + (1.f - beta1) * gs;
    float vi = beta2 * v[i] + (1.f - beta2) * gs * gs;
    m[i] = mi;
    v[i] = vi;
    float pi = xft_cpu::ld(p, i);
    pi -= lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + wd * pi);
    xft_cpu::st(p, i, pi);
    if (kCopy == 1) ((float*)A.p_copy)[i] = pi;
    if (kCopy == 2) xft_cpu::st((uint16_t*)A.p_copy, i, pi);
  }
}

// the round-to-nearest cases: p f32 or bf16, g f32 or bf16, copy none / f32 / bf16
XFT_VEC void adamw_range(const AdamwArgs& A, int pb, int gb, int copy, size_t a, size_t b) {
  typedef uint16_t H;
  const int key = pb * 6 + gb * 3 + copy;
  switch (key) {
    case 0: adamw_body<float, float, 0>(A, a, b); break;
    case 1: adamw_body<float, float, 1>(A, a, b); break;
    case 2: adamw_body<float, float, 2>(A, a, b); break;
    case 3: adamw_body<float, H, 0>(A, a, b); break;
    case 4: adamw_body<float, H, 1>(A, a, b); break;
    case 5: adamw_body<float, H, 2>(A, a, b); break;
    case 6: adamw_body<H, float, 0>(A, a, b); break;
    case 7: adamw_body<H, float, 1>(A, a, b); break;
    case 8: adamw_body<H, float, 2>(A, a, b); break;
    case 9: adamw_body<H, H, 0>(A, a, b); break;
    case 10: adamw_body<H, H, 1>(A, a, b); break;
    default: adamw_body<H, H, 2>(A, a, b); break;
  }
}

}  // namespace

// one tensor's update with the bias corrections bc1, bc2 (1 - beta^t) already computed
static void adamw_tensor(void* p, int p_dtype, const void* g, int g_dtype, float* m, float* v, size_t n, float lr, float beta1,
                         float beta2, float eps, float weight_decay, float bc1, float bc2, float grad_scale, void* p_copy,
                         int copy_dtype, int stochastic, uint64_t sr_stream) {
  if (!(stochastic && p_dtype == XFT_BF16)) {
    const AdamwArgs A{p, g, m, v, p_copy, lr, beta1, beta2, eps, weight_decay, grad_scale, bc1, bc2};
    const int copy = p_copy ? (copy_dtype == XFT_BF16 ? 2 : 1) : 0;
    xft_cpu::parallel_for(n, 12.0 * (double)n, [&](size_t a, size_t b) {
      adamw_range(A, p_dtype == XFT_BF16, g_dtype == XFT_BF16, copy, a, b);
    });
    return;
  }
  xft_cpu::parallel_for(n, 12.0 * (double)n, [&](size_t a, size_t b) {
    for (size_t i = a; i < b; i++) {
      const float gs = xft_load_value(g, g_dtype, i) * grad_scale;
      xft_adamw_element(p, p_dtype, m, v, i, gs, lr, beta1, beta2, eps, weight_decay, bc1, bc2, p_copy, copy_dtype, stochastic,
                        sr_stream);
    }
  });
}

int xft_cpu_adamw(void* p, int p_dtype, const void* g, int g_dtype, float* m, float* v, size_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int step, float grad_scale, void* p_copy, int copy_dtype,
                  int stochastic, uint64_t sr_stream) {
  // bias corrections in double on the host, as the CUDA launcher computes them
  const float bc1 = xft_adamw_bias_correction(beta1, step), bc2 = xft_adamw_bias_correction(beta2, step);
  adamw_tensor(p, p_dtype, g, g_dtype, m, v, n, lr, beta1, beta2, eps, weight_decay, bc1, bc2, grad_scale, p_copy, copy_dtype,
               stochastic, sr_stream);
  return 0;
}

// the multi-tensor step (cuda/adamw.cu xft_cuda_adamw_multi): each tensor as xft_cpu_adamw, the
// stochastic-rounding stream from (seed, step, index); a set skip flag in the control block writes nothing
int xft_cpu_adamw_multi(const xft_adamw_tensor* tensors, int count, const xft_adamw_options* options) {
  if (xft_control_skip(options->control)) return 0;
  const xft_adamw_options resolved = xft_adamw_resolve(*options), *o = &resolved;
  const float grad_scale = xft_control_scale(o->control, o->grad_scale);
  for (int k = 0; k < count; k++) {
    const xft_adamw_tensor& t = tensors[k];
    const uint64_t sr_stream = xft_sr_stream(o->seed, (uint64_t)o->step, (uint64_t)t.index);
    adamw_tensor(t.p, t.p_dtype, t.g, t.g_dtype, t.m, t.v, (size_t)t.n, o->lr, o->beta1, o->beta2, o->eps, o->weight_decay, o->bc1,
                 o->bc2, grad_scale, t.p_copy, t.copy_dtype, o->stochastic, sr_stream);
  }
  return 0;
}
