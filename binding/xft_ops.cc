// The three XFT op families: shared-expert routing, grouped expert GEMM, mixing-coefficient merge.
// lib/ops.ts validates shapes and dtypes and allocates outputs; this layer re-checks sizes and
// devices (a second line of defence against out-of-bounds access) and dispatches CPU or CUDA.
#include <vector>

#include "common.h"

namespace xft {

namespace {

const int kMaxRouteColumns = 1024;  // mirrored in lib/ops.ts (MAX_ROUTE_EXPERTS)

void CheckRouteShape(Napi::Env env, const char* op, int64_t T, int64_t N, int64_t K, bool shared) {
  if (T < 0 || N < 1 || N > kMaxRouteColumns)
    Throw(env, "XFT_SHAPE", std::string(op) + ": logits must be [T, N] with 1 <= N <= " + std::to_string(kMaxRouteColumns));
  int64_t S = shared ? K - 1 : K;
  if (S < 1 || S > N) Throw(env, "XFT_SHAPE", std::string(op) + ": topK out of range for " + std::to_string(N) + " logit columns");
}

// Every expert slot the backward reads (all K without a shared expert; the first K - 1 with one,
// as 1 + the logit column) names a logit column; else XFT_INDEX naming the entry.
void CheckRouteExperts(Napi::Env env, const char* op, const int* experts, int64_t T, int64_t K, int64_t N, bool shared) {
  const int64_t S = shared ? K - 1 : K, lo = shared ? 1 : 0;
  for (int64_t t = 0; t < T; t++)
    for (int64_t s = 0; s < S; s++) {
      const int e = experts[t * K + s];
      if (e < lo || e >= N + lo)
        Throw(env, "XFT_INDEX", std::string(op) + ": routing.experts[" + std::to_string(t) + ", " + std::to_string(s) +
                                    "] = " + std::to_string(e) + " is not an expert of this routing (expected " +
                                    std::to_string(lo) + " <= e <= " + std::to_string(N + lo - 1) +
                                    (shared ? "; slot K-1 is the shared expert 0" : "") + ")");
    }
}

// routeForward(logits, dtype, T, N, K, normalize, shared, experts, weights, counts, offsets, order, importance, load, probs?)
Napi::Value RouteForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "routeShared";
  Storage* logits = ArgStorage(info, 0, op, "logits");
  int dtype = ArgDtype(info, 1, op, "dtype");
  int64_t T = ArgInt(info, 2, op, "T"), N = ArgInt(info, 3, op, "N"), K = ArgInt(info, 4, op, "topK");
  bool normalize = info[5].ToBoolean(), shared = info[6].ToBoolean();
  CheckRouteShape(env, op, T, N, K, shared);
  int64_t E = shared ? N + 1 : N;
  Storage* experts = ArgStorage(info, 7, op, "experts");
  Storage* weights = ArgStorage(info, 8, op, "weights");
  Storage* counts = ArgStorage(info, 9, op, "counts");
  Storage* offsets = ArgStorage(info, 10, op, "offsets");
  Storage* order = ArgStorage(info, 11, op, "order");
  Storage* importance = ArgStorage(info, 12, op, "importance");
  Storage* load = ArgStorage(info, 13, op, "load");
  Storage* probs = ArgStorageOrNull(info, 14, op, "probs");
  RequireBytes(env, logits, T * N, dtype, op, "logits");
  RequireBytes(env, experts, T * K, XFT_I32, op, "experts");
  RequireBytes(env, weights, T * K, XFT_F32, op, "weights");
  RequireBytes(env, counts, E, XFT_I32, op, "counts");
  RequireBytes(env, offsets, E + 1, XFT_I32, op, "offsets");
  RequireBytes(env, order, T * K, XFT_I32, op, "order");
  RequireBytes(env, importance, N, XFT_F32, op, "importance");
  RequireBytes(env, load, N, XFT_F32, op, "load");
  RequireBytes(env, probs, N, XFT_F32, op, "probs");
  int device = CommonDevice(env, op, {logits, experts, weights, counts, offsets, order, importance, load, probs});
  XFT_DISPATCH(env, op, device, route_forward, logits->data, dtype, (int)T, (int)N, (int)K, normalize, shared,
               (int*)experts->data, (float*)weights->data, (int*)counts->data, (int*)offsets->data,
               (int*)order->data, (float*)importance->data, (float*)load->data,
               probs ? (float*)probs->data : nullptr);
  return env.Undefined();
}

// routeBackward(logits, dtype, T, N, K, normalize, shared, experts, dweights, dimportance|null, dlogits, dprobs?)
Napi::Value RouteBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "routeSharedBackward";
  Storage* logits = ArgStorage(info, 0, op, "logits");
  int dtype = ArgDtype(info, 1, op, "dtype");
  int64_t T = ArgInt(info, 2, op, "T"), N = ArgInt(info, 3, op, "N"), K = ArgInt(info, 4, op, "topK");
  bool normalize = info[5].ToBoolean(), shared = info[6].ToBoolean();
  CheckRouteShape(env, op, T, N, K, shared);
  Storage* experts = ArgStorage(info, 7, op, "experts");
  Storage* dweights = ArgStorage(info, 8, op, "dWeights");
  Storage* dimportance = ArgStorageOrNull(info, 9, op, "dImportance");
  Storage* dlogits = ArgStorage(info, 10, op, "dLogits");
  Storage* dprobs = ArgStorageOrNull(info, 11, op, "dProbs");
  RequireBytes(env, logits, T * N, dtype, op, "logits");
  RequireBytes(env, experts, T * K, XFT_I32, op, "experts");
  RequireBytes(env, dweights, T * K, XFT_F32, op, "dWeights");
  RequireBytes(env, dimportance, N, XFT_F32, op, "dImportance");
  RequireBytes(env, dlogits, T * N, dtype, op, "dLogits");
  RequireBytes(env, dprobs, N, XFT_F32, op, "dProbs");
  int device = CommonDevice(env, op, {logits, experts, dweights, dimportance, dlogits, dprobs});
  // the experts come from the caller: on the CPU check them here (one pass, before anything is
  // written); the CUDA kernel clamps them and reports an index fault at the next synchronisation
  if (device == DEV_CPU) CheckRouteExperts(env, op, (const int*)experts->data, T, K, N, shared);
  XFT_DISPATCH(env, op, device, route_backward, logits->data, dtype, (int)T, (int)N, (int)K, normalize, shared,
               (const int*)experts->data, (const float*)dweights->data,
               dimportance ? (const float*)dimportance->data : nullptr, dlogits->data,
               dprobs ? (const float*)dprobs->data : nullptr);
  return env.Undefined();
}

