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
  XFT_NUM_THREADS. Inputs are read in place by the packing (bf16 widened there), 8 MiB of panels at a
  time at most; the experts of one call are batched (see kChunkM below for the partition and threads).
- the reference path (XFT_CPU_REFERENCE=1, read at each call): the plain loops below, separate
  multiply and add, each sum in k (forward), n (dx) or row (dw) order. test/21.gemm_fast.ts holds the
  two together: with f32 inputs within 1e-5 relative (norm; fused vs separately rounded products),
  with bf16 inputs bit for bit (a product of two bf16 values is exact in fp32: the same sums in the
  same order). The cuda/grouped_gemm.cu kernels sum in their own order: test/30 compares them to
  this file within tolerances, never bit for bit.
Scratch (per calling thread, kept across calls): the packed panels of one batch (kPackFloats), with
bf16 or accumulated outputs one task's fp32 sums per thread, and for a slice cut along its depth its
fp32 sums (kChunkM x kChunkN at most).
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <system_error>
#include <thread>
#include <tuple>
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

// The driver runs a list of GEMMs (one per expert) in batches. A GEMM's C is cut into slices of at most
// kChunkM x kChunkN, and its depth into super-blocks whose packed panels fit kPackFloats; a batch is
// consecutive slices whose packed panels fit kPackFloats together (several small experts share one).
// Per batch, two jobs on the pool: (1) pack every panel of A and B of the batch's slices, in parallel
// units of about kPackUnit values (each value packed once, by one thread; an operand whose rows are
// contiguous in memory is cut along the depth too, so that a unit reads whole cache lines); (2) the
// tasks: 2-D blocks of C, each over the slice's whole depth (its C block stays in cache across the
// depth blocks), as even as the panels allow and, per slice, a multiple of the thread count where the
// panels allow it. A slice whose depth is cut into several super-blocks is a batch of its own, the
// later ones continuing the sums of the earlier (in the output when it is f32 and overwritten, else in
// fp32 scratch).
constexpr int kChunkM = 2048, kChunkN = 2048;
constexpr size_t kPackFloats = (size_t)2 << 20;  // 8 MiB of packed panels per batch
constexpr size_t kPackUnit = (size_t)32 << 10;   // values per packing unit (a few per thread)
// parallel_tasks' threshold counts work at the scalar kernels' rate (2 Mflop a thread); the packed
// kernels are ~20x faster, but a job on the pool costs microseconds, so a batch below ~8 Mflop (~50 us
// on one thread) stays on the calling thread
constexpr double kFastFlopsPerWork = 2;

// C [M, N] of out (row stride ld elements): overwritten, or with accumulate out = out + sum (the sum
// rounded to fp32 first, then added, then rounded to the dtype once)
struct GemmOut {
  void* data;
  int dtype;
  size_t ld;
  bool accumulate;
};

// out (+)= A B^T: A [M, K], B [N, K] (operands of gemm_kernels.h)
struct Gemm {
  xft_gemm_operand A, B;
  int M, N, K;
  GemmOut out;
};

// rows [m0, m0 + mb) x columns [n0, n0 + nb) of one GEMM's C over depth [k0, k0 + kn)
struct Slice {
  const Gemm* g;
  int m0, mb, n0, nb, k0, kn;
  int pa, pb;     // packed panels: ceil(mb / mr) of A, ceil(nb / nr) of B
  int tm, tn;     // task blocks along M and N
  size_t packed;  // where its panels start in the batch's packed buffer: A (pa * mr * kn), then B
};

// a unit of packing: rows [r0, r0 + rows) of a slice's A (or B) over depth [d0, d1)
struct PackUnit {
  int slice;
  bool b;
  int r0, rows;
  int d0, d1;  // depth [d0, d1) of the slice's, multiples of kc (the last may end at kn)
};

// buffers of the calling thread, kept across calls (the pool's threads work on the caller's)
float* scratch(std::vector<float>& v, size_t n) {
  if (v.size() < n + 16) v.resize(n + 16);
  uintptr_t p = (uintptr_t)v.data();
  return (float*)((p + 63) & ~(uintptr_t)63);
}
thread_local std::vector<float> t_packed, t_sums;
thread_local std::vector<float> t_tile;  // each thread's own: one task's fp32 sums
thread_local std::vector<Slice> t_slices;
thread_local std::vector<PackUnit> t_units;

bool direct_out(const GemmOut& o) { return o.dtype == XFT_F32 && !o.accumulate; }  // sums straight into it

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

