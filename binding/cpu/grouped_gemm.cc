/*
CPU twin of cuda/grouped_gemm.cu: one GEMM per expert over a contiguous group of rows.
  x [M, k] (rows grouped by expert), w [E, n, k] (nn.Linear layout), offsets [E + 1]
  forward:  y[r]  = w[e] @ x[r]                  for r in [o_e, o_{e+1})     y  [M, n]
  backward: dx[r] = w[e]^T @ dy[r]                                            dx [M, k] (or += with dx_accumulate)
            dw[e] (+)= sum_r dy[r] outer x[r]                                 dw [E, n, k]
bf16 operands are widened to fp32, accumulated in fp32, and results rounded once to bf16
(with accumulate, dw = round(dw + sum)). Any offsets (lib/ops.ts checks them unless validate is
false) are memory safe and give fully defined outputs, as the CUDA kernels: each is clamped to
[0, M] and raised to the running maximum, o'_e = max(o'_{e-1}, clamp(o_e)); group e is rows
o'_e .. o'_{e+1}; rows outside [o'_0, o'_E) of y and dx are zero.

Two implementations, the same semantics:
- the fast path (default): blocked GEMMs over packed panels (gemm_kernels.h), the instruction set
  chosen at run time from the CPU (AVX-512F, else AVX2 + FMA, else portable C++; XFT_CPU_ISA=avx2 or
  portable caps it). Each output element is one fused multiply-add chain in k order, whatever the
  blocking and the thread count (2-D blocks of the output are the tasks), so its bits do not depend on
  XFT_NUM_THREADS. Inputs are read in place (bf16 widened while packing, f32 never copied whole).
- the reference path (XFT_CPU_REFERENCE=1, read at each call): the plain loops below, separate
  multiply and add, each sum in k (forward), n (dx) or row (dw) order. test/21.gemm_fast.ts holds the
  two together: with f32 inputs within 1e-5 relative (norm; fused vs separately rounded products),
  with bf16 inputs bit for bit (a product of two bf16 values is exact in fp32: the same sums in the
  same order). The cuda/grouped_gemm.cu kernels sum in their own order: test/30 compares them to
  this file within tolerances, never bit for bit.
Scratch (per calling thread, kept across calls): the packed panels of one depth block of one chunk
of C, and with bf16 or accumulated outputs the fp32 sums of that chunk (kChunkM x kChunkN at most).
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "gemm_kernels.h"
#include "xft_cpu.h"

namespace {

// o'_0 .. o'_E: the offsets clamped to [0, M] and made non-decreasing (the groups as the kernels see them)
std::vector<int> effective_offsets(const int* offsets, int E, int M) {
  std::vector<int> o(E + 1);
  for (int e = 0; e <= E; e++) {
    o[e] = std::min(std::max(offsets[e], 0), M);
    if (e > 0) o[e] = std::max(o[e], o[e - 1]);
  }
  return o;
}

// zero rows [0, o'_0) and [o'_E, M) of out [M, cols]
void zero_uncovered_rows(void* out, const std::vector<int>& o, int M, int cols, size_t es) {
  const size_t row = (size_t)cols * es;
  memset(out, 0, (size_t)o.front() * row);
  memset((char*)out + (size_t)o.back() * row, 0, (size_t)(M - o.back()) * row);
}

// y[r, j] = dot(a[r, :], b[j, :]) for r < rows, j < cols, all fp32, k contiguous in both
void gemm_nt(const float* a, const float* b, float* y, int rows, int cols, int k) {
  const int R = 4;
  int r = 0;
  for (; r + R <= rows; r += R) {
    const float* a0 = a + (size_t)r * k;
    for (int j = 0; j < cols; j++) {
      const float* bj = b + (size_t)j * k;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      for (int i = 0; i < k; i++) {
        float bv = bj[i];
        s0 += a0[i] * bv;
        s1 += a0[k + i] * bv;
        s2 += a0[2 * (size_t)k + i] * bv;
        s3 += a0[3 * (size_t)k + i] * bv;
      }
      y[(size_t)r * cols + j] = s0;
      y[(size_t)(r + 1) * cols + j] = s1;
      y[(size_t)(r + 2) * cols + j] = s2;
      y[(size_t)(r + 3) * cols + j] = s3;
    }
  }
  for (; r < rows; r++) {
    const float* ar = a + (size_t)r * k;
    for (int j = 0; j < cols; j++) {
      const float* bj = b + (size_t)j * k;
      float s = 0.f;
      for (int i = 0; i < k; i++) s += ar[i] * bj[i];
      y[(size_t)r * cols + j] = s;
    }
  }
}

size_t elem_size(int dtype) { return dtype == XFT_BF16 ? 2 : 4; }

void from_f32(void* dst, int dtype, const float* src, size_t n) {
  for (size_t i = 0; i < n; i++) xft_cpu::store(dst, dtype, i, src[i]);
}

int reference_forward(const void* x, const void* w, const int* offsets, void* y,
                                 int dtype, int M, int n, int k, int E) {
  const size_t es = elem_size(dtype);
  std::vector<float> xe, we((size_t)n * k), ye;
  const std::vector<int> o = effective_offsets(offsets, E, M);
  zero_uncovered_rows(y, o, M, n, es);
  for (int e = 0; e < E; e++) {
    int r0 = o[e], r1 = o[e + 1];
    int rows = r1 - r0;
    if (rows == 0) continue;
    xe.resize((size_t)rows * k);
    ye.resize((size_t)rows * n);
    xft_cpu::to_f32(xe.data(), (const char*)x + (size_t)r0 * k * es, dtype, (size_t)rows * k);
    xft_cpu::to_f32(we.data(), (const char*)w + (size_t)e * n * k * es, dtype, (size_t)n * k);
    xft_cpu::parallel_for((size_t)rows, 2.0 * rows * n * k, [&](size_t ra, size_t rb) {
      gemm_nt(xe.data() + ra * k, we.data(), ye.data() + ra * n, (int)(rb - ra), n, k);
    });
    from_f32((char*)y + (size_t)r0 * n * es, dtype, ye.data(), (size_t)rows * n);
  }
  return 0;
}

int reference_backward(const void* x, const void* w, const int* offsets, const void* dy,
                                  void* dx, void* dw, int dtype, int dw_dtype, int M, int n, int k, int E,
                                  int accumulate, int dx_accumulate) {
  const size_t es = elem_size(dtype);
  std::vector<float> xe, dye, we((size_t)n * k), dwe((size_t)n * k);
  const std::vector<int> o = effective_offsets(offsets, E, M);
  if (dx && !dx_accumulate) zero_uncovered_rows(dx, o, M, k, es);
  for (int e = 0; e < E; e++) {
    int r0 = o[e], r1 = o[e + 1];
    int rows = r1 - r0;
    dye.resize((size_t)rows * n);
    xe.resize((size_t)rows * k);
    xft_cpu::to_f32(dye.data(), (const char*)dy + (size_t)r0 * n * es, dtype, (size_t)rows * n);
    if (dx && rows > 0) {
      xft_cpu::to_f32(we.data(), (const char*)w + (size_t)e * n * k * es, dtype, (size_t)n * k);
      xft_cpu::parallel_for((size_t)rows, 2.0 * rows * n * k, [&](size_t ra, size_t rb) {
        std::vector<float> acc(k);
        for (size_t r = ra; r < rb; r++) {
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int j = 0; j < n; j++) {
            float g = dye[r * n + j];
            const float* wj = we.data() + (size_t)j * k;
            for (int i = 0; i < k; i++) acc[i] += g * wj[i];
          }
          char* out = (char*)dx + (size_t)(r0 + r) * k * es;
          if (dx_accumulate)
            for (int i = 0; i < k; i++) acc[i] += xft_cpu::load(out, dtype, (size_t)i);
          from_f32(out, dtype, acc.data(), k);
        }
      });
    }
    if (dw) {
      xft_cpu::to_f32(xe.data(), (const char*)x + (size_t)r0 * k * es, dtype, (size_t)rows * k);
      std::fill(dwe.begin(), dwe.end(), 0.f);
      // split over the n output rows of dw: each keeps the row order of the sum
      xft_cpu::parallel_for((size_t)n, 2.0 * rows * n * k, [&](size_t ja, size_t jb) {
        for (int r = 0; r < rows; r++) {
          const float* xr = xe.data() + (size_t)r * k;
          for (size_t j = ja; j < jb; j++) {
            float g = dye[(size_t)r * n + j];
            float* dwj = dwe.data() + j * k;
            for (int i = 0; i < k; i++) dwj[i] += g * xr[i];
          }
        }
      });
      char* out = (char*)dw + (size_t)e * n * k * elem_size(dw_dtype);
      if (accumulate)
        for (size_t i = 0; i < (size_t)n * k; i++) dwe[i] += xft_cpu::load(out, dw_dtype, i);
      from_f32(out, dw_dtype, dwe.data(), (size_t)n * k);
    }
  }
  return 0;
}

// ---- the fast path ----

static_assert(XFT_BF16 == 1 && XFT_F32 == 0, "gemm_kernel_impl.h hard-codes the dtype codes");

// the largest slice of C one round of packing covers: bounds the packed panels ((kChunkM + kChunkN) *
// kc floats) and the fp32 scratch of a bf16 or accumulated output (kChunkM * kChunkN floats)
constexpr int kChunkM = 1536, kChunkN = 2048;
// parallel_for's threshold counts work at the scalar kernels' rate; the packed kernels do about this
// many flops in that time, so a GEMM below ~32 Mflop (~0.2 ms) stays on one thread
constexpr double kFastFlopsPerWork = 8;

// C [M, N] of out (row stride ld elements): overwritten, or with accumulate out = out + sum (the sum
// rounded to fp32 first, then added, then rounded to the dtype once)
struct GemmOut {
  void* data;
  int dtype;
  size_t ld;
  bool accumulate;
};

// buffers of the calling thread, kept across calls (the pool's threads work on the caller's)
float* scratch(std::vector<float>& v, size_t n) {
  if (v.size() < n + 16) v.resize(n + 16);
  uintptr_t p = (uintptr_t)v.data();
  return (float*)((p + 63) & ~(uintptr_t)63);
}
thread_local std::vector<float> t_packed, t_sums;

// out[i, j] for i < m, j < n from the fp32 sums c (row stride ldc)
void write_out(const GemmOut& out, size_t i0, size_t j0, int m, int n, const float* c, size_t ldc) {
  for (int i = 0; i < m; i++) {
    const float* ci = c + (size_t)i * ldc;
    const size_t row = (i0 + i) * out.ld + j0;
    if (out.dtype == XFT_F32) {
      float* o = (float*)out.data + row;
      if (out.accumulate)
        for (int j = 0; j < n; j++) o[j] = ci[j] + o[j];
      else
        memcpy(o, ci, sizeof(float) * n);
    } else {
      uint16_t* o = (uint16_t*)out.data + row;
      if (out.accumulate)
        for (int j = 0; j < n; j++) o[j] = xft_f32_to_bf16(ci[j] + xft_bf16_to_f32(o[j]));
      else
        for (int j = 0; j < n; j++) o[j] = xft_f32_to_bf16(ci[j]);
    }
  }
}

// blocks of at most `most` (a multiple of `unit`) covering `total`, as even as the unit allows
int even_block(int total, int most, int unit) {
  int blocks = (total + most - 1) / most;
  int b = (total + blocks - 1) / blocks;
  return (b + unit - 1) / unit * unit;
}

// out (+)= A B^T: A [M, K], B [N, K] (operands of gemm_kernels.h)
void gemm(const xft_gemm_kernel& kr, const xft_gemm_operand& A, const xft_gemm_operand& B, int M, int N, int K,
          const GemmOut& out) {
  if (M <= 0 || N <= 0) return;
  const bool direct = out.dtype == XFT_F32 && !out.accumulate;  // sums straight into the output
  for (int m0 = 0; m0 < M; m0 += kChunkM)
    for (int n0 = 0; n0 < N; n0 += kChunkN) {
      const int mb = std::min(kChunkM, M - m0), nb = std::min(kChunkN, N - n0);
      float* c = direct ? (float*)out.data + (size_t)m0 * out.ld + n0 : scratch(t_sums, (size_t)mb * nb);
      const size_t ldc = direct ? out.ld : (size_t)nb;
      const int pa = (mb + kr.mr - 1) / kr.mr, pb = (nb + kr.nr - 1) / kr.nr;  // packed panels
      const int mc = even_block(mb, kr.mc, kr.mr), nc = even_block(nb, kr.nc, kr.nr);
      const int tm = (mb + mc - 1) / mc, tn = (nb + nc - 1) / nc;
      if (K == 0) {
        if (!direct) memset(c, 0, sizeof(float) * (size_t)mb * nb);
        else
          for (int i = 0; i < mb; i++) memset(c + (size_t)i * ldc, 0, sizeof(float) * nb);
      }
      for (int p0 = 0; p0 < K; p0 += kr.kc) {
        const int kc = std::min(kr.kc, K - p0);
        const double work = 2.0 * mb * nb * kc / kFastFlopsPerWork;
        float* a = scratch(t_packed, (size_t)(pa * kr.mr + pb * kr.nr) * kc);
        float* b = a + (size_t)pa * kr.mr * kc;
        // pack this depth block of A's and B's rows, a panel per index
        xft_cpu::parallel_for((size_t)(pa + pb), work, [&](size_t q0, size_t q1) {
          for (size_t q = q0; q < q1; q++) {
            if ((int)q < pa) {
              const int i = (int)q * kr.mr;
              kr.pack_a(a + (size_t)i * kc, A, (size_t)(m0 + i), std::min(kr.mr, mb - i), (size_t)p0, kc);
            } else {
              const int j = ((int)q - pa) * kr.nr;
              kr.pack_b(b + (size_t)j * kc, B, (size_t)(n0 + j), std::min(kr.nr, nb - j), (size_t)p0, kc);
            }
          }
        });
        const bool last = p0 + kc >= K;
        xft_cpu::parallel_tasks((size_t)tm * tn, work, [&](size_t task) {
          const int i = (int)(task / tn) * mc, j = (int)(task % tn) * nc;
          const int m = std::min(mc, mb - i), n = std::min(nc, nb - j);
          float* ct = c + (size_t)i * ldc + j;
          kr.block(a + (size_t)i * kc, b + (size_t)j * kc, m, n, kc, ct, ldc, p0 > 0);
          if (last && !direct) write_out(out, (size_t)(m0 + i), (size_t)(n0 + j), m, n, ct, ldc);
        });
      }
      if (K == 0 && !direct) write_out(out, (size_t)m0, (size_t)n0, mb, nb, c, ldc);
    }
}

bool env_is(const char* name, const char* value) {
  const char* v = getenv(name);
  return v && strcmp(v, value) == 0;
}

// the kernel for this CPU (XFT_CPU_ISA may ask for a lesser one), or null for the reference path
const xft_gemm_kernel* fast_kernel() {
  if (env_is("XFT_CPU_REFERENCE", "1")) return nullptr;
#if defined(__x86_64__) || defined(_M_X64)
  static const int best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
  }();
  int want = env_is("XFT_CPU_ISA", "portable") ? 0 : env_is("XFT_CPU_ISA", "avx2") ? 1 : 2;
  switch (std::min(best, want)) {
    case 2: return &xft_gemm_avx512;
    case 1: return &xft_gemm_avx2;
    default: return &xft_gemm_portable;
  }
#else
  return &xft_gemm_portable;
#endif
}

}  // namespace

const char* xft_cpu_gemm_kernel_name() {
  const xft_gemm_kernel* k = fast_kernel();
  return k ? k->name : "reference";
}

int xft_cpu_grouped_gemm_forward(const void* x, const void* w, const int* offsets, void* y,
                                 int dtype, int M, int n, int k, int E) {
  const xft_gemm_kernel* kr = fast_kernel();
  if (!kr) return reference_forward(x, w, offsets, y, dtype, M, n, k, E);
  const size_t es = elem_size(dtype);
  const std::vector<int> o = effective_offsets(offsets, E, M);
  zero_uncovered_rows(y, o, M, n, es);
  for (int e = 0; e < E; e++) {
    const int r0 = o[e], rows = o[e + 1] - o[e];
    if (rows == 0) continue;
    // y[r, j] = sum_i x[r, i] w[e, j, i]
    const xft_gemm_operand A{(const char*)x + (size_t)r0 * k * es, dtype, (size_t)k, 1};
    const xft_gemm_operand B{(const char*)w + (size_t)e * n * k * es, dtype, (size_t)k, 1};
    gemm(*kr, A, B, rows, n, k, GemmOut{(char*)y + (size_t)r0 * n * es, dtype, (size_t)n, false});
  }
  return 0;
}

int xft_cpu_grouped_gemm_backward(const void* x, const void* w, const int* offsets, const void* dy,
                                  void* dx, void* dw, int dtype, int dw_dtype, int M, int n, int k, int E,
                                  int accumulate, int dx_accumulate) {
  const xft_gemm_kernel* kr = fast_kernel();
  if (!kr) return reference_backward(x, w, offsets, dy, dx, dw, dtype, dw_dtype, M, n, k, E, accumulate, dx_accumulate);
  const size_t es = elem_size(dtype), dw_es = elem_size(dw_dtype);
  const std::vector<int> o = effective_offsets(offsets, E, M);
  if (dx && !dx_accumulate) zero_uncovered_rows(dx, o, M, k, es);
  for (int e = 0; e < E; e++) {
    const int r0 = o[e], rows = o[e + 1] - o[e];
    const char* dye = (const char*)dy + (size_t)r0 * n * es;
    const char* we = (const char*)w + (size_t)e * n * k * es;
    if (dx && rows > 0) {
      // dx[r, i] = sum_j dy[r, j] w[e, j, i]
      const xft_gemm_operand A{dye, dtype, (size_t)n, 1}, B{we, dtype, 1, (size_t)k};
      gemm(*kr, A, B, rows, k, n, GemmOut{(char*)dx + (size_t)r0 * k * es, dtype, (size_t)k, dx_accumulate != 0});
    }
    if (dw) {
      // dw[e, j, i] (+)= sum_r dy[r, j] x[r, i]; no rows: 0 (+ dw)
      const xft_gemm_operand A{dye, dtype, 1, (size_t)n}, B{(const char*)x + (size_t)r0 * k * es, dtype, 1, (size_t)k};
      gemm(*kr, A, B, n, k, rows, GemmOut{(char*)dw + (size_t)e * n * k * dw_es, dw_dtype, (size_t)k, accumulate != 0});
    }
  }
  return 0;
}

// ---- the fused SwiGLU FFN GEMMs (cuda/grouped_gemm.cu kGateUp, kSwigluDown, kGateUpDx) ----
// gate/up forward: g = x_i W_gate[e]^T, u = x_i W_up[e]^T rounded to dtype, gu [M, 2f] = [g | u],
// h [M, f] = silu(g) u from the rounded values (swiglu.cc, element for element). Row i of the GEMM
// reads x[gather[i] / gather_div] (a zero row where negative or outside [0, S)), or x[i] without gather.
// down backward: dh = dy W_down[e] rounded to dtype, then swiglu.cc's backward into dgu = [dg | du]
// and h recomputed. gate/up backward: dx = dg W_gate[e] + du W_up[e] summed over both halves in fp32
// and rounded once (or added into dx), dW_gate, dW_up (+)= dg^T x, du^T x (the grouped GEMM's dw).
// Rows outside the groups: zeros in gu, h, dgu (and dx unless accumulating), as the kernels.

namespace {

// Temporaries of the fused twins: buffers of the calling thread kept across calls (a fresh
// multi-megabyte buffer per call costs its page faults every step, more than the GEMMs at demo sizes).
// Every byte handed out is written before it is read.
char* scratch_bytes(std::vector<char>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}
thread_local std::vector<char> t_x, t_g, t_u, t_dh, t_dg, t_du;
// buffers over 256 MiB are not kept past the call that needed them (memory held between steps stays
// bounded at large shapes, where a page fault per 4 KiB is small beside the GEMMs anyway)
void trim_scratch() {
  for (std::vector<char>* v : {&t_x, &t_g, &t_u, &t_dh, &t_dg, &t_du})
    if (v->capacity() > ((size_t)256 << 20)) std::vector<char>().swap(*v);
}

// x gathered into xe [M, d] (dtype, the calling thread's t_x), row i = x[gather[i] / div] or zeros;
// without gather: x itself
const void* gather_rows(const void* x, const int* gather, int div, int S, int M, int d, size_t es) {
  if (!gather) return x;
  const size_t row = (size_t)d * es;
  char* xe = scratch_bytes(t_x, (size_t)M * row);
  for (int i = 0; i < M; i++) {
    const int src = gather[i] >= 0 ? gather[i] / div : -1;
    if (src >= 0 && src < S) memcpy(xe + (size_t)i * row, (const char*)x + (size_t)src * row, row);
    else memset(xe + (size_t)i * row, 0, row);
  }
  return xe;
}

// columns [c0, c0 + f) of the rows of m [M, 2f] into / out of a contiguous [M, f]
void split_half(const void* m, void* half, int M, int f, int c0, size_t es) {
  for (int i = 0; i < M; i++) memcpy((char*)half + (size_t)i * f * es, (const char*)m + ((size_t)i * 2 * f + c0) * es, (size_t)f * es);
}
void join_half(void* m, const void* half, int M, int f, int c0, size_t es) {
  for (int i = 0; i < M; i++) memcpy((char*)m + ((size_t)i * 2 * f + c0) * es, (const char*)half + (size_t)i * f * es, (size_t)f * es);
}

}  // namespace

int xft_cpu_gateup_forward(const void* x, const int* gather, int gather_div, int S, const void* w_gate,
                           const void* w_up, const int* offsets, void* gu, void* h, int dtype, int M, int f, int d,
                           int E) {
  const size_t es = elem_size(dtype);
  const void* xs = gather_rows(x, gather, gather_div, S, M, d, es);
  char* g = scratch_bytes(t_g, (size_t)M * f * es);
  char* u = scratch_bytes(t_u, (size_t)M * f * es);
  xft_cpu_grouped_gemm_forward(xs, w_gate, offsets, g, dtype, M, f, d, E);
  xft_cpu_grouped_gemm_forward(xs, w_up, offsets, u, dtype, M, f, d, E);
  join_half(gu, g, M, f, 0, es);
  join_half(gu, u, M, f, f, es);
  // h = silu(g) u by swiglu.cc itself (uncovered rows: g = u = 0 from the GEMMs, so h = 0)
  xft_cpu_swiglu_forward(g, u, h, dtype, (size_t)M * f);
  trim_scratch();
  return 0;
}

int xft_cpu_swiglu_down_backward(const void* dy, const void* w_down, const int* offsets, const void* gu, void* dgu,
                                 void* h, int dtype, int M, int f, int d, int E) {
  const size_t es = elem_size(dtype);
  char* dh = scratch_bytes(t_dh, (size_t)M * f * es);
  // dh [M, f] = dy [M, d] @ w_down[e] [d, f]: the grouped GEMM's dx with n = d, k = f (x unused without dw)
  xft_cpu_grouped_gemm_backward(dy, w_down, offsets, dy, dh, nullptr, dtype, dtype, M, d, f, E, 0, 0);
  // swiglu.cc's backward and forward on the halves of gu (rows outside the groups: dh = 0 there, and
  // g = u = 0 from the forward, so dg = du = h = 0; zeroed explicitly all the same)
  const size_t n = (size_t)M * f;
  char* g = scratch_bytes(t_g, n * es);
  char* u = scratch_bytes(t_u, n * es);
  char* dg = scratch_bytes(t_dg, n * es);
  char* du = scratch_bytes(t_du, n * es);
  split_half(gu, g, M, f, 0, es);
  split_half(gu, u, M, f, f, es);
  xft_cpu_swiglu_backward(g, u, dh, dg, du, dtype, n);
  xft_cpu_swiglu_forward(g, u, h, dtype, n);
  join_half(dgu, dg, M, f, 0, es);
  join_half(dgu, du, M, f, f, es);
  const std::vector<int> o = effective_offsets(offsets, E, M);
  const size_t grow = (size_t)2 * f * es, hrow = (size_t)f * es;
  for (int i = 0; i < M; i++)
    if (i < o.front() || i >= o.back()) {
      memset((char*)dgu + (size_t)i * grow, 0, grow);
      memset((char*)h + (size_t)i * hrow, 0, hrow);
    }
  trim_scratch();
  return 0;
}

int xft_cpu_gateup_backward(const void* x, const int* gather, int gather_div, int S, const void* w_gate,
                            const void* w_up, const int* offsets, const void* dgu, void* dx, void* dw_gate,
                            void* dw_up, int dtype, int dw_dtype, int M, int f, int d, int E, int accumulate,
                            int dx_accumulate) {
  const size_t es = elem_size(dtype);
  const std::vector<int> o = effective_offsets(offsets, E, M);
  const xft_gemm_kernel* kr = fast_kernel();
  if (dx && kr) {
    // the fast path: both halves' products summed into fp32 sums (the gate half, then the up half added
    // to them), rounded to the dtype once (added to dx first with dx_accumulate)
    if (!dx_accumulate) zero_uncovered_rows(dx, o, M, d, es);
    for (int e = 0; e < E; e++) {
      const int r0 = o[e], rows = o[e + 1] - o[e];
      if (rows == 0) continue;
      float* acc = (float*)scratch_bytes(t_dh, (size_t)rows * d * sizeof(float));
      const char* dgr = (const char*)dgu + (size_t)r0 * 2 * f * es;
      // acc[r, i] = sum_j dg[r, j] w_gate[e, j, i] (+ sum_j du[r, j] w_up[e, j, i])
      const xft_gemm_operand Ag{dgr, dtype, (size_t)2 * f, 1}, Au{dgr + (size_t)f * es, dtype, (size_t)2 * f, 1};
      const xft_gemm_operand Bg{(const char*)w_gate + (size_t)e * f * d * es, dtype, 1, (size_t)d};
      const xft_gemm_operand Bu{(const char*)w_up + (size_t)e * f * d * es, dtype, 1, (size_t)d};
      gemm(*kr, Ag, Bg, rows, d, f, GemmOut{acc, XFT_F32, (size_t)d, false});
      gemm(*kr, Au, Bu, rows, d, f, GemmOut{acc, XFT_F32, (size_t)d, true});
      char* out = (char*)dx + (size_t)r0 * d * es;
      const size_t n = (size_t)rows * d;
      if (dx_accumulate)
        for (size_t i = 0; i < n; i++) acc[i] += xft_cpu::load(out, dtype, i);
      from_f32(out, dtype, acc, n);
    }
  } else if (dx) {
    if (!dx_accumulate) zero_uncovered_rows(dx, o, M, d, es);
    std::vector<float> wg((size_t)f * d), wu((size_t)f * d);
    for (int e = 0; e < E; e++) {
      const int r0 = o[e], rows = o[e + 1] - o[e];
      if (rows == 0) continue;
      xft_cpu::to_f32(wg.data(), (const char*)w_gate + (size_t)e * f * d * es, dtype, (size_t)f * d);
      xft_cpu::to_f32(wu.data(), (const char*)w_up + (size_t)e * f * d * es, dtype, (size_t)f * d);
      xft_cpu::parallel_for((size_t)rows, 4.0 * rows * f * d, [&](size_t ra, size_t rb) {
        std::vector<float> acc(d), grow(2 * (size_t)f);
        for (size_t r = ra; r < rb; r++) {
          const size_t row = (size_t)r0 + r;
          xft_cpu::to_f32(grow.data(), (const char*)dgu + row * 2 * f * es, dtype, 2 * (size_t)f);
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int j = 0; j < 2 * f; j++) {  // [dg | du] @ [W_gate; W_up]: one sum over 2f
            const float gj = grow[j];
            const float* wj = (j < f ? wg.data() + (size_t)j * d : wu.data() + (size_t)(j - f) * d);
            for (int i = 0; i < d; i++) acc[i] += gj * wj[i];
          }
          char* out = (char*)dx + row * d * es;
          if (dx_accumulate)
            for (int i = 0; i < d; i++) acc[i] += xft_cpu::load(out, dtype, (size_t)i);
          from_f32(out, dtype, acc.data(), d);
        }
      });
    }
  }
  if (dw_gate && dw_up) {
    const void* xs = gather_rows(x, gather, gather_div, S, M, d, es);
    char* half = scratch_bytes(t_g, (size_t)M * f * es);
    split_half(dgu, half, M, f, 0, es);
    xft_cpu_grouped_gemm_backward(xs, w_gate, offsets, half, nullptr, dw_gate, dtype, dw_dtype, M, f, d, E, accumulate, 0);
    split_half(dgu, half, M, f, f, es);
    xft_cpu_grouped_gemm_backward(xs, w_up, offsets, half, nullptr, dw_up, dtype, dw_dtype, M, f, d, E, accumulate, 0);
  }
  trim_scratch();
  return 0;
}

// q, k, v as one GEMM (cuda/grouped_gemm.cu kQkv): each exactly the one-group grouped GEMM's output
int xft_cpu_qkv_forward(const void* x, const void* wq, const void* wk, const void* wv, const int* offsets, void* q,
                        void* k, void* v, int dtype, int M, int nq, int nk, int d) {
  xft_cpu_grouped_gemm_forward(x, wq, offsets, q, dtype, M, nq, d, 1);
  xft_cpu_grouped_gemm_forward(x, wk, offsets, k, dtype, M, nk, d, 1);
  xft_cpu_grouped_gemm_forward(x, wv, offsets, v, dtype, M, nk, d, 1);
  return 0;
}