void CheckSwitchShape(Napi::Env env, const char* op, int64_t N, int64_t T, int64_t S) {
  if (N < 1 || N > kMaxRouteColumns || T < 0 || T > INT32_MAX || S < 1 || S > N)
    Throw(env, "XFT_SHAPE", std::string(op) + ": expected 1 <= N <= " + std::to_string(kMaxRouteColumns) +
                                " experts, T >= 0 tokens and 1 <= selected <= N");
}

// switchLossForward(probs, load, N, T, S, weight, loss)
Napi::Value SwitchLossForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "switchLoss";
  Storage* probs = ArgStorage(info, 0, op, "probs");
  Storage* load = ArgStorage(info, 1, op, "load");
  int64_t N = ArgInt(info, 2, op, "N"), T = ArgInt(info, 3, op, "tokens"), S = ArgInt(info, 4, op, "selected");
  double weight = ArgNumber(info, 5, op, "weight");
  Storage* loss = ArgStorage(info, 6, op, "loss");
  CheckSwitchShape(env, op, N, T, S);
  RequireBytes(env, probs, N, XFT_F32, op, "probs");
  RequireBytes(env, load, N, XFT_F32, op, "load");
  RequireBytes(env, loss, 1, XFT_F32, op, "loss");
  int device = CommonDevice(env, op, {probs, load, loss});
  XFT_DISPATCH(env, op, device, switch_loss_forward, (const float*)probs->data, (const float*)load->data, (int)N, (int)T,
               (int)S, (float)weight, (float*)loss->data);
  return env.Undefined();
}

