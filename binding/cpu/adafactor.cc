/*
CPU twin of cuda/adafactor.cu: one Adafactor step over many tensors, as transformers' Adafactor with
scale_parameter = relative_step = warmup_init = False, beta1 = None, weight_decay = 0 (what the
Trainer builds for --optim adafactor). Per tensor, in PyTorch terms (gs = g * grad_scale, fp32):
  beta2t = 1 - t^decay_rate
  update = gs**2 + eps1
  factored ([S, R, C]; a 2-D weight is S = 1; statistics over the last two dims):
    row = beta2t row + (1 - beta2t) update.mean(-1)                     # [S, R]
    col = beta2t col + (1 - beta2t) update.mean(-2)                     # [S, C]
    u = ((row / row.mean(-1, keepdim)).rsqrt()[..., None] * col.rsqrt()[..., None, :]) * gs
  vector ([C]):
    v = beta2t v + (1 - beta2t) update;   u = v.rsqrt() * gs
  u = u / max(1, rms(u) / clip_threshold)     rms over the tensor, or over each slice (clip_per_slice)
  p = p - lr u                                (p f32 or bf16; bf16: nearest even or stochastic)
Sums accumulate in double in a fixed order (per row, then rows in order): the same bits on any
number of threads.
*/
#include <math.h>

#include <vector>

#include "xft_cpu.h"
#include "../../cuda/step.h"
#include "../../cuda/optim.h"

namespace {

void adafactor_tensor(const xft_adafactor_tensor& t, const xft_adafactor_options& o, float beta) {
  const size_t S = (size_t)t.slices, R = (size_t)t.rows, C = (size_t)t.cols, RC = R * C, n = S * RC;
  if (n == 0) return;
  const float gscale = xft_control_scale(o.control, o.grad_scale), eps1 = o.eps1;
  auto gs = [&](size_t i) { return xft_load_value(t.g, t.g_dtype, i) * gscale; };
  const bool factored = t.row != nullptr;
  std::vector<float> rowmean(S, 1.f);
  if (factored) {
    // row statistics: one row per index
    xft_cpu::parallel_for(S * R, 3.0 * (double)n, [&](size_t a, size_t b) {
      for (size_t sr = a; sr < b; sr++) {
        double sum = 0.0;
        for (size_t c = 0; c < C; c++) {
          const float x = gs(sr * C + c);
          sum += (double)(x * x + eps1);
        }
        t.row[sr] = beta * t.row[sr] + (1.f - beta) * (float)(sum / (double)C);
      }
    });
    // column statistics: rows in order into double accumulators
    std::vector<double> acc(C);
    for (size_t s = 0; s < S; s++) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (size_t r = 0; r < R; r++)
        for (size_t c = 0; c < C; c++) {
          const float x = gs(s * RC + r * C + c);
          acc[c] += (double)(x * x + eps1);
        }
      for (size_t c = 0; c < C; c++) t.col[s * C + c] = beta * t.col[s * C + c] + (1.f - beta) * (float)(acc[c] / (double)R);
      double sum = 0.0;
      for (size_t r = 0; r < R; r++) sum += t.row[s * R + r];
      rowmean[s] = (float)(sum / (double)R);
    }
  } else {
    for (size_t i = 0; i < n; i++) {
      const float x = gs(i);
      t.v[i] = beta * t.v[i] + (1.f - beta) * (x * x + eps1);
    }
  }
  // the unclipped update of element i = (s, r, c)
  auto update = [&](size_t i) -> float {
    if (!factored) return (1.f / sqrtf(t.v[i])) * gs(i);
    const size_t s = i / RC, r = (i % RC) / C, c = i % C;
    return ((1.f / sqrtf(t.row[s * R + r] / rowmean[s])) * (1.f / sqrtf(t.col[s * C + c]))) * gs(i);
  };
  // sum of u^2 per row (parallel), then per clip group in row order
  std::vector<double> rowsq(S * R);
  xft_cpu::parallel_for(S * R, 6.0 * (double)n, [&](size_t a, size_t b) {
    for (size_t sr = a; sr < b; sr++) {
      double sum = 0.0;
      for (size_t c = 0; c < C; c++) {
        const float u = update(sr * C + c);
        sum += (double)u * u;
      }
      rowsq[sr] = sum;
    }
  });
  const size_t groups = t.clip_per_slice ? S : 1, group_n = n / groups, group_rows = (S * R) / groups;
  std::vector<float> denom(groups);
  for (size_t q = 0; q < groups; q++) {
    double sum = 0.0;
    for (size_t r = 0; r < group_rows; r++) sum += rowsq[q * group_rows + r];
    const float rms = (float)sqrt(sum / (double)group_n);
    denom[q] = fmaxf(1.f, rms / o.clip_threshold);
  }
  xft_cpu::parallel_for(n, 8.0 * (double)n, [&](size_t a, size_t b) {
    for (size_t i = a; i < b; i++) {
      const float u = update(i) / denom[i / group_n];
      const float p = xft_load_value(t.p, t.p_dtype, i) - u * o.lr;
      xft_store_param(t.p, t.p_dtype, i, p, o.stochastic, t.sr_stream);
      if (t.p_copy) xft_store_value(t.p_copy, t.copy_dtype, i, p);
    }
  });
}

}  // namespace

int xft_cpu_adafactor(const xft_adafactor_tensor* tensors, int count, const xft_adafactor_options* o) {
  if (xft_control_skip(o->control)) return 0;  // a non-finite step (cuda/step.h): nothing is written
  const float beta = xft_adafactor_beta2t(o->step, o->decay_rate);
  for (int k = 0; k < count; k++) adafactor_tensor(tensors[k], *o, beta);
  return 0;
}