// block `i` of `blocks` over `panels` panels of `r` rows covering `total` rows: [*r0, *r0 + *rows)
void panel_block(int i, int blocks, int panels, int r, int total, int* r0, int* rows) {
  const int p0 = (int)((long)panels * i / blocks), p1 = (int)((long)panels * (i + 1) / blocks);
  *r0 = p0 * r;
  *rows = std::min(p1 * r, total) - *r0;
}

// a GEMM with K = 0: out = 0, or out = out + 0 with accumulate
void gemm_empty(const Gemm& g) {
  const std::vector<float> zeros((size_t)g.N, 0.f);
  for (int i = 0; i < g.M; i++) write_out(g.out, (size_t)i, 0, 1, g.N, zeros.data(), 0);
}

// one batch of slices: pack, then the tasks; `sums` holds the fp32 partial sums of a lone slice cut
// along its depth whose output is not f32 overwritten (mb x nb)
void run_batch(const xft_gemm_kernel& kr, Slice* sl, int count, float* sums) {
  const int mr = kr.mr, nr = kr.nr;
  double flops = 0;
  size_t floats = 0;
  for (int s = 0; s < count; s++) {
    flops += 2.0 * sl[s].mb * sl[s].nb * sl[s].kn;
    sl[s].packed = floats;
    floats += ((size_t)sl[s].pa * mr + (size_t)sl[s].pb * nr) * sl[s].kn;
  }
  const double work = flops / kFastFlopsPerWork;
  const int T = xft_cpu::threads_for(work);
  float* packed = scratch(t_packed, floats);
  // the tasks: blocks of at most kr.mc x kr.nc, a multiple of T per slice where the panels allow
  size_t tasks = 0;
  for (int s = 0; s < count; s++) {
    Slice& x = sl[s];
    x.tm = (x.pa + kr.mc / mr - 1) / (kr.mc / mr);
    x.tn = (x.pb + kr.nc / nr - 1) / (kr.nc / nr);
    while (T > 1 && (x.tm * x.tn) % T && (x.tm < x.pa || x.tn < x.pb)) {
      if (x.tm < x.pa) x.tm++;
      else x.tn++;
    }
    tasks += (size_t)x.tm * x.tn;
  }
  // (1) packing, in units of about kPackUnit values
  std::vector<PackUnit>& units = t_units;
  units.clear();
  for (int s = 0; s < count; s++)
    for (int b = 0; b < 2; b++) {
      const int r = b ? nr : mr, total = b ? sl[s].nb : sl[s].mb;
      const xft_gemm_operand& op = b ? sl[s].g->B : sl[s].g->A;
      const int kn = sl[s].kn;
      int step, depth;
      if (op.rs == 1) {  // rows contiguous: many of them (whole cache lines), a slice of the depth
        step = std::max(r, std::min((total + r - 1) / r * r, (int)(kPackUnit / (size_t)kr.kc) / r * r));
        depth = std::min(kn, std::max(kr.kc, (int)(kPackUnit / (size_t)step) / kr.kc * kr.kc));
      } else {  // the depth contiguous: a few panels of rows, the whole depth
        step = std::max(r, (int)(kPackUnit / (size_t)kn) / r * r);
        depth = kn;
      }
      for (int r0 = 0; r0 < total; r0 += step)
        for (int d0 = 0; d0 < kn; d0 += depth)
          units.push_back(PackUnit{s, b != 0, r0, std::min(step, total - r0), d0, std::min(kn, d0 + depth)});
    }
  xft_cpu::parallel_tasks(units.size(), T > 1 ? work : 0, [&](size_t u) {
    const PackUnit& p = units[u];
    const Slice& x = sl[p.slice];
    const int r = p.b ? nr : mr, panels = p.b ? x.pb : x.pa;
    float* base = packed + x.packed + (p.b ? (size_t)x.pa * mr * x.kn : 0);
    for (int d = p.d0; d < p.d1; d += kr.kc) {
      const int kc = std::min(kr.kc, x.kn - d);
      float* dst = base + (size_t)d * panels * r + (size_t)p.r0 * kc;
      if (p.b) kr.pack_b(dst, x.g->B, (size_t)(x.n0 + p.r0), p.rows, (size_t)(x.k0 + d), kc);
      else kr.pack_a(dst, x.g->A, (size_t)(x.m0 + p.r0), p.rows, (size_t)(x.k0 + d), kc);
    }
  });
  // (2) the tasks
  xft_cpu::parallel_tasks(tasks, T > 1 ? work : 0, [&](size_t task) {
    int s = 0;
    while (task >= (size_t)sl[s].tm * sl[s].tn) task -= (size_t)sl[s].tm * sl[s].tn, s++;
    const Slice& x = sl[s];
    const GemmOut& out = x.g->out;
    int i0, m, j0, n;
    panel_block((int)(task / x.tn), x.tm, x.pa, mr, x.mb, &i0, &m);
    panel_block((int)(task % x.tn), x.tn, x.pb, nr, x.nb, &j0, &n);
    const bool split = x.kn < x.g->K, last = x.k0 + x.kn == x.g->K;
    float* c;
    size_t ldc;
    if (direct_out(out)) c = (float*)out.data + (size_t)(x.m0 + i0) * out.ld + x.n0 + j0, ldc = out.ld;
    else if (split) c = sums + (size_t)i0 * x.nb + j0, ldc = (size_t)x.nb;
    else c = scratch(t_tile, (size_t)m * n), ldc = (size_t)n;
    const float* a = packed + x.packed;
    const float* b = a + (size_t)x.pa * mr * x.kn;
    for (int d = 0; d < x.kn; d += kr.kc) {
      const int kc = std::min(kr.kc, x.kn - d);
      kr.block(a + (size_t)d * x.pa * mr + (size_t)i0 * kc, b + (size_t)d * x.pb * nr + (size_t)j0 * kc, m, n, kc, c, ldc,
               x.k0 + d > 0);
    }
    if (last && !direct_out(out)) write_out(out, (size_t)(x.m0 + i0), (size_t)(x.n0 + j0), m, n, c, ldc);
  });
}