// switchLossBackward(load, N, T, S, weight, dloss, dProbs)
Napi::Value SwitchLossBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "switchLossBackward";
  Storage* load = ArgStorage(info, 0, op, "load");
  int64_t N = ArgInt(info, 1, op, "N"), T = ArgInt(info, 2, op, "tokens"), S = ArgInt(info, 3, op, "selected");
  double weight = ArgNumber(info, 4, op, "weight"), dloss = ArgNumber(info, 5, op, "dLoss");
  Storage* dprobs = ArgStorage(info, 6, op, "dProbs");
  CheckSwitchShape(env, op, N, T, S);
  RequireBytes(env, load, N, XFT_F32, op, "load");
  RequireBytes(env, dprobs, N, XFT_F32, op, "dProbs");
  int device = CommonDevice(env, op, {load, dprobs});
  XFT_DISPATCH(env, op, device, switch_loss_backward, (const float*)load->data, (int)N, (int)T, (int)S, (float)weight,
               (float)dloss, (float*)dprobs->data);
  return env.Undefined();
}

void CheckGemmShape(Napi::Env env, const char* op, int64_t M, int64_t n, int64_t k, int64_t E, int dtype) {
  if (M < 0 || n < 1 || k < 1 || E < 1 || M > INT32_MAX || n > INT32_MAX || k > INT32_MAX)
    Throw(env, "XFT_SHAPE", std::string(op) + ": invalid sizes M=" + std::to_string(M) + " n=" + std::to_string(n) +
                                " k=" + std::to_string(k) + " E=" + std::to_string(E));
  if (dtype == XFT_I32) Throw(env, "XFT_DTYPE", std::string(op) + ": expected f32 or bf16 operands, got i32");
}

// groupedGemmForward(x, w, offsets, y, dtype, M, n, k, E)
Napi::Value GroupedGemmForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "groupedGemm";
  Storage* x = ArgStorage(info, 0, op, "x");
  Storage* w = ArgStorage(info, 1, op, "w");
  Storage* offsets = ArgStorage(info, 2, op, "offsets");
  Storage* y = ArgStorage(info, 3, op, "y");
  int dtype = ArgDtype(info, 4, op, "dtype");
  int64_t M = ArgInt(info, 5, op, "M"), n = ArgInt(info, 6, op, "n"), k = ArgInt(info, 7, op, "k"),
          E = ArgInt(info, 8, op, "E");
  CheckGemmShape(env, op, M, n, k, E, dtype);
  RequireBytes(env, x, M * k, dtype, op, "x");
  RequireBytes(env, w, E * n * k, dtype, op, "w");
  RequireBytes(env, offsets, E + 1, XFT_I32, op, "offsets");
  RequireBytes(env, y, M * n, dtype, op, "y");
  int device = CommonDevice(env, op, {x, w, offsets, y});
  XFT_DISPATCH(env, op, device, grouped_gemm_forward, x->data, w->data, (const int*)offsets->data, y->data, dtype,
               (int)M, (int)n, (int)k, (int)E);
  return env.Undefined();
}

