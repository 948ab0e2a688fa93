/*
Standalone check of cuda/routing.cu and cuda/merge.cu against their CPU twins
(binding/cpu/routing.cc, binding/cpu/merge.cc), plus run-to-run bit reproducibility and a
rough timing. Not part of the addon build (CMake globs cuda/*.cu only). From the repo root:

  nvcc -std=c++17 -O3 -arch=sm_90a -Icuda -Ibinding/cpu cuda/dev/test_routing_merge.cu \
    cuda/routing.cu cuda/merge.cu cuda/runtime.cu binding/cpu/routing.cc binding/cpu/merge.cc \
    binding/cpu/fill.cc -o /tmp/test_routing_merge && /tmp/test_routing_merge

Exact: experts, counts, offsets, order, load. Close: weights, importance (1e-5 relative +
1e-6 absolute), dlogits (f32: 1e-5 of the row's largest magnitude + 1e-6; bf16: 1e-2),
merged (f32 1e-6, bf16 one ulp), dalpha (1e-5 of the largest |dalpha| + 1e-7).
Prints 'N passed, M failed' last; exit status 1 on any failure. '--bench' adds timings.
XFT_VERBOSE=1 names each routing case. cuda/dev/emu/run.sh runs the same checks without a GPU.
*/
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <string>
#include <vector>

#include "xft_cpu.h"
#include "xft_cuda.h"
#include "xft_math.h"

extern "C" cudaStream_t xft_cuda_stream(void);

static int g_pass = 0, g_fail = 0;

#define CK(call)                                                                            \
  do {                                                                                      \
    int e_ = (call);                                                                        \
    if (e_) {                                                                               \
      fprintf(stderr, "%s:%d %s -> %s\n", __FILE__, __LINE__, #call, xft_cuda_error_string(e_)); \
      exit(2);                                                                              \
    }                                                                                       \
  } while (0)

static void report(bool ok, const std::string& what, const std::string& detail = "") {
  if (ok) g_pass++;
  else g_fail++;
  if (!ok) printf("FAIL %s %s\n", what.c_str(), detail.c_str());
}

template <typename T>
static T* dev_copy(const std::vector<T>& h) {
  void* d = nullptr;
  CK(xft_cuda_malloc(&d, h.size() * sizeof(T)));
  CK(xft_cuda_memcpy_h2d(d, h.data(), h.size() * sizeof(T)));
  return (T*)d;
}

template <typename T>
static T* dev_alloc(size_t n) {
  void* d = nullptr;
  CK(xft_cuda_malloc(&d, n * sizeof(T)));
  CK(xft_cuda_memset(d, 0xA5, n * sizeof(T)));  // garbage, so unwritten outputs show
  return (T*)d;
}

template <typename T>
static std::vector<T> host_copy(const T* d, size_t n) {
  std::vector<T> h(n);
  CK(xft_cuda_memcpy_d2h(h.data(), d, n * sizeof(T)));
  return h;
}

template <typename T>
static bool same(const std::vector<T>& a, const std::vector<T>& b, std::string* where) {
  for (size_t i = 0; i < a.size(); i++)
    if (memcmp(&a[i], &b[i], sizeof(T))) {
      *where = "first difference at " + std::to_string(i);
      return false;
    }
  return true;
}

static bool close(const std::vector<float>& got, const std::vector<float>& ref, double rel, double abs_, std::string* where) {
  double worst = 0;
  size_t wi = 0;
  bool ok = true;
  for (size_t i = 0; i < got.size(); i++) {
    double d = fabs((double)got[i] - (double)ref[i]), tol = abs_ + rel * fabs((double)ref[i]);
    if (!(d <= tol) && !(std::isnan(got[i]) && std::isnan(ref[i]))) {
      ok = false;
      if (!(d <= worst)) worst = d, wi = i;
    }
  }
  if (!ok) *where = "worst at " + std::to_string(wi) + ": got " + std::to_string(got[wi]) + " want " + std::to_string(ref[wi]);
  return ok;
}

// kind 0: normal logits; 1: many ties (values on a grid of 0.5); 2: ties plus NaN and +-inf
static std::vector<float> make_logits(int T, int N, uint64_t seed, int kind) {
  std::vector<float> v((size_t)T * N);
  for (size_t i = 0; i < v.size(); i++) {
    float u = xft_normal(seed, i) * 2.f;
    v[i] = kind ? roundf(u * 2.f) / 2.f : u;
    if (kind == 2 && i % 13 == 3) v[i] = NAN;
    if (kind == 2 && i % 17 == 5) v[i] = -INFINITY;
    if (kind == 2 && i % 23 == 7) v[i] = INFINITY;
  }
  return v;
}

static std::vector<char> encode(const std::vector<float>& v, int dtype) {
  std::vector<char> out(v.size() * (dtype == XFT_BF16 ? 2 : 4));
  for (size_t i = 0; i < v.size(); i++) {
    if (dtype == XFT_BF16) ((uint16_t*)out.data())[i] = xft_f32_to_bf16(v[i]);
    else ((float*)out.data())[i] = v[i];
  }
  return out;
}

static std::vector<float> decode(const std::vector<char>& b, int dtype, size_t n) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; i++) v[i] = dtype == XFT_BF16 ? xft_bf16_to_f32(((const uint16_t*)b.data())[i]) : ((const float*)b.data())[i];
  return v;
}

