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
number of threads. The elementwise passes (column statistics, the update u of a row, the write) are
vectorized with the same operations in the same order as the scalar loops; the fp64 sums along a
row stay sequential: the bits do not change.
*/
#include <math.h>

#include <vector>

#include "vec.h"
#include "xft_cpu.h"
#include "../../cuda/step.h"
#include "../../cuda/optim.h"

namespace {

typedef uint16_t H;

// g * gscale of the C elements of one row, into out
template <class TG>
XFT_INLINE void scaled_row(const TG* __restrict g, float gscale, size_t C, float* __restrict out) {
  for (size_t c = 0; c < C; c++) out[c] = xft_cpu::ld(g, c) * gscale;
}

XFT_VEC void scaled_row_v(const void* g, int gbf, size_t offset, float gscale, size_t C, float* out) {
  if (gbf) scaled_row((const H*)g + offset, gscale, C, out);
  else scaled_row((const float*)g + offset, gscale, C, out);
}

// acc[c] += x[c]^2 + eps1 in double (one row of the column statistics; rows come in order)
XFT_VEC void column_acc(const float* __restrict x, float eps1, size_t C, double* __restrict acc) {
  for (size_t c = 0; c < C; c++) acc[c] += (double)(x[c] * x[c] + eps1);
}

// u of one row: factored ((1/sqrt(row/rowmean)) * (1/sqrt(col))) * gs, or (1/sqrt(v)) * gs
XFT_VEC void update_row(const float* __restrict gs, const float* __restrict col, float rfac, const float* __restrict v, size_t C,
                        float* __restrict u) {
  if (col)
    for (size_t c = 0; c < C; c++) u[c] = (rfac * (1.f / sqrtf(col[c]))) * gs[c];
  else
    for (size_t c = 0; c < C; c++) u[c] = (1.f / sqrtf(v[c])) * gs[c];
}

template <class TP, int kCopy>
XFT_INLINE void write_row(TP* __restrict p, const float* __restrict u, float denom, float lr, size_t C, void* copy) {
  for (size_t c = 0; c < C; c++) {
    const float np = xft_cpu::ld(p, c) - (u[c] / denom) * lr;
    xft_cpu::st(p, c, np);
    if (kCopy == 1) ((float*)copy)[c] = np;
    if (kCopy == 2) xft_cpu::st((H*)copy, c, np);
  }
}

// p -= (u / denom) lr for one row (round to nearest), with the copy (0 none, 1 f32, 2 bf16)
XFT_VEC void write_row_v(void* p, int pbf, const float* u, float denom, float lr, size_t C, void* copy, int kcopy) {
  switch (pbf * 3 + kcopy) {
    case 0: write_row<float, 0>((float*)p, u, denom, lr, C, copy); break;
    case 1: write_row<float, 1>((float*)p, u, denom, lr, C, copy); break;
    case 2: write_row<float, 2>((float*)p, u, denom, lr, C, copy); break;
    case 3: write_row<H, 0>((H*)p, u, denom, lr, C, copy); break;
    case 4: write_row<H, 1>((H*)p, u, denom, lr, C, copy); break;
    default: write_row<H, 2>((H*)p, u, denom, lr, C, copy); break;
  }
}

void adafactor_tensor(const xft_adafactor_tensor& t, const xft_adafactor_options& o, float beta) {
  const size_t S = (size_t)t.slices, R = (size_t)t.rows, C = (size_t)t.cols, RC = R * C, n = S * RC;
  if (n == 0) return;
  const float gscale = xft_control_scale(o.control, o.grad_scale), eps1 = o.eps1;
  const int gbf = t.g_dtype == XFT_BF16;
  const bool factored = t.row != nullptr;
  std::vector<float> rowmean(S, 1.f);
  if (factored) {
    // row statistics: one row per index
    xft_cpu::parallel_for(S * R, 3.0 * (double)n, [&](size_t a, size_t b) {
      std::vector<float> x(C);
      for (size_t sr = a; sr < b; sr++) {
        scaled_row_v(t.g, gbf, sr * C, gscale, C, x.data());
        double sum = 0.0;
        for (size_t c = 0; c < C; c++) sum += (double)(x[c] * x[c] + eps1);
        t.row[sr] = beta * t.row[sr] + (1.f - beta) * (float)(sum / (double)C);
      }
    });
    // column statistics: rows in order into double accumulators
    std::vector<double> acc(C);
    std::vector<float> x(C);
    for (size_t s = 0; s < S; s++) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (size_t r = 0; r < R; r++) {
        scaled_row_v(t.g, gbf, s * RC + r * C, gscale, C, x.data());
        column_acc(x.data(), eps1, C, acc.data());
      }
      for (size_t c = 0; c < C; c++) t.col[s * C + c] = beta * t.col[s * C + c] + (1.f - beta) * (float)(acc[c] / (double)R);
      double sum = 0.0;
      for (size_t r = 0; r < R; r++) sum += t.row[s * R + r];
      rowmean[s] = (float)(sum / (double)R);
    }
  } else {
    std::vector<float> x(n);
    scaled_row_v(t.g, gbf, 0, gscale, n, x.data());
    for (size_t i = 0; i < n; i++) t.v[i] = beta * t.v[i] + (1.f - beta) * (x[i] * x[i] + eps1);
  }
  // the unclipped update of row sr (factored) or of the vector, into u
  auto update = [&](size_t sr, float* gs, float* u) {
    scaled_row_v(t.g, gbf, sr * C, gscale, C, gs);
    if (!factored) return update_row(gs, nullptr, 0.f, t.v, C, u);
    const size_t s = sr / R;
    update_row(gs, t.col + s * C, 1.f / sqrtf(t.row[sr] / rowmean[s]), nullptr, C, u);
  };
  // sum of u^2 per row (parallel), then per clip group in row order
  std::vector<double> rowsq(S * R);
  xft_cpu::parallel_for(S * R, 6.0 * (double)n, [&](size_t a, size_t b) {
    std::vector<float> gs(C), u(C);
    for (size_t sr = a; sr < b; sr++) {
      update(sr, gs.data(), u.data());
      double sum = 0.0;
      for (size_t c = 0; c < C; c++) sum += (double)u[c] * u[c];
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
  const int pbf = t.p_dtype == XFT_BF16, kcopy = t.p_copy ? (t.copy_dtype == XFT_BF16 ? 2 : 1) : 0;
  const size_t pes = pbf ? 2 : 4, ces = t.copy_dtype == XFT_BF16 ? 2 : 4;
  xft_cpu::parallel_for(S * R, 8.0 * (double)n, [&](size_t a, size_t b) {
    std::vector<float> gs(C), u(C);
    for (size_t sr = a; sr < b; sr++) {
      update(sr, gs.data(), u.data());
      const float dn = denom[(sr * C) / group_n];
      if (o.stochastic && pbf) {
        for (size_t c = 0; c < C; c++) {
          const size_t i = sr * C + c;
          const float p = xft_load_value(t.p, t.p_dtype, i) - (u[c] / dn) * o.lr;
          xft_store_param(t.p, t.p_dtype, i, p, o.stochastic, t.sr_stream);
          if (t.p_copy) xft_store_value(t.p_copy, t.copy_dtype, i, p);
        }
      } else {
        write_row_v((char*)t.p + sr * C * pes, pbf, u.data(), dn, o.lr, C, t.p_copy ? (char*)t.p_copy + sr * C * ces : nullptr, kcopy);
      }
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