// groupedGemmBackward(x, w, offsets, dy, dx|null, dw|null, dtype, M, n, k, E, accumulate, dwDtype, dxAccumulate?)
Napi::Value GroupedGemmBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "groupedGemmBackward";
  Storage* x = ArgStorage(info, 0, op, "x");
  Storage* w = ArgStorage(info, 1, op, "w");
  Storage* offsets = ArgStorage(info, 2, op, "offsets");
  Storage* dy = ArgStorage(info, 3, op, "dy");
  Storage* dx = ArgStorageOrNull(info, 4, op, "dx");
  Storage* dw = ArgStorageOrNull(info, 5, op, "dw");
  int dtype = ArgDtype(info, 6, op, "dtype");
  int64_t M = ArgInt(info, 7, op, "M"), n = ArgInt(info, 8, op, "n"), k = ArgInt(info, 9, op, "k"),
          E = ArgInt(info, 10, op, "E");
  bool accumulate = info[11].ToBoolean();
  int dw_dtype = ArgDtype(info, 12, op, "dwDtype");
  bool dx_accumulate = info.Length() > 13 && info[13].ToBoolean();
  if (dw_dtype != dtype && dw_dtype != XFT_F32)
    Throw(env, "XFT_DTYPE", std::string(op) + ": dw must have the inputs' dtype or f32");
  CheckGemmShape(env, op, M, n, k, E, dtype);
  RequireBytes(env, x, M * k, dtype, op, "x");
  RequireBytes(env, w, E * n * k, dtype, op, "w");
  RequireBytes(env, offsets, E + 1, XFT_I32, op, "offsets");
  RequireBytes(env, dy, M * n, dtype, op, "dy");
  RequireBytes(env, dx, M * k, dtype, op, "dx");
  RequireBytes(env, dw, E * n * k, dw_dtype, op, "dw");
  int device = CommonDevice(env, op, {x, w, offsets, dy, dx, dw});
  XFT_DISPATCH(env, op, device, grouped_gemm_backward, x->data, w->data, (const int*)offsets->data, dy->data,
               dx ? dx->data : nullptr, dw ? dw->data : nullptr, dtype, dw_dtype, (int)M, (int)n, (int)k, (int)E,
               accumulate, dx_accumulate);
  return env.Undefined();
}

// The gather of the fused gate/up GEMMs: null (x has M rows) or i32 [M] with a divisor >= 1 (x has S rows).
struct Gather {
  Storage* index;
  int64_t div, S;
};
Gather ArgGather(const Napi::CallbackInfo& info, size_t i, const char* op, int64_t M) {
  Napi::Env env = info.Env();
  Gather g = {ArgStorageOrNull(info, i, op, "gather"), ArgInt(info, i + 1, op, "gatherDiv"), ArgInt(info, i + 2, op, "S")};
  if (g.div < 1 || g.S < 0 || g.S > INT32_MAX) Throw(env, "XFT_SHAPE", std::string(op) + ": expected gatherDiv >= 1 and 0 <= S");
  if (!g.index && g.S != M) Throw(env, "XFT_SHAPE", std::string(op) + ": without a gather x must have M = " + std::to_string(M) + " rows");
  RequireBytes(env, g.index, M, XFT_I32, op, "gather");
  return g;
}

// gateupForward(x, gather|null, gatherDiv, S, wGate, wUp, offsets, gu, h, dtype, M, f, d, E)
Napi::Value GateupForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "gateUp";
  Storage* x = ArgStorage(info, 0, op, "x");
  int64_t M = ArgInt(info, 10, op, "M"), f = ArgInt(info, 11, op, "f"), d = ArgInt(info, 12, op, "d"), E = ArgInt(info, 13, op, "E");
  int dtype = ArgDtype(info, 9, op, "dtype");
  CheckGemmShape(env, op, M, f, d, E, dtype);
  Gather g = ArgGather(info, 1, op, M);
  Storage* wg = ArgStorage(info, 4, op, "wGate");
  Storage* wu = ArgStorage(info, 5, op, "wUp");
  Storage* offsets = ArgStorage(info, 6, op, "offsets");
  Storage* gu = ArgStorage(info, 7, op, "gu");
  Storage* h = ArgStorage(info, 8, op, "h");
  RequireBytes(env, x, g.S * d, dtype, op, "x");
  RequireBytes(env, wg, E * f * d, dtype, op, "wGate");
  RequireBytes(env, wu, E * f * d, dtype, op, "wUp");
  RequireBytes(env, offsets, E + 1, XFT_I32, op, "offsets");
  RequireBytes(env, gu, M * 2 * f, dtype, op, "gu");
  RequireBytes(env, h, M * f, dtype, op, "h");
  int device = CommonDevice(env, op, {x, g.index, wg, wu, offsets, gu, h});
  XFT_DISPATCH(env, op, device, gateup_forward, x->data, g.index ? (const int*)g.index->data : nullptr, (int)g.div,
               (int)g.S, wg->data, wu->data, (const int*)offsets->data, gu->data, h->data, dtype, (int)M, (int)f, (int)d,
               (int)E);
  return env.Undefined();
}

