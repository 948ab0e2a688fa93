/*
What the optimizer kernels (cuda/adamw.cu, cuda/adafactor.cu) share with their CPU twins
(binding/cpu/adamw.cc, binding/cpu/adafactor.cc): the per-tensor table of the multi-tensor
Adafactor, and the write of an updated parameter, round to nearest or stochastic.

Stochastic rounding of fp32 -> bf16: add 16 random bits to the 16 bits that bf16 drops, then
truncate. The magnitude rounds up with probability (dropped bits) / 2^16, so the expected stored
value is the fp32 value: an update smaller than half a bf16 ulp moves the weight on average
instead of being lost. The bits are a counter-based hash of (seed, optimizer step, tensor index,
element index): a run is reproducible, and resuming at step t draws what the unbroken run drew.
*/
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "xft_math.h"

#ifdef __cplusplus
extern "C" {
#endif

// One tensor of a multi-tensor Adafactor step. Factored (row != NULL): p and g are [slices, rows, cols],
// row f32 [slices, rows], col f32 [slices, cols], v NULL. Unfactored (a vector): slices = rows = 1,
// p and g [cols], v f32 [cols], row and col NULL. p f32 or bf16 (updated in place); g f32 or bf16.
// p_copy (NULL: none) receives the updated p in copy_dtype (the bf16 compute copy of an f32 master).
// clip_per_slice: the RMS clipping runs over each slice (the reference's experts are separate
// parameters) instead of over the whole tensor. sr_stream: xft_sr_stream(seed, step, tensor index).
typedef struct xft_adafactor_tensor {
  void* p;
  const void* g;
  float* row;
  float* col;
  float* v;
  void* p_copy;
  int64_t slices, rows, cols;
  int p_dtype, g_dtype, copy_dtype;
  int clip_per_slice;
  uint64_t sr_stream;
} xft_adafactor_tensor;

// The scalars of one Adafactor step (transformers' Adafactor with relative_step = scale_parameter =
// warmup_init = False, beta1 = None, weight_decay = 0).
typedef struct xft_adafactor_options {
  const float* control;  // NULL, or the step's control block on the device (cuda/step.h): skip flag, scale
  float lr;              // the step's learning rate
  float eps1;            // 1e-30: added to g^2
  float clip_threshold;  // 1.0: the update's RMS is clipped to it
  float decay_rate;      // -0.8: beta2t = 1 - step^decay_rate
  float grad_scale;      // multiplies g first (gradient clipping factor, 1 / accumulation)
  int step;              // t >= 1
  int stochastic;        // bf16 p: stochastic rounding of the write
} xft_adafactor_options;

// One tensor of a multi-tensor AdamW step: p f32 or bf16 (in place), g f32 or bf16, m and v f32, n
// elements; p_copy (NULL: none) receives the updated p in copy_dtype. index: the tensor's position in
// the run (its stochastic-rounding stream, xft_sr_stream(seed, step, index), derived on the device).
typedef struct xft_adamw_tensor {
  void* p;
  const void* g;
  float* m;
  float* v;
  void* p_copy;
  int64_t n;
  int p_dtype, g_dtype, copy_dtype;
  int index;
} xft_adamw_tensor;

// The scalars of one AdamW step (bc1, bc2: the bias corrections 1 - beta^t, computed once on the host).
typedef struct xft_adamw_options {
  const float* control;  // NULL, or the step's control block on the device (cuda/step.h): skip flag, scale
  const float* hyper;    // NULL, or f32 [4] on the device: lr, bc1, bc2, step, read instead of those fields (a graph's replay)
  float lr, beta1, beta2, eps, weight_decay, bc1, bc2, grad_scale;
  int step;
  int stochastic;
  uint64_t seed;
} xft_adamw_options;

#ifdef __cplusplus
}
#endif

// the options with the step's values from o.hyper when given (step as f32: exact below 2^24)
XFT_HD xft_adamw_options xft_adamw_resolve(xft_adamw_options o) {
  if (o.hyper != nullptr) o.lr = o.hyper[0], o.bc1 = o.hyper[1], o.bc2 = o.hyper[2], o.step = (int)o.hyper[3];
  return o;
}

// the per-tensor stream of stochastic-rounding bits at an optimizer step
XFT_HD uint64_t xft_sr_stream(uint64_t seed, uint64_t step, uint64_t tensor) {
  return xft_hash64(seed ^ 0x5352a5a5c3c3e1e1ull, (step << 24) ^ tensor);
}

// fp32 -> bf16 bits, stochastic rounding with 16 random bits r (NaN and Inf as round to nearest)
XFT_HD uint16_t xft_f32_to_bf16_sr(float f, uint32_t r) {
  uint32_t u = xft_f32_bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u) return xft_f32_to_bf16(f);
  u += r & 0xffffu;  // a carry moves to the next bf16 value (the next binade, or Inf past the largest)
  return (uint16_t)(u >> 16);
}

// the updated parameter v into element i of p (f32, or bf16: nearest even, or stochastic from the stream)
XFT_HD void xft_store_param(void* p, int dtype, size_t i, float v, int stochastic, uint64_t stream) {
  if (dtype == XFT_BF16)
    ((uint16_t*)p)[i] = stochastic ? xft_f32_to_bf16_sr(v, (uint32_t)(xft_hash64(stream, i) >> 48)) : xft_f32_to_bf16(v);
  else
    ((float*)p)[i] = v;
}

// beta2t = 1 - t^decay_rate, in double on the host as transformers computes it (math.pow)
inline float xft_adafactor_beta2t(int step, float decay_rate) {
  return (float)(1.0 - pow((double)step, (double)decay_rate));
}

// AdamW's bias corrections 1 - beta^t, in double on the host (both backends)
inline float xft_adamw_bias_correction(float beta, int step) { return (float)(1.0 - pow((double)beta, (double)step)); }

// element i of an AdamW step (gs: the scaled gradient), shared by the kernels and their CPU twin
XFT_HD void xft_adamw_element(void* p, int p_dtype, float* m, float* v, size_t i, float gs, float lr, float beta1, float beta2,
                              float eps, float weight_decay, float bc1, float bc2, void* p_copy, int copy_dtype, int stochastic,
                              uint64_t sr_stream) {
  const float mi = beta1 * m[i] + (1.f - beta1) * gs;
  const float vi = beta2 * v[i] + (1.f - beta2) * gs * gs;
  m[i] = mi;
  v[i] = vi;
  float pi = xft_load_value(p, p_dtype, i);
  pi -= lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + weight_decay * pi);
  xft_store_param(p, p_dtype, i, pi, stochastic, sr_stream);
  if (p_copy) xft_store_value(p_copy, copy_dtype, i, pi);
}