// the GEMMs g[0 .. count), in batches (see the comment at kChunkM); their outputs must not overlap
void gemm(const xft_gemm_kernel& kr, const Gemm* g, int count) {
  std::vector<Slice>& sl = t_slices;
  sl.clear();
  for (int q = 0; q < count; q++) {
    if (g[q].M <= 0 || g[q].N <= 0) continue;
    if (g[q].K <= 0) {
      gemm_empty(g[q]);
      continue;
    }
    const int mc = even_block(g[q].M, kChunkM, kr.mr), nc = even_block(g[q].N, kChunkN, kr.nr);
    for (int m0 = 0; m0 < g[q].M; m0 += mc)
      for (int n0 = 0; n0 < g[q].N; n0 += nc) {
        Slice x{};
        x.g = &g[q];
        x.m0 = m0, x.mb = std::min(mc, g[q].M - m0), x.n0 = n0, x.nb = std::min(nc, g[q].N - n0);
        x.pa = (x.mb + kr.mr - 1) / kr.mr, x.pb = (x.nb + kr.nr - 1) / kr.nr;
        const size_t rows = (size_t)x.pa * kr.mr + (size_t)x.pb * kr.nr;
        const int depth = std::max(kr.kc, (int)(kPackFloats / rows) / kr.kc * kr.kc);
        for (int k0 = 0; k0 < g[q].K; k0 += depth) {
          x.k0 = k0, x.kn = std::min(depth, g[q].K - k0);
          sl.push_back(x);
        }
      }
  }
  for (size_t s = 0; s < sl.size();) {
    const Slice& x = sl[s];
    if (x.kn < x.g->K) {  // a slice cut along its depth: alone, its partial sums kept between batches
      run_batch(kr, &sl[s], 1, direct_out(x.g->out) ? nullptr : scratch(t_sums, (size_t)x.mb * x.nb));
      s++;
      continue;
    }
    size_t e = s, floats = 0;
    while (e < sl.size() && sl[e].kn == sl[e].g->K) {
      const size_t f = ((size_t)sl[e].pa * kr.mr + (size_t)sl[e].pb * kr.nr) * sl[e].kn;
      if (e > s && floats + f > kPackFloats) break;
      floats += f;
      e++;
    }
    run_batch(kr, &sl[s], (int)(e - s), nullptr);
    s = e;
  }
}

bool env_is(const char* name, const char* value) {
  const char* v = getenv(name);
  return v && strcmp(v, value) == 0;
}

// the kernel for this CPU (XFT_CPU_ISA may ask for a lesser one)
const xft_gemm_kernel* isa_kernel() {
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

// isa_kernel(), or null for the reference path (XFT_CPU_REFERENCE=1)
const xft_gemm_kernel* fast_kernel() {
  return env_is("XFT_CPU_REFERENCE", "1") ? nullptr : isa_kernel();
}

}  // namespace