// swigluDownBackward(dy, wDown, offsets, gu, dgu, h, dtype, M, f, d, E)
Napi::Value SwigluDownBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "swigluDownBackward";
  Storage* dy = ArgStorage(info, 0, op, "dy");
  Storage* wd = ArgStorage(info, 1, op, "wDown");
  Storage* offsets = ArgStorage(info, 2, op, "offsets");
  Storage* gu = ArgStorage(info, 3, op, "gu");
  Storage* dgu = ArgStorage(info, 4, op, "dgu");
  Storage* h = ArgStorage(info, 5, op, "h");
  int dtype = ArgDtype(info, 6, op, "dtype");
  int64_t M = ArgInt(info, 7, op, "M"), f = ArgInt(info, 8, op, "f"), d = ArgInt(info, 9, op, "d"), E = ArgInt(info, 10, op, "E");
  CheckGemmShape(env, op, M, f, d, E, dtype);
  RequireBytes(env, dy, M * d, dtype, op, "dy");
  RequireBytes(env, wd, E * d * f, dtype, op, "wDown");
  RequireBytes(env, offsets, E + 1, XFT_I32, op, "offsets");
  RequireBytes(env, gu, M * 2 * f, dtype, op, "gu");
  RequireBytes(env, dgu, M * 2 * f, dtype, op, "dgu");
  RequireBytes(env, h, M * f, dtype, op, "h");
  int device = CommonDevice(env, op, {dy, wd, offsets, gu, dgu, h});
  XFT_DISPATCH(env, op, device, swiglu_down_backward, dy->data, wd->data, (const int*)offsets->data, gu->data, dgu->data,
               h->data, dtype, (int)M, (int)f, (int)d, (int)E);
  return env.Undefined();
}

// qkvForward(x, wq, wk, wv, offsets, q, k, v, dtype, M, nq, nk, d)
Napi::Value QkvForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "qkv";
  Storage* x = ArgStorage(info, 0, op, "x");
  Storage* wq = ArgStorage(info, 1, op, "wq");
  Storage* wk = ArgStorage(info, 2, op, "wk");
  Storage* wv = ArgStorage(info, 3, op, "wv");
  Storage* offsets = ArgStorage(info, 4, op, "offsets");
  Storage* q = ArgStorage(info, 5, op, "q");
  Storage* k = ArgStorage(info, 6, op, "k");
  Storage* v = ArgStorage(info, 7, op, "v");
  int dtype = ArgDtype(info, 8, op, "dtype");
  int64_t M = ArgInt(info, 9, op, "M"), nq = ArgInt(info, 10, op, "nq"), nk = ArgInt(info, 11, op, "nk"), d = ArgInt(info, 12, op, "d");
  CheckGemmShape(env, op, M, nq + 2 * nk, d, 1, dtype);
  if (nq < 1 || nk < 1) Throw(env, "XFT_SHAPE", std::string(op) + ": expected nq, nk >= 1");
  RequireBytes(env, x, M * d, dtype, op, "x");
  RequireBytes(env, wq, nq * d, dtype, op, "wq");
  RequireBytes(env, wk, nk * d, dtype, op, "wk");
  RequireBytes(env, wv, nk * d, dtype, op, "wv");
  RequireBytes(env, offsets, 2, XFT_I32, op, "offsets");
  RequireBytes(env, q, M * nq, dtype, op, "q");
  RequireBytes(env, k, M * nk, dtype, op, "k");
  RequireBytes(env, v, M * nk, dtype, op, "v");
  int device = CommonDevice(env, op, {x, wq, wk, wv, offsets, q, k, v});
  XFT_DISPATCH(env, op, device, qkv_forward, x->data, wq->data, wk->data, wv->data, (const int*)offsets->data, q->data,
               k->data, v->data, dtype, (int)M, (int)nq, (int)nk, (int)d);
  return env.Undefined();
}