static void test_route(int T, int N, int K, int normalize, int shared, int dtype, int kind) {
  const int E = shared ? N + 1 : N;
  char name[160];
  snprintf(name, sizeof name, "route T=%d N=%d K=%d norm=%d shared=%d %s%s", T, N, K, normalize, shared,
           dtype == XFT_BF16 ? "bf16" : "f32", kind == 1 ? " ties" : kind == 2 ? " nan/inf" : "");
  if (getenv("XFT_VERBOSE")) printf("%s\n", name);
  std::vector<float> lf = make_logits(T, N, 1000 + T * 31 + N * 7 + K, kind);
  std::vector<char> lb = encode(lf, dtype);
  // CPU twin
  std::vector<int> ex((size_t)T * K), cnt(E), off(E + 1), ord((size_t)T * K);
  std::vector<float> w((size_t)T * K), imp(N), load(N);
  xft_cpu_route_forward(lb.data(), dtype, T, N, K, normalize, shared, ex.data(), w.data(), cnt.data(), off.data(),
                        ord.data(), imp.data(), load.data(), nullptr);
  // GPU, twice
  std::vector<char> lbd = lb.empty() ? std::vector<char>(4) : lb;
  void* dl = dev_copy(lbd);
  size_t P = std::max<size_t>((size_t)T * K, 1);
  int *dex = dev_alloc<int>(P), *dcnt = dev_alloc<int>(E), *doff = dev_alloc<int>(E + 1), *dord = dev_alloc<int>(P);
  float *dw = dev_alloc<float>(P), *dimp = dev_alloc<float>(N), *dload = dev_alloc<float>(N);
  std::vector<float> w_first, imp_first;
  std::vector<int> ord_first;
  for (int rep = 0; rep < 2; rep++) {
    CK(xft_cuda_route_forward(dl, dtype, T, N, K, normalize, shared, dex, dw, dcnt, doff, dord, dimp, dload, nullptr));
    CK(xft_cuda_synchronize());
    auto gex = host_copy(dex, (size_t)T * K), gcnt = host_copy(dcnt, E), goff = host_copy(doff, E + 1),
         gord = host_copy(dord, (size_t)T * K);
    auto gw = host_copy(dw, (size_t)T * K), gimp = host_copy(dimp, N), gload = host_copy(dload, N);
    std::string where;
    if (rep == 0) {
      report(same(gex, ex, &where), std::string(name) + " experts", where);
      report(same(gcnt, cnt, &where), std::string(name) + " counts", where);
      report(same(goff, off, &where), std::string(name) + " offsets", where);
      report(same(gord, ord, &where), std::string(name) + " order", where);
      report(same(gload, load, &where), std::string(name) + " load", where);
      report(close(gw, w, 1e-5, 1e-6, &where), std::string(name) + " weights", where);
      report(close(gimp, imp, 1e-5, 1e-6, &where), std::string(name) + " importance", where);
      w_first = gw, imp_first = gimp, ord_first = gord;
    } else {
      report(same(gw, w_first, &where) && same(gimp, imp_first, &where) && same(gord, ord_first, &where),
             std::string(name) + " reproducible", where);
    }
  }
  // backward, with and without dimportance (not for NaN logits: NaN gradients)
  for (int with_imp = 0; with_imp < 2 && kind != 2; with_imp++) {
    std::vector<float> dg((size_t)T * K), di(N);
    for (size_t i = 0; i < dg.size(); i++) dg[i] = xft_normal(77, i);
    for (int j = 0; j < N; j++) di[j] = xft_normal(78, j);
    std::vector<char> dz_cpu(lb.size());
    xft_cpu_route_backward(lb.data(), dtype, T, N, K, normalize, shared, ex.data(), dg.data(),
                           with_imp ? di.data() : nullptr, dz_cpu.data(), nullptr);
    std::vector<float> dgd = dg.empty() ? std::vector<float>(1) : dg;
    float *ddg = dev_copy(dgd), *ddi = dev_copy(di);
    void* ddz = dev_alloc<char>(std::max<size_t>(lb.size(), 4));
    CK(xft_cuda_route_backward(dl, dtype, T, N, K, normalize, shared, dex, ddg, with_imp ? ddi : nullptr, ddz, nullptr));
    std::vector<char> dz_gpu = host_copy((char*)ddz, lb.size());
    std::vector<float> a = decode(dz_gpu, dtype, (size_t)T * N), b = decode(dz_cpu, dtype, (size_t)T * N);
    // tolerance relative to each row's largest gradient
    bool ok = true;
    std::string where;
    for (int t = 0; t < T && ok; t++) {
      double big = 0;
      for (int j = 0; j < N; j++) big = std::max(big, (double)fabsf(b[(size_t)t * N + j]));
      for (int j = 0; j < N; j++) {
        double d = fabs((double)a[(size_t)t * N + j] - b[(size_t)t * N + j]);
        double tol = dtype == XFT_BF16 ? 1e-2 * big + 1e-3 : 1e-5 * big + 1e-6;
        if (!(d <= tol)) {
          ok = false;
          where = "t=" + std::to_string(t) + " j=" + std::to_string(j) + " got " + std::to_string(a[(size_t)t * N + j]) +
                  " want " + std::to_string(b[(size_t)t * N + j]);
          break;
        }
      }
    }
    report(ok, std::string(name) + (with_imp ? " dlogits (+dimportance)" : " dlogits"), where);
    CK(xft_cuda_free(ddg));
    CK(xft_cuda_free(ddi));
    CK(xft_cuda_free(ddz));
  }
  for (void* p : {(void*)dl, (void*)dex, (void*)dcnt, (void*)doff, (void*)dord, (void*)dw, (void*)dimp, (void*)dload})
    CK(xft_cuda_free(p));
}