const char* xft_cpu_gemm_kernel_name() {
  const xft_gemm_kernel* k = fast_kernel();
  return k ? k->name : "reference";
}

// The machine's floating-point ceiling as the GEMM's kernel sees it: `threads` OS threads (not the pool:
// each must run the whole time) each run the kernel's register-only FMA loop for the same number of
// rounds, sized so that one round of all of them takes about ms / 5 on this machine; the best of at least
// 3 rounds within about ms. GFLOP/s of all threads together (wall time from the first start to the last
// end), or -1 where a thread could not be started.
double xft_cpu_peak_gflops(int threads, double ms) {
  using clock = std::chrono::steady_clock;
  const xft_gemm_kernel* kr = isa_kernel();
  volatile float sink = 0.f;
  // calibrate on this thread: rounds for ms / 5 of one thread's work
  long iters = 1 << 12;
  for (;;) {
    const auto t0 = clock::now();
    sink = sink + kr->peak(iters);
    const double took = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
    if (took >= 2.0 || iters >= (1L << 40)) {
      iters = std::max(1L, (long)(iters * (ms / 5) / std::max(took, 1e-3)));
      break;
    }
    iters *= 4;
  }
  double best = 0;
  const auto start = clock::now();
  for (int round = 0; round < 3 || std::chrono::duration<double, std::milli>(clock::now() - start).count() < ms; round++) {
    std::atomic<int> ready{0};
    std::atomic<bool> go{false};
    std::vector<clock::time_point> t0(threads), t1(threads);
    std::vector<float> out(threads);
    auto body = [&](int i) {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      t0[i] = clock::now();
      out[i] = kr->peak(iters);
      t1[i] = clock::now();
    };
    std::vector<std::thread> pool;
    try {
      for (int i = 1; i < threads; i++) pool.emplace_back(body, i);
    } catch (const std::system_error&) {
      go.store(true);
      for (auto& th : pool) th.join();
      return -1;
    }
    while (ready.load() < threads - 1) std::this_thread::yield();
    go.store(true, std::memory_order_release);
    body(0);
    for (auto& th : pool) th.join();
    const double wall =
        std::chrono::duration<double>(*std::max_element(t1.begin(), t1.end()) - *std::min_element(t0.begin(), t0.end())).count();
    for (float v : out) sink = sink + v;
    if (wall > 0) best = std::max(best, (double)threads * iters * kr->peak_flops / wall / 1e9);
    if (round > 1000) break;
  }
  return best;
}