// gateupBackward(x, gather|null, gatherDiv, S, wGate, wUp, offsets, dgu, dx|null, dwGate|null, dwUp|null, dtype,
//                dwDtype, M, f, d, E, accumulate, dxAccumulate)
Napi::Value GateupBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "gateUpBackward";
  Storage* x = ArgStorage(info, 0, op, "x");
  int dtype = ArgDtype(info, 11, op, "dtype"), dw_dtype = ArgDtype(info, 12, op, "dwDtype");
  int64_t M = ArgInt(info, 13, op, "M"), f = ArgInt(info, 14, op, "f"), d = ArgInt(info, 15, op, "d"), E = ArgInt(info, 16, op, "E");
  bool accumulate = info[17].ToBoolean(), dx_accumulate = info[18].ToBoolean();
  if (dw_dtype != dtype && dw_dtype != XFT_F32)
    Throw(env, "XFT_DTYPE", std::string(op) + ": dw must have the inputs' dtype or f32");
  CheckGemmShape(env, op, M, f, d, E, dtype);
  Gather g = ArgGather(info, 1, op, M);
  Storage* wg = ArgStorage(info, 4, op, "wGate");
  Storage* wu = ArgStorage(info, 5, op, "wUp");
  Storage* offsets = ArgStorage(info, 6, op, "offsets");
  Storage* dgu = ArgStorage(info, 7, op, "dgu");
  Storage* dx = ArgStorageOrNull(info, 8, op, "dx");
  Storage* dwg = ArgStorageOrNull(info, 9, op, "dwGate");
  Storage* dwu = ArgStorageOrNull(info, 10, op, "dwUp");
  if (!dwg != !dwu) Throw(env, "XFT_TYPE", std::string(op) + ": dwGate and dwUp are both given or both null");
  RequireBytes(env, x, g.S * d, dtype, op, "x");
  RequireBytes(env, wg, E * f * d, dtype, op, "wGate");
  RequireBytes(env, wu, E * f * d, dtype, op, "wUp");
  RequireBytes(env, offsets, E + 1, XFT_I32, op, "offsets");
  RequireBytes(env, dgu, M * 2 * f, dtype, op, "dgu");
  RequireBytes(env, dx, M * d, dtype, op, "dx");
  RequireBytes(env, dwg, E * f * d, dw_dtype, op, "dwGate");
  RequireBytes(env, dwu, E * f * d, dw_dtype, op, "dwUp");
  int device = CommonDevice(env, op, {x, g.index, wg, wu, offsets, dgu, dx, dwg, dwu});
  XFT_DISPATCH(env, op, device, gateup_backward, x->data, g.index ? (const int*)g.index->data : nullptr, (int)g.div,
               (int)g.S, wg->data, wu->data, (const int*)offsets->data, dgu->data, dx ? dx->data : nullptr,
               dwg ? dwg->data : nullptr, dwu ? dwu->data : nullptr, dtype, dw_dtype, (int)M, (int)f, (int)d, (int)E,
               accumulate, dx_accumulate);
  return env.Undefined();
}

// The lists of the merge ops: expert stacks [E, numel] and their merged counterparts [numel].
struct MergeLists {
  std::vector<const void*> stacks;
  std::vector<void*> merged;
  std::vector<size_t> numel;
  std::vector<Storage*> storages;
};