static void test_merge(int E, int dtype, float shared_rate, const std::vector<size_t>& sizes, int accumulate) {
  char name[160];
  snprintf(name, sizeof name, "merge E=%d %s rate=%g tensors=%zu acc=%d", E, dtype == XFT_BF16 ? "bf16" : "f32",
           shared_rate, sizes.size(), accumulate);
  const int A = shared_rate >= 0 ? E - 1 : E;
  const size_t es = dtype == XFT_BF16 ? 2 : 4;
  std::vector<float> alpha(A);
  for (int i = 0; i < A; i++) alpha[i] = xft_normal(5, i);
  float* dalpha_in = dev_copy(alpha);
  std::vector<std::vector<char>> stacks, dmer;
  std::vector<void*> dstack, dout, ddm;
  for (size_t t = 0; t < sizes.size(); t++) {
    std::vector<float> s(E * sizes[t]), g(sizes[t]);
    for (size_t i = 0; i < s.size(); i++) s[i] = xft_normal(100 + t, i) * 0.05f;
    for (size_t i = 0; i < g.size(); i++) g[i] = xft_normal(200 + t, i);
    stacks.push_back(encode(s, dtype));
    dmer.push_back(encode(g, dtype));
    std::vector<char> sd = stacks.back(), gd = dmer.back();
    if (sd.empty()) sd.resize(16), gd.resize(16);
    dstack.push_back(dev_copy(sd));
    ddm.push_back(dev_copy(gd));
    dout.push_back(dev_alloc<char>(std::max<size_t>(sizes[t] * es, 16)));
  }
  std::vector<const void*> hstack;
  std::vector<void*> hout;
  std::vector<std::vector<char>> cpu_out;
  for (size_t t = 0; t < sizes.size(); t++) {
    hstack.push_back(stacks[t].data());
    cpu_out.emplace_back(std::max<size_t>(sizes[t] * es, 16));
    hout.push_back(cpu_out.back().data());
  }
  xft_cpu_merge_forward(hstack.data(), hout.data(), sizes.data(), (int)sizes.size(), dtype, E, alpha.data(), shared_rate);
  std::vector<const void*> cst(dstack.begin(), dstack.end());
  CK(xft_cuda_merge_forward(cst.data(), dout.data(), sizes.data(), (int)sizes.size(), dtype, E, dalpha_in, shared_rate));
  for (size_t t = 0; t < sizes.size(); t++) {
    std::vector<char> got = host_copy((char*)dout[t], sizes[t] * es);
    std::vector<float> a = decode(got, dtype, sizes[t]), b = decode(cpu_out[t], dtype, sizes[t]);
    std::string where;
    report(close(a, b, dtype == XFT_BF16 ? 8e-3 : 1e-6, 1e-7, &where), std::string(name) + " merged[" + std::to_string(t) + "]", where);
  }
  // backward
  std::vector<float> dal_cpu(A), init(A);
  for (int i = 0; i < A; i++) init[i] = dal_cpu[i] = accumulate ? 0.25f * i : 0.f;
  std::vector<const void*> hdm;
  for (auto& d : dmer) hdm.push_back(d.data());
  xft_cpu_merge_backward(hstack.data(), hdm.data(), sizes.data(), (int)sizes.size(), dtype, E, alpha.data(), shared_rate,
                         dal_cpu.data(), accumulate);
  std::vector<float> initd = init.empty() ? std::vector<float>(1) : init;
  float* ddal = dev_copy(initd);
  std::vector<const void*> cdm(ddm.begin(), ddm.end());
  std::vector<float> first;
  for (int rep = 0; rep < 2; rep++) {
    CK(xft_cuda_memcpy_h2d(ddal, initd.data(), initd.size() * 4));
    CK(xft_cuda_merge_backward(cst.data(), cdm.data(), sizes.data(), (int)sizes.size(), dtype, E, dalpha_in, shared_rate,
                               ddal, accumulate));
    std::vector<float> got = host_copy(ddal, A);
    std::string where;
    if (rep == 0) {
      double big = 0;
      for (float v : dal_cpu) big = std::max(big, (double)fabsf(v));
      report(close(got, dal_cpu, 0, 1e-5 * big + 1e-7, &where), std::string(name) + " dalpha", where);
      first = got;
    } else {
      report(same(got, first, &where), std::string(name) + " dalpha reproducible", where);
    }
  }
  CK(xft_cuda_free(ddal));
  CK(xft_cuda_free(dalpha_in));
  for (size_t t = 0; t < sizes.size(); t++) {
    CK(xft_cuda_free(dstack[t]));
    CK(xft_cuda_free(ddm[t]));
    CK(xft_cuda_free(dout[t]));
  }
}