int xft_cpu_grouped_gemm_forward(const void* x, const void* w, const int* offsets, void* y,
                                 int dtype, int M, int n, int k, int E) {
  const xft_gemm_kernel* kr = fast_kernel();
  if (!kr) return reference_forward(x, w, offsets, y, dtype, M, n, k, E);
  const size_t es = elem_size(dtype);
  const std::vector<int> o = effective_offsets(offsets, E, M);
  zero_uncovered_rows(y, o, M, n, es);
  std::vector<Gemm> gs;
  for (int e = 0; e < E; e++) {
    const int r0 = o[e], rows = o[e + 1] - o[e];
    // y[r, j] = sum_i x[r, i] w[e, j, i]
    const xft_gemm_operand A{(const char*)x + (size_t)r0 * k * es, dtype, (size_t)k, 1};
    const xft_gemm_operand B{(const char*)w + (size_t)e * n * k * es, dtype, (size_t)k, 1};
    gs.push_back(Gemm{A, B, rows, n, k, GemmOut{(char*)y + (size_t)r0 * n * es, dtype, (size_t)n, false}});
  }
  gemm(*kr, gs.data(), (int)gs.size());
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
  std::vector<Gemm> gs;  // every expert's dx, then every expert's dw (disjoint outputs: one call)
  for (int e = 0; e < E && dx; e++) {
    const int r0 = o[e], rows = o[e + 1] - o[e];
    // dx[r, i] = sum_j dy[r, j] w[e, j, i]
    const xft_gemm_operand A{(const char*)dy + (size_t)r0 * n * es, dtype, (size_t)n, 1};
    const xft_gemm_operand B{(const char*)w + (size_t)e * n * k * es, dtype, 1, (size_t)k};
    gs.push_back(Gemm{A, B, rows, k, n, GemmOut{(char*)dx + (size_t)r0 * k * es, dtype, (size_t)k, dx_accumulate != 0}});
  }
  for (int e = 0; e < E && dw; e++) {
    const int r0 = o[e], rows = o[e + 1] - o[e];
    // dw[e, j, i] (+)= sum_r dy[r, j] x[r, i]; no rows: 0 (+ dw)
    const xft_gemm_operand A{(const char*)dy + (size_t)r0 * n * es, dtype, 1, (size_t)n};
    const xft_gemm_operand B{(const char*)x + (size_t)r0 * k * es, dtype, 1, (size_t)k};
    gs.push_back(Gemm{A, B, n, k, rows, GemmOut{(char*)dw + (size_t)e * n * k * dw_es, dw_dtype, (size_t)k, accumulate != 0}});
  }
  gemm(*kr, gs.data(), (int)gs.size());
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
  xft_cpu::parallel_for((size_t)M, 2.0 * M * d, [&](size_t a, size_t b) {
    for (size_t i = a; i < b; i++) {
      const int src = gather[i] >= 0 ? gather[i] / div : -1;
      if (src >= 0 && src < S) memcpy(xe + i * row, (const char*)x + (size_t)src * row, row);
      else memset(xe + i * row, 0, row);
    }
  });
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
  const xft_gemm_kernel* kr = fast_kernel();
  if (!kr) {  // the reference path: the grouped GEMM twice, then swiglu.cc over the whole of g and u
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
  // the fast path: g and u straight into the halves of gu (row stride 2f), both in one call; then
  // swiglu.cc row by row (elementwise: the same values as over the whole)
  const std::vector<int> o = effective_offsets(offsets, E, M);
  zero_uncovered_rows(gu, o, M, 2 * f, es);
  std::vector<Gemm> gs;
  for (int e = 0; e < E; e++) {
    const int r0 = o[e], rows = o[e + 1] - o[e];
    const xft_gemm_operand A{(const char*)xs + (size_t)r0 * d * es, dtype, (size_t)d, 1};
    char* out = (char*)gu + (size_t)r0 * 2 * f * es;
    for (int half = 0; half < 2; half++) {
      const xft_gemm_operand B{(const char*)(half ? w_up : w_gate) + (size_t)e * f * d * es, dtype, (size_t)d, 1};
      gs.push_back(Gemm{A, B, rows, f, d, GemmOut{out + (size_t)half * f * es, dtype, (size_t)2 * f, false}});
    }
  }
  gemm(*kr, gs.data(), (int)gs.size());
  xft_cpu::parallel_for((size_t)M, 20.0 * M * f, [&](size_t a, size_t b) {
    xft_cpu_swiglu_forward_rows((const char*)gu + a * 2 * f * es, (char*)h + a * f * es, dtype, b - a, (size_t)f);
  });
  trim_scratch();
  return 0;
}

int xft_cpu_swiglu_down_backward(const void* dy, const void* w_down, const int* offsets, const void* gu, void* dgu,
                                 void* h, int dtype, int M, int f, int d, int E) {
  const size_t es = elem_size(dtype);
  char* dh = scratch_bytes(t_dh, (size_t)M * f * es);
  // dh [M, f] = dy [M, d] @ w_down[e] [d, f]: the grouped GEMM's dx with n = d, k = f (x unused without dw)
  xft_cpu_grouped_gemm_backward(dy, w_down, offsets, dy, dh, nullptr, dtype, dtype, M, d, f, E, 0, 0);
  // swiglu.cc's backward and forward on the halves of each row of gu (rows outside the groups: dh = 0
  // there, and g = u = 0 from the forward, so dg = du = h = 0; zeroed explicitly all the same)
  const std::vector<int> o = effective_offsets(offsets, E, M);
  const size_t grow = (size_t)2 * f * es, hrow = (size_t)f * es;
  const size_t r0 = (size_t)o.front(), r1 = (size_t)o.back();
  xft_cpu::parallel_for((size_t)M, 50.0 * M * f, [&](size_t a, size_t b) {
    const size_t ca = std::min(std::max(a, r0), r1), cb = std::max(std::min(b, r1), r0);  // [ca, cb): covered
    for (size_t i = a; i < b; i++)
      if (i < r0 || i >= r1) {
        memset((char*)dgu + i * grow, 0, grow);
        memset((char*)h + i * hrow, 0, hrow);
      }
    if (ca < cb) {
      xft_cpu_swiglu_backward_rows((const char*)gu + ca * grow, dh + ca * hrow, (char*)dgu + ca * grow, dtype, cb - ca, (size_t)f);
      xft_cpu_swiglu_forward_rows((const char*)gu + ca * grow, (char*)h + ca * hrow, dtype, cb - ca, (size_t)f);
    }
  });
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
    const int first = o.front(), covered = o.back() - o.front();
    float* acc = (float*)scratch_bytes(t_dh, (size_t)covered * d * sizeof(float));
    std::vector<Gemm> gate, up;  // acc[r, i] = sum_j dg[r, j] w_gate[e, j, i], then + sum_j du[r, j] w_up[e, j, i]
    for (int e = 0; e < E; e++) {
      const int r0 = o[e], rows = o[e + 1] - o[e];
      const char* dgr = (const char*)dgu + (size_t)r0 * 2 * f * es;
      const xft_gemm_operand Ag{dgr, dtype, (size_t)2 * f, 1}, Au{dgr + (size_t)f * es, dtype, (size_t)2 * f, 1};
      const xft_gemm_operand Bg{(const char*)w_gate + (size_t)e * f * d * es, dtype, 1, (size_t)d};
      const xft_gemm_operand Bu{(const char*)w_up + (size_t)e * f * d * es, dtype, 1, (size_t)d};
      float* acc_e = acc + (size_t)(r0 - first) * d;
      gate.push_back(Gemm{Ag, Bg, rows, d, f, GemmOut{acc_e, XFT_F32, (size_t)d, false}});
      up.push_back(Gemm{Au, Bu, rows, d, f, GemmOut{acc_e, XFT_F32, (size_t)d, true}});
    }
    gemm(*kr, gate.data(), E);
    gemm(*kr, up.data(), E);  // after the gate half: the same sums
    char* out = (char*)dx + (size_t)first * d * es;
    xft_cpu::parallel_for((size_t)covered * d, 3.0 * covered * d, [&](size_t a, size_t b) {
      if (dx_accumulate)
        for (size_t i = a; i < b; i++) acc[i] += xft_cpu::load(out, dtype, i);
      from_f32(out + a * es, dtype, acc + a, b - a);
    });
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
  if (dw_gate && dw_up && kr) {
    // the fast path: dW_gate[e], dW_up[e] (+)= dg^T x, du^T x read in place from dgu (row stride 2f), all
    // in one call: the grouped GEMM's dw for each half
    const void* xs = gather_rows(x, gather, gather_div, S, M, d, es);
    const size_t dw_es = elem_size(dw_dtype);
    std::vector<Gemm> gs;
    for (int half = 0; half < 2; half++)
      for (int e = 0; e < E; e++) {
        const int r0 = o[e], rows = o[e + 1] - o[e];
        const xft_gemm_operand A{(const char*)dgu + ((size_t)r0 * 2 * f + (size_t)half * f) * es, dtype, 1, (size_t)2 * f};
        const xft_gemm_operand B{(const char*)xs + (size_t)r0 * d * es, dtype, 1, (size_t)d};
        void* dw = (char*)(half ? dw_up : dw_gate) + (size_t)e * f * d * dw_es;
        gs.push_back(Gemm{A, B, f, d, rows, GemmOut{dw, dw_dtype, (size_t)d, accumulate != 0}});
      }
    gemm(*kr, gs.data(), (int)gs.size());
  } else if (dw_gate && dw_up) {
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
  const xft_gemm_kernel* kr = fast_kernel();
  if (!kr) {
    xft_cpu_grouped_gemm_forward(x, wq, offsets, q, dtype, M, nq, d, 1);
    xft_cpu_grouped_gemm_forward(x, wk, offsets, k, dtype, M, nk, d, 1);
    xft_cpu_grouped_gemm_forward(x, wv, offsets, v, dtype, M, nk, d, 1);
    return 0;
  }
  // the fast path: the three in one call
  const size_t es = elem_size(dtype);
  const std::vector<int> o = effective_offsets(offsets, 1, M);
  const int r0 = o[0], rows = o[1] - o[0];
  const xft_gemm_operand A{(const char*)x + (size_t)r0 * d * es, dtype, (size_t)d, 1};
  Gemm gs[3];
  int count = 0;
  for (auto [w, y, n] : {std::make_tuple(wq, q, nq), std::make_tuple(wk, k, nk), std::make_tuple(wv, v, nk)}) {
    zero_uncovered_rows(y, o, M, n, es);
    gs[count++] = Gemm{A, xft_gemm_operand{w, dtype, (size_t)d, 1}, rows, n, d, GemmOut{(char*)y + (size_t)r0 * n * es, dtype, (size_t)n, false}};
  }
  gemm(*kr, gs, count);
  return 0;
}