MergeLists ArgMergeLists(const Napi::CallbackInfo& info, const char* op, const char* merged_name, int dtype, int64_t E) {
  Napi::Env env = info.Env();
  if (!info[0].IsArray() || !info[1].IsArray() || !info[2].IsArray())
    Throw(env, "XFT_TYPE", std::string(op) + ": weights, " + merged_name + " and numel must be arrays");
  Napi::Array w = info[0].As<Napi::Array>(), m = info[1].As<Napi::Array>(), ne = info[2].As<Napi::Array>();
  if (w.Length() != m.Length() || w.Length() != ne.Length())
    Throw(env, "XFT_SHAPE", std::string(op) + ": weights and " + merged_name + " must have the same length");
  MergeLists L;
  for (uint32_t t = 0; t < w.Length(); t++) {
    Napi::Value wv = w.Get(t), mv = m.Get(t), nv = ne.Get(t);
    Storage* ws = ValueStorage(env, wv, op, "weights[i]");
    Storage* ms = ValueStorage(env, mv, op, merged_name);
    if (!nv.IsNumber()) Throw(env, "XFT_TYPE", std::string(op) + ": numel must be numbers");
    size_t n = (size_t)nv.As<Napi::Number>().Int64Value();
    RequireBytes(env, ws, (size_t)E * n, dtype, op, "weights[i]");
    RequireBytes(env, ms, n, dtype, op, merged_name);
    L.stacks.push_back(ws->data);
    L.merged.push_back(ms->data);
    L.numel.push_back(n);
    L.storages.push_back(ws);
    L.storages.push_back(ms);
  }
  return L;
}

int ListDevice(Napi::Env env, const char* op, const std::vector<Storage*>& storages, std::initializer_list<Storage*> more) {
  int device = CommonDevice(env, op, more);
  for (Storage* s : storages)
    if (s->device != device) Throw(env, "XFT_DEVICE", std::string(op) + ": all tensors must be on one device");
  return device;
}

void CheckMergeArgs(Napi::Env env, const char* op, int dtype, int64_t E, double shared_rate) {
  if (E < 2 || E > 1024) Throw(env, "XFT_SHAPE", std::string(op) + ": expected 2 <= E <= 1024 experts");
  if (dtype == XFT_I32) Throw(env, "XFT_DTYPE", std::string(op) + ": expected f32 or bf16 weights, got i32");
  if (shared_rate > 1.0 || !(shared_rate == shared_rate))
    Throw(env, "XFT_VALUE", std::string(op) + ": sharedRate must be in [0, 1] (or negative for none)");
}

// mergeForward(stacks[], merged[], numel[], dtype, E, alpha, sharedRate)
Napi::Value MergeForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "mergeExperts";
  int dtype = ArgDtype(info, 3, op, "dtype");
  int64_t E = ArgInt(info, 4, op, "E");
  Storage* alpha = ArgStorage(info, 5, op, "alpha");
  double shared_rate = ArgNumber(info, 6, op, "sharedRate");
  CheckMergeArgs(env, op, dtype, E, shared_rate);
  MergeLists L = ArgMergeLists(info, op, "merged", dtype, E);
  RequireBytes(env, alpha, shared_rate >= 0 ? E - 1 : E, XFT_F32, op, "alpha");
  int device = ListDevice(env, op, L.storages, {alpha});
  XFT_DISPATCH(env, op, device, merge_forward, L.stacks.data(), L.merged.data(), L.numel.data(), (int)L.numel.size(),
               dtype, (int)E, (const float*)alpha->data, (float)shared_rate);
  return env.Undefined();
}

// mergeBackward(stacks[], dmerged[], numel[], dtype, E, alpha, sharedRate, dalpha, accumulate)
Napi::Value MergeBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "mergeExpertsBackward";
  int dtype = ArgDtype(info, 3, op, "dtype");
  int64_t E = ArgInt(info, 4, op, "E");
  Storage* alpha = ArgStorage(info, 5, op, "alpha");
  double shared_rate = ArgNumber(info, 6, op, "sharedRate");
  Storage* dalpha = ArgStorage(info, 7, op, "dAlpha");
  bool accumulate = info[8].ToBoolean();
  CheckMergeArgs(env, op, dtype, E, shared_rate);
  MergeLists L = ArgMergeLists(info, op, "dMerged", dtype, E);
  int64_t A = shared_rate >= 0 ? E - 1 : E;
  RequireBytes(env, alpha, A, XFT_F32, op, "alpha");
  RequireBytes(env, dalpha, A, XFT_F32, op, "dAlpha");
  int device = ListDevice(env, op, L.storages, {alpha, dalpha});
  std::vector<const void*> dmerged(L.merged.begin(), L.merged.end());
  XFT_DISPATCH(env, op, device, merge_backward, L.stacks.data(), dmerged.data(), L.numel.data(), (int)L.numel.size(),
               dtype, (int)E, (const float*)alpha->data, (float)shared_rate, (float*)dalpha->data, accumulate);
  return env.Undefined();
}