static void bench() {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  float ms;
  {  // routing, XFT shape
    const int T = 131072, N = 7, K = 6, E = 8;
    std::vector<float> lf = make_logits(T, N, 9, 0);
    float* dl = dev_copy(lf);
    int *dex = dev_alloc<int>(T * K), *dcnt = dev_alloc<int>(E), *doff = dev_alloc<int>(E + 1), *dord = dev_alloc<int>(T * K);
    float *dw = dev_alloc<float>(T * K), *dimp = dev_alloc<float>(N), *dload = dev_alloc<float>(N), *ddz = dev_alloc<float>(T * N);
    for (int i = 0; i < 3; i++) CK(xft_cuda_route_forward(dl, XFT_F32, T, N, K, 1, 1, dex, dw, dcnt, doff, dord, dimp, dload, nullptr));
    cudaEventRecord(a, xft_cuda_stream());
    for (int i = 0; i < 20; i++) CK(xft_cuda_route_forward(dl, XFT_F32, T, N, K, 1, 1, dex, dw, dcnt, doff, dord, dimp, dload, nullptr));
    cudaEventRecord(b, xft_cuda_stream());
    cudaEventSynchronize(b);
    cudaEventElapsedTime(&ms, a, b);
    printf("bench route_forward T=%d N=%d K=%d: %.1f us\n", T, N, K, ms * 1000 / 20);
    cudaEventRecord(a, xft_cuda_stream());
    for (int i = 0; i < 20; i++) CK(xft_cuda_route_backward(dl, XFT_F32, T, N, K, 1, 1, dex, dw, dimp, ddz, nullptr));
    cudaEventRecord(b, xft_cuda_stream());
    cudaEventSynchronize(b);
    cudaEventElapsedTime(&ms, a, b);
    printf("bench route_backward T=%d N=%d K=%d: %.1f us\n", T, N, K, ms * 1000 / 20);
    for (void* p : {(void*)dl, (void*)dex, (void*)dcnt, (void*)doff, (void*)dord, (void*)dw, (void*)dimp, (void*)dload, (void*)ddz})
      CK(xft_cuda_free(p));
  }
  {  // merge, one 1.3B-sized layer: gate, up [5504, 2048], down [2048, 5504], E = 8, bf16
    const int E = 8;
    const size_t n = (size_t)5504 * 2048;
    std::vector<void*> st, out, dm;
    std::vector<size_t> sizes(3, n);
    for (int t = 0; t < 3; t++) {
      st.push_back(dev_alloc<uint16_t>(E * n));
      dm.push_back(dev_alloc<uint16_t>(n));
      out.push_back(dev_alloc<uint16_t>(n));
      CK(xft_cuda_memset(st.back(), 0, E * n * 2));
      CK(xft_cuda_memset(dm.back(), 0, n * 2));
    }
    std::vector<float> alpha(E - 1, 0.f);
    float *dal = dev_copy(alpha), *dda = dev_alloc<float>(E - 1);
    std::vector<const void*> cst(st.begin(), st.end()), cdm(dm.begin(), dm.end());
    CK(xft_cuda_merge_forward(cst.data(), out.data(), sizes.data(), 3, XFT_BF16, E, dal, 0.75f));
    cudaEventRecord(a, xft_cuda_stream());
    for (int i = 0; i < 10; i++) CK(xft_cuda_merge_forward(cst.data(), out.data(), sizes.data(), 3, XFT_BF16, E, dal, 0.75f));
    cudaEventRecord(b, xft_cuda_stream());
    cudaEventSynchronize(b);
    cudaEventElapsedTime(&ms, a, b);
    double bytes = 3.0 * n * 2 * (E + 1);
    printf("bench merge_forward 3 x %zu bf16, E=%d: %.1f us, %.0f GB/s\n", n, E, ms * 100, bytes / (ms / 10 * 1e-3) / 1e9);
    cudaEventRecord(a, xft_cuda_stream());
    for (int i = 0; i < 10; i++)
      CK(xft_cuda_merge_backward(cst.data(), cdm.data(), sizes.data(), 3, XFT_BF16, E, dal, 0.75f, dda, 1));
    cudaEventRecord(b, xft_cuda_stream());
    cudaEventSynchronize(b);
    cudaEventElapsedTime(&ms, a, b);
    printf("bench merge_backward 3 x %zu bf16, E=%d: %.1f us, %.0f GB/s\n", n, E, ms * 100, bytes / (ms / 10 * 1e-3) / 1e9);
    for (int t = 0; t < 3; t++) {
      CK(xft_cuda_free(st[t]));
      CK(xft_cuda_free(dm[t]));
      CK(xft_cuda_free(out[t]));
    }
    CK(xft_cuda_free(dal));
    CK(xft_cuda_free(dda));
  }
}

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  int count = 0;
  CK(xft_cuda_device_count(&count));
  if (count == 0) {
    printf("no CUDA device\n");
    return 0;
  }
  xft_cuda_device info;
  CK(xft_cuda_init(0, &info));
  printf("device: %s (sm_%d%d)\n", info.name, info.major, info.minor);