// cpuGemm() -> { kernel, threads }: the CPU GEMM's kernel in use (XFT_CPU_REFERENCE, XFT_CPU_ISA) and
// the CPU backend's thread count (XFT_NUM_THREADS), as they stand now
Napi::Value CpuGemm(const Napi::CallbackInfo& info) {
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("kernel", xft_cpu_gemm_kernel_name());
  o.Set("threads", xft_cpu::threads());
  return o;
}

// cpuPeak(threads, ms) -> GFLOP/s: the machine's fused multiply-add ceiling on `threads` threads at once,
// register-only, with the instruction set of the GEMM's kernel (whatever XFT_CPU_REFERENCE says), measured
// for about ms; bench/cpu sets its GEMM figures beside it. Blocks the calling thread for that long.
Napi::Value CpuPeak(const Napi::CallbackInfo& info) {
  const char* op = "cpuPeak";
  const int64_t threads = ArgInt(info, 0, op, "threads");
  const double ms = ArgNumber(info, 1, op, "ms");
  if (threads < 1 || threads > 1024) Throw(info.Env(), "XFT_VALUE", std::string(op) + ": threads must be an integer in [1, 1024]");
  if (!(ms >= 1 && ms <= 60000)) Throw(info.Env(), "XFT_VALUE", std::string(op) + ": ms must be a number in [1, 60000]");
  const double gflops = xft_cpu_peak_gflops((int)threads, ms);
  if (gflops < 0) Throw(info.Env(), "XFT_OOM", std::string(op) + ": out of resources: could not start " + std::to_string(threads) + " threads");
  return Napi::Number::New(info.Env(), gflops);
}

}  // namespace

void RegisterXftOps(Napi::Env env, Napi::Object exports) {
  exports.Set("routeForward", Napi::Function::New(env, RouteForward, "routeForward"));
  exports.Set("routeBackward", Napi::Function::New(env, RouteBackward, "routeBackward"));
  exports.Set("switchLossForward", Napi::Function::New(env, SwitchLossForward, "switchLossForward"));
  exports.Set("switchLossBackward", Napi::Function::New(env, SwitchLossBackward, "switchLossBackward"));
  exports.Set("groupedGemmForward", Napi::Function::New(env, GroupedGemmForward, "groupedGemmForward"));
  exports.Set("groupedGemmBackward", Napi::Function::New(env, GroupedGemmBackward, "groupedGemmBackward"));
  exports.Set("gateupForward", Napi::Function::New(env, GateupForward, "gateupForward"));
  exports.Set("swigluDownBackward", Napi::Function::New(env, SwigluDownBackward, "swigluDownBackward"));
  exports.Set("gateupBackward", Napi::Function::New(env, GateupBackward, "gateupBackward"));
  exports.Set("qkvForward", Napi::Function::New(env, QkvForward, "qkvForward"));
  exports.Set("mergeForward", Napi::Function::New(env, MergeForward, "mergeForward"));
  exports.Set("mergeBackward", Napi::Function::New(env, MergeBackward, "mergeBackward"));
  exports.Set("cpuGemm", Napi::Function::New(env, CpuGemm, "cpuGemm"));
  exports.Set("cpuPeak", Napi::Function::New(env, CpuPeak, "cpuPeak"));
}

}  // namespace xft