#ifndef XFT_DEV_SMALL
  const int shapes[][3] = {{37, 7, 6}, {1, 7, 6}, {20, 7, 2}, {15, 7, 8}, {10, 1, 2}, {50, 15, 4}, {0, 7, 6},
                           {4099, 7, 6}, {70000, 7, 6}, {300, 33, 5}, {257, 100, 9}, {64, 256, 257}, {40, 1024, 7},
                           {9, 1024, 1025}, {3000, 3, 4}, {1000, 32, 33}, {5000, 2, 2}, {130, 1, 1}};
  const std::vector<std::vector<size_t>> lists = {{1000, 4096, 7}, {65536, 3, 0}, {1, 257}, {}, {2048 * 16 + 5}};
#else  // for cuda/dev/emu (host emulation, slow)
  const int shapes[][3] = {{37, 7, 6}, {1, 7, 6}, {20, 7, 2}, {15, 7, 8}, {10, 1, 2}, {50, 15, 4}, {0, 7, 6},
                           {300, 7, 6}, {70, 33, 5}, {40, 100, 9}, {9, 256, 257}, {5, 1024, 7}, {3, 1024, 1025},
                           {200, 3, 4}, {100, 32, 33}, {150, 2, 2}, {130, 1, 1}};
  const std::vector<std::vector<size_t>> lists = {{1000, 4096, 7}, {6000, 3, 0}, {1, 257}, {}, {2048 * 3 + 5}};
#endif
  for (int dtype : {XFT_F32, XFT_BF16})
    for (int mode = 0; mode < 3; mode++) {
      const int normalize = mode != 1, shared = mode != 2;
      for (auto& s : shapes) {
        const int T = s[0], N = s[1];
        const int K = shared ? s[2] : std::min(s[2], N);
        const int S = shared ? K - 1 : K;
        if (S < 1 || S > N) continue;
        for (int kind = 0; kind < 3; kind++) test_route(T, N, K, normalize, shared, dtype, kind);
      }
    }

  for (int dtype : {XFT_F32, XFT_BF16})
    for (int E : {2, 8, 65, 130})
      for (float rate : {0.75f, 0.f, 1.f, -1.f})
        for (auto& l : lists) test_merge(E, dtype, rate, l, (E + (int)l.size()) % 2);

  if (argc > 1 && !strcmp(argv[1], "--bench")) bench();
  printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
